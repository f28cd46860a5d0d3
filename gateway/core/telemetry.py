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

The histograms are plain bucket counts (:class:`Buckets`) kept here, not prometheus-client
``Histogram`` objects: they travel in :class:`TelemetryState` like every counter, so with
``EMBED_WORKERS > 1`` :meth:`Telemetry.combined` sums them over the processes, and both modes render
them the same way (``HistogramMetricFamily`` at scrape time).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from encoder.batcher import BatcherEvent, BatchReport
from encoder.device import gpu_memory

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "BATCH_TOKENS_BUCKETS",
    "ENCODER_SECONDS_BUCKETS",
    "PROMETHEUS_CONTENT_TYPE",
    "REQUEST_SECONDS_BUCKETS",
    "Buckets",
    "EngineStats",
    "GpuStats",
    "KeyStats",
    "LiveState",
    "ModelCounts",
    "ModelStats",
    "ModelTelemetry",
    "StatsSnapshot",
    "Telemetry",
    "TelemetryState",
]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds (Prometheus' ``le``) of the histograms' finite buckets; +Inf is always added.
# Requests may run for minutes (a 300,000-token request on CPU), and one 8,192-token forward pass on
# CPU for well over 10 s: the top buckets reach that far, so quantiles never stop at the last bound.
REQUEST_SECONDS_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
ENCODER_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
BATCH_TOKENS_BUCKETS = (64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0)


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
    engines: list[EngineStats] = msgspec.field(default_factory=list)
    models: list[ModelStats] = msgspec.field(default_factory=list)


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


class EngineStats(msgspec.Struct):
    """One engine (a model on one device) as /stats lists it: ``EMBED_DEVICES`` has one per entry.

    ``batches`` and ``busy_fraction`` (forward-pass seconds over the engine's uptime) count since
    this engine process started; the whole server's totals, which survive restarts, are under
    ``encoder``. ``up`` is false while the engine is away (restarting): its work goes to the others.
    """

    index: int
    device: str
    up: bool
    batches: int = 0
    forward_seconds: float = 0.0
    busy_fraction: float = 0.0
    queue_tokens: int = 0
    uptime_seconds: float = 0.0

    @classmethod
    def of(cls, index: int, device: str, state: TelemetryState, queue_tokens: int) -> EngineStats:
        """Engine ``index``'s figures from its own counters ``state``."""
        batches = state.counts[_COUNTS.index("batches")]
        uptime = max(time.time() - state.started_at, 1e-9)
        return cls(
            index=index,
            device=device,
            up=True,
            batches=batches,
            forward_seconds=round(state.batch_seconds, 3),
            busy_fraction=round(min(1.0, state.batch_seconds / uptime), 4),
            queue_tokens=queue_tokens,
            uptime_seconds=round(uptime, 3),
        )


class ModelStats(msgspec.Struct):
    """One served model (``EMBED_MODELS_FILE`` lists several) as /stats lists it: its share of the
    server's inputs, tokens, cache lookups and forward passes, and its queue now."""

    model: str
    device: str
    dtype: str
    fingerprint: str
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    batches: int = 0
    forward_seconds: float = 0.0
    queue_tokens: int = 0


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
    engines: list[EngineStats] = msgspec.field(default_factory=list)  # one per engine (EMBED_DEVICES)
    models: list[ModelStats] = msgspec.field(default_factory=list)  # one per served model (EMBED_MODELS_FILE)
    engine_restarts: int = 0  # times the supervisor restarted the engine process
    worker_restarts: int = 0  # times it restarted a worker process


class Buckets(msgspec.Struct, array_like=True):
    """One histogram's observations: how many fell in each bucket (not cumulative: ``counts[i]``
    holds those above bound ``i - 1`` up to bound ``i``; the last, those above every bound) and
    their sum."""

    counts: list[int]
    sum: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Buckets:
        return cls([0] * (len(bounds) + 1))

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # Prometheus' buckets: value <= le
        self.sum += value

    def add(self, other: Buckets | None) -> None:
        """Add ``other``'s observations; one with other bounds (another version's) is left out."""
        if other is not None and len(other.counts) == len(self.counts):
            self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
            self.sum += other.sum

    def copy(self) -> Buckets:
        return Buckets(list(self.counts), self.sum)


class ModelCounts(msgspec.Struct, array_like=True):
    """One model's share of a process's counters (several models: ``EMBED_MODELS_FILE``)."""

    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    batches: int = 0
    forward_seconds: float = 0.0

    def add(self, other: ModelCounts) -> None:
        for name in ModelCounts.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TelemetryState(msgspec.Struct, array_like=True):
    """One process's counters and histograms (cumulative), sent to another process to be added up
    (EMBED_WORKERS > 1) and kept in the supervisor's ledger (:mod:`gateway.engine.ledger`)."""

    started_at: float
    counts: list[int]  # _Counters' integer fields, in _COUNTS order
    batch_seconds: float
    events: dict[str, int]
    by_endpoint: list[tuple[str, int, int]]
    by_key: dict[str, KeyStats]
    latencies: list[float]
    request_seconds: dict[str, Buckets] = msgspec.field(default_factory=dict)  # by endpoint
    batch_size: Buckets | None = None
    batch_tokens: Buckets | None = None
    encoder_seconds: Buckets | None = None
    by_model: dict[str, ModelCounts] = msgspec.field(default_factory=dict)  # by served model id


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
    by_model: dict[str, ModelCounts] = field(default_factory=dict)


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
        self.request_seconds: dict[str, Buckets] = {}  # by endpoint
        self.batch_size = Buckets.empty(BATCH_SIZE_BUCKETS)
        self.batch_tokens = Buckets.empty(BATCH_TOKENS_BUCKETS)
        self.encoder_seconds = Buckets.empty(ENCODER_SECONDS_BUCKETS)
        self.registry = CollectorRegistry()
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
        durations = self.request_seconds.get(endpoint)
        if durations is None:
            durations = self.request_seconds[endpoint] = Buckets.empty(REQUEST_SECONDS_BUCKETS)
        durations.observe(REQUEST_SECONDS_BUCKETS, seconds)

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
        self.batch_size.observe(BATCH_SIZE_BUCKETS, report.size)
        self.batch_tokens.observe(BATCH_TOKENS_BUCKETS, report.padded_tokens)
        self.encoder_seconds.observe(ENCODER_SECONDS_BUCKETS, report.seconds)

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
            by_key={name: msgspec.structs.replace(stats) for name, stats in c.by_key.items()},
            latencies=list(self._latencies),
            request_seconds={endpoint: buckets.copy() for endpoint, buckets in self.request_seconds.items()},
            batch_size=self.batch_size.copy(),
            batch_tokens=self.batch_tokens.copy(),
            encoder_seconds=self.encoder_seconds.copy(),
            by_model={name: msgspec.structs.replace(counts) for name, counts in c.by_model.items()},
        )

    @classmethod
    def combined(cls, states: list[TelemetryState]) -> Telemetry:
        """A telemetry holding the sum of ``states`` (counters and histograms; latencies pooled), for
        one snapshot, or for :meth:`state` to carry on as one."""
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
            for endpoint, buckets in state.request_seconds.items():
                found_buckets = total.request_seconds.get(endpoint)
                if found_buckets is None:
                    found_buckets = total.request_seconds[endpoint] = Buckets.empty(REQUEST_SECONDS_BUCKETS)
                found_buckets.add(buckets)
            total.batch_size.add(state.batch_size)
            total.batch_tokens.add(state.batch_tokens)
            total.encoder_seconds.add(state.encoder_seconds)
            for name, counts in state.by_model.items():
                c.by_model.setdefault(name, ModelCounts()).add(counts)
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
            engines=list(live.engines),
            models=[self._model_stats(model) for model in live.models],
        )

    def _model_stats(self, live: ModelStats) -> ModelStats:
        """``live`` (a model's device, dtype, fingerprint and queue now) with its counters."""
        counts = self.counters.by_model.get(live.model) or ModelCounts()
        return msgspec.structs.replace(
            live,
            inputs=counts.inputs,
            tokens=counts.tokens,
            cache_hits=counts.cache_hits,
            cache_misses=counts.cache_misses,
            batches=counts.batches,
            forward_seconds=round(counts.forward_seconds, 3),
        )

    def render_prometheus(self, live: LiveState) -> bytes:
        """The Prometheus text exposition: this snapshot's counters, gauges and histograms."""
        self._live = live  # read by _SnapshotCollector during generate_latest, on this same thread
        return generate_latest(self.registry)


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


