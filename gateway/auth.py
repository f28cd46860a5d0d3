"""API keys: ``Authorization: Bearer <key>`` on everything but /health.

Each route says what it needs in its ``opt``: ``{"auth": "api"}`` (the embeddings API, models),
``{"auth": "ops"}`` (/stats, /metrics, /dashboard: open when ``EMBED_PUBLIC_METRICS=true``), or
nothing (open). Keys are compared in constant time against every configured key.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from gateway.errors import AuthenticationError

__all__ = ["api_key_guard"]


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def api_key_guard(keys: frozenset[str], *, public_metrics: bool) -> Guard:
    encoded = [key.encode() for key in sorted(keys)]

    # async on purpose: Litestar runs a sync guard in a worker thread, a hop (and a GIL hand-off)
    # per request that cost the hit path a fifth of its throughput.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        needs = handler.opt.get("auth")
        if not encoded or needs is None or (needs == "ops" and public_metrics):
            return
        presented = _presented_key(connection)
        if presented is None:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
        candidate = presented.encode()
        # Compare against every key (no early exit), so timing does not tell which one was close.
        matched = False
        for key in encoded:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")

    return guard
