"""Build the Litestar app. The lifespan owns every resource: model, batcher, cache.

This is the one module that wires the pieces together. ``create_app(settings)`` is cheap: nothing
is loaded until the server starts, so ``embedding-gateway openapi`` can build the app to export its
schema without a model. Tests pass a loaded ``encoder`` (and may pass a ``cache``) to share one
model across many apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from litestar import Litestar, Router
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.types import BeforeMessageSendHookHandler, ControllerRouterHandler, Message, Scope

from encoder import Encoder
from encoder.batcher import MicroBatcher
from encoder.model_files import read_prompts
from encoder.shared_forward import SharedForward
from gateway.core.backend import Batcher, EncoderInfo
from gateway.core.cache import BlobCache, CircuitBreakerCache, MemoryBlobCache, RedisBlobCache
from gateway.core.history import HistoryRing, run_sampler
from gateway.core.inputs import TokenIdDecoder
from gateway.core.keys import ApiKey, load_keys
from gateway.core.models_file import model_settings
from gateway.core.prompts import PromptBook
from gateway.core.ratelimit import RateLimiter
from gateway.core.schemas import request_schema_components
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import ModelTelemetry, Telemetry
from gateway.engine.client import EngineLink
from gateway.engine.router import EngineRouter
from gateway.http.answers import AnswerBuilder
from gateway.http.auth import ApiKeyMiddleware
from gateway.http.batch_api import running_batches
from gateway.http.clients import ClientHooks
from gateway.http.compression import AnswerCompressor, compression_middleware
from gateway.http.errors import exception_handlers
from gateway.http.middleware import InFlight, RequestContextMiddleware, request_id
from gateway.http.routes import EMBEDDING_ROUTES, OTHER_ROUTES, TEI_ROUTER
from gateway.http.routes.batches import batch_routes
from gateway.http.routes.rerank import body_schemas as rerank_body_schemas
from gateway.http.routes.tei import body_schemas as tei_body_schemas
from gateway.http.runtime import Runtime, ServedModel
from gateway.loading import load_model  # read from here: the CLI imports it here, tests patch it here
from gateway.settings import Settings

__all__ = ["create_app", "load_model"]

logger = logging.getLogger("gateway")

VERSION = "0.2.0"


def _response_headers(clients: ClientHooks, *, worker: bool) -> BeforeMessageSendHookHandler:
    """The app's one ``before_send`` hook (Litestar wraps ``send`` once for all of them).

    Every answer, unrouted 404s included, gets its ``x-request-id``, and with ``EMBED_WORKERS > 1``
    an ``x-worker-pid`` (which worker answered, for operators and tests). An embedding route's
    error answer gets its pacing headers and is counted for its key; a success built those itself
    (:class:`~gateway.http.answers.AnswerBuilder`).
    """

    async def before_send(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        headers = list(message.get("headers", ()))
        headers.append((b"x-request-id", request_id(scope).encode()))
        if worker:
            headers.append((b"x-worker-pid", str(os.getpid()).encode()))
        status = message["status"]
        if status >= 400:
            handler = scope.get("route_handler")
            if handler is not None and handler.opt.get("embedding"):
                headers += clients.answer_headers(scope, status)
        message["headers"] = headers

    return before_send


def _answer_builder(settings: Settings, clients: ClientHooks) -> AnswerBuilder:
    compressor = AnswerCompressor(settings.compression_min_bytes) if settings.compression else None
    return AnswerBuilder(clients.answer_headers, compressor)


def _compressed(settings: Settings) -> list[DefineMiddleware]:
    compression = compression_middleware(settings)
    return [compression] if compression else []


def _routes(settings: Settings) -> list[ControllerRouterHandler]:
    """Embedding routes compress their own answers (answers.py); the rest go through Litestar's middleware."""
    # TEI's routes answer like the embedding routes (their own compression) with TEI's error shape.
    others = [*OTHER_ROUTES, *batch_routes(settings)]
    return [*EMBEDDING_ROUTES, TEI_ROUTER, Router("/", route_handlers=others, middleware=_compressed(settings))]


def _openapi(settings: Settings) -> OpenAPIConfig:
    """The schema and its pages under ``/docs``, compressed like the other routes (a 45 KB document)."""
    return OpenAPIConfig(
        title="embedding-gateway",
        version=VERSION,
        description="OpenAI-compatible embeddings with a Redis vector cache.",
        openapi_router=Router("/docs", route_handlers=[], middleware=_compressed(settings), include_in_schema=False),
    )


def _middleware(
    settings: Settings, keys: Sequence[ApiKey], telemetry: Telemetry, clients: ClientHooks
) -> list[DefineMiddleware]:
    """Request context outermost (it records every status), then the API keys (none: no check at all)."""
    in_flight = InFlight(settings.max_connections, telemetry)  # one cap for every route's stack
    middleware = [
        DefineMiddleware(
            partial(
                RequestContextMiddleware,
                telemetry=telemetry,
                json_logs=settings.log_format == "json",
                in_flight=in_flight,
            )
        )
    ]
    if keys:
        middleware.append(
            DefineMiddleware(
                ApiKeyMiddleware,
                keys=keys,
                public_metrics=settings.public_metrics,
                admit=clients.admit,
                limiter=clients.limiter,  # a key's tokens are reserved before the work (issue 26)
            )
        )
    return middleware


