"""API keys, deny by default: ``Authorization: Bearer <key>`` on every route unless it is public.

With keys configured, a route needs a key unless its ``opt`` says otherwise:
``{"public": True}`` (``/health``, ``/livez``, ``/readyz``: probes and load balancers carry no key)
or ``{"ops": True}`` (``/stats``, ``/metrics``, ``/dashboard``: open when ``EMBED_PUBLIC_METRICS``
is on). A new route without either is protected. Keys are compared in constant time against every
configured key. The key that matched (:class:`~gateway.core.keys.ApiKey`: its name and limits,
from ``EMBED_API_KEYS_FILE``) is kept in the request's scope state: :func:`client_key` reads it.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard, Scope

from gateway.core.errors import UnauthenticatedError
from gateway.core.keys import ApiKey

__all__ = ["OPS", "PUBLIC", "api_key_guard", "client_key", "client_name"]

PUBLIC = {"public": True}
OPS = {"ops": True}


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


_CLIENT_KEY = "gateway.key"


def client_key(scope: Scope) -> ApiKey | None:
    """The API key this request was admitted with (None: no keys configured, or a public route)."""
    found = scope.get("state", {}).get(_CLIENT_KEY)
    return found if isinstance(found, ApiKey) else None


def client_name(scope: Scope) -> str | None:
    """The admitted key's name from the keys file (None for unnamed keys): what telemetry counts by."""
    found = client_key(scope)
    return found.name if found is not None else None


def api_key_guard(keys: Sequence[ApiKey], *, public_metrics: bool) -> Guard:
    encoded = [(entry.key.encode(), entry) for entry in sorted(keys, key=lambda entry: entry.key)]

    # async on purpose: Litestar runs a sync guard in a worker thread, a hop (and a GIL hand-off)
    # per request that cost the hit path a fifth of its throughput.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public") or (public_metrics and handler.opt.get("ops")):
            return
        presented = _presented_key(connection)
        if presented is None:
            raise UnauthenticatedError("Missing API key: send it as 'Authorization: Bearer <key>'.")
        candidate = presented.encode()
        # Compare against every key (no early exit), so timing does not tell which one was close.
        matched: ApiKey | None = None
        for key, entry in encoded:
            if hmac.compare_digest(candidate, key):
                matched = entry
        if matched is None:
            raise UnauthenticatedError("Incorrect API key provided.")
        connection.scope.setdefault("state", {})[_CLIENT_KEY] = matched

    return guard
