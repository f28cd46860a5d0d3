"""The live objects one server process holds, built by :mod:`gateway.http.app`'s lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from encoder import Encoder
from encoder.batcher import MicroBatcher
from encoder.device import gpu_memory
from gateway.core.cache import BlobCache, CircuitBreakerCache
from gateway.core.inputs import TokenIdDecoder
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import GpuStats, LiveState, Telemetry
from gateway.settings import Settings

__all__ = ["Runtime"]


@dataclass(slots=True)
class Runtime:
    settings: Settings
    encoder: Encoder
    batcher: MicroBatcher
    cache: BlobCache | None
    service: EmbeddingService
    telemetry: Telemetry
    token_decoder: TokenIdDecoder
    draining: bool = False

    @property
    def ready(self) -> bool:
        """Can this process take embedding requests now? (not draining, batcher worker running)"""
        return not self.draining and self.batcher.running

    async def cache_status(self) -> Literal["off", "ok", "unreachable"]:
        """``off``, ``ok`` or ``unreachable`` (a real ping: health checks are rare)."""
        if self.cache is None:
            return "off"
        return "ok" if await self.cache.ping() else "unreachable"

    def live_state(self) -> LiveState:
        encoder, cache = self.encoder, self.cache
        breaker = cache if isinstance(cache, CircuitBreakerCache) else None
        memory = gpu_memory(encoder.torch_device)
        gpu = None
        if memory is not None:
            gpu = GpuStats(
                name=memory.name,
                memory_allocated_bytes=memory.allocated_bytes,
                memory_reserved_bytes=memory.reserved_bytes,
                max_memory_allocated_bytes=memory.max_allocated_bytes,
                memory_total_bytes=memory.total_bytes,
            )
        return LiveState(
            model=self.settings.served_model,
            fingerprint=encoder.fingerprint,
            device=encoder.device,
            dtype=encoder.dtype,
            threads=encoder.threads,
            cache_backend=cache.backend if cache is not None else "off",
            cache_circuit=breaker.state if breaker is not None else "closed",
            cache_circuit_opened=breaker.opened if breaker is not None else 0,
            queue_tokens=self.batcher.queue_tokens,
            inputs_in_flight=self.batcher.in_flight,
            pending_cache_writes=self.service.pending_writes,
            asyncio_tasks=len(asyncio.all_tasks()),
            gpu=gpu,
            backend=encoder.backend.name,
            quantization=encoder.quantization,
        )