def prompt_book(model_path: Path, default_name: str) -> PromptBook:
    """The served model's prompts; ``default_name`` (EMBED_DEFAULT_PROMPT_NAME) overrides its default."""
    found = read_prompts(model_path)
    return PromptBook(found.prompts, default_name or found.default_name)


async def _log_ready(served: Sequence[ServedModel], cache: BlobCache | None) -> None:
    backend = cache.backend if cache is not None else "off"  # an empty cache is falsy
    if cache is not None and not await cache.ping():
        logger.warning("cache %s is unreachable at start; serving without it until it answers", backend)
    for one in served:
        model = one.encoder
        logger.info(
            "ready: model=%s served_as=%s cache_namespace=%s numerics=%s device=%s dtype=%s threads=%d "
            "cache=%s backend=%s quantization=%s",
            one.settings.model,
            one.settings.served_model,
            one.service.namespace,
            model.numerics,
            model.device,
            model.dtype,
            model.threads,
            backend,
            model.numerics.split(":")[0],
            "int8" if ":int8" in model.numerics else "none",
        )


def _routers(models: Sequence[Settings], sockets: Sequence[Path], telemetry: Telemetry) -> list[EngineRouter]:
    """A worker's links: the supervisor starts the same number of engines for each model (one per
    ``EMBED_DEVICES`` entry), model after model, so ``sockets`` splits into one group per model."""
    if len(sockets) % len(models):
        raise ValueError(f"{len(sockets)} engine sockets cannot be split over {len(models)} models")
    per_model = len(sockets) // len(models)
    return [
        EngineRouter(
            [
                EngineLink(path, truncate=model.truncate, telemetry=telemetry)
                for path in sockets[number * per_model : (number + 1) * per_model]
            ]
        )
        for number, model in enumerate(models)
    ]


async def _local_models(
    models: Sequence[Settings],
    encoders: Sequence[Encoder],
    cache: BlobCache | None,
    telemetry: Telemetry,
    forward_threads: dict[str, SharedForward],
) -> list[ServedModel]:
    """Each model in this process: loaded (unless given in ``encoders``), with its micro-batcher
    running. Several models are also counted apart (:class:`ModelTelemetry`) and share one forward
    thread per device (``forward_threads``: the caller shuts them down at the end; a start that
    fails stops here what it started)."""
    served: list[ServedModel] = []
    try:
        for number, settings in enumerate(models):
            loaded = encoders[number] if number < len(encoders) else await asyncio.to_thread(load_model, settings)
            observer = ModelTelemetry(telemetry, settings.served_model) if len(models) > 1 else None
            forward = None
            if len(models) > 1:
                device = str(loaded.torch_device)
                if device not in forward_threads:
                    forward_threads[device] = SharedForward(f"encoder-forward-{device}")
                forward = forward_threads[device].lane()
            batcher = MicroBatcher(
                loaded,
                max_batch_tokens=settings.max_batch_tokens or None,
                max_batch_size=settings.max_batch_size,
                max_queue_tokens=settings.max_queue_tokens,
                pipeline_depth=settings.pipeline_depth,
                observer=observer or telemetry,
                forward=forward,
            )
            await batcher.start()
            served.append(_served(settings, loaded, batcher, cache, observer or telemetry))
    except BaseException:  # a later model failed to load: what the earlier ones started stops
        for one in served:
            await one.batcher.stop()
        for thread in forward_threads.values():
            thread.shutdown()
        forward_threads.clear()
        raise
    return served


def _served(
    settings: Settings,
    encoder: EncoderInfo,
    batcher: Batcher,
    cache: BlobCache | None,
    telemetry: Telemetry | ModelTelemetry,
) -> ServedModel:
    """One model's service (its cache namespace is its own fingerprint's) and prompts."""
    service = EmbeddingService(
        encoder=encoder,
        batcher=batcher,
        cache=cache,
        telemetry=telemetry,
        cache_prefix=settings.cache_prefix,
        max_request_tokens=settings.max_request_tokens,
        truncate=settings.truncate,
        share_numerics=settings.cache_share_numerics,
        cache_dtype=settings.cache_dtype,
    )
    return ServedModel(settings, encoder, batcher, service, prompt_book(encoder.path, settings.default_prompt_name))


