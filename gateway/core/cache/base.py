"""The contract every cache backend keeps, its errors, and the key layout."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "BlobCache",
    "CacheBusyError",
    "CacheRefusedError",
    "CacheSkippedError",
    "CacheUnavailableError",
    "cache_key",
]


class CacheUnavailableError(RuntimeError):
    """The cache could not be read or written in time. Callers treat it as all-miss.

    ``logged`` is true when the cache (its circuit breaker) has already logged this failure, or
    decided it is one of a run it logged once: callers then need not log it again at warning level.
    """

    logged: bool = False


class CacheRefusedError(CacheUnavailableError):
    """Redis answered, with an error: ``READONLY`` (a replica), ``OOM`` (full, no eviction),
    ``NOPERM``... It stays up for reads while it refuses writes."""


class CacheSkippedError(CacheUnavailableError):
    """The circuit breaker is open: the cache was not even asked."""


class CacheBusyError(CacheSkippedError):
    """Every connection to the cache stayed busy for the whole wait: this process is saturated, Redis
    was not asked and has not failed, so the circuit breaker does not count it."""


class BlobCache(Protocol):
    """String keys to sealed byte values (:mod:`gateway.core.cache.formats`), with a TTL.

    Failures surface as :class:`CacheUnavailableError`, never as a backend's own exception.
    """

    backend: str

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def put_first(self, key: str, value: bytes) -> bytes | None:
        """Store ``value`` under ``key`` unless the key holds a value already (``SET NX``), then read
        it back: the value the cache keeps, ours or the one stored first (None: nothing is kept, say
        evicted at once or larger than the cache). Every caller sharing the cache so adopts one value."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def cache_key(prefix: str, namespace: str, text: str) -> str:
    """``{prefix}:{namespace}:{BLAKE2s-256 hex of the UTF-8 text}``; the namespace starts with the model fingerprint.

    The text's digest must be collision-resistant, not just well spread: the cache is shared by every
    API key, so two texts with one key would let any client choose the vector another client is
    served. XXH3 (used here before) has a public secret, and two valid UTF-8 texts with the same
    XXH3-128 take a few lines to build (support/collisions.py). BLAKE2s-256 (128-bit collision
    resistance; BLAKE2b-256, used first, cost a third more per short text) costs about 0.3 us per short
    text against XXH3's 0.07 us, noise beside the rest of a hit, and needs no secret shared by the replicas.
    """
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}:{namespace}:{digest}"
