"""The contract every cache backend keeps, its errors, and the key layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import xxhash

__all__ = ["BlobCache", "CacheSkippedError", "CacheUnavailableError", "cache_key"]


class CacheUnavailableError(RuntimeError):
    """The cache could not be read or written in time. Callers treat it as all-miss."""


class CacheSkippedError(CacheUnavailableError):
    """The circuit breaker is open: the cache was not even asked."""


class BlobCache(Protocol):
    """String keys to sealed byte values (:mod:`gateway.core.cache.formats`), with a TTL.

    Failures surface as :class:`CacheUnavailableError`, never as a backend's own exception.
    """

    backend: str

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def cache_key(prefix: str, namespace: str, text: str) -> str:
    """``{prefix}:{namespace}:{xxh3_128 hex of the UTF-8 text}``; the namespace starts with the model fingerprint."""
    return f"{prefix}:{namespace}:{xxhash.xxh3_128_hexdigest(text.encode('utf-8', 'surrogatepass'))}"
