"""Counters and histograms, fed at explicit points; /stats and /metrics render one snapshot.

Who feeds what:

* the HTTP layer: :meth:`Telemetry.request_done` once per routed request (and
  :meth:`Telemetry.refused_at_capacity` once per request refused at the in-flight cap), and
  :meth:`Telemetry.key_request` once per request made with a named API key (never the key itself);
* the service: :meth:`Telemetry.looked_up`, :meth:`embedded`, :meth:`cache_failed`, :meth:`cache_written`;
* the micro-batcher: :meth:`batch_done` and :meth:`batcher_event` (it takes ``Telemetry`` as its
  :class:`~encoder.batcher.BatchObserver`).

Gauges (queue depth, breaker state, GPU memory) are state, not events: the app hands
:meth:`Telemetry.snapshot` a :class:`LiveState` read at that moment. :class:`StatsSnapshot` is the
``/stats`` body and the OpenAPI document's schema for it; the Prometheus text is rendered from the
same snapshot, so the two can never disagree. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from encoder.batcher import BatcherEvent, BatchReport
from encoder.device import gpu_memory

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "GpuStats",
    "KeyStats",
    "LiveState",
    "StatsSnapshot",
    "Telemetry",
    "TelemetryState",
]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GpuStats(msgspec.Struct):
    name: str
    memory_allocated_bytes: int
    memory_reserved_bytes: int
    max_memory_allocated_bytes: int
    memory_total_bytes: int


def gpu_stats(device: torch.device) -> GpuStats | None:
    """The memory figures of a CUDA ``device`` for /stats; ``None`` for any other device."""
    memory = gpu_memory(device)
    if memory is None:
        return None
    return GpuStats(
        name=memory.name,
        memory_allocated_bytes=memory.allocated_bytes,
        memory_reserved_bytes=memory.reserved_bytes,
        max_memory_allocated_bytes=memory.max_allocated_bytes,
        memory_total_bytes=memory.total_bytes,
    )


class LiveState(msgspec.Struct, kw_only=True):
    """What the server is right now, read when a snapshot is taken."""

    model: str = ""
    fingerprint: str = ""
    device: str = ""
    dtype: str = ""
    threads: int = 0
    cache_backend: str = "off"
    cache_circuit: str = "closed"
    cache_circuit_opened: int = 0
    queue_tokens: int = 0
    inputs_in_flight: int = 0
    pending_cache_writes: int = 0
    asyncio_tasks: int = 0
    gpu: GpuStats | None = None
    cache_namespace: str = ""
    backend: str = "torch"
    quantization: str = "none"


class RequestCounts(msgspec.Struct):
    total: int
    errors: int
    refused_at_cap: int = 0  # requests of any route answered 503 at EMBED_MAX_CONNECTIONS in flight


class CacheStats(msgspec.Struct):
    backend: str
    hits: int
    misses: int
    hit_rate: float
    errors: int
    writes: int
    circuit: str
    circuit_opened: int
    namespace: str = ""  # the key segment after the prefix: fingerprint + numerics/truncation tag


class EncoderStats(msgspec.Struct):
    device: str
    dtype: str
    threads: int
    batches: int
    inputs: int
    avg_batch_size: float
    forward_seconds: float
    avg_batch_tokens: float
    padding_ratio: float
    queue_tokens: int
    deduplicated: int
    dropped: int
    rejected: int
    failed: int
    oom_splits: int
    worker_restarts: int
    backend: str = "torch"
    quantization: str = "none"


class LatencyStats(msgspec.Struct):
    p50: float
    p95: float
    p99: float
    window: int


class Internals(msgspec.Struct):
    """For leak hunting: all three return to their idle values between bursts."""

    asyncio_tasks: int
    pending_cache_writes: int
    inputs_in_flight: int


class KeyStats(msgspec.Struct):
    """One named API key's embedding requests (429s included in ``requests``)."""

    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class StatsSnapshot(msgspec.Struct, omit_defaults=True):
    """The ``/stats`` body: embedding requests, cache, encoder and latency, as of ``uptime_seconds``."""

    model: str
    fingerprint: str
    uptime_seconds: float
    requests: RequestCounts
    inputs: int
    tokens: int
    cache: CacheStats
    encoder: EncoderStats
    latency_ms: LatencyStats
    internals: Internals
    gpu: GpuStats | None = None
    keys: dict[str, KeyStats] = msgspec.field(default_factory=dict)  # by key name (EMBED_API_KEYS_FILE)
    # EMBED_WORKERS > 1 only (issue 12): the whole server's counters, summed over these processes
    workers: int = 0  # HTTP worker processes
    engine_restarts: int = 0  # times the supervisor restarted the engine process
    worker_restarts: int = 0  # times it restarted a worker process


