"""The Grafana dashboard and Prometheus config query metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from encoder.batcher import BatchReport
from gateway.core.telemetry import LiveState, Telemetry

ROOT = Path(__file__).resolve().parents[2]


def _with_traffic() -> Telemetry:
    """One process's telemetry after a little of everything the dashboard draws."""
    telemetry = Telemetry()
    telemetry.request_done("/v1/embeddings", 200, 0.02, embedding=True)
    telemetry.request_done("/v1/embeddings", 400, 0.001, embedding=True)
    telemetry.looked_up(hits=1, misses=2)
    telemetry.embedded(inputs=3, tokens=40)
    telemetry.cache_failed()
    telemetry.batch_done(BatchReport(size=2, tokens=30, padded_tokens=32, seconds=0.05))
    return telemetry


# The two ways /metrics is rendered: one process, and EMBED_WORKERS > 1 (the engine sums every
# process's state: here an engine's and two workers').
MODES: dict[str, Callable[[], Telemetry]] = {
    "single process": _with_traffic,
    "workers": lambda: Telemetry.combined([_with_traffic().state() for _ in range(3)]),
}


def _exported(telemetry: Telemetry) -> dict[str, float]:
    """Sample name -> its values summed over labels: only names with series count as exported."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(telemetry.render_prometheus(LiveState()).decode()):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/embedding-gateway.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Cache hit rate", "Requests per second", "Latency (embeddings)", "Queue depth (tokens)"} <= titles
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bembedding_\w+", target["expr"]))
    return used


@pytest.mark.parametrize("mode", MODES)
def test_dashboard_queries_name_exported_metrics(mode: str) -> None:
    exported = _exported(MODES[mode]())
    missing = _dashboard_metrics() - set(exported)
    assert not missing, f"{mode}: the dashboard queries metrics without series: {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_every_histogram_the_dashboard_draws_has_observations(mode: str) -> None:
    exported = _exported(MODES[mode]())
    histograms = {name.removesuffix("_bucket") for name in _dashboard_metrics() if name.endswith("_bucket")}
    assert {"embedding_request_duration_seconds", "embedding_encoder_seconds", "embedding_batch_size"} <= histograms
    empty = {name for name in histograms if not exported.get(f"{name}_count")}
    assert not empty, f"{mode}: these panels would be blank: {empty}"


def test_compose_monitoring_profile_and_scrape_config() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "allkeys-lru" in services["redis"]["command"]
    assert services["gateway"]["environment"]["EMBED_REDIS_URL"] == "redis://redis:6379/0"
    assert "profiles" not in services["gateway"] and "profiles" not in services["lb"]  # plain `up` starts both
    scrape = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    # `--scale gateway=N`: one target per replica, found by Docker's DNS (an A record per container of
    # the compose service), not one fixed host:port that would hit a single replica at random.
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A"
    assert all(name in services for name in sd["names"]) and sd["names"] == ["gateway"]
    assert sd["port"] == int(services["gateway"]["environment"]["EMBED_PORT"])
