"""Prometheus metrics that read the same numbers as /stats.

Counters live once, in :class:`~gateway.stats.Stats` and the batcher's stats; a custom collector
turns them into Prometheus families at scrape time, so /stats and /metrics can never disagree.
Histograms (latency, batch size, batch tokens, encoder time) are prometheus-client objects fed at
the same points where /stats takes its numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from encoder.batcher import BatchReport
from gateway.stats import Stats

if TYPE_CHECKING:
    from gateway.runtime import Runtime

__all__ = ["CONTENT_TYPE", "Metrics", "endpoint_label"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_ENDPOINTS = frozenset(
    {
        "/v1/embeddings",
        "/embeddings",
        "/v1/embeddings/sparse",
        "/v1/embeddings/multivector",
        "/v1/models",
        "/health",
        "/stats",
        "/metrics",
        "/dashboard",
    }
)


def endpoint_label(path: str) -> str:
    """A bounded label: known routes by name, model ids folded, anything else ``other``."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class _StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self.metrics.stats
        requests = CounterMetricFamily(
            "embedding_requests", "HTTP requests by endpoint and status", labels=["endpoint", "status"]
        )
        for (endpoint, status), count in sorted(stats.by_endpoint.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        for name, value, text in (
            ("embedding_inputs", stats.inputs, "inputs embedded (hits and misses)"),
            ("embedding_tokens", stats.tokens, "tokens embedded, as the model's tokenizer counts"),
            ("embedding_cache_hits", stats.cache_hits, "distinct texts served from the cache"),
            ("embedding_cache_misses", stats.cache_misses, "distinct texts not in the cache"),
            ("embedding_cache_errors", stats.cache_errors, "cache reads or writes that failed or timed out"),
            ("embedding_cache_writes", stats.cache_writes, "vectors written back to the cache"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        runtime = self.metrics.runtime
        queued = runtime.batcher.stats.queue_tokens if runtime is not None else 0
        yield GaugeMetricFamily("embedding_queue_tokens", "tokens waiting for the encoder", value=queued)
        if runtime is None:
            return
        device = runtime.encoder.torch_device
        if device.type == "cuda":
            import torch

            for name, value in (
                ("embedding_gpu_memory_allocated_bytes", torch.cuda.memory_allocated(device)),
                ("embedding_gpu_memory_reserved_bytes", torch.cuda.memory_reserved(device)),
                ("embedding_gpu_memory_total_bytes", torch.cuda.get_device_properties(device).total_memory),
            ):
                yield GaugeMetricFamily(name, name.replace("_", " "), value=value)


class Metrics:
    """One registry per app (tests run many apps in one process)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.runtime: Runtime | None = None
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "embedding_request_duration_seconds",
            "time from request to response, by endpoint",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "embedding_batch_size",
            "inputs per forward pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_tokens = Histogram(
            "embedding_batch_tokens",
            "padded tokens per forward pass",
            registry=self.registry,
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
        )
        self.encoder_seconds = Histogram(
            "embedding_encoder_seconds",
            "seconds per forward pass",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.registry.register(_StatsCollector(self))
        self._durations: dict[str, Histogram] = {}

    def observe_batch(self, report: BatchReport) -> None:
        self.batch_size.observe(report.size)
        self.batch_tokens.observe(report.padded_tokens)
        self.encoder_seconds.observe(report.seconds)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.stats.observe_request(endpoint, status, seconds)
        child = self._durations.get(endpoint)
        if child is None:  # .labels() hashes and locks on every call: keep the children
            child = self._durations[endpoint] = self.request_duration.labels(endpoint)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
