"""API keys, deny by default: ``Authorization: Bearer <key>`` on every route unless it is public.

With keys configured, :class:`ApiKeyMiddleware` (an app middleware, so it sees every routed
request and its handler) admits a request to a route only with a key, unless the route's ``opt``
says otherwise:
``{"public": True}`` (``/health``, ``/livez``, ``/readyz``: probes and load balancers carry no key)
or ``{"ops": True}`` (``/stats``, ``/metrics``, ``/dashboard``: open when ``EMBED_PUBLIC_METRICS``
is on). A new route without either is protected. Keys are compared in constant time against every
configured key. The key that matched (:class:`~gateway.core.keys.ApiKey`: its name and limits,
from ``EMBED_API_KEYS_FILE``) is kept in the request's scope state: :func:`client_key` reads it.
On an embedding route a key with limits is then admitted against its buckets (``admit``).

A middleware rather than a Litestar guard: Litestar calls each guard with a copy of the route
handler (``copy(handler)``, 15 us per guard and request here), more than the whole hit path
spends on authentication and rate limiting together.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from litestar import Request
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.core.errors import GatewayError, UnauthenticatedError
from gateway.core.keys import ApiKey
from gateway.http.errors import gateway_error

__all__ = ["OPS", "PUBLIC", "Admit", "ApiKeyMiddleware", "client_key", "client_name"]

PUBLIC = {"public": True}
OPS = {"ops": True}


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


_CLIENT_KEY = "gateway.key"


def client_key(scope: Scope) -> ApiKey | None:
    """The API key this request was admitted with (None: no keys configured, or a public route)."""
    found = scope.get("state", {}).get(_CLIENT_KEY)
    return found if isinstance(found, ApiKey) else None


def client_name(scope: Scope) -> str | None:
    """The admitted key's name from the keys file (None for unnamed keys): what telemetry counts by."""
    found = client_key(scope)
    return found.name if found is not None else None


Admit = Callable[[Scope, ApiKey], Awaitable[None]]


class ApiKeyMiddleware:
    """Refuses a request without a configured key (401), or one its key's limits refuse (429), with
    OpenAI's error envelope; hands every other request on with its key in the scope state.

    ``admit`` (:meth:`~gateway.http.clients.ClientHooks.admit`) runs on embedding routes for keys
    with limits and raises the 429."""

    def __init__(self, app: ASGIApp, *, keys: Sequence[ApiKey], public_metrics: bool, admit: Admit) -> None:
        self.app = app
        self.public_metrics = public_metrics
        self.admit = admit
        self.encoded = [(entry.key.encode(), entry) for entry in sorted(keys, key=lambda entry: entry.key)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            try:
                await self._check(scope)
            except GatewayError as exc:
                # Answered here, inside the request context middleware (which records the status),
                # with the same handler Litestar would pick for the error.
                request: Request[Any, Any, Any] = Request(scope, receive, send)
                await gateway_error(request, exc).to_asgi_response(app=None, request=request)(scope, receive, send)
                return
        elif scope["type"] == ScopeType.WEBSOCKET:
            await self._check(scope)  # none today; Litestar closes the socket on the error
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope) -> None:
        opt = scope["route_handler"].opt
        if opt.get("public") or (self.public_metrics and opt.get("ops")):
            return
        presented = _presented_key(scope)
        if presented is None:
            raise UnauthenticatedError("Missing API key: send it as 'Authorization: Bearer <key>'.")
        candidate = presented.encode()
        # Compare against every key (no early exit), so timing does not tell which one was close.
        matched: ApiKey | None = None
        for key, entry in self.encoded:
            if hmac.compare_digest(candidate, key):
                matched = entry
        if matched is None:
            raise UnauthenticatedError("Incorrect API key provided.")
        scope.setdefault("state", {})[_CLIENT_KEY] = matched
        if matched.limited and opt.get("embedding"):
            await self.admit(scope, matched)
