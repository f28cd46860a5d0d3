"""Probes and observability: /health, /livez, /readyz, /stats, /stats/history, /metrics and /dashboard."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import msgspec
from litestar import MediaType, Request, Response, get

from gateway.core.history import History
from gateway.core.telemetry import PROMETHEUS_CONTENT_TYPE, StatsSnapshot
from gateway.http.auth import OPS, PUBLIC
from gateway.http.routes.common import ERRORS, runtime_of

__all__ = ["dashboard", "health", "livez", "metrics", "readyz", "stats", "stats_history"]


class CacheHealth(msgspec.Struct):
    backend: str
    status: Literal["off", "ok", "degraded", "unreachable"]


class Health(msgspec.Struct):
    status: Literal["ok", "degraded"]
    model: str
    device: str
    cache: CacheHealth


class Probe(msgspec.Struct, omit_defaults=True):
    status: Literal["ok", "unavailable"]
    cache: str | None = None  # /readyz: the cache's state; a degraded cache does not make the server unready


@get("/health", summary="Model, device and cache health", tags=["operations"], opt=PUBLIC)
async def health(request: Request[Any, Any, Any]) -> Health:
    runtime = runtime_of(request)
    cache_status = await runtime.cache_status()
    return Health(
        status="ok" if cache_status in ("ok", "off") else "degraded",
        model=runtime.settings.served_model,
        device=runtime.encoder.device,
        cache=CacheHealth(backend=runtime.cache.backend if runtime.cache is not None else "off", status=cache_status),
    )


@get("/livez", summary="Liveness: the process answers", tags=["operations"], opt=PUBLIC)
async def livez() -> Probe:
    return Probe(status="ok")


@get(
    "/readyz",
    summary="Readiness: 200 while embedding requests are taken, 503 while draining or without an encoder worker",
    tags=["operations"],
    opt=PUBLIC,
    responses={503: ERRORS[503]},
)
async def readyz(request: Request[Any, Any, Any]) -> Response[Probe]:
    runtime = runtime_of(request)
    ready = runtime.ready
    probe = Probe(status="ok" if ready else "unavailable", cache=await runtime.cache_status())
    return Response(probe, status_code=200 if ready else 503)


@get("/stats", summary="Counters for dashboards", tags=["operations"], responses={401: ERRORS[401]}, opt=OPS)
async def stats(request: Request[Any, Any, Any]) -> StatsSnapshot:
    return await runtime_of(request).stats()


@get(
    "/stats/history",
    summary="Per-interval samples of the last hour (EMBED_HISTORY_INTERVAL_S x EMBED_HISTORY_SAMPLES), oldest first",
    tags=["operations"],
    responses={401: ERRORS[401]},
    opt=OPS,
)
async def stats_history(request: Request[Any, Any, Any]) -> History:
    runtime = runtime_of(request)
    if runtime.history is None:
        return History(interval_seconds=runtime.settings.history_interval_s, capacity=0, samples=[])
    return runtime.history.history()


@get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["operations"],
    responses={401: ERRORS[401]},
    opt=OPS,
    media_type=PROMETHEUS_CONTENT_TYPE,
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(await runtime_of(request).metrics(), media_type=PROMETHEUS_CONTENT_TYPE)


@cache
def _dashboard_html() -> bytes:
    return (Path(__file__).parent.parent / "static" / "dashboard.html").read_bytes()


@get(
    "/dashboard",
    summary="A self-contained live dashboard (draws /stats/history, polls /stats)",
    tags=["operations"],
    # The page holds no data, so it opens without a key: a browser cannot send one with the page's
    # own request. It reads the key from /dashboard#key=<key> (a fragment never leaves the browser)
    # and sends it with its /stats and /stats/history requests, which stay protected.
    opt=PUBLIC,
    media_type=MediaType.HTML,
)
async def dashboard() -> Response[bytes]:
    return Response(_dashboard_html(), media_type=MediaType.HTML)