def make_cache(settings: Settings) -> BlobCache | None:
    """The configured cache: Redis behind a circuit breaker, an in-process LRU, or none."""
    if not settings.cache:
        return None
    if settings.redis_url:
        redis_cache = RedisBlobCache(
            settings.redis_url.strip(),
            ttl_seconds=settings.cache_ttl_seconds,
            timeout_s=settings.cache_timeout_ms / 1000,
            mode=settings.redis_mode,
            sentinel_master=settings.redis_sentinel_master.strip(),
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_ms / 1000,
            node_cooldown_s=min(1.0, settings.cache_breaker_seconds),
        )
        return CircuitBreakerCache(
            redis_cache, failures=settings.cache_breaker_failures, cooldown_s=settings.cache_breaker_seconds
        )
    return MemoryBlobCache(max_bytes=settings.memory_cache_bytes, ttl_seconds=settings.cache_ttl_seconds)


def create_app(
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    encoders: Sequence[Encoder] = (),
    cache: BlobCache | None = None,
    telemetry: Telemetry | None = None,
    engine_sockets: Sequence[Path] = (),
) -> Litestar:
    """The app for ``settings``. ``encoder``, ``cache`` and ``telemetry`` replace what the lifespan
    would build (tests share one loaded model, or observe or break the telemetry); ``encoders``
    are the models of ``EMBED_MODELS_FILE``, loaded, in the file's order (``serve`` loads them
    before the port opens).

    ``engine_sockets`` make this an HTTP worker (``EMBED_WORKERS > 1`` or several ``EMBED_DEVICES``):
    no model here; misses go to the engine processes listening there, each owning the model on its
    device and its micro-batcher (:class:`~gateway.engine.router.EngineRouter` picks one per batch)."""
    telemetry = telemetry or Telemetry()
    models = model_settings(settings)  # EMBED_MODEL alone, or each [[models]] table's
    if encoder is not None and not encoders:
        encoders = (encoder,)
    keys = load_keys(settings)
    limited = any(entry.limited for entry in keys)
    limiter = RateLimiter(
        redis_url=settings.redis_url.strip() if limited else "",  # shared buckets: every replica sees one
        mode=settings.redis_mode,  # the cache's Redis, reached the same way (issue 26)
        sentinel_master=settings.redis_sentinel_master.strip(),
        max_connections=settings.redis_max_connections,
        prefix=settings.cache_prefix,
        timeout_s=settings.cache_timeout_ms / 1000,
        unsettled=settings.rate_limit_local_share,
    )
    clients = ClientHooks(limiter, telemetry)
    answers = _answer_builder(settings, clients)
    history = HistoryRing(interval_s=settings.history_interval_s, capacity=settings.history_samples)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        vector_cache = cache if cache is not None else make_cache(settings)
        served: list[ServedModel] = []
        # Several models on one device share one forward thread (see MicroBatcher's ``forward``).
        forward_threads: dict[str, SharedForward] = {}
        routers: list[EngineRouter] = []
        if engine_sockets:
            routers = _routers(models, engine_sockets, telemetry)
            await asyncio.gather(*(router.start(timeout_s=settings.engine_start_timeout_s) for router in routers))
            for model, router in zip(models, routers, strict=True):
                assert router.encoder is not None
                observer = ModelTelemetry(telemetry, model.served_model) if len(models) > 1 else telemetry
                served.append(_served(model, router.encoder, router, vector_cache, observer))
        else:
            served = await _local_models(models, encoders, vector_cache, telemetry, forward_threads)
        default = served[0]
        runtime = Runtime(
            settings=default.settings,
            encoder=default.encoder,
            batcher=default.batcher,
            cache=vector_cache,
            service=default.service,
            telemetry=telemetry,
            token_decoder=TokenIdDecoder(),
            answers=answers,
            prompts=default.prompts,
            models=served,
        )
        runtime.history = history
        runtime.engines = routers
        app.state.runtime = runtime
        await limiter.connect()
        sampler = asyncio.create_task(run_sampler(history, telemetry, runtime.live_state), name="history-sampler")
        # What exists now (the model, tokenizer, app) lives as long as the process: out of the garbage
        # collector's reach, so a full collection scans only what requests leave behind. A full one
        # over a big heap stalls the event loop (0.49 s in the test suite's process, past the 250 ms
        # Redis deadline of every lookup in flight).
        gc.freeze()
        await _log_ready(served, vector_cache)
        try:
            async with running_batches(app, settings, runtime):
                yield
        finally:
            runtime.draining = True
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for one in served:
                await one.service.drain(timeout_s=settings.shutdown_timeout_s)
                await one.batcher.stop()
            for thread in forward_threads.values():
                thread.shutdown()
            await limiter.close()
            if vector_cache is not None and cache is None:
                await vector_cache.close()

    app = Litestar(
        route_handlers=_routes(settings),
        lifespan=[lifespan],
        exception_handlers=exception_handlers(),
        middleware=_middleware(settings, keys, telemetry, clients),
        before_send=[_response_headers(clients, worker=bool(engine_sockets))],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=_openapi(settings),
        debug=False,
        logging_config=None,
    )
    # Litestar documents bodies it decodes itself; ours is decoded strictly by msgspec in the route.
    app.openapi_schema.components.schemas.update(
        {**request_schema_components(), **tei_body_schemas(), **rerank_body_schemas()}
    )
    return app