class TelemetryState(msgspec.Struct, array_like=True):
    """One process's counters, sent to another process to be added up (EMBED_WORKERS > 1)."""

    started_at: float
    counts: list[int]  # _Counters' integer fields, in _COUNTS order
    batch_seconds: float
    events: dict[str, int]
    by_endpoint: list[tuple[str, int, int]]
    by_key: dict[str, KeyStats]
    latencies: list[float]


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))]


@dataclass(slots=True)
class _Counters:
    requests: int = 0  # embedding requests
    request_errors: int = 0
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_errors: int = 0
    cache_writes: int = 0
    batches: int = 0
    batch_inputs: int = 0
    batch_tokens: int = 0
    batch_padded_tokens: int = 0
    batch_seconds: float = 0.0
    events: dict[BatcherEvent, int] = field(default_factory=lambda: dict.fromkeys(BatcherEvent, 0))
    by_endpoint: dict[tuple[str, int], int] = field(default_factory=dict)
    by_key: dict[str, KeyStats] = field(default_factory=dict)
    refused_at_cap: int = 0


_COUNTS = (
    "requests",
    "request_errors",
    "inputs",
    "tokens",
    "cache_hits",
    "cache_misses",
    "cache_errors",
    "cache_writes",
    "batches",
    "batch_inputs",
    "batch_tokens",
    "batch_padded_tokens",
    "refused_at_cap",
)


