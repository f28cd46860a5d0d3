"""``put_first`` (``SET NX`` then ``GET``) on every cache, and the int8/uint8 calibration it shares.

The first value stored under a key stays: every later caller gets that value back, its own value
dropped. Cohere's ``/v2/embed`` stores a model's calibration with it, so every replica sharing the
cache quantises with the first replica's ranges (issue 24's review, finding "calibration ranges
differ between replicas").
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.core.cache import (
    CacheSkippedError,
    CacheUnavailableError,
    CircuitBreakerCache,
    MemoryBlobCache,
    RedisBlobCache,
)
from gateway.core.quantize import _encode, _Vectors, calibration_key, ranges_of
from support.processes import RedisCluster


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- in-process ----------------------------------------------------------------------------------


def test_memory_keeps_the_first_value() -> None:
    async def scenario() -> None:
        cache = MemoryBlobCache(max_bytes=1 << 20, ttl_seconds=60)
        assert await cache.put_first("k", b"first") == b"first"
        assert await cache.put_first("k", b"second") == b"first"
        assert await cache.get_blobs(["k"]) == [b"first"]

    _run(scenario())


def test_memory_replaces_an_expired_value_and_keeps_nothing_too_large() -> None:
    async def scenario() -> None:
        cache = MemoryBlobCache(max_bytes=4096, ttl_seconds=0)
        await cache.put_blobs([("k", b"old")])
        await asyncio.sleep(0.01)  # expired: the key holds nothing
        cache.ttl_seconds = 60
        assert await cache.put_first("k", b"new") == b"new"
        assert await cache.put_first("big", b"x" * 8192) is None, "larger than the cache: not kept"

    _run(scenario())


# --- the circuit breaker -------------------------------------------------------------------------


class _Failing(MemoryBlobCache):
    """A memory cache whose ``put_first`` fails while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__(max_bytes=1 << 20, ttl_seconds=60)
        self.failing = False
        self.calls = 0

    async def put_first(self, key: str, value: bytes) -> bytes | None:
        self.calls += 1
        if self.failing:
            raise CacheUnavailableError("down")
        return await super().put_first(key, value)

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.failing:
            raise CacheUnavailableError("down")
        return await super().get_blobs(keys)


def test_breaker_passes_put_first_through_and_counts_its_failures() -> None:
    async def scenario() -> None:
        inner = _Failing()
        cache = CircuitBreakerCache(inner, failures=2, cooldown_s=60)
        assert await cache.put_first("k", b"a") == b"a"
        assert await cache.put_first("k", b"b") == b"a"
        inner.failing = True
        for _ in range(2):
            with pytest.raises(CacheUnavailableError):
                await cache.put_first("k", b"c")
        assert cache.state == "open"
        calls = inner.calls
        with pytest.raises(CacheSkippedError):  # open: Redis is not even asked
            await cache.put_first("k", b"c")
        assert inner.calls == calls

    _run(scenario())


# --- Redis: one node, and a cluster --------------------------------------------------------------


def _redis_first_wins(url: str, mode: Any, ttl_of: Any) -> None:
    key = f"put-first-{uuid.uuid4().hex}"

    async def scenario() -> list[bytes | None]:
        caches = [RedisBlobCache(url, ttl_seconds=300, timeout_s=2.0, mode=mode) for _ in range(4)]
        try:
            # four "replicas" at once: one value wins, and all four read it back
            return list(await asyncio.gather(*(c.put_first(key, f"v{i}".encode()) for i, c in enumerate(caches))))
        finally:
            for cache in caches:
                await cache.close()

    kept = _run(scenario())
    assert len(set(kept)) == 1 and kept[0] in {b"v0", b"v1", b"v2", b"v3"}, kept
    assert 0 < ttl_of(key) <= 300, "stored with the cache's TTL"


def test_redis_single_keeps_the_first_value(redis_server: Any) -> None:
    client = redis_server.client()
    _redis_first_wins(redis_server.url, "single", client.ttl)
    client.close()


def test_redis_unreachable_is_cache_unavailable() -> None:
    async def scenario() -> None:
        cache = RedisBlobCache("redis://127.0.0.1:1/0", ttl_seconds=60, timeout_s=0.5)
        try:
            with pytest.raises(CacheUnavailableError):
                await cache.put_first("k", b"v")
        finally:
            await cache.close()

    _run(scenario())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("put-first-cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


def test_redis_cluster_keeps_the_first_value(cluster: RedisCluster) -> None:
    client = cluster.client()
    for _ in range(3):  # random keys, of other slots (and most likely other masters)
        _redis_first_wins(cluster.url, "cluster", client.ttl)
    client.close()


# --- the calibration every replica shares --------------------------------------------------------


def _ranges(url: str) -> tuple[np.ndarray, str]:
    shown = httpx.get(f"{url}/v2/embed/ranges", timeout=120).json()
    return np.array([shown["min"], shown["max"]], dtype=np.float32), shown["calibration"]["digest"]


def test_replicas_adopt_the_calibration_stored_first(gateway_factory: Any, redis_server: Any) -> None:
    """A calibration already stored under the namespace is adopted as is (here a planted one, which
    no replica would compute), by every replica whatever its batching settings; the ranges at a
    shorter width come from the same stored vectors."""
    prefix = f"calib-{uuid.uuid4().hex[:8]}"
    first = gateway_factory(redis_url=redis_server.url, cache_prefix=prefix)
    namespace = httpx.get(f"{first.url}/stats", timeout=10).json()["cache"]["namespace"]
    planted = np.random.default_rng(7).normal(size=(20, 384)).astype(np.float32)
    client = redis_server.client()
    client.set(calibration_key(prefix, namespace), _encode(_Vectors(namespace, planted, ("planted",))))
    second = gateway_factory(redis_url=redis_server.url, cache_prefix=prefix, max_batch_size=1)
    ranges, digest = _ranges(first.url)
    np.testing.assert_array_equal(ranges, ranges_of(planted))
    assert _ranges(second.url)[1] == digest
    short = [
        httpx.get(f"{g.url}/v2/embed/ranges", params={"output_dimension": 50}, timeout=60) for g in (first, second)
    ]
    assert short[0].json() == short[1].json() and short[0].json()["calibration"]["texts"] == 20
    client.close()


def test_the_first_calibration_is_stored_for_the_next_replica(gateway_factory: Any, redis_server: Any) -> None:
    """With nothing stored, the first replica calibrates and stores its vectors; a replica started
    later (or restarted) adopts them, with no calibration pass of its own."""
    prefix = f"calib-{uuid.uuid4().hex[:8]}"
    first = gateway_factory(redis_url=redis_server.url, cache_prefix=prefix)
    digest = _ranges(first.url)[1]
    namespace = httpx.get(f"{first.url}/stats", timeout=10).json()["cache"]["namespace"]
    client = redis_server.client()
    assert client.exists(calibration_key(prefix, namespace))
    second = gateway_factory(redis_url=redis_server.url, cache_prefix=prefix, max_batch_tokens=64)
    before = httpx.get(f"{second.url}/stats", timeout=10).json()["cache"]
    assert _ranges(second.url)[1] == digest
    after = httpx.get(f"{second.url}/stats", timeout=10).json()["cache"]
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"], "no calibration texts looked up"
    client.close()
