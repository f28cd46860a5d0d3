"""The recorder: :class:`Telemetry`, the one object every part of the server reports events to.

Who feeds what:

* the HTTP layer: :meth:`Telemetry.request_done` once per routed request (and
  :meth:`Telemetry.refused_at_capacity` once per request refused at the in-flight cap), and
  :meth:`Telemetry.key_request` once per request made with a named API key (never the key itself);
* the service: :meth:`Telemetry.looked_up`, :meth:`embedded`, :meth:`cache_failed`, :meth:`cache_written`;
* the micro-batcher: :meth:`batch_done` and :meth:`batcher_event` (it takes ``Telemetry`` as its
  :class:`~encoder.batcher.BatchObserver`).

Each event is a few integer additions on plain fields (:class:`~gateway.core.telemetry.state.Counters`),
because they sit on the hot path of every request. Everything runs on the event loop: no locks.
Reading is the expensive side, and rare: :meth:`Telemetry.snapshot` builds the ``/stats`` body,
:meth:`Telemetry.render_prometheus` the ``/metrics`` text from the same snapshot, and
:meth:`Telemetry.state` / :meth:`Telemetry.combined` carry the counters between processes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from encoder.batcher import BatcherEvent, BatchReport
from gateway.core.telemetry.prometheus import metric_families
from gateway.core.telemetry.state import (
    BATCH_SIZE_BUCKETS,
    BATCH_TOKENS_BUCKETS,
    COUNTS,
    ENCODER_SECONDS_BUCKETS,
    REQUEST_SECONDS_BUCKETS,
    Buckets,
    Counters,
    KeyStats,
    ModelCounts,
    TelemetryState,
)
from gateway.core.telemetry.stats import (
    CacheStats,
    EncoderStats,
    Internals,
    LatencyStats,
    LiveState,
    ModelStats,
    RequestCounts,
    StatsSnapshot,
)

__all__ = ["Telemetry"]


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))]


class Telemetry:
    """One per server; tests run many in one process, so each owns its Prometheus registry."""

    def __init__(self, *, latency_window: int = 2048) -> None:
        self.started_at = time.time()
        self.counters = Counters()
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
            counts=[getattr(c, name) for name in COUNTS],
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
            for name, value in zip(COUNTS, state.counts, strict=False):
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


class _SnapshotCollector:
    """Turns the snapshot into Prometheus families at scrape time."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        telemetry = self.telemetry
        snapshot = telemetry.snapshot(telemetry._live)
        yield from metric_families(telemetry, snapshot)
