"""Per-key token buckets for requests and tokens per minute, shared by every replica through Redis.

A bucket holds up to ``limit`` units and refills at ``limit / 60`` per second. A request is admitted
while its key's requests bucket holds one whole request and its tokens bucket is not in debt; the
request takes one request at once and, once answered, its real token count (the model's tokenizer,
cache hits included, so only known after the lookup). A request may therefore push the tokens bucket
below zero; the next request of that key is then refused until the debt has refilled.

With Redis, both buckets of a key live in one hash-tagged pair of keys and one Lua script reads,
refills and takes them atomically with Redis' own clock: two replicas see one bucket. Without
Redis, or while Redis fails, each process keeps its own buckets (fail open, never a 5xx).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.core.keys import ApiKey

__all__ = ["Admission", "Levels", "RateLimiter", "format_reset"]

logger = logging.getLogger(__name__)

WINDOW_S = 60.0  # limits are per minute

# KEYS: requests bucket, tokens bucket. ARGV: requests limit, tokens limit (0: none), requests to take,
# tokens to take, check (1: refuse when short). Returns {admitted, blocked (0, 1 requests, 2 tokens),
# requests level, tokens level} with the levels as strings (Lua numbers would be cut to integers).
_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local function level(key, limit)
  if limit <= 0 then return 0 end
  local state = redis.call('HMGET', key, 'level', 'at')
  local value = tonumber(state[1]) or limit
  local at = tonumber(state[2]) or now
  return math.min(limit, value + math.max(0, now - at) * limit / 60)
end
local rl, tl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rv, tv = level(KEYS[1], rl), level(KEYS[2], tl)
local blocked = 0
if tonumber(ARGV[5]) == 1 then
  if rl > 0 and rv < 1 then blocked = 1 elseif tl > 0 and tv <= 0 then blocked = 2 end
end
if blocked == 0 then
  if rl > 0 then rv = rv - tonumber(ARGV[3]) end
  if tl > 0 then tv = tv - tonumber(ARGV[4]) end
end
if rl > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(rv), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if tl > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(tv), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120 + math.ceil(math.max(0, -tv) * 60 / tl))
end
return {blocked == 0 and 1 or 0, blocked, tostring(rv), tostring(tv)}
"""


def format_reset(seconds: float) -> str:
    """OpenAI's (Go's) duration text: ``"17ms"``, ``"1s"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


@dataclass(frozen=True, slots=True)
class Levels:
    """A key's two buckets after a call (a limit of None: that bucket does not exist)."""

    requests_limit: int | None
    tokens_limit: int | None
    requests: float
    tokens: float

    def remaining_requests(self) -> int:
        return max(0, math.floor(self.requests))

    def remaining_tokens(self) -> int:
        return max(0, math.floor(self.tokens))

    def reset_requests(self) -> float:
        """Seconds until the requests bucket is full again."""
        limit = self.requests_limit
        return (limit - self.requests) * WINDOW_S / limit if limit else 0.0

    def reset_tokens(self) -> float:
        limit = self.tokens_limit
        return (limit - self.tokens) * WINDOW_S / limit if limit else 0.0


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    blocked: Literal["requests", "tokens"] | None
    levels: Levels

    @property
    def retry_after(self) -> float:
        """Seconds until the blocking bucket admits a request again."""
        levels = self.levels
        if self.blocked == "requests" and levels.requests_limit:
            return (1 - levels.requests) * WINDOW_S / levels.requests_limit
        if self.blocked == "tokens" and levels.tokens_limit:
            return (max(0.0, -levels.tokens) * WINDOW_S / levels.tokens_limit) + 0.001
        return 0.0


_BLOCKED: dict[int, Literal["requests", "tokens"] | None] = {0: None, 1: "requests", 2: "tokens"}


class _LocalBuckets:
    """The same arithmetic as the Lua script, for one process."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def _level(self, bucket: str, limit: int, now: float) -> float:
        value, at = self._state.get(bucket, (float(limit), now))
        return min(float(limit), value + max(0.0, now - at) * limit / WINDOW_S)

    def run(self, name: str, rl: int, tl: int, take: tuple[int, int], check: bool) -> tuple[int, float, float]:
        now = time.monotonic()
        rv = self._level(f"{name}:r", rl, now) if rl else 0.0
        tv = self._level(f"{name}:t", tl, now) if tl else 0.0
        blocked = 0
        if check:
            if rl and rv < 1:
                blocked = 1
            elif tl and tv <= 0:
                blocked = 2
        if not blocked:
            rv -= take[0] if rl else 0
            tv -= take[1] if tl else 0
        if rl:
            self._state[f"{name}:r"] = (rv, now)
        if tl:
            self._state[f"{name}:t"] = (tv, now)
        return blocked, rv, tv


class RateLimiter:
    """Buckets for the keys that have limits; ``connect`` (in the app's lifespan) shares them via Redis."""

    def __init__(
        self, *, redis_url: str = "", prefix: str = "emb", timeout_s: float = 0.25, retry_s: float = 5.0
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s  # after a Redis failure, local buckets for this long
        self._local = _LocalBuckets()
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._down_until = 0.0

    @property
    def shared(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        if self.redis_url and self._client is None:
            self._client = aioredis.Redis.from_url(
                self.redis_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            self._script = self._client.register_script(_SCRIPT)  # EVALSHA, loaded again after NOSCRIPT

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = self._script = None

    def _keys(self, name: str) -> list[str]:
        # One hash tag per key name: both buckets sit in one Redis Cluster slot.
        return [f"{self.prefix}:ratelimit:{{{name}}}:requests", f"{self.prefix}:ratelimit:{{{name}}}:tokens"]

    async def _run(self, key: ApiKey, take_requests: int, take_tokens: int, check: bool) -> tuple[int, float, float]:
        assert key.name is not None, "only named keys have limits"
        rl, tl = key.requests_per_minute or 0, key.tokens_per_minute or 0
        script = self._script
        if script is not None and time.monotonic() >= self._down_until:
            try:
                async with asyncio.timeout(self.timeout_s):
                    raw = await script(keys=self._keys(key.name), args=[rl, tl, take_requests, take_tokens, int(check)])
                return int(raw[1]), float(raw[2]), float(raw[3])
            except (RedisError, OSError, TimeoutError) as exc:
                self._down_until = time.monotonic() + self.retry_s
                logger.warning("rate limits fall back to this process for %.0f s: redis failed: %r", self.retry_s, exc)
        return self._local.run(key.name, rl, tl, (take_requests, take_tokens), check)

    async def admit(self, key: ApiKey) -> Admission:
        """Take one request from ``key``'s buckets, unless one of them is short."""
        blocked, rv, tv = await self._run(key, 1, 0, check=True)
        levels = Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)
        return Admission(admitted=blocked == 0, blocked=_BLOCKED[blocked], levels=levels)

    async def charge(self, key: ApiKey, tokens: int) -> Levels:
        """Take an answered request's tokens (the bucket may go into debt)."""
        _, rv, tv = await self._run(key, 0, tokens, check=False)
        return Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)
