"""Build the Litestar app. The lifespan owns every resource: model, batcher, cache.

This is the one module that wires the pieces together. ``create_app(settings)`` is cheap: nothing
is loaded until the server starts, so ``embedding-gateway openapi`` can build the app to export its
schema without a model. Tests pass a loaded ``encoder`` (and may pass a ``cache``) to share one
model across many apps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from litestar import Litestar
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from encoder import Encoder, load_encoder
from encoder.batcher import MicroBatcher
from encoder.onnx_int8 import GateFloor
from gateway.core.cache import BlobCache, CircuitBreakerCache, MemoryBlobCache, RedisBlobCache
from gateway.core.inputs import TokenIdDecoder
from gateway.core.schemas import request_schema_components
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import Telemetry
from gateway.http.auth import api_key_guard
from gateway.http.errors import exception_handlers
from gateway.http.middleware import RequestContextMiddleware, add_request_id_header
from gateway.http.routes import ROUTES
from gateway.http.runtime import Runtime
from gateway.settings import Settings

__all__ = ["create_app", "load_model"]

logger = logging.getLogger("gateway")

VERSION = "0.2.0"


def load_model(settings: Settings) -> Encoder:
    """Load and warm up the configured model (seconds to minutes: call it before serving)."""
    encoder = load_encoder(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cpu_threads=settings.cpu_threads or None,
        max_tokens=settings.max_input_tokens or None,
        truncate=settings.truncate,
        revision=settings.revision or None,
        quantize=settings.quantize,
        onnx_cache_dir=settings.onnx_cache_dir or None,
        int8_floor=GateFloor(
            min_cosine=settings.int8_min_cosine,
            mean_cosine=settings.int8_min_mean_cosine,
            top10_overlap=settings.int8_min_top10_overlap,
        ),
    )
    encoder.warmup()
    return encoder


def make_cache(settings: Settings) -> BlobCache | None:
    """The configured cache: Redis behind a circuit breaker, an in-process LRU, or none."""
    if not settings.cache:
        return None
    if settings.redis_url:
        redis_cache = RedisBlobCache(
            settings.redis_url, ttl_seconds=settings.cache_ttl_seconds, timeout_s=settings.cache_timeout_ms / 1000
        )
        return CircuitBreakerCache(
            redis_cache, failures=settings.cache_breaker_failures, cooldown_s=settings.cache_breaker_seconds
        )
    return MemoryBlobCache(max_items=settings.memory_cache_items, ttl_seconds=settings.cache_ttl_seconds)


def create_app(
    settings: Settings,
    *,
    encoder: Encoder | None = None,
    cache: BlobCache | None = None,
    telemetry: Telemetry | None = None,
) -> Litestar:
    """The app for ``settings``. ``encoder``, ``cache`` and ``telemetry`` replace what the lifespan
    would build (tests share one loaded model, or observe or break the telemetry)."""
    telemetry = telemetry or Telemetry()
    keys = settings.api_key_set()  # no keys, no guard: not even a call per request

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        model = encoder if encoder is not None else await asyncio.to_thread(load_model, settings)
        vector_cache = cache if cache is not None else make_cache(settings)
        batcher = MicroBatcher(
            model,
            max_batch_tokens=settings.max_batch_tokens or None,
            max_batch_size=settings.max_batch_size,
            max_queue_tokens=settings.max_queue_tokens,
            observer=telemetry,
        )
        await batcher.start()
        service = EmbeddingService(
            encoder=model,
            batcher=batcher,
            cache=vector_cache,
            telemetry=telemetry,
            cache_prefix=settings.cache_prefix,
            max_request_tokens=settings.max_request_tokens,
            truncate=settings.truncate,
        )
        runtime = Runtime(
            settings=settings,
            encoder=model,
            batcher=batcher,
            cache=vector_cache,
            service=service,
            telemetry=telemetry,
            token_decoder=TokenIdDecoder(),
        )
        app.state.runtime = runtime
        backend = vector_cache.backend if vector_cache else "off"
        if vector_cache is not None and not await vector_cache.ping():
            logger.warning("cache %s is unreachable at start; serving without it until it answers", backend)
        logger.info(
            "ready: model=%s served_as=%s fingerprint=%s device=%s dtype=%s threads=%d cache=%s backend=%s "
            "quantization=%s numerics=%s",
            settings.model,
            settings.served_model,
            model.fingerprint,
            model.device,
            model.dtype,
            model.threads,
            backend,
            model.backend.name,
            model.quantization,
            model.numerics,
        )
        try:
            yield
        finally:
            runtime.draining = True
            await service.drain(timeout_s=settings.shutdown_timeout_s)
            await batcher.stop()
            if vector_cache is not None and cache is None:
                await vector_cache.close()

    app = Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        exception_handlers=exception_handlers(),
        middleware=[
            DefineMiddleware(
                partial(RequestContextMiddleware, telemetry=telemetry, json_logs=settings.log_format == "json")
            )
        ],
        guards=[api_key_guard(keys, public_metrics=settings.public_metrics)] if keys else [],
        before_send=[add_request_id_header],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="embedding-gateway",
            version=VERSION,
            description="OpenAI-compatible embeddings with a Redis vector cache.",
            path="/docs",
        ),
        debug=False,
        logging_config=None,
    )
    # Litestar documents bodies it decodes itself; ours is decoded strictly by msgspec in the route.
    app.openapi_schema.components.schemas.update(request_schema_components())
    return app
