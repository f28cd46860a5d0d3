"""Where vectors are kept between requests: Redis, or an in-process LRU when there is no Redis.

The cache knows nothing of HTTP or the encoder: it maps string keys to :class:`CachedVector`.
A stored value is self-checking::

    b"E1" | uint32 token count | dim x float32 (little-endian) | xxh3_64 of everything before it

so a value of the wrong length, of another dimension, or plain garbage decodes as a miss (and is
overwritten), never as a wrong vector. Input text is never stored; keys hold only its hash.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import redis.asyncio as aioredis
import xxhash
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = [
    "CacheSkippedError",
    "CacheUnavailableError",
    "CachedVector",
    "CircuitBreakerCache",
    "MemoryVectorCache",
    "RedisVectorCache",
    "VectorCache",
    "cache_key",
    "pack",
    "pack_colbert",
    "pack_sparse",
    "unpack",
    "unpack_colbert",
    "unpack_sparse",
]

_MAGIC = b"E1"
_HEADER = struct.Struct("<2sI")
_CHECKSUM = struct.Struct("<Q")


class CachedVector(NamedTuple):
    vector: np.ndarray  # float32, full dimension, as the encoder produced it
    tokens: int


class CacheUnavailableError(RuntimeError):
    """The cache could not be read or written in time. Callers treat it as all-miss."""


class CacheSkippedError(CacheUnavailableError):
    """The circuit breaker is open: the cache was not even asked."""


def cache_key(prefix: str, namespace: str, text: str) -> str:
    """``{prefix}:{namespace}:{xxh3_128 hex of the UTF-8 text}``; the namespace is the model fingerprint."""
    return f"{prefix}:{namespace}:{xxhash.xxh3_128_hexdigest(text.encode('utf-8', 'surrogatepass'))}"


def pack(value: CachedVector) -> bytes:
    body = _HEADER.pack(_MAGIC, value.tokens) + np.ascontiguousarray(value.vector, dtype="<f4").tobytes()
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _seal(body: bytes) -> bytes:
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _opened(data: bytes | None, magic: bytes) -> memoryview | None:
    """The body of a sealed value with this magic, or None when it is short, foreign or corrupt."""
    if data is None or len(data) < len(magic) + _CHECKSUM.size or not data.startswith(magic):
        return None
    body = memoryview(data)[: -_CHECKSUM.size]
    if _CHECKSUM.unpack_from(data, len(body))[0] != xxhash.xxh3_64_intdigest(body):
        return None
    return body


_SPARSE = struct.Struct("<2sII")  # magic, tokens, entries
_COLBERT = struct.Struct("<2sIII")  # magic, tokens, rows, dim


def pack_sparse(tokens: int, indices: np.ndarray, values: np.ndarray) -> bytes:
    """Sparse weights: token ids (uint32) and weights (float32), both little-endian."""
    header = _SPARSE.pack(b"S1", tokens, len(indices))
    return _seal(header + indices.astype("<u4").tobytes() + values.astype("<f4").tobytes())


def unpack_sparse(data: bytes | None) -> tuple[int, np.ndarray, np.ndarray] | None:
    body = _opened(data, b"S1")
    if body is None or len(body) < _SPARSE.size:
        return None
    _, tokens, count = _SPARSE.unpack_from(body)
    if len(body) != _SPARSE.size + 8 * count:
        return None
    indices = np.frombuffer(body, dtype="<u4", count=count, offset=_SPARSE.size).astype(np.int64)
    values = np.frombuffer(body, dtype="<f4", count=count, offset=_SPARSE.size + 4 * count)
    return tokens, indices, values


def pack_colbert(tokens: int, vectors: np.ndarray) -> bytes:
    """ColBERT vectors: a (rows, dim) float32 matrix, little-endian."""
    rows, dim = vectors.shape
    return _seal(_COLBERT.pack(b"C1", tokens, rows, dim) + np.ascontiguousarray(vectors, dtype="<f4").tobytes())


def unpack_colbert(data: bytes | None, dim: int) -> tuple[int, np.ndarray] | None:
    body = _opened(data, b"C1")
    if body is None or len(body) < _COLBERT.size:
        return None
    _, tokens, rows, stored_dim = _COLBERT.unpack_from(body)
    if stored_dim != dim or len(body) != _COLBERT.size + 4 * rows * dim:
        return None
    matrix = np.frombuffer(body, dtype="<f4", offset=_COLBERT.size).reshape(rows, dim)
    return tokens, matrix


def unpack(data: bytes | None, dim: int) -> CachedVector | None:
    """The stored vector, or ``None`` for anything that is not a whole, intact value of ``dim``."""
    end = _HEADER.size + 4 * dim
    if data is None or len(data) != end + _CHECKSUM.size:
        return None
    body = memoryview(data)[:end]  # no copies: this runs for every hit
    magic, tokens = _HEADER.unpack_from(body)
    if magic != _MAGIC or _CHECKSUM.unpack_from(data, end)[0] != xxhash.xxh3_64_intdigest(body):
        return None
    return CachedVector(np.frombuffer(body, dtype="<f4", offset=_HEADER.size), tokens)


class VectorCache(Protocol):
    """What the service needs from a cache. Errors surface as :class:`CacheUnavailableError`.

    ``get_many``/``put_many`` hold dense vectors; ``get_blobs``/``put_blobs`` hold any sealed value
    (sparse weights, ColBERT matrices) under keys that name their kind.
    """

    backend: str

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def get_many(self, keys: Sequence[str]) -> list[CachedVector | None]: ...

    async def put_many(self, items: Sequence[tuple[str, CachedVector]]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class _DenseValues:
    """Dense vectors on top of a cache's blob calls (the same for every backend)."""

    dim: int

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    async def get_many(self, keys: Sequence[str]) -> list[CachedVector | None]:
        return [unpack(value, self.dim) for value in await self.get_blobs(keys)]

    async def put_many(self, items: Sequence[tuple[str, CachedVector]]) -> None:
        await self.put_blobs([(key, pack(value)) for key, value in items])


