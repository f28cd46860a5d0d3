"""The ``/stats`` body: what one snapshot of the server says, as msgspec structs.

:class:`StatsSnapshot` is both the answer of ``GET /stats`` and, through msgspec's JSON Schema, the
OpenAPI document's schema for it; the Prometheus text (:mod:`gateway.core.telemetry.prometheus`) is
rendered from the same snapshot, so ``/stats`` and ``/metrics`` can never disagree.

Counters come from :class:`~gateway.core.telemetry.Telemetry`; gauges (queue depth, breaker state,
GPU memory) are state, not events, so the app reads them at the moment of the snapshot and hands
them over as a :class:`LiveState`. Changing a field here changes the public contract: the committed
``openapi/openapi.json`` must be exported again (a test fails when it drifts).
"""

from __future__ import annotations

import time

import msgspec
import torch

from encoder.device import gpu_memory
from gateway.core.telemetry.state import COUNTS, KeyStats, TelemetryState

__all__ = [
    "BatchStats",
    "CacheStats",
    "EncoderStats",
    "EngineStats",
    "GpuStats",
    "Internals",
    "LatencyStats",
    "LiveState",
    "ModelStats",
    "RequestCounts",
    "StatsSnapshot",
    "gpu_stats",
]


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
        batches = state.counts[COUNTS.index("batches")]
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


class BatchStats(msgspec.Struct):
    """The Batch API's batches not yet final, across every replica, and their request lines."""

    active: int
    requests_total: int
    requests_completed: int
    requests_failed: int


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
    batches: BatchStats | None = None  # the Batch API's batches not yet final (EMBED_BATCH_DIR)
