"""Redis absent, dying, slow, full: the gateway keeps answering correctly and promptly."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder
from tests.helpers import embed, fetch_stats, vectors
from tests.servers import RedisServer, SlowProxy, free_port

pytestmark = pytest.mark.slow


def test_absent_at_start_serves_degraded(gateway_factory, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_timeout_ms=100)
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "degraded"
    response = embed(live.url, ["no redis here"])
    np.testing.assert_allclose(vectors(response), minilm_encoder.embed(["no redis here"]), atol=1e-6)


def test_circuit_breaker_opens_then_closes(gateway_factory, fresh_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(
        redis_url=fresh_redis.url, cache_timeout_ms=100, cache_breaker_failures=2, cache_breaker_seconds=1.0
    )
    embed(live.url, ["breaker text"])
    assert fetch_stats(live.url)["cache"]["circuit"] == "closed"
    fresh_redis.stop()
    for i in range(3):
        embed(live.url, [f"while down {i}"])
    stats = fetch_stats(live.url)
    assert stats["cache"]["circuit"] == "open"
    assert stats["cache"]["circuit_opened"] == 1
    errors = stats["cache"]["errors"]
    started = time.monotonic()
    embed(live.url, ["breaker text"])
    assert time.monotonic() - started < 0.5
    assert fetch_stats(live.url)["cache"]["errors"] == errors + 1  # skipped, counted, not waited for

    fresh_redis.start()
    time.sleep(1.1)
    assert fetch_stats(live.url)["cache"]["circuit"] == "half-open"
    embed(live.url, ["after restart"])  # the probe succeeds and closes the circuit
    assert fetch_stats(live.url)["cache"]["circuit"] == "closed"
    time.sleep(0.3)
    hits = fetch_stats(live.url)["cache"]["hits"]
    embed(live.url, ["after restart"])
    assert fetch_stats(live.url)["cache"]["hits"] == hits + 1


def test_slow_redis_costs_at_most_the_timeout(
    gateway_factory, fresh_redis: RedisServer, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    proxy = SlowProxy(fresh_redis.port)
    try:
        live = gateway_factory(redis_url=proxy.url, cache_timeout_ms=150, cache_breaker_failures=100)
        embed(live.url, ["slow one", "slow two"])
        proxy.delay = 1.0  # every Redis reply now stalls for a second
        for texts in (["slow one", "slow two"], ["brand new text"]):
            started = time.monotonic()
            response = embed(live.url, texts)
            elapsed = time.monotonic() - started
            assert elapsed < 0.6, f"a stalled Redis held the request for {elapsed:.2f}s"
            np.testing.assert_allclose(vectors(response), minilm_encoder.embed(texts), atol=1e-6)
        assert fetch_stats(live.url)["cache"]["errors"] >= 2
    finally:
        proxy.close()


def test_full_redis_with_lru_keeps_serving(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path, None, "--maxmemory", "1mb", "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        live = gateway_factory(redis_url=server.url)
        for batch in range(30):
            embed(live.url, [f"filler {batch}-{i} for a small redis" for i in range(32)])
        time.sleep(0.5)
        stats = fetch_stats(live.url)
        assert stats["cache"]["errors"] == 0
        assert stats["cache"]["writes"] == 30 * 32
        info = server.client().info("stats")
        assert info["evicted_keys"] > 0, "the test must actually fill Redis"
    finally:
        server.stop()


def test_killed_under_load_no_5xx_every_vector_right(
    gateway_factory, fresh_redis: RedisServer, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    import threading

    live = gateway_factory(redis_url=fresh_redis.url, cache_timeout_ms=100)
    pool = [f"kill test text number {i}" for i in range(40)]
    reference = dict(zip(pool, minilm_encoder.embed(pool), strict=True))
    failures: list[str] = []
    stop = time.monotonic() + 6

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                texts = list(rng.choice(pool, size=int(rng.integers(1, 6)), replace=False))
                response = http.post(f"{live.url}/v1/embeddings", json={"input": texts, "encoding_format": "float"})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                got = [item["embedding"] for item in response.json()["data"]]
                for text, vector in zip(texts, got, strict=True):
                    if not np.allclose(vector, reference[text], atol=1e-5):
                        failures.append(f"wrong vector for {text!r}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    fresh_redis.stop()
    time.sleep(2)
    fresh_redis.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert fetch_stats(live.url)["cache"]["errors"] >= 1


def test_a_read_only_replica_is_degraded_health_and_one_log_line(
    gateway_factory, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Before: /health said ok while every write failed, and each request logged a warning."""
    import logging

    replica = RedisServer(tmp_path, None, "--replicaof", "127.0.0.1", str(redis_server.port))
    replica.start()
    try:
        live = gateway_factory(redis_url=replica.url)
        with caplog.at_level(logging.WARNING, logger="gateway"):
            for i in range(8):
                response = httpx.post(f"{live.url}/v1/embeddings", json={"input": [f"text {i} for a replica"]})
                assert response.status_code == 200
                time.sleep(0.05)
            deadline = time.monotonic() + 5
            while httpx.get(f"{live.url}/health").json()["cache"]["status"] != "degraded":
                assert time.monotonic() < deadline, "health must say the cache is degraded"
                time.sleep(0.05)
        health = httpx.get(f"{live.url}/health").json()
        assert health["status"] == "degraded"
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 200, "a degraded cache does not make the server unready"
        assert ready.json()["cache"] == "degraded"
        # The breaker says it once when writes start failing and once when it opens; the service
        # adds nothing of its own for a failure the breaker already logged. Never once per request.
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "writ" in r.getMessage()]
        assert 1 <= len(warnings) <= 2, warnings
    finally:
        replica.stop()
