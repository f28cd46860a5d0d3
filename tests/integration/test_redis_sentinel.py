"""The vector cache behind Redis Sentinel: a master, its replica and a sentinel on free ports, with a
password; the URL lists a dead sentinel first. Killing the master promotes the replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder
from support.processes import RedisSentinelSetup, free_port
from tests.helpers import embed, fetch_stats, vectors

pytestmark = pytest.mark.slow

TEXTS = [f"sentinel text {i}" for i in range(12)]


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[RedisSentinelSetup]:
    setup = RedisSentinelSetup(tmp_path, master_name="vectors", password="sentinel-secret")
    setup.start()
    yield setup
    setup.stop()


def drain(gateway) -> None:  # type: ignore[no-untyped-def]
    service = gateway.server.config.app.state.runtime.service
    deadline = time.monotonic() + 5
    while service.pending_writes and time.monotonic() < deadline:
        time.sleep(0.01)


def test_master_failover_keeps_200_and_hits_resume(
    gateway_factory, sentinel_setup: RedisSentinelSetup, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    url = sentinel_setup.url(free_port())  # a sentinel that is down, then the live one
    live = gateway_factory(
        redis_url=url,
        redis_mode="sentinel",
        redis_sentinel_master="vectors",
        cache_timeout_ms=200,
        cache_breaker_failures=3,
        cache_breaker_seconds=0.5,
    )
    embed(live.url, TEXTS)
    drain(live)
    stats = fetch_stats(live.url)["cache"]
    assert stats["backend"] == "redis-sentinel" and stats["writes"] == len(TEXTS) and stats["errors"] == 0
    embed(live.url, TEXTS)
    assert fetch_stats(live.url)["cache"]["hits"] == len(TEXTS)
    replica = sentinel_setup._client(sentinel_setup.replica)
    deadline = time.monotonic() + 10
    while replica.dbsize() < len(TEXTS) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replica.dbsize() == len(TEXTS), "the replica must hold the vectors before the master dies"

    reference = minilm_encoder.embed(TEXTS)
    failures: list[str] = []
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                response = http.post(f"{live.url}/v1/embeddings", json={"input": TEXTS, "encoding_format": "float"})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                got = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
                if not np.allclose(got, reference, atol=1e-5):
                    failures.append("wrong vector")
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        sentinel_setup.master.stop()
        sentinel_setup.wait_for_failover(timeout=30)
        time.sleep(0.5)  # the clients keep going through the switch
    finally:
        done.set()
        for thread in threads:
            thread.join()
    # Hits resume from the promoted replica (it had every vector); nothing else sends requests now.
    deadline = time.monotonic() + 15
    resumed = False
    while time.monotonic() < deadline and not resumed:
        before = fetch_stats(live.url)["cache"]["hits"]
        embed(live.url, TEXTS)
        resumed = fetch_stats(live.url)["cache"]["hits"] - before == len(TEXTS)
        time.sleep(0.1)
    assert failures == []
    assert resumed, "hits did not resume on the promoted replica"
    stats = fetch_stats(live.url)["cache"]
    assert stats["errors"] >= 1, "the dead master must have been noticed"
    # New texts are written to the new master.
    new = ["written after the failover"]
    embed(live.url, new)
    drain(live)
    assert replica.exists(live.server.config.app.state.runtime.service.key(new[0]))
    response = embed(live.url, new)
    np.testing.assert_allclose(vectors(response), minilm_encoder.embed(new), atol=1e-6)
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
