"""Redis as the shared vector cache: one MGET per lookup, one pipeline of SET EX per write."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.core.cache.base import CacheUnavailableError

__all__ = ["RedisBlobCache"]


class RedisBlobCache:
    """Every call is bounded by ``timeout_s`` (socket timeouts and an outer deadline), and redis-py
    retries once at once: a dead Redis costs a request milliseconds, not a hang.
    """

    backend = "redis"

    def __init__(self, url: str, *, ttl_seconds: int, timeout_s: float) -> None:
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
