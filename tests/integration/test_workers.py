"""EMBED_WORKERS=2 (issue 12): two HTTP workers on one port in front of one engine process.

One gateway serves the whole module (a start costs ~20 s on two cores); the tests run in file
order and the last one stops it with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.servers import GatewayProcess, RedisServer

pytestmark = pytest.mark.slow


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of ``pid``'s live child processes (from /proc)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _role(gateway: GatewayProcess, role: str) -> list[int]:
    assert gateway.process is not None
    return sorted(pid for pid, cmd in _children(gateway.process.pid).items() if f"-m gateway {role}" in cmd)


def _post(url: str, texts: list[str], timeout: float = 30) -> httpx.Response:
    # A new connection each time: SO_REUSEPORT spreads connections (not requests) over workers.
    return httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=timeout)


@pytest.fixture(scope="module")
def workers_gateway(
    minilm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
            "EMBED_REDIS_URL": redis_server.url,
            "EMBED_CACHE_PREFIX": f"workers-{uuid.uuid4().hex[:8]}",
            "EMBED_TRUNCATE": "true",
            "EMBED_WORKERS": "2",
            "EMBED_SHUTDOWN_TIMEOUT_S": "10",
        },
        tmp_path_factory.mktemp("workers") / "gateway.log",
    )
    # Ready once both workers answer (each has its own pid header).
    seen: set[str] = set()

    def both_ready() -> bool:
        response = httpx.get(f"{gateway.url}/health", timeout=1.0)
        seen.add(response.headers.get("x-worker-pid", ""))
        return response.status_code == 200 and len(seen - {""}) == 2

    gateway.start_when(both_ready, timeout=180)
    yield gateway
    gateway.stop()
    print(gateway.log()[-3000:])


def test_two_workers_serve_and_share_the_cache(workers_gateway: GatewayProcess) -> None:
    url = workers_gateway.url
    workers = _role(workers_gateway, "worker")
    assert len(workers) == 2 and len(_role(workers_gateway, "engine")) == 1
    text = f"computed once through one worker {uuid.uuid4().hex}"
    first = _post(url, [text])
    assert first.status_code == 200 and first.headers["x-cache-misses"] == "1"
    computed_by = first.headers["x-worker-pid"]
    assert int(computed_by) in workers
    deadline = time.monotonic() + 30
    while True:  # the same text through the other worker: a hit from the shared Redis
        again = _post(url, [text])
        assert again.status_code == 200
        if again.headers["x-worker-pid"] != computed_by:
            break
        assert time.monotonic() < deadline, "every connection went to one worker"
    assert again.headers["x-cache-hits"] == "1"
    np.testing.assert_allclose(again.json()["data"][0]["embedding"], first.json()["data"][0]["embedding"], atol=1e-6)
    stats = httpx.get(f"{url}/stats").json()
    assert stats["workers"] == 2
    assert stats["cache"]["hits"] >= 1 and stats["cache"]["misses"] >= 1


def test_32_concurrent_misses_over_two_workers_share_forward_passes(workers_gateway: GatewayProcess) -> None:
    url = workers_gateway.url
    before = httpx.get(f"{url}/stats").json()
    tag = uuid.uuid4().hex
    barrier = threading.Barrier(32)

    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=60) as client:
            client.get(f"{url}/health")  # connect first, so the 32 posts leave together
            barrier.wait(timeout=30)
            return client.post(f"{url}/v1/embeddings", json={"input": [f"miss {i} of {tag} about vectors"]})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 and r.headers["x-cache-misses"] == "1" for r in responses)
    pids = {r.headers["x-worker-pid"] for r in responses}
    assert len(pids) == 2, "the misses came through both workers"
    after = httpx.get(f"{url}/stats").json()
    batches = after["encoder"]["batches"] - before["encoder"]["batches"]
    inputs = after["encoder"]["inputs"] - before["encoder"]["inputs"]
    print(f"32 single-text misses over 2 workers: {batches} forward passes, {inputs} inputs")
    assert inputs == 32
    assert batches <= 16, f"{batches} forward passes for 32 concurrent misses"


def test_a_killed_worker_is_restarted(workers_gateway: GatewayProcess) -> None:
    url = workers_gateway.url
    victim = _role(workers_gateway, "worker")[0]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    statuses: list[int] = []
    while True:
        assert time.monotonic() - started < 120, "the worker was not replaced"
        try:
            statuses.append(_post(url, [f"during worker restart {uuid.uuid4().hex}"], timeout=10).status_code)
        except httpx.TransportError:
            statuses.append(0)  # a connection the kernel had queued for the dead worker
        workers = _role(workers_gateway, "worker")
        if len(workers) == 2 and victim not in workers:
            seen = {httpx.get(f"{url}/health", timeout=5).headers["x-worker-pid"] for _ in range(20)}
            if len(seen) == 2:
                break
        time.sleep(0.2)
    print(f"worker restarted in {time.monotonic() - started:.1f} s; statuses meanwhile: {sorted(set(statuses))}")
    assert set(statuses) <= {0, 200}
    assert statuses.count(200) >= len(statuses) // 2, "the surviving worker kept serving"
    assert httpx.get(f"{url}/stats").json()["worker_restarts"] >= 1


def test_engine_killed_under_load_gives_503_with_retry_after_then_recovers(workers_gateway: GatewayProcess) -> None:
    url = workers_gateway.url
    assert _post(url, ["warm before the kill"]).status_code == 200
    engine = _role(workers_gateway, "engine")
    assert len(engine) == 1
    results: list[tuple[float, int, str | None]] = []  # (time, status, retry-after)
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=15) as client:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    response = client.post(
                        f"{url}/v1/embeddings", json={"input": [f"load {worker} {n} {uuid.uuid4()}"]}
                    )
                except httpx.TimeoutException:
                    results.append((started, -1, None))  # a hang: must never happen
                    continue
                results.append((time.monotonic(), response.status_code, response.headers.get("retry-after")))
                if response.status_code == 503:
                    time.sleep(0.1)  # a client backing off (less than Retry-After asks, to see recovery sooner)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    os.kill(engine[0], signal.SIGKILL)
    recovered_at = None
    deadline = killed_at + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
        after = [r for r in results if r[0] > killed_at]
        if any(status == 503 for _, status, _ in after) and any(
            status == 200 and t > max(u for u, s, _ in after if s == 503) for t, status, _ in after
        ):
            recovered_at = min(t for t, s, _ in after if s == 200 and t > max(u for u, s2, _ in after if s2 == 503))
            break
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(30)
    statuses = {status for _, status, _ in results}
    unavailable = [r for r in results if r[1] == 503]
    print(
        f"engine killed under load: statuses {sorted(statuses)}, {len(unavailable)} x 503, "
        f"{sum(1 for r in results if r[1] == 200)} x 200; 200s resumed "
        f"{(recovered_at - killed_at) if recovered_at else float('nan'):.2f} s after the kill"
    )
    assert statuses <= {200, 503}, "only 200 or 503: never a hang, never a 500"
    assert unavailable, "the kill was seen"
    assert all(retry_after is not None and int(retry_after) >= 1 for _, _, retry_after in unavailable)
    assert recovered_at is not None, "200s did not resume after the engine restart"
    new_engine = _role(workers_gateway, "engine")
    assert len(new_engine) == 1 and new_engine != engine
    assert httpx.get(f"{url}/stats").json()["engine_restarts"] >= 1


def test_sigterm_drains_every_process_and_exits_0(workers_gateway: GatewayProcess) -> None:
    assert workers_gateway.process is not None
    children = set(_children(workers_gateway.process.pid))
    assert len(children) == 3
    started = time.monotonic()
    assert workers_gateway.terminate(timeout=30) == 0
    print(f"SIGTERM: supervisor exited 0 after {time.monotonic() - started:.1f} s")
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
