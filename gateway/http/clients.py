"""Per-client behaviour of the embedding routes: key limits, pacing headers, per-key telemetry.

* :meth:`ClientHooks.admit` (called by :class:`~gateway.http.auth.ApiKeyMiddleware` once a key
  with limits is recognised on an embedding route) admits the request against its key's buckets
  (:mod:`gateway.core.ratelimit`) or refuses it with 429 ``rate_limit_exceeded`` (type
  ``requests`` or ``tokens``) and ``Retry-After``.
* :meth:`ClientHooks.answer_headers` runs once per embedding answer (the route calls it for its
  answer, the app's ``before_send`` hook for an error): it charges the answered tokens to the key,
  returns OpenAI's ``x-ratelimit-*`` headers (from the key's buckets when it has limits, else from
  the encoder queue: tokens it still takes and how long the queued ones take) and, on success,
  ``x-cache-hits`` / ``x-cache-misses``, and counts the request under the key's name.
"""

from __future__ import annotations

import math

from litestar.types import Scope

from gateway.core.errors import RequestsRateLimitedError, TokensRateLimitedError
from gateway.core.keys import ApiKey
from gateway.core.ratelimit import Admission, Levels, RateLimiter, format_reset
from gateway.core.telemetry import Telemetry
from gateway.http.auth import client_key
from gateway.http.middleware import outcome
from gateway.http.runtime import Runtime

__all__ = ["UNLIMITED_REQUESTS", "ClientHooks"]

UNLIMITED_REQUESTS = 1_000_000  # x-ratelimit-*-requests of a key without a requests limit
_ADMISSION = "gateway.admission"


class ClientHooks:
    def __init__(self, limiter: RateLimiter, telemetry: Telemetry) -> None:
        self.limiter = limiter
        self.telemetry = telemetry
        self._queue_state: tuple[int, int, float] | None = None
        self._queue_encoded: list[tuple[bytes, bytes]] = []

    async def admit(self, scope: Scope, key: ApiKey) -> None:
        """Take one request from ``key``'s buckets, or raise the 429 that says which one is empty."""
        admission = await self.limiter.admit(key)
        scope["state"][_ADMISSION] = admission
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

    def answer_headers(self, scope: Scope, status: int) -> list[tuple[bytes, bytes]]:
        """The pacing and cache headers of one embedding answer; charges and counts it for its key."""
        done = outcome(scope)
        key = client_key(scope)
        admission = scope["state"].get(_ADMISSION) if key is not None and key.limited else None
        if key is not None and isinstance(admission, Admission):
            levels = admission.levels
            if admission.admitted and key.tokens_per_minute and done.tokens:
                # The route reserved these tokens before the work (issue 26): shown, not charged again.
                levels = Levels(
                    levels.requests_limit, levels.tokens_limit, levels.requests, levels.tokens - done.tokens
                )
            headers = _limit_headers(levels, self._queue_headers(scope))
        else:
            headers = list(self._queue_headers(scope))
        if status < 400:
            headers.append((b"x-cache-hits", _count(done.hits)))
            headers.append((b"x-cache-misses", _count(done.misses)))
        if key is not None and key.name is not None:
            self.telemetry.key_request(
                key.name, status, inputs=done.inputs, tokens=done.tokens, hits=done.hits, misses=done.misses
            )
        return headers

    def _queue_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The six ``x-ratelimit-*`` headers of a key without limits: no requests limit, and the encoder
        queue's tokens (what it still takes, how long the queued ones take). Encoded once per queue state."""
        runtime: Runtime | None = getattr(scope["litestar_app"].state, "runtime", None)
        if runtime is None:
            return []
        batcher = runtime.batcher
        state = (batcher.max_queue_tokens, batcher.queue_tokens, batcher.tokens_per_second)
        if state != self._queue_state:
            limit, queued, speed = state
            self._queue_state = state
            self._queue_encoded = _UNLIMITED_REQUEST_HEADERS + _encode(
                "tokens", limit, max(0, limit - queued), format_reset(queued / max(speed, 1e-9))
            )
        return self._queue_encoded


_HEADER_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}".encode(),
        f"x-ratelimit-remaining-{kind}".encode(),
        f"x-ratelimit-reset-{kind}".encode(),
    )
    for kind in ("requests", "tokens")
}
_COUNTS = [str(n).encode() for n in range(1024)]


def _count(n: int) -> bytes:
    return _COUNTS[n] if 0 <= n < 1024 else str(n).encode()


def _encode(kind: str, limit: int, remaining: int, reset: str) -> list[tuple[bytes, bytes]]:
    names = _HEADER_NAMES[kind]
    return [(names[0], str(limit).encode()), (names[1], str(remaining).encode()), (names[2], reset.encode())]


_UNLIMITED_REQUEST_HEADERS = _encode("requests", UNLIMITED_REQUESTS, UNLIMITED_REQUESTS, "0s")


def _limit_headers(levels: Levels, queue: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A limited key's headers: from its buckets where it has limits, else as for a key without them."""
    if levels.requests_limit:
        out = _encode(
            "requests", levels.requests_limit, levels.remaining_requests(), format_reset(levels.reset_requests())
        )
    else:
        out = list(_UNLIMITED_REQUEST_HEADERS)
    if levels.tokens_limit:
        out += _encode("tokens", levels.tokens_limit, levels.remaining_tokens(), format_reset(levels.reset_tokens()))
    else:
        out += queue[3:]
    return out
