"""EMBED_DEVICES=cpu,cpu (issue 20): two engine processes behind the HTTP worker, on the CPU.

One gateway serves the module (two MiniLM engines, one core each, one worker); the tests run in
file order: routing spreads the misses over both engines, /stats and /metrics report each engine,
a killed engine's work goes to the other with no client seeing an error, and the restarted engine
takes work again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import GatewayProcess

pytestmark = pytest.mark.slow


def _engines(gateway: GatewayProcess) -> list[int]:
    """The supervisor's live engine processes, in start order."""
    assert gateway.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == gateway.process.pid and fields[0] != "Z" and "-m gateway engine" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _stats(gateway: GatewayProcess) -> dict[str, object]:
    response = httpx.get(f"{gateway.url}/stats", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _engine_batches(gateway: GatewayProcess) -> list[int]:
    engines = _stats(gateway)["engines"]
    assert isinstance(engines, list)
    return [int(engine["batches"]) for engine in engines]


def _post(gateway: GatewayProcess, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/embeddings", json={"input": texts}, timeout=60)


@pytest.fixture(scope="module")
def engines_gateway(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_DEVICES": "cpu,cpu",
            "EMBED_CACHE": "false",  # every request is a miss: the engines see all of them
            "EMBED_SHUTDOWN_TIMEOUT_S": "10",
        },
        tmp_path_factory.mktemp("engines") / "gateway.log",
    )
    gateway.start_when(lambda: httpx.get(f"{gateway.url}/readyz", timeout=1).status_code == 200, timeout=180)
    yield gateway
    gateway.stop()
    print(gateway.log()[-3000:])


def test_two_engines_start_each_on_its_share_of_the_cores(engines_gateway: GatewayProcess) -> None:
    assert len(_engines(engines_gateway)) == 2
    engines = _stats(engines_gateway)["engines"]
    assert isinstance(engines, list)
    assert [(e["index"], e["device"], e["up"]) for e in engines] == [(0, "cpu", True), (1, "cpu", True)]


def test_concurrent_misses_are_spread_over_both_engines(engines_gateway: GatewayProcess) -> None:
    before = _engine_batches(engines_gateway)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _post(engines_gateway, [f"spread {i} {j}" for j in range(16)]), range(48)))
    assert {answer.status_code for answer in answers} == {200}
    after = _engine_batches(engines_gateway)
    gained = [a - b for a, b in zip(after, before, strict=True)]
    assert all(count > 0 for count in gained), f"passes per engine: {gained}"
    # the least-loaded rule keeps them within a factor of each other, not one doing it all
    assert min(gained) * 4 >= max(gained), gained


def test_both_engines_compute_the_same_vectors(engines_gateway: GatewayProcess) -> None:
    texts = [f"the same vector from either engine {i}" for i in range(4)]
    with ThreadPoolExecutor(8) as pool:  # concurrent, so both engines answer some of them
        answers = list(pool.map(lambda _: _post(engines_gateway, texts), range(16)))
    vectors = [np.array([row["embedding"] for row in answer.json()["data"]]) for answer in answers]
    for other in vectors[1:]:
        np.testing.assert_allclose(other, vectors[0], atol=1e-5)


def test_metrics_label_each_engine(engines_gateway: GatewayProcess) -> None:
    text = httpx.get(f"{engines_gateway.url}/metrics", timeout=10).text
    seen = {
        (sample.name, sample.labels["engine"], sample.labels["device"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("embedding_engine_")
    }
    for index in ("0", "1"):
        assert seen[("embedding_engine_up", index, "cpu")] == 1.0
        assert seen[("embedding_engine_batches", index, "cpu")] > 0
        assert ("embedding_engine_queue_tokens", index, "cpu") in seen
        assert 0 < seen[("embedding_engine_busy_ratio", index, "cpu")] <= 1


def test_a_killed_engine_fails_over_to_the_other_with_no_client_error(engines_gateway: GatewayProcess) -> None:
    """SIGKILL engine 0 while 8 clients send misses: every request is answered 200 (the calls in
    flight on the dead engine are sent again to the live one), then engine 0 comes back and takes
    work again."""
    statuses: list[int] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            statuses.append(_post(engines_gateway, [f"failover {worker} {i} {j}" for j in range(8)]).status_code)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        first, _ = _engines(engines_gateway)
        os.kill(first, signal.SIGKILL)
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert statuses and set(statuses) == {200}, {status: statuses.count(status) for status in set(statuses)}
    assert _stats(engines_gateway)["engine_restarts"] == 1

    deadline = time.monotonic() + 120
    while not all(engine["up"] for engine in _stats(engines_gateway)["engines"]):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "engine 0 did not come back"
        time.sleep(0.5)
    before = _engine_batches(engines_gateway)[0]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _post(engines_gateway, [f"back {i} {j}" for j in range(16)]), range(32)))
    assert _engine_batches(engines_gateway)[0] > before, "the restarted engine takes no work"
