"""The Prometheus text exposition of one :class:`~gateway.core.telemetry.Telemetry`.

Nothing here keeps state: at scrape time :func:`metric_families` turns the same
:class:`~gateway.core.telemetry.stats.StatsSnapshot` that ``/stats`` answers (plus the per-endpoint
counts and the histograms, which /stats summarises) into metric families, so the two can never
disagree. The families are built afresh for every scrape (prometheus-client's "custom collector"
pattern) rather than kept as live ``Counter`` objects, because with ``EMBED_WORKERS > 1`` the figures
are a sum over processes that only exists at the moment of the snapshot.

:class:`Recorded` names what is read of the recorder, so this module never imports it: the recorder
imports this one to register its collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from gateway.core.telemetry.state import (
    BATCH_SIZE_BUCKETS,
    BATCH_TOKENS_BUCKETS,
    ENCODER_SECONDS_BUCKETS,
    REQUEST_SECONDS_BUCKETS,
    Buckets,
    Counters,
)
from gateway.core.telemetry.stats import EngineStats, ModelStats, StatsSnapshot

__all__ = ["PROMETHEUS_CONTENT_TYPE", "Recorded", "metric_families"]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Recorded(Protocol):
    """What the exposition reads of a :class:`~gateway.core.telemetry.Telemetry` besides its snapshot."""

    counters: Counters
    request_seconds: dict[str, Buckets]
    batch_size: Buckets
    batch_tokens: Buckets
    encoder_seconds: Buckets


def _add_buckets(family: HistogramMetricFamily, labels: list[str], bounds: tuple[float, ...], buckets: Buckets) -> None:
    """``buckets`` as Prometheus wants them: cumulative counts by ``le`` (``1.0``, ..., ``+Inf``)."""
    cumulative, running = [], 0
    for bound, count in zip((*bounds, None), buckets.counts, strict=True):
        running += count
        cumulative.append(("+Inf" if bound is None else repr(float(bound)), float(running)))
    family.add_metric(labels, cumulative, buckets.sum)


def _engine_families(engines: list[EngineStats]) -> Iterator[Metric]:
    """Per-engine gauges, labelled by engine index and device (``EMBED_DEVICES``). Gauges, not
    counters: an engine's figures start again when it restarts (the totals above do not)."""
    labels = ["engine", "device"]
    families = [
        (GaugeMetricFamily("embedding_engine_up", "1 while the engine is connected", labels=labels), "up"),
        (GaugeMetricFamily("embedding_engine_queue_tokens", "tokens queued there", labels=labels), "queue_tokens"),
        (
            GaugeMetricFamily("embedding_engine_batches", "forward passes since the engine started", labels=labels),
            "batches",
        ),
        (
            GaugeMetricFamily(
                "embedding_engine_busy_ratio", "forward-pass time over uptime since the engine started", labels=labels
            ),
            "busy_fraction",
        ),
    ]
    for engine in engines:
        for family, name in families:
            family.add_metric([str(engine.index), engine.device], float(getattr(engine, name)))
    for family, _ in families:
        yield family


def _model_families(models: list[ModelStats]) -> Iterator[Metric]:
    """Per-model counters and queue, labelled by the served model's id (``EMBED_MODELS_FILE``)."""
    labels = ["model"]
    counters = [
        (CounterMetricFamily(f"embedding_model_{name}", f"{text}, by model", labels=labels), name)
        for name, text in (
            ("inputs", "inputs embedded (hits and misses)"),
            ("tokens", "tokens embedded"),
            ("cache_hits", "distinct texts served from the cache"),
            ("cache_misses", "distinct texts computed"),
            ("batches", "forward passes"),
        )
    ]
    queue = GaugeMetricFamily("embedding_model_queue_tokens", "tokens waiting for the model's encoder", labels=labels)
    for model in models:
        for family, name in counters:
            family.add_metric([model.model], float(getattr(model, name)))
        queue.add_metric([model.model], float(model.queue_tokens))
    for family, _ in counters:
        yield family
    yield queue