class ModelTelemetry:
    """The server's :class:`Telemetry` as one model's service and micro-batcher report to it: every
    count goes to the server's totals as before, and the model's inputs, tokens, cache lookups and
    passes also under its served id (``by_model``: summed over processes like every counter, shown
    as /stats' ``models`` and the ``embedding_model_*`` metrics when a server serves several)."""

    def __init__(self, shared: Telemetry, model: str) -> None:
        self.shared = shared
        self.model = model

    @property
    def counts(self) -> ModelCounts:
        by_model = self.shared.counters.by_model
        found = by_model.get(self.model)
        if found is None:
            found = by_model[self.model] = ModelCounts()
        return found

    def looked_up(self, hits: int, misses: int) -> None:
        counts = self.counts
        counts.cache_hits += hits
        counts.cache_misses += misses
        self.shared.looked_up(hits, misses)

    def embedded(self, inputs: int, tokens: int) -> None:
        counts = self.counts
        counts.inputs += inputs
        counts.tokens += tokens
        self.shared.embedded(inputs, tokens)

    def cache_failed(self) -> None:
        self.shared.cache_failed()

    def cache_written(self, count: int) -> None:
        self.shared.cache_written(count)

    def batch_done(self, report: BatchReport) -> None:
        counts = self.counts
        counts.batches += 1
        counts.forward_seconds += report.seconds
        self.shared.batch_done(report)

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        self.shared.batcher_event(event, count)


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
