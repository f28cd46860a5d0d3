"""A circuit breaker in front of a cache: skip a failing Redis instead of paying its timeout per request."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.core.cache.base import BlobCache, CacheSkippedError, CacheUnavailableError

__all__ = ["CircuitBreakerCache"]


class CircuitBreakerCache:
    """After ``failures`` consecutive errors the breaker *opens*: lookups answer all-miss at once and
    writes are dropped, for ``cooldown_s``. Then one call is let through (*half-open*): success
    closes the breaker, failure opens it again. Skipped calls raise :class:`CacheSkippedError`
    (a :class:`CacheUnavailableError`), so callers treat them as misses.
    """

    def __init__(self, inner: BlobCache, *, failures: int = 3, cooldown_s: float = 5.0) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._consecutive = 0
        self._opened_at: float | None = None
        self.opened = 0  # how many times it opened, for /stats

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self._opened_at >= self.cooldown_s else "open"

    def _check(self) -> None:
        if self.state == "open":
            raise CacheSkippedError("circuit open: cache skipped after repeated failures")

    def _record(self, ok: bool) -> None:
        if ok:
            self._consecutive, self._opened_at = 0, None
            return
        self._consecutive += 1
        if self._opened_at is not None or self._consecutive >= self.failures:
            if self._opened_at is None:
                self.opened += 1
            self._opened_at = time.monotonic()  # (re)open: a failed half-open probe waits again

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        self._check()
        try:
            found = await self.inner.get_blobs(keys)
        except CacheUnavailableError:
            self._record(False)
            raise
        self._record(True)
        return found

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._check()
        try:
            await self.inner.put_blobs(items)
        except CacheUnavailableError:
            self._record(False)
            raise
        self._record(True)

    async def ping(self) -> bool:
        # Health checks probe Redis itself (they are rare), and a good answer closes the breaker.
        ok = await self.inner.ping()
        if ok:
            self._record(True)
        return ok

    async def close(self) -> None:
        await self.inner.close()
