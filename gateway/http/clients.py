"""Per-client behaviour of the embedding routes: key limits, pacing headers, per-key telemetry.

* :meth:`ClientHooks.guard` (an app guard after the API key guard) admits an embedding request
  against its key's buckets (:mod:`gateway.core.ratelimit`) or refuses it with 429
  ``rate_limit_exceeded`` (type ``requests`` or ``tokens``) and ``Retry-After``.
* :meth:`ClientHooks.before_send` (a ``before_send`` hook) runs as the answer starts: it charges
  the answered tokens to the key, adds OpenAI's ``x-ratelimit-*`` headers (from the key's buckets
  when it has limits, else from the encoder queue: tokens it still takes and how long the queued
  ones take) and ``x-cache-hits`` / ``x-cache-misses``, and counts the request under the key's name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Message, Scope

from gateway.core.errors import RequestsRateLimitedError, TokensRateLimitedError
from gateway.core.ratelimit import Admission, Levels, RateLimiter, format_reset
from gateway.core.telemetry import Telemetry
from gateway.http.auth import client_key
from gateway.http.middleware import outcome
from gateway.http.runtime import Runtime

__all__ = ["UNLIMITED_REQUESTS", "ClientHooks"]

UNLIMITED_REQUESTS = 1_000_000  # x-ratelimit-*-requests of a key without a requests limit
_ADMISSION = "gateway.admission"


def _is_embedding(scope: Scope) -> bool:
    handler = scope.get("route_handler")
    return bool(handler is not None and handler.opt.get("embedding"))


class ClientHooks:
    def __init__(self, limiter: RateLimiter, telemetry: Telemetry) -> None:
        self.limiter = limiter
        self.telemetry = telemetry
        self._charges: set[asyncio.Task[Levels]] = set()

    async def guard(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if not handler.opt.get("embedding"):
            return
        key = client_key(connection.scope)
        if key is None or not key.limited:
            return
        admission = await self.limiter.admit(key)
        connection.scope["state"][_ADMISSION] = admission
        if admission.admitted:
            return
        wait = admission.retry_after
        levels = admission.levels
        if admission.blocked == "requests":
            raise RequestsRateLimitedError(
                f"Rate limit reached for key '{key.name}' on requests per min (RPM): Limit "
                f"{levels.requests_limit}. Please try again in {format_reset(wait)}.",
                retry_after=wait,
            )
        raise TokensRateLimitedError(
            f"Rate limit reached for key '{key.name}' on tokens per min (TPM): Limit {levels.tokens_limit}, "
            f"the key is {math.ceil(-levels.tokens)} tokens in debt. Please try again in {format_reset(wait)}.",
            retry_after=wait,
        )

    async def before_send(self, message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start" or not _is_embedding(scope):
            return
        status: int = message["status"]
        done = outcome(scope)
        key = client_key(scope)
        levels: Levels | None = None
        if key is not None and key.limited:
            admission = scope["state"].get(_ADMISSION)
            if isinstance(admission, Admission):
                levels = admission.levels
                if admission.admitted and key.tokens_per_minute and done.tokens:
                    # Not awaited: the charge leaves for Redis before this answer's body does, so the
                    # key's next request already sees it, and the hit path pays no second round trip.
                    levels = dataclasses.replace(levels, tokens=levels.tokens - done.tokens)
                    task = asyncio.create_task(self.limiter.charge(key, done.tokens))
                    self._charges.add(task)
                    task.add_done_callback(self._charges.discard)
        runtime: Runtime | None = getattr(scope["litestar_app"].state, "runtime", None)
        headers = list(message.get("headers", []))
        headers += _rate_headers(levels, runtime)
        if status < 400:
            headers += [(b"x-cache-hits", str(done.hits).encode()), (b"x-cache-misses", str(done.misses).encode())]
        message["headers"] = headers
        if key is not None and key.name is not None:
            self.telemetry.key_request(
                key.name, status, inputs=done.inputs, tokens=done.tokens, hits=done.hits, misses=done.misses
            )


def _rate_headers(levels: Levels | None, runtime: Runtime | None) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if levels is not None and levels.requests_limit:
        requests = (levels.requests_limit, levels.remaining_requests(), format_reset(levels.reset_requests()))
    else:
        requests = (UNLIMITED_REQUESTS, UNLIMITED_REQUESTS, "0s")
    if levels is not None and levels.tokens_limit:
        tokens = (levels.tokens_limit, levels.remaining_tokens(), format_reset(levels.reset_tokens()))
    elif runtime is not None:  # the encoder queue: what it still takes, and how long the queued tokens take
        batcher = runtime.batcher
        queued = batcher.queue_tokens
        tokens = (
            batcher.max_queue_tokens,
            max(0, batcher.max_queue_tokens - queued),
            format_reset(queued / max(batcher.tokens_per_second, 1e-9)),
        )
    else:
        return out
    for kind, (limit, remaining, reset) in (("requests", requests), ("tokens", tokens)):
        out += [
            (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(remaining).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), reset.encode()),
        ]
    return out
