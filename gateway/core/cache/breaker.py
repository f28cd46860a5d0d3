"""A circuit breaker in front of a cache: skip a failing Redis instead of paying its timeout per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gateway.core.cache.base import (
    BlobCache,
    CacheBusyError,
    CacheRefusedError,
    CacheSkippedError,
    CacheUnavailableError,
)

__all__ = ["CircuitBreakerCache"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RANK = {"closed": 0, "half-open": 1, "open": 2}


class _Circuit:
    """Consecutive failures open it for ``cooldown_s``; then one call at a time probes (half-open).

    Calls that were already in flight when a failure was counted fail *with* it, not after it: a
    pause of this process (a long garbage collection, a starved event loop) times out every call in
    flight at once, and 64 of them are one event, not 64 reasons to give up on a healthy Redis. So a
    failure counts only when its call started after the last counted one; a dead Redis still opens
    the circuit within a few round trips, since the next calls start after that.
    """

    def __init__(self, what: str, failures: int, cooldown_s: float) -> None:
        self.what = what  # "cache" or "cache writes", for the log
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False
        self.counted_at = float("-inf")  # monotonic time the last counted failure was recorded

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def admit(self) -> str:
        """May a call go to the cache now: ``"no"``, ``"yes"``, or ``"probe"`` (half-open: one call at a
        time; the caller hands the probe back with :meth:`release`)."""
        state = self.state
        if state == "closed":
            return "yes"
        if state == "open" or self.probing:
            return "no"
        self.probing = True
        return "probe"

    def release(self) -> None:
        self.probing = False

    def succeeded(self) -> None:
        if self.opened_at is not None:
            logger.info("%s answering again after %d failures: circuit closed", self.what, self.consecutive)
        self.consecutive, self.opened_at = 0, None

    def failed(self, exc: CacheUnavailableError, started: float) -> bool:
        """Record the failure of a call that started at ``started`` (logged here, once per run and once per
        opening); True when it opened the circuit."""
        exc.logged = True
        if started < self.counted_at and self.opened_at is None:  # in flight with the last counted one
            logger.debug("%s failed with the calls before it: %s", self.what, exc)
            return False
        self.counted_at = time.monotonic()
        self.consecutive += 1
        if self.opened_at is not None:  # a failed half-open probe: wait again, quietly
            self.opened_at = time.monotonic()
            logger.debug("%s probe failed: %s", self.what, exc)
            return False
        if self.consecutive >= self.failures:
            self.opened_at = time.monotonic()
            logger.warning(
                "%s failed %d times in a row, skipping it for %gs (then one call probes it): %s",
                self.what,
                self.consecutive,
                self.cooldown_s,
                exc,
            )
            return True
        level = logging.WARNING if self.consecutive == 1 else logging.DEBUG
        logger.log(level, "%s failed: %s", self.what, exc)
        return False


class CircuitBreakerCache:
    """After ``failures`` consecutive errors the breaker *opens*: lookups answer all-miss at once and
    writes are dropped, for ``cooldown_s``. Then one call is let through (*half-open*): success
    closes the breaker, failure opens it again. Skipped calls raise :class:`CacheSkippedError`
    (a :class:`CacheUnavailableError`), so callers treat them as misses.

    Two circuits: one for Redis failing (unreachable, timing out), fed by reads and writes alike, and
    one for Redis *refusing writes* while it still answers reads (:class:`CacheRefusedError`: a
    read-only replica, a full Redis without eviction): only a successful write closes that one, and
    while it is open reads still go to Redis. A :class:`CacheBusyError` (no free connection in time:
    this process is saturated, Redis is fine) counts for neither. Each circuit logs the first failure
    of a run and its opening at warning level, the rest at debug, and marks the errors ``logged``.
    """

    def __init__(self, inner: BlobCache, *, failures: int = 3, cooldown_s: float = 5.0) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.circuit = _Circuit("cache", failures, cooldown_s)
        self.write_circuit = _Circuit("cache writes", failures, cooldown_s)
        self.opened = 0  # how many times it went from closed to open, for /stats

    @property
    def state(self) -> str:
        """The worse of the two circuits: ``closed``, ``half-open`` or ``open``."""
        return max(self.circuit.state, self.write_circuit.state, key=_RANK.__getitem__)

    def _failed(self, circuit: _Circuit, exc: CacheUnavailableError, started: float) -> None:
        was_closed = self.state == "closed"
        if circuit.failed(exc, started) and was_closed:
            self.opened += 1

    async def _call(self, circuits: tuple[_Circuit, ...], call: Callable[[], Awaitable[T]]) -> T:
        probes: list[_Circuit] = []
        try:
            for circuit in circuits:
                admitted = circuit.admit()
                if admitted == "no":
                    raise CacheSkippedError(f"circuit open: {circuit.what} skipped after repeated failures")
                if admitted == "probe":
                    probes.append(circuit)
            started = time.monotonic()
            try:
                result = await call()
            except CacheBusyError:
                raise
            except CacheRefusedError as exc:
                if circuits[-1] is self.write_circuit:  # Redis answered, refusing the write
                    self.circuit.succeeded()
                self._failed(circuits[-1], exc, started)
                raise
            except CacheUnavailableError as exc:
                self._failed(self.circuit, exc, started)
                raise
            for circuit in circuits:
                circuit.succeeded()
            return result
        finally:
            for circuit in probes:
                circuit.release()

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        circuit = self.circuit
        if circuit.opened_at is not None:  # open or half-open: the general path (skip, or one probe)
            return await self._call((circuit,), lambda: self.inner.get_blobs(keys))
        started = time.monotonic()
        try:  # closed, the hit path: the same bookkeeping as _call without its generic machinery
            found = await self.inner.get_blobs(keys)
        except CacheBusyError:
            raise
        except CacheUnavailableError as exc:
            self._failed(circuit, exc, started)
            raise
        circuit.consecutive = 0
        return found

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        await self._call((self.circuit, self.write_circuit), lambda: self.inner.put_blobs(items))

    async def put_first(self, key: str, value: bytes) -> bytes | None:
        return await self._call((self.circuit, self.write_circuit), lambda: self.inner.put_first(key, value))

    async def ping(self) -> bool:
        # Health checks probe Redis itself (they are rare), and a good answer closes the main circuit
        # (not the write circuit: a read-only replica answers PING too).
        ok = await self.inner.ping()
        if ok:
            self.circuit.succeeded()
        return ok

    async def close(self) -> None:
        await self.inner.close()