def metric_families(telemetry: Recorded, snapshot: StatsSnapshot) -> Iterator[Metric]:
    """Every family of one scrape: counters, histograms and gauges of ``snapshot``, per endpoint,
    engine, model and API key name."""
    requests = CounterMetricFamily(
        "embedding_requests", "HTTP requests by endpoint and status", labels=["endpoint", "status"]
    )
    for (endpoint, status), count in sorted(telemetry.counters.by_endpoint.items()):
        requests.add_metric([endpoint, str(status)], count)
    yield requests
    cache, encoder = snapshot.cache, snapshot.encoder
    for name, value, text in (
        (
            "embedding_requests_refused_at_cap",
            snapshot.requests.refused_at_cap,
            "requests answered 503 because the in-flight cap was reached (probes and /metrics never are)",
        ),
        ("embedding_inputs", snapshot.inputs, "inputs embedded (hits and misses)"),
        ("embedding_tokens", snapshot.tokens, "tokens embedded, as the model's tokenizer counts"),
        ("embedding_cache_hits", cache.hits, "distinct texts served from the cache"),
        ("embedding_cache_misses", cache.misses, "distinct texts not in the cache"),
        ("embedding_cache_errors", cache.errors, "cache reads or writes that failed or timed out"),
        ("embedding_cache_writes", cache.writes, "vectors written back to the cache"),
        ("embedding_batcher_dropped", encoder.dropped, "inputs dropped before compute (their clients left)"),
        ("embedding_batcher_rejected", encoder.rejected, "calls refused because the queue was full"),
        ("embedding_batcher_failed", encoder.failed, "inputs the encoder could not compute"),
        ("embedding_batcher_worker_restarts", encoder.worker_restarts, "batcher worker crashes (each restarted)"),
    ):
        yield CounterMetricFamily(name, text, value=value)
    durations = HistogramMetricFamily(
        "embedding_request_duration_seconds", "time from request to response, by endpoint", labels=["endpoint"]
    )
    for endpoint, buckets in sorted(telemetry.request_seconds.items()):
        _add_buckets(durations, [endpoint], REQUEST_SECONDS_BUCKETS, buckets)
    yield durations
    for name, text, bounds, buckets in (
        ("batch_size", "inputs per forward pass", BATCH_SIZE_BUCKETS, telemetry.batch_size),
        ("batch_tokens", "padded tokens per forward pass", BATCH_TOKENS_BUCKETS, telemetry.batch_tokens),
        ("encoder_seconds", "seconds per forward pass", ENCODER_SECONDS_BUCKETS, telemetry.encoder_seconds),
    ):
        histogram = HistogramMetricFamily(f"embedding_{name}", text)
        _add_buckets(histogram, [], bounds, buckets)
        yield histogram
    yield GaugeMetricFamily("embedding_queue_tokens", "tokens waiting for the encoder", value=encoder.queue_tokens)
    yield from _engine_families(snapshot.engines)
    yield from _model_families(snapshot.models)
    yield GaugeMetricFamily(
        "embedding_cache_circuit_open",
        "1 while the cache breaker skips the cache",
        value=int(cache.circuit == "open"),
    )
    if snapshot.keys:
        families = {
            field: CounterMetricFamily(f"embedding_key_{field}", f"{text}, by API key name", labels=["key"])
            for field, text in (
                ("requests", "embedding requests"),
                ("errors", "embedding requests answered with an error"),
                ("rate_limited", "embedding requests refused by the key's limits (429)"),
                ("inputs", "inputs embedded"),
                ("tokens", "tokens embedded"),
                ("cache_hits", "distinct texts served from the cache"),
                ("cache_misses", "distinct texts computed"),
            )
        }
        for name, stats in snapshot.keys.items():
            for field, family in families.items():
                family.add_metric([name], getattr(stats, field))
        yield from families.values()
    info = GaugeMetricFamily(
        "embedding_encoder_info",
        "the encoder's backend and quantisation (always 1)",
        labels=["backend", "quantization"],
    )
    info.add_metric([encoder.backend, encoder.quantization], 1)
    yield info
    gpu = snapshot.gpu
    if gpu is not None:
        for name, value in (
            ("embedding_gpu_memory_allocated_bytes", gpu.memory_allocated_bytes),
            ("embedding_gpu_memory_reserved_bytes", gpu.memory_reserved_bytes),
            ("embedding_gpu_memory_total_bytes", gpu.memory_total_bytes),
        ):
            yield GaugeMetricFamily(name, name.replace("_", " "), value=value)
