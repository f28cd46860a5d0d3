"""The live objects one server process holds, built by :mod:`gateway.http.app`'s lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from encoder.batcher import QueueFullError
from gateway.core.backend import Batcher, EncoderInfo
from gateway.core.cache import BlobCache, CircuitBreakerCache
from gateway.core.errors import ModelNotFoundError, OverloadedError
from gateway.core.history import HistoryRing
from gateway.core.inputs import TokenIdDecoder
from gateway.core.models_file import ANY_MODEL
from gateway.core.prompts import PromptBook
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import (
    EngineStats,
    LiveState,
    ModelStats,
    ModelTelemetry,
    StatsSnapshot,
    Telemetry,
    gpu_stats,
)
from gateway.engine.router import EngineRouter
from gateway.http.answers import AnswerBuilder
from gateway.settings import Settings

__all__ = ["Runtime", "ServedModel"]


@dataclass(slots=True)
class ServedModel:
    """One model the server serves: its settings (the server's, with its ``[[models]]`` table's
    fields in place), encoder, micro-batcher, service and prompts."""

    settings: Settings
    encoder: EncoderInfo
    batcher: Batcher
    service: EmbeddingService
    prompts: PromptBook
    telemetry: ModelTelemetry | None = None  # its own counters, when the server serves several

    def stats(self) -> ModelStats | None:
        if self.telemetry is None:
            return None
        encoder = self.encoder
        return self.telemetry.stats(
            self.settings.served_model, encoder.device, encoder.dtype, encoder.fingerprint, self.batcher.queue_tokens
        )


@dataclass(slots=True)
class Runtime:
    settings: Settings
    encoder: EncoderInfo
    batcher: Batcher
    cache: BlobCache | None
    service: EmbeddingService
    telemetry: Telemetry
    token_decoder: TokenIdDecoder
    answers: AnswerBuilder
    prompts: PromptBook = field(default_factory=lambda: PromptBook({}))  # the model's instruction prompts
    draining: bool = False
    history: HistoryRing | None = None  # /stats/history (issue 13)
    engine: EngineRouter | None = None  # a worker (EMBED_WORKERS > 1 or EMBED_DEVICES): its links to the engines
    # Every model served (EMBED_MODELS_FILE), the default first; empty: the one above alone.
    models: list[ServedModel] = field(default_factory=list)
    _by_name: dict[str, ServedModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [ServedModel(self.settings, self.encoder, self.batcher, self.service, self.prompts)]
        self._by_name = names_of(self.models)

    def model_for(self, name: str | None) -> ServedModel:
        """The model a request names (its id, an alias, its ``path``), the default for none, or
        the one with alias ``*`` for any other name; else a 404 that lists what is served."""
        if name is None:
            return self.models[0]
        found = self._by_name.get(name) or self._by_name.get(ANY_MODEL)
        if found is None:
            served = ", ".join(repr(model.settings.served_model) for model in self.models)
            raise ModelNotFoundError(
                f"The model '{name}' does not exist on this server; it serves {served}.", param="model"
            )
        return found

    @property
    def ready(self) -> bool:
        """Can this process take embedding requests now? (not draining, every batcher running)"""
        return not self.draining and all(model.batcher.running for model in self.models)

    async def cache_status(self) -> Literal["off", "ok", "degraded", "unreachable"]:
        """``off``; ``unreachable`` (a real ping fails: health checks are rare); ``degraded`` while
        the breaker skips the cache or writes fail (a read-only replica, a full Redis); else ``ok``."""
        if self.cache is None:
            return "off"
        if not await self.cache.ping():
            return "unreachable"
        breaker_open = isinstance(self.cache, CircuitBreakerCache) and self.cache.state != "closed"
        return "degraded" if breaker_open or self.service.writes_failing else "ok"

    def live_state(self) -> LiveState:
        encoder, cache = self.encoder, self.cache
        breaker = cache if isinstance(cache, CircuitBreakerCache) else None
        gpu = gpu_stats(encoder.torch_device)
        return LiveState(
            model=self.settings.served_model,
            fingerprint=encoder.fingerprint,
            cache_namespace=self.service.namespace,
            device=encoder.device,
            dtype=encoder.dtype,
            threads=encoder.threads,
            cache_backend=cache.backend if cache is not None else "off",
            cache_circuit=breaker.state if breaker is not None else "closed",
            cache_circuit_opened=breaker.opened if breaker is not None else 0,
            queue_tokens=sum(model.batcher.queue_tokens for model in self.models),
            inputs_in_flight=sum(model.batcher.in_flight for model in self.models),
            pending_cache_writes=self.service.pending_writes,
            asyncio_tasks=len(asyncio.all_tasks()),
            gpu=gpu,
            backend=encoder.numerics.split(":")[0],
            quantization="int8" if ":int8" in encoder.numerics else "none",
            models=[stats for model in self.models if (stats := model.stats()) is not None],
        )

    async def whole_server(self) -> tuple[Telemetry, LiveState, StatsSnapshot]:
        """The telemetry, live state and snapshot of the whole server: this process alone, or with
        ``EMBED_WORKERS > 1`` the engine's counters plus every worker's (asked of the engine)."""
        live = self.live_state()
        if self.engine is None:
            state = self.telemetry.state()
            live.engines = [EngineStats.of(0, live.device, state, live.queue_tokens)]
            return self.telemetry, live, self.telemetry.snapshot(live)
        try:
            answer, live.engines = await self.engine.whole_server()
        except QueueFullError as exc:  # no engine and no ledger to answer from
            raise OverloadedError(str(exc), retry_after=exc.retry_after) from None
        telemetry = Telemetry.combined([answer.engine, *answer.workers])
        live.queue_tokens = answer.queue_tokens
        live.inputs_in_flight = answer.in_flight
        live.gpu = answer.gpu
        snapshot = telemetry.snapshot(live)
        snapshot.workers = answer.worker_count or 1
        snapshot.engine_restarts = answer.engine_restarts
        snapshot.worker_restarts = answer.worker_restarts
        return telemetry, live, snapshot

    async def stats(self) -> StatsSnapshot:
        return (await self.whole_server())[2]

    async def metrics(self) -> bytes:
        telemetry, live, _ = await self.whole_server()
        return telemetry.render_prometheus(live)


def names_of(models: list[ServedModel]) -> dict[str, ServedModel]:
    """Every id a request may send, to the model it names: each model's served id and aliases, and
    its ``EMBED_MODEL`` path where no other model has the same one."""
    found: dict[str, ServedModel] = {}
    paths = [model.settings.model for model in models]
    for model in models:
        settings = model.settings
        for name in (settings.served_model, *settings.model_aliases):
            found.setdefault(name, model)
        if paths.count(settings.model) == 1:
            found.setdefault(settings.model, model)
    return found
