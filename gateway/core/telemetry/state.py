"""The counters and histograms one process keeps, in the shape they travel between processes.

Everything here is plain data: :class:`Counters` is what :class:`~gateway.core.telemetry.Telemetry`
adds to as events arrive, :class:`TelemetryState` is the same figures frozen into a msgspec struct
so that, with ``EMBED_WORKERS > 1``, a worker can send them to the engine (and the supervisor's
ledger can keep them) and another process can add them up.

The histograms are plain bucket counts (:class:`Buckets`), not prometheus-client ``Histogram``
objects, for that same reason: a ``Histogram`` cannot be sent to another process and summed there,
a list of counts can. The bucket bounds live here too, because both the recorder and the Prometheus
rendering must agree on them.

:class:`TelemetryState`, :class:`Buckets` and :class:`ModelCounts` are ``array_like`` (fields by
position, not by name): a worker sends its state every second, and the ledger keeps one per process.
Their later fields come last with a default (``request_seconds`` onwards), so a state another
version wrote still decodes.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import msgspec

from encoder.batcher import BatcherEvent

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "BATCH_TOKENS_BUCKETS",
    "COUNTS",
    "ENCODER_SECONDS_BUCKETS",
    "REQUEST_SECONDS_BUCKETS",
    "Buckets",
    "Counters",
    "KeyStats",
    "ModelCounts",
    "TelemetryState",
]

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


class KeyStats(msgspec.Struct):
    """One named API key's embedding requests (429s included in ``requests``)."""

    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


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


@dataclass(slots=True)
class Counters:
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


COUNTS = (
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