class Telemetry:
    """One per server; tests run many in one process, so each owns its Prometheus registry."""

    def __init__(self, *, latency_window: int = 2048) -> None:
        self.started_at = time.time()
        self.counters = _Counters()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._interval_latencies: deque[float] = deque(maxlen=65_536)  # since the last history sample
        self.registry = CollectorRegistry()
        self._request_seconds = Histogram(
            "embedding_request_duration_seconds",
            "time from request to response, by endpoint",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._batch_size = Histogram(
            "embedding_batch_size",
            "inputs per forward pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self._batch_tokens = Histogram(
            "embedding_batch_tokens",
            "padded tokens per forward pass",
            registry=self.registry,
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
        )
        self._encoder_seconds = Histogram(
            "embedding_encoder_seconds",
            "seconds per forward pass",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._durations: dict[str, Histogram] = {}
        self._live = LiveState()
        self.registry.register(_SnapshotCollector(self))

    # --- fed by the HTTP layer -------------------------------------------------------------
    def request_done(self, endpoint: str, status: int, seconds: float, *, embedding: bool) -> None:
        """One routed request. ``embedding`` requests also count towards requests, errors and latency."""
        counters = self.counters
        key = (endpoint, status)
        counters.by_endpoint[key] = counters.by_endpoint.get(key, 0) + 1
        if embedding:
            counters.requests += 1
            counters.request_errors += int(status >= 400)
            self._latencies.append(seconds)
            self._interval_latencies.append(seconds)
        child = self._durations.get(endpoint)
        if child is None:  # .labels() hashes and locks on every call: keep the children
            child = self._durations[endpoint] = self._request_seconds.labels(endpoint)
        child.observe(seconds)

    def refused_at_capacity(self) -> None:
        """One request refused (503) because the server's in-flight cap was reached; it is also
        reported to :meth:`request_done` with its status."""
        self.counters.refused_at_cap += 1

    def key_request(self, name: str, status: int, *, inputs: int, tokens: int, hits: int, misses: int) -> None:
        """One embedding request made with the key called ``name``."""
        found = self.counters.by_key.get(name)
        if found is None:
            found = self.counters.by_key[name] = KeyStats()
        found.requests += 1
        found.errors += int(status >= 400)
        found.rate_limited += int(status == 429)
        found.inputs += inputs
        found.tokens += tokens
        found.cache_hits += hits
        found.cache_misses += misses

    def take_interval_latencies(self) -> list[float]:
        """Embedding request latencies (seconds) since the previous call, for the history ring."""
        taken = list(self._interval_latencies)
        self._interval_latencies.clear()
        return taken

    # --- fed by the service ----------------------------------------------------------------
    def looked_up(self, hits: int, misses: int) -> None:
        self.counters.cache_hits += hits
        self.counters.cache_misses += misses

    def embedded(self, inputs: int, tokens: int) -> None:
        self.counters.inputs += inputs
        self.counters.tokens += tokens

    def cache_failed(self) -> None:
        self.counters.cache_errors += 1

    def cache_written(self, count: int) -> None:
        self.counters.cache_writes += count

    # --- fed by the micro-batcher (a BatchObserver) ------------------------------------------
    def batch_done(self, report: BatchReport) -> None:
        counters = self.counters
        counters.batches += 1
        counters.batch_inputs += report.size
        counters.batch_tokens += report.tokens
        counters.batch_padded_tokens += report.padded_tokens
        counters.batch_seconds += report.seconds
        self._batch_size.observe(report.size)
        self._batch_tokens.observe(report.padded_tokens)
        self._encoder_seconds.observe(report.seconds)

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        self.counters.events[event] += count

    # --- across processes (EMBED_WORKERS > 1) ------------------------------------------------
    def state(self) -> TelemetryState:
        """This process's counters, to be summed with other processes' by :meth:`combined`."""
        c = self.counters
        return TelemetryState(
            started_at=self.started_at,
            counts=[getattr(c, name) for name in _COUNTS],
            batch_seconds=c.batch_seconds,
            events={str(event): count for event, count in c.events.items()},
            by_endpoint=[(endpoint, status, count) for (endpoint, status), count in c.by_endpoint.items()],
            by_key=c.by_key,
            latencies=list(self._latencies),
        )

    @classmethod
    def combined(cls, states: list[TelemetryState]) -> Telemetry:
        """A telemetry holding the sum of ``states`` (counters; latencies pooled), for one snapshot.

        Its histograms are empty: /metrics in worker mode reports the summed counters and gauges.
        """
        total = cls(latency_window=max(2048, sum(len(state.latencies) for state in states)))
        c = total.counters
        if states:
            total.started_at = min(state.started_at for state in states)
        for state in states:
            for name, value in zip(_COUNTS, state.counts, strict=False):
                setattr(c, name, getattr(c, name) + value)
            c.batch_seconds += state.batch_seconds
            for event, count in state.events.items():
                if event in BatcherEvent.__members__.values():
                    c.events[BatcherEvent(event)] += count
            for endpoint, status, count in state.by_endpoint:
                c.by_endpoint[(endpoint, status)] = c.by_endpoint.get((endpoint, status), 0) + count
            for name, stats in state.by_key.items():
                found = c.by_key.setdefault(name, KeyStats())
                for field_name in KeyStats.__struct_fields__:
                    setattr(found, field_name, getattr(found, field_name) + getattr(stats, field_name))
            total._latencies.extend(state.latencies)
        return total

    # --- read ------------------------------------------------------------------------------
    def snapshot(self, live: LiveState) -> StatsSnapshot:
        c = self.counters
        ordered = sorted(self._latencies)
        looked_up = c.cache_hits + c.cache_misses
        events = c.events
        return StatsSnapshot(
            model=live.model,
            fingerprint=live.fingerprint,
            uptime_seconds=round(time.time() - self.started_at, 3),
            requests=RequestCounts(total=c.requests, errors=c.request_errors, refused_at_cap=c.refused_at_cap),
            inputs=c.inputs,
            tokens=c.tokens,
            cache=CacheStats(
                backend=live.cache_backend,
                hits=c.cache_hits,
                misses=c.cache_misses,
                hit_rate=round(c.cache_hits / looked_up, 6) if looked_up else 0.0,
                errors=c.cache_errors,
                writes=c.cache_writes,
                circuit=live.cache_circuit,
                circuit_opened=live.cache_circuit_opened,
                namespace=live.cache_namespace,
            ),
            encoder=EncoderStats(
                device=live.device,
                dtype=live.dtype,
                threads=live.threads,
                batches=c.batches,
                inputs=c.batch_inputs,
                avg_batch_size=round(c.batch_inputs / c.batches, 3) if c.batches else 0.0,
                forward_seconds=round(c.batch_seconds, 3),
                avg_batch_tokens=round(c.batch_padded_tokens / c.batches, 1) if c.batches else 0.0,
                padding_ratio=round(1 - c.batch_tokens / c.batch_padded_tokens, 4) if c.batch_padded_tokens else 0.0,
                queue_tokens=live.queue_tokens,
                deduplicated=events[BatcherEvent.DEDUPLICATED],
                dropped=events[BatcherEvent.DROPPED],
                rejected=events[BatcherEvent.REJECTED],
                failed=events[BatcherEvent.FAILED],
                oom_splits=events[BatcherEvent.OOM_SPLIT],
                worker_restarts=events[BatcherEvent.WORKER_RESTARTED],
                backend=live.backend,
                quantization=live.quantization,
            ),
            latency_ms=LatencyStats(
                p50=round(_percentile(ordered, 0.50) * 1e3, 3),
                p95=round(_percentile(ordered, 0.95) * 1e3, 3),
                p99=round(_percentile(ordered, 0.99) * 1e3, 3),
                window=len(ordered),
            ),
            internals=Internals(
                asyncio_tasks=live.asyncio_tasks,
                pending_cache_writes=live.pending_cache_writes,
                inputs_in_flight=live.inputs_in_flight,
            ),
            gpu=live.gpu,
            keys={name: msgspec.structs.replace(stats) for name, stats in sorted(c.by_key.items())},
        )

    def render_prometheus(self, live: LiveState) -> bytes:
        """The Prometheus text exposition: this snapshot's counters and gauges, and the histograms."""
        self._live = live  # read by _SnapshotCollector during generate_latest, on this same thread
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Turns the snapshot into Prometheus families at scrape time."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        telemetry = self.telemetry
        snapshot = telemetry.snapshot(telemetry._live)
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
        yield GaugeMetricFamily("embedding_queue_tokens", "tokens waiting for the encoder", value=encoder.queue_tokens)
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