class RedisVectorCache(_DenseValues):
    """One ``MGET`` per lookup, one non-transactional pipeline of ``SET key value EX ttl`` per write.

    Every call is bounded by ``timeout_s`` (socket timeouts and an outer deadline), and redis-py
    retries once at once: a dead Redis costs a request milliseconds, not a hang.
    """

    backend = "redis"

    def __init__(self, url: str, *, dim: int, ttl_seconds: int, timeout_s: float) -> None:
        self.dim = dim
        self.ttl_seconds = ttl_seconds
        self.timeout_s = timeout_s
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await self.client.mget(keys)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailableError(f"redis read failed: {exc!r}") from exc
        return [value if isinstance(value, bytes) else None for value in values]

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        try:
            # Writes run after the response, so they may take longer than a read before giving up.
            async with asyncio.timeout(self.timeout_s * 4):
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, value in items:
                        pipe.set(key, value, ex=self.ttl_seconds)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailableError(f"redis write failed: {exc!r}") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose()


class MemoryVectorCache(_DenseValues):
    """An in-process LRU of ``max_items`` packed values with a TTL, for running without Redis."""

    backend = "memory"

    def __init__(self, *, dim: int, max_items: int, ttl_seconds: int) -> None:
        self.dim = dim
        self.max_items = max_items
        self.ttl_seconds = ttl_seconds
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        found: list[bytes | None] = []
        for key in keys:
            entry = self._items.get(key)
            if entry is None or entry[0] < now:
                found.append(None)
                continue
            self._items.move_to_end(key)
            found.append(entry[1])
        return found

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        expires = time.monotonic() + self.ttl_seconds
        for key, value in items:
            self._items[key] = (expires, value)
            self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()


class CircuitBreakerCache(_DenseValues):
    """Skips a failing cache for a while instead of paying its timeout on every request.

    After ``failures`` consecutive errors the breaker *opens*: lookups answer all-miss at once and
    writes are dropped, for ``cooldown_s``. Then one call is let through (*half-open*): success
    closes the breaker, failure opens it again. Skipped calls raise :class:`CacheUnavailableError`
    like real failures, so the service counts them the same way.
    """

    def __init__(self, inner: VectorCache, *, failures: int = 3, cooldown_s: float = 5.0) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.dim: int = getattr(inner, "dim", 0)
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
