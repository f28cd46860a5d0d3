"""A ring of per-interval samples (default 360 x 10 s: the last hour), behind ``GET /stats/history``.

A background task (owned by the app's lifespan) calls :meth:`HistoryRing.sample` every
``EMBED_HISTORY_INTERVAL_S`` with a fresh :class:`~gateway.core.telemetry.StatsSnapshot`; each
sample holds what happened in that interval (the difference of two snapshots), latency percentiles
of the requests that ended in it, and the gauges at its end. The dashboard draws the ring the moment
it opens, so it shows the past, not only what happened while it was open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec

from gateway.core.telemetry import KeyStats, LiveState, StatsSnapshot, Telemetry

__all__ = ["History", "HistoryRing", "HistorySample", "KeySample", "run_sampler"]

logger = logging.getLogger(__name__)


class KeySample(msgspec.Struct):
    """One API key name's traffic in one interval."""

    requests: int
    errors: int
    rate_limited: int
    inputs: int
    tokens: int
    cache_hits: int
    cache_misses: int


class HistorySample(msgspec.Struct):
    """One interval: counts in it, rates over it, latency of the requests that ended in it, gauges at its end."""

    time: float  # unix seconds at the end of the interval
    seconds: float  # the interval's real length
    requests: int
    errors: int
    inputs: int
    tokens: int
    cache_hits: int
    cache_misses: int
    cache_errors: int
    hit_rate: float | None  # None: no lookups in this interval
    requests_per_s: float
    tokens_per_s: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    batches: int
    avg_batch_size: float | None
    queue_tokens: int
    keys: dict[str, KeySample] = msgspec.field(default_factory=dict)


class History(msgspec.Struct):
    """The ``/stats/history`` body: oldest sample first."""

    interval_seconds: float
    capacity: int
    samples: list[HistorySample]


def _percentile_ms(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] * 1e3, 3)


def _key_delta(now: KeyStats, before: KeyStats | None) -> KeySample:
    before = before or KeyStats()
    return KeySample(
        requests=now.requests - before.requests,
        errors=now.errors - before.errors,
        rate_limited=now.rate_limited - before.rate_limited,
        inputs=now.inputs - before.inputs,
        tokens=now.tokens - before.tokens,
        cache_hits=now.cache_hits - before.cache_hits,
        cache_misses=now.cache_misses - before.cache_misses,
    )


class HistoryRing:
    def __init__(self, *, interval_s: float, capacity: int) -> None:
        self.interval_s = interval_s
        self.capacity = capacity
        self._samples: deque[HistorySample] = deque(maxlen=capacity)
        self._previous: tuple[float, StatsSnapshot] | None = None

    def sample(self, snapshot: StatsSnapshot, latencies: list[float], now: float | None = None) -> HistorySample | None:
        """Record the interval since the previous call (the first call only sets the baseline)."""
        now = time.time() if now is None else now
        previous, self._previous = self._previous, (now, snapshot)
        if previous is None:
            return None
        then, before = previous
        seconds = max(now - then, 1e-9)
        hits = snapshot.cache.hits - before.cache.hits
        misses = snapshot.cache.misses - before.cache.misses
        requests = snapshot.requests.total - before.requests.total
        tokens = snapshot.tokens - before.tokens
        batches = snapshot.encoder.batches - before.encoder.batches
        batch_inputs = snapshot.encoder.inputs - before.encoder.inputs
        ordered = sorted(latencies)
        keys = {
            name: delta
            for name, stats in snapshot.keys.items()
            if (delta := _key_delta(stats, before.keys.get(name))).requests
        }
        sample = HistorySample(
            time=round(now, 3),
            seconds=round(seconds, 3),
            requests=requests,
            errors=snapshot.requests.errors - before.requests.errors,
            inputs=snapshot.inputs - before.inputs,
            tokens=tokens,
            cache_hits=hits,
            cache_misses=misses,
            cache_errors=snapshot.cache.errors - before.cache.errors,
            hit_rate=round(hits / (hits + misses), 6) if hits + misses else None,
            requests_per_s=round(requests / seconds, 3),
            tokens_per_s=round(tokens / seconds, 3),
            latency_p50_ms=_percentile_ms(ordered, 0.50),
            latency_p95_ms=_percentile_ms(ordered, 0.95),
            latency_p99_ms=_percentile_ms(ordered, 0.99),
            batches=batches,
            avg_batch_size=round(batch_inputs / batches, 3) if batches else None,
            queue_tokens=snapshot.encoder.queue_tokens,
            keys=keys,
        )
        self._samples.append(sample)
        return sample

    def history(self) -> History:
        return History(interval_seconds=self.interval_s, capacity=self.capacity, samples=list(self._samples))


async def run_sampler(ring: HistoryRing, telemetry: Telemetry, live: Callable[[], LiveState]) -> None:
    """Sample every ``ring.interval_s`` until cancelled (the app's lifespan owns this task)."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        try:
            ring.sample(telemetry.snapshot(live()), telemetry.take_interval_latencies())
        except Exception:  # a bug here must not stop the history, nor the server
            logger.exception("history sample failed")
        next_at += ring.interval_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))
