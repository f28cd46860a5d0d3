"""The live objects one server process holds, built by :mod:`gateway.http.app`'s lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from encoder.batcher import QueueFullError
from encoder.kinds import OutputKind
from gateway.core.backend import Batcher, EncoderInfo
from gateway.core.batch.runner import BatchRunner
from gateway.core.batch.service import BatchService
from gateway.core.cache import BlobCache, CircuitBreakerCache
from gateway.core.errors import ModelNotFoundError, OverloadedError
from gateway.core.history import HistoryRing
from gateway.core.inputs import TokenIdDecoder
from gateway.core.models_file import ANY_MODEL
from gateway.core.prompts import PromptBook
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import (
    BatchStats,
    EngineStats,
    LiveState,
    ModelStats,
    StatsSnapshot,
    Telemetry,
    TelemetryState,
    gpu_stats,
)
from gateway.engine.protocol import StatsAnswer
from gateway.engine.router import EngineRouter, with_fresh_engines
from gateway.http.answers import AnswerBuilder
from gateway.settings import Settings

__all__ = ["Runtime", "ServedModel", "batch_metrics"]


@dataclass(slots=True)
class ServedModel:
    """One model the server serves: its settings (the server's, with its ``[[models]]`` table's
    fields in place), encoder, micro-batcher, service and prompts."""

    settings: Settings
    encoder: EncoderInfo
    batcher: Batcher
    service: EmbeddingService
    prompts: PromptBook

    @property
    def reranker(self) -> bool:
        """A cross-encoder (scores pairs on the rerank routes), not an embedding model."""
        return OutputKind.SCORE in self.encoder.outputs

    @property
    def ranks(self) -> bool:
        """A cross-encoder of one label: one score a pair (a two-label classifier cannot rank)."""
        return self.reranker and self.encoder.output_width(OutputKind.SCORE) == 1

    @property
    def ranks_with_own_outputs(self) -> bool:
        """An embedding model with dense, sparse and ColBERT outputs (bge-m3): it ranks too."""
        return self.encoder.outputs >= {OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT}

    def live(self) -> ModelStats:
        """What /stats' ``models`` shows of it now (the telemetry adds its counters)."""
        encoder = self.encoder
        return ModelStats(
            model=self.settings.served_model,
            device=encoder.device,
            dtype=encoder.dtype,
            fingerprint=encoder.fingerprint,
            queue_tokens=self.batcher.queue_tokens,
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
    # a worker (EMBED_WORKERS > 1 or EMBED_DEVICES): its links to the engines, one router per model
    engines: list[EngineRouter] = field(default_factory=list)
    # Every model served (EMBED_MODELS_FILE), the default first; empty: the one above alone.
    models: list[ServedModel] = field(default_factory=list)
    batches: BatchService | None = None  # OpenAI's Batch API (EMBED_BATCH_DIR); None: off
    batch_runner: BatchRunner | None = None
    _by_name: dict[str, ServedModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [ServedModel(self.settings, self.encoder, self.batcher, self.service, self.prompts)]
        self._by_name = names_of(self.models)

    def model_for(self, name: str | None, *, reranker: bool = False) -> ServedModel:
        """The model a request names (its id, an alias, its ``path``), or the one with alias ``*``
        for any other name; else a 404 that lists what is served. None names the default: the
        first model of the kind the route serves (``reranker``: a cross-encoder, else a model that
        ranks with its own outputs), else the first."""
        if name is None:
            if not reranker:
                return next((model for model in self.models if not model.reranker), self.models[0])
            # a cross-encoder of one label; else a model that ranks with its own outputs (bge-m3)
            ranking = [model for model in self.models if model.ranks]
            ranking += [model for model in self.models if model.ranks_with_own_outputs]
            return ranking[0] if ranking else self.models[0]
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
        failing = any(model.service.writes_failing for model in self.models)
        return "degraded" if breaker_open or failing else "ok"

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
            pending_cache_writes=sum(model.service.pending_writes for model in self.models),
            asyncio_tasks=len(asyncio.all_tasks()),
            gpu=gpu,
            backend=encoder.numerics.split(":")[0],
            quantization="int8" if ":int8" in encoder.numerics else "none",
            models=[model.live() for model in self.models] if len(self.models) > 1 else [],
        )

    async def whole_server(self) -> tuple[Telemetry, LiveState, StatsSnapshot]:
        """The telemetry, live state and snapshot of the whole server: this process alone, or with
        ``EMBED_WORKERS > 1`` the engine's counters plus every worker's (asked of the engine)."""
        live = self.live_state()
        if not self.engines:
            state = self.telemetry.state()
            live.engines = [EngineStats.of(0, live.device, state, live.queue_tokens)]
            return self.telemetry, live, self.telemetry.snapshot(live)
        try:
            answer, live.engines = await _whole_server(self.engines)
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
        snapshot = (await self.whole_server())[2]
        batches = await self._batch_stats()
        return msgspec.structs.replace(snapshot, batches=batches) if batches is not None else snapshot

    async def metrics(self) -> bytes:
        telemetry, live, _ = await self.whole_server()
        text = telemetry.render_prometheus(live)
        batches = await self._batch_stats()
        return text + batch_metrics(batches) if batches is not None else text

    async def _batch_stats(self) -> BatchStats | None:
        """Batches across every replica (the job store's view); None when off or unreachable."""
        if self.batches is None:
            return None
        try:
            return await asyncio.wait_for(self.batches.progress(), timeout=2.0)
        except Exception:  # the job store is down: the rest of /stats still answers
            return None


def batch_metrics(stats: BatchStats) -> bytes:
    """The Batch API's gauges in Prometheus' text format (every replica's batches not yet final)."""
    active = GaugeMetricFamily(
        "embedding_batches_active", "Batch API batches not yet completed, failed, expired or cancelled."
    )
    active.add_metric([], stats.active)
    requests = GaugeMetricFamily(
        "embedding_batch_requests", "Request lines of the active batches, by state.", labels=["state"]
    )
    for state, count in (
        ("total", stats.requests_total),
        ("completed", stats.requests_completed),
        ("failed", stats.requests_failed),
    ):
        requests.add_metric([state], count)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([active, requests]))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def names_of(models: list[ServedModel]) -> dict[str, ServedModel]:
    """Every id a request may send, to the model it names: each model's served id and aliases, and
    its ``EMBED_MODEL`` path where no other model has the same one."""
    found: dict[str, ServedModel] = {}
    paths = [model.settings.model for model in models]
    for model in models:  # the ids each model declares first: a path never takes one of them
        for name in (model.settings.served_model, *model.settings.model_aliases):
            found.setdefault(name, model)
    for model in models:
        if paths.count(model.settings.model) == 1:
            found.setdefault(model.settings.model, model)
    return found


async def _whole_server(routers: list[EngineRouter]) -> tuple[StatsAnswer, list[EngineStats]]:
    """Every model's engines asked at once (several models: one router each): the counters of the
    first answer that comes from an engine (each holds every process's, from the shared ledger),
    the queues summed, and every engine's own figures, numbered across the models."""
    answers = await asyncio.gather(*(router.whole_server() for router in routers))
    whole = next((answer for answer, _, _ in answers if answer.from_engine), answers[0][0])
    engines: list[EngineStats] = []
    fresh: dict[str, TelemetryState] = {}
    for answer, own, answered in answers:
        fresh.update(answered)
        for engine in own:
            engines.append(msgspec.structs.replace(engine, index=len(engines)))
        if answer is not whole:
            whole.queue_tokens += answer.queue_tokens
            whole.in_flight += answer.in_flight
    with_fresh_engines(whole, fresh)  # the other models' engines as they answered, not as last kept
    return whole, engines
