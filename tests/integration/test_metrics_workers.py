"""/metrics with EMBED_WORKERS=2 (issue 27 #6): the whole server's counters and histograms.

* the request-duration, batch-size, batch-tokens and encoder-seconds histograms have observations;
* every metric the shipped Grafana dashboard queries has series;
* no counter (nor histogram bucket, count or sum) goes back after a worker and then the engine are
  killed (SIGKILL): Prometheus would read a reset and over-count every rate.

One gateway serves the module; the tests run in file order (the last one kills its processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import GatewayProcess, RedisServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HISTOGRAMS: tuple[tuple[str, dict[str, str]], ...] = (
    ("embedding_request_duration_seconds", {"endpoint": "/v1/embeddings"}),
    ("embedding_batch_size", {}),
    ("embedding_batch_tokens", {}),
    ("embedding_encoder_seconds", {}),
)

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def _children(pid: int, role: str) -> list[int]:
    """The live ``python -m gateway <role>`` children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and f"-m gateway {role}" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _scrape(url: str) -> tuple[dict[Sample, float], dict[str, str]]:
    """Every sample of /metrics, and each family's type."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: dict[Sample, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def _monotonic(samples: dict[Sample, float], types: dict[str, str]) -> dict[Sample, float]:
    """The samples that may only grow: counters' totals, histograms' buckets, counts and sums."""
    kept = {}
    for (name, labels), value in samples.items():
        family = re.sub(r"_(total|bucket|count|sum)$", "", name)
        if types.get(family) in ("counter", "histogram") and not name.endswith("_created"):
            kept[(name, labels)] = value
    return kept


def _post(url: str, texts: list[str], timeout: float = 30) -> httpx.Response:
    # A new connection each time: SO_REUSEPORT spreads connections (not requests) over workers.
    return httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=timeout)


def _traffic_through_both_workers(url: str) -> None:
    """Misses and hits until both workers have answered some."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2 or time.monotonic() < deadline - 55:
        assert time.monotonic() < deadline, "every connection went to one worker"
        text = f"metrics in workers mode {uuid.uuid4().hex}"
        for texts in ([text], [text, "a text seen before"]):
            response = _post(url, texts)
            assert response.status_code == 200, response.text
            seen.add(response.headers["x-worker-pid"])


def _wait_until_served(gateway: GatewayProcess, workers: int, exclude: set[int], timeout: float = 180) -> None:
    """Until ``workers`` workers (none of ``exclude``) answer, and the engine computes misses again."""
    assert gateway.process is not None
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"the gateway did not recover:\n{gateway.log()[-3000:]}"
        time.sleep(0.2)
        live = _children(gateway.process.pid, "worker")
        if len(live) != workers or set(live) & exclude or len(_children(gateway.process.pid, "engine")) != 1:
            continue
        try:
            seen = {httpx.get(f"{gateway.url}/health", timeout=5).headers["x-worker-pid"] for _ in range(20)}
            ok = _post(gateway.url, [f"after the restart {uuid.uuid4().hex}"], timeout=10).status_code == 200
        except httpx.TransportError:
            continue
        if ok and len(seen) == workers:
            return


@pytest.fixture(scope="module")
def gateway(
    minilm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    served = GatewayProcess(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
            "EMBED_REDIS_URL": redis_server.url,
            "EMBED_CACHE_PREFIX": f"metrics-workers-{uuid.uuid4().hex[:8]}",
            "EMBED_TRUNCATE": "true",
            "EMBED_WORKERS": "2",
            "EMBED_SHUTDOWN_TIMEOUT_S": "10",
        },
        tmp_path_factory.mktemp("metrics-workers") / "gateway.log",
    )
    seen: set[str] = set()

    def both_ready() -> bool:
        response = httpx.get(f"{served.url}/health", timeout=1.0)
        seen.add(response.headers.get("x-worker-pid", ""))
        return response.status_code == 200 and len(seen - {""}) == 2

    served.start_when(both_ready, timeout=180)
    yield served
    served.stop()
    print(served.log()[-3000:])


def test_histograms_have_observations_in_workers_mode(gateway: GatewayProcess) -> None:
    _traffic_through_both_workers(gateway.url)
    samples, types = _scrape(gateway.url)
    for name, labels in HISTOGRAMS:
        assert types.get(name) == "histogram", f"{name} is not exported as a histogram"
        count = samples.get((f"{name}_count", tuple(sorted(labels.items()))), 0.0)
        buckets = [
            value
            for (sample, sample_labels), value in samples.items()
            if sample == f"{name}_bucket" and dict(sample_labels).get("le") != "+Inf"
        ]
        print(f"{name}: count {count}, finite buckets {buckets}")
        assert count > 0, f"{name} has no observations in workers mode"
        assert max(buckets, default=0) > 0


def test_every_dashboard_query_has_series_in_workers_mode(gateway: GatewayProcess) -> None:
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/embedding-gateway.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bembedding_\w+", target["expr"])
    }
    _post(gateway.url, ["one more, so every series is there"])
    names = {name for name, _ in _scrape(gateway.url)[0]}
    assert not used - names, f"the dashboard queries metrics without series in workers mode: {used - names}"


def test_counters_never_go_back_after_a_worker_and_the_engine_are_killed(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    url = gateway.url
    _traffic_through_both_workers(url)
    before = _monotonic(*_scrape(url))
    assert before[("embedding_requests_total", (("endpoint", "/v1/embeddings"), ("status", "200")))] > 0

    (victim, *_) = _children(gateway.process.pid, "worker")
    os.kill(victim, signal.SIGKILL)
    _wait_until_served(gateway, 2, exclude={victim})
    after_worker = _monotonic(*_scrape(url))

    (engine,) = _children(gateway.process.pid, "engine")
    os.kill(engine, signal.SIGKILL)
    time.sleep(0.5)
    _wait_until_served(gateway, 2, exclude={victim})
    assert _children(gateway.process.pid, "engine") != [engine]
    after_engine = _monotonic(*_scrape(url))

    for label, earlier, later in (
        ("the worker's kill", before, after_worker),
        ("the engine's kill", after_worker, after_engine),
    ):
        went_back = {
            f"{name}{dict(labels)}": (value, later.get((name, labels), 0.0))
            for (name, labels), value in earlier.items()
            if later.get((name, labels), 0.0) < value
        }
        print(f"after {label}: {len(went_back)} of {len(earlier)} samples went back: {went_back}")
        assert not went_back, f"after {label} these went back (before, after): {went_back}"
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["worker_restarts"] >= 1 and stats["engine_restarts"] >= 1
