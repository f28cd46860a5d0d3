"""The Grafana dashboard and Prometheus config query metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway.core.telemetry import LiveState, Telemetry

ROOT = Path(__file__).resolve().parents[2]


def _exported_names() -> set[str]:
    text = Telemetry().render_prometheus(LiveState()).decode()
    names = set(re.findall(r"^# TYPE (\w+) ", text, flags=re.MULTILINE))
    suffixed = {f"{name}{suffix}" for name in names for suffix in ("_total", "_bucket", "_sum", "_count")}
    return names | suffixed


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/embedding-gateway.json").read_text())
    exported = _exported_names()
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Cache hit rate", "Requests per second", "Latency (embeddings)", "Queue depth (tokens)"} <= titles
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bembedding_\w+", target["expr"]))
    missing = used - exported
    assert not missing, f"dashboard queries unknown metrics: {missing}"


def test_compose_monitoring_profile_and_scrape_config() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "allkeys-lru" in services["redis"]["command"]
    assert services["gateway"]["environment"]["EMBED_REDIS_URL"] == "redis://redis:6379/0"
    scrape = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gateway:8001"]
