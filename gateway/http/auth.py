"""API keys, deny by default: ``Authorization: Bearer <key>`` on every route unless it is public.

With keys configured, :class:`ApiKeyMiddleware` (an app middleware, so it sees every routed
request and its handler) admits a request to a route only with a key, unless the route's ``opt``
says otherwise:
``{"public": True}`` (``/health``, ``/livez``, ``/readyz``: probes and load balancers carry no key)
or ``{"ops": True}`` (``/stats``, ``/metrics``, ``/dashboard``: open when ``EMBED_PUBLIC_METRICS``
is on). A new route without either is protected. Keys are compared in constant time against every
configured key. The key that matched (:class:`~gateway.core.keys.ApiKey`: its name and limits,
from ``EMBED_API_KEYS_FILE``) is kept in the request's scope state: :func:`client_key` reads it.
On an embedding route a key with limits is then admitted against its buckets (``admit``), and a key
with ``tokens_per_minute`` gets a :class:`TokenReservation` (:func:`token_reservation`): the route
reserves the request's tokens with it once they are counted, before any encoding (issue 26), so an
embedding route that does not reserve serves that key's tokens unlimited.

A middleware rather than a Litestar guard: Litestar calls each guard with a copy of the route
handler (``copy(handler)``, 15 us per guard and request here), more than the whole hit path
spends on authentication and rate limiting together.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from litestar import Request
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.core.errors import GatewayError, TokensRateLimitedError, UnauthenticatedError
from gateway.core.keys import ApiKey
from gateway.core.ratelimit import RateLimiter, format_reset, over_tokens_limit
from gateway.http.errors import TEI_ERRORS, gateway_error, tei_error

__all__ = [
    "KEY_REQUESTS",
    "OPS",
    "PUBLIC",
    "Admit",
    "ApiKeyMiddleware",
    "TokenReservation",
    "client_key",
    "client_name",
    "token_reservation",
]

PUBLIC = {"public": True}
OPS = {"ops": True}
# A route with this ``opt`` (not an embedding one: /tokenize, /decode) spends a request of a limited
# key's requests per minute too, so a limit cannot be dodged through it.
KEY_REQUESTS = "key_requests"


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


_RESERVATION = "gateway.reservation"


def token_reservation(scope: Scope) -> TokenReservation | None:
    """The request's reservation against its key's tokens per minute (None: the key has no such limit)."""
    found = scope.get("state", {}).get(_RESERVATION)
    return found if isinstance(found, TokenReservation) else None


class TokenReservation:
    """The tokens one request has taken from its key's tokens-per-minute bucket.

    :meth:`cover` is called with the request's whole token count as soon as it is known, before
    the encoder works for it; they stay taken when the client hangs up. :meth:`release` gives them
    back when the server, not the client, failed the request.
    """

    __slots__ = ("key", "limiter", "reserved")

    def __init__(self, limiter: RateLimiter, key: ApiKey) -> None:
        assert key.tokens_per_minute, "only keys with tokens_per_minute reserve tokens"
        self.limiter = limiter
        self.key = key
        self.reserved = 0

    async def cover(self, tokens: int) -> None:
        """Hold ``tokens`` for this request. The first call takes them only if the bucket holds them
        all, else raises the 429 (or a 400 when they are more than the key's whole limit, which no
        wait would cure); a later one (the count came out otherwise) takes or gives back the
        difference without a check."""
        if tokens <= 0:
            return
        if self.reserved:
            if tokens != self.reserved:
                self.limiter.adjust_later(self.key, tokens - self.reserved)
                self.reserved = tokens
            return
        limit = self.key.tokens_per_minute
        assert limit is not None
        if tokens > limit:
            raise over_tokens_limit(self.key.name, limit, str(tokens))
        admission = await self.limiter.reserve(self.key, tokens)
        if not admission.admitted:
            wait = admission.retry_after
            left = max(0, math.floor(admission.levels.tokens))
            raise TokensRateLimitedError(
                f"Rate limit reached for key '{self.key.name}' on tokens per min (TPM): Limit {limit}, "
                f"Remaining {left}, Requested {tokens}. Please try again in {format_reset(wait)}.",
                retry_after=wait,
            )
        self.reserved = tokens

    def release(self) -> None:
        """Give the reserved tokens back (the request failed on the server's side)."""
        if self.reserved:
            self.limiter.adjust_later(self.key, -self.reserved)
            self.reserved = 0


Admit = Callable[[Scope, ApiKey], Awaitable[None]]


class ApiKeyMiddleware:
    """Refuses a request without a configured key (401), or one its key's limits refuse (429), with
    OpenAI's error envelope; hands every other request on with its key in the scope state.

    ``admit`` (:meth:`~gateway.http.clients.ClientHooks.admit`) runs on embedding routes for keys
    with limits and raises the 429; ``limiter`` then gives a key with ``tokens_per_minute`` its
    request's :class:`TokenReservation`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Sequence[ApiKey],
        public_metrics: bool,
        admit: Admit,
        limiter: RateLimiter,
    ) -> None:
        self.app = app
        self.public_metrics = public_metrics
        self.admit = admit
        self.limiter = limiter
        self.encoded = [(entry.key.encode(), entry) for entry in sorted(keys, key=lambda entry: entry.key)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            try:
                await self._check(scope)
            except GatewayError as exc:
                # Answered here, inside the request context middleware (which records the status),
                # with the same handler Litestar would pick for the error.
                request: Request[Any, Any, Any] = Request(scope, receive, send)
                answer = (tei_error if scope["route_handler"].opt.get(TEI_ERRORS) else gateway_error)(request, exc)
                await answer.to_asgi_response(app=None, request=request)(scope, receive, send)
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
        state = scope.setdefault("state", {})
        state[_CLIENT_KEY] = matched
        if matched.limited and (opt.get("embedding") or opt.get(KEY_REQUESTS)):
            await self.admit(scope, matched)
            if matched.tokens_per_minute and opt.get("embedding"):
                state[_RESERVATION] = TokenReservation(self.limiter, matched)
