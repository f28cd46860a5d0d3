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
