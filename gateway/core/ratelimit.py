"""Per-key token buckets for requests and tokens per minute, shared by every replica through Redis.

A bucket holds up to ``limit`` units and refills at ``limit / 60`` per second. A request is admitted
while its key's requests bucket holds one whole request and its tokens bucket is not in debt; the
request takes one request at once and, once answered, its real token count (the model's tokenizer,
cache hits included, so only known after the lookup). A request may therefore push the tokens bucket
below zero; the next request of that key is then refused until the debt has refilled.

With Redis, both buckets of a key live in one hash-tagged pair of keys and one Lua script reads,
refills and takes them atomically with Redis' own clock: two replicas see one bucket. Without
Redis, or while Redis fails, each process keeps its own buckets (fail open, never a 5xx).

A Redis round trip per request would cost the hit path more than everything else it does, so each
replica keeps, per key, the levels Redis answered last and what it admitted and charged since:

* **far** from the limit (its view, less its own unsettled usage, keeps more than ``near`` = 20% of
  both limits, the view is at most ``4 x settle_s`` = 0.2 s old, and its unsettled usage stays within
  ``unsettled`` = 5% of each limit) it admits locally; a background task settles every key's usage
  with Redis every ``settle_s`` = 50 ms (one pipeline of script calls) and reads the new levels back;
* **near** the limit (or with a stale view, or a full unsettled share) it does what it did before:
  one awaited script call per admission (settling the key's unsettled usage first) and the charge
  sent at once, so the first request past a limit is refused, whichever replica gets it.

The bound: only the unsettled usage (at most 5% of a limit per replica) is invisible to the other
replicas, and a replica admits locally only while the key had more than 20% left at its view at most
0.2 s ago. A key is admitted past its limit only when the other replicas together take more than
that 20% within those 0.2 s; the excess is then at most 5% of the limit per replica. Usage still
unsettled is sent on :meth:`RateLimiter.close`; when Redis fails it is dropped with the views and
the process falls back to its own buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.core.keys import ApiKey

__all__ = ["Admission", "Levels", "RateLimiter", "format_reset"]

logger = logging.getLogger(__name__)

WINDOW_S = 60.0  # limits are per minute

# KEYS: requests bucket, tokens bucket. ARGV: requests limit, tokens limit (0: none), requests to take,
# tokens to take, check (1: refuse when short), requests and tokens to settle (usage a replica admitted
# locally: taken before the check, whatever it says). Returns {admitted, blocked (0, 1 requests, 2
# tokens), requests level, tokens level} with the levels as strings (Lua numbers would be cut to integers).
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
if rl > 0 then rv = rv - (tonumber(ARGV[6]) or 0) end
if tl > 0 then tv = tv - (tonumber(ARGV[7]) or 0) end
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
  redis.call('EXPIRE', KEYS[1], 120 + math.ceil(math.max(0, -rv) * 60 / rl))
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


class Levels(NamedTuple):
    """A key's two buckets after a call (a limit of None: that bucket does not exist).

    Named tuples, not frozen dataclasses, for this and :class:`Admission`: the hit path builds both
    per request of a limited key, and a frozen dataclass sets each field through ``object.__setattr__``
    (2.5 us for the pair against 0.8 us).
    """

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


class Admission(NamedTuple):
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


@dataclass(slots=True)
class _View:
    """One key's buckets as Redis answered them last, and what this replica took since."""

    requests_limit: int  # 0: none
    tokens_limit: int
    requests: float
    tokens: float
    at: float  # time.monotonic() of that answer
    pending_requests: int = 0  # admitted here, not yet sent to Redis
    pending_tokens: int = 0
    sending_requests: int = 0  # on their way to Redis in a call that has not answered yet
    sending_tokens: int = 0


class RateLimiter:
    """Buckets for the keys that have limits; ``connect`` (in the app's lifespan) shares them via Redis."""

    def __init__(
        self,
        *,
        redis_url: str = "",
        prefix: str = "emb",
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
        settle_s: float = 0.05,
        near: float = 0.2,
        unsettled: float = 0.05,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s  # after a Redis failure, local buckets for this long
        self.settle_s = settle_s  # how often usage admitted locally is settled with Redis
        self.near = near  # within this share of a limit, every admission asks Redis
        self.unsettled = unsettled  # the most of a limit a replica admits without telling Redis
        self.fresh_s = 4 * settle_s  # an older view is not trusted to admit locally
        self._local = _LocalBuckets()
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._down_until = 0.0
        self._views: dict[str, _View] = {}
        self._keys_of: dict[str, list[str]] = {}
        self._settler: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[Any]] = set()

    @property
    def shared(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        if self.redis_url and self._client is None:
            self._client = aioredis.Redis.from_url(
                self.redis_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            self._script = self._client.register_script(_SCRIPT)  # EVALSHA, loaded again after NOSCRIPT
            self._settler = asyncio.create_task(self._settle_forever(), name="ratelimit-settle")

    async def close(self) -> None:
        """Stop settling, send the usage still unsettled (bounded by ``timeout_s``), close the client."""
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
            self._settler = None
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=self.timeout_s)
        await self.settle()
        if self._client is not None:
            await self._client.aclose()
            self._client = self._script = None

    def _keys(self, name: str) -> list[str]:
        # One hash tag per key name: both buckets sit in one Redis Cluster slot.
        found = self._keys_of.get(name)
        if found is None:
            found = self._keys_of[name] = [
                f"{self.prefix}:ratelimit:{{{name}}}:requests",
                f"{self.prefix}:ratelimit:{{{name}}}:tokens",
            ]
        return found

    def _redis_up(self) -> bool:
        return self._script is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        self._views.clear()  # unsettled usage is dropped: this process's own buckets take over
        logger.warning("rate limits fall back to this process for %.0f s: redis failed: %r", self.retry_s, exc)

    def _far(
        self, view: _View, rl: int, tl: int, *, requests: int, tokens: int, now: float
    ) -> tuple[float, float] | None:
        """The key's levels after taking ``requests`` and ``tokens`` here, or None when Redis must decide."""
        age = now - view.at
        if age > self.fresh_s:
            return None
        rv = tv = 0.0
        if rl:
            pending = view.pending_requests + requests
            rv = min(rl, view.requests + age * rl / WINDOW_S) - view.sending_requests - pending
            if rv < self.near * rl or pending > self.unsettled * rl:
                return None
        if tl:
            pending = view.pending_tokens + tokens
            tv = min(tl, view.tokens + age * tl / WINDOW_S) - view.sending_tokens - pending
            if tv < self.near * tl or pending > self.unsettled * tl:
                return None
        return rv, tv

    async def _call(
        self, name: str, rl: int, tl: int, take_requests: int, take_tokens: int, *, check: bool
    ) -> tuple[int, float, float]:
        """One awaited script call that also settles ``name``'s unsettled usage; raises on failure."""
        assert self._script is not None
        view = self._views.get(name)
        settle_requests = settle_tokens = 0
        if view is not None:
            settle_requests, settle_tokens = view.pending_requests, view.pending_tokens
            view.pending_requests = view.pending_tokens = 0
            view.sending_requests += settle_requests
            view.sending_tokens += settle_tokens
        args = [rl, tl, take_requests, take_tokens, int(check), settle_requests, settle_tokens]
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._script(keys=self._keys(name), args=args)
        finally:
            if view is not None:
                view.sending_requests -= settle_requests
                view.sending_tokens -= settle_tokens
        blocked, rv, tv = int(raw[1]), float(raw[2]), float(raw[3])
        self._seen(name, rl, tl, rv, tv)
        return blocked, rv, tv

    def _seen(self, name: str, rl: int, tl: int, rv: float, tv: float) -> None:
        view = self._views.get(name)
        if view is None or (view.requests_limit, view.tokens_limit) != (rl, tl):
            self._views[name] = _View(rl, tl, rv, tv, time.monotonic())
        else:
            view.requests, view.tokens, view.at = rv, tv, time.monotonic()

    async def _run(self, key: ApiKey, take_requests: int, take_tokens: int, check: bool) -> tuple[int, float, float]:
        assert key.name is not None, "only named keys have limits"
        rl, tl = key.requests_per_minute or 0, key.tokens_per_minute or 0
        if self._redis_up():
            try:
                return await self._call(key.name, rl, tl, take_requests, take_tokens, check=check)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
        return self._local.run(key.name, rl, tl, (take_requests, take_tokens), check)

    async def admit(self, key: ApiKey) -> Admission:
        """Take one request from ``key``'s buckets, unless one of them is short."""
        if self._script is not None and key.name is not None:
            view = self._views.get(key.name)
            if view is not None:
                rl, tl = key.requests_per_minute or 0, key.tokens_per_minute or 0
                now = time.monotonic()
                far = self._far(view, rl, tl, requests=1, tokens=0, now=now) if now >= self._down_until else None
                if far is not None:
                    if rl:
                        view.pending_requests += 1
                    return Admission(True, None, Levels(key.requests_per_minute, key.tokens_per_minute, *far))
        blocked, rv, tv = await self._run(key, 1, 0, check=True)
        levels = Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)
        return Admission(admitted=blocked == 0, blocked=_BLOCKED[blocked], levels=levels)

    async def charge(self, key: ApiKey, tokens: int) -> Levels:
        """Take an answered request's tokens (the bucket may go into debt), at once."""
        _, rv, tv = await self._run(key, 0, tokens, check=False)
        return Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)

    def charge_later(self, key: ApiKey, tokens: int) -> None:
        """Take an answered request's tokens without waiting: far from the limit they are settled with
        the next batch, near it they leave for Redis at once (before this answer's body does, so the
        key's next request sees them); without Redis this process's buckets take them now."""
        if not tokens or not key.tokens_per_minute or key.name is None:
            return
        if not self._redis_up():
            self._local.run(key.name, key.requests_per_minute or 0, key.tokens_per_minute, (0, tokens), False)
            return
        view = self._views.get(key.name)
        if (
            view is not None
            and self._far(view, 0, key.tokens_per_minute, requests=0, tokens=tokens, now=time.monotonic()) is not None
        ):
            view.pending_tokens += tokens
            return
        task = asyncio.create_task(self.charge(key, tokens))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def settle(self) -> None:
        """Send every key's unsettled usage to Redis in one pipeline and read the levels back."""
        if not self._redis_up() or self._client is None or self._script is None:
            return
        batch: list[tuple[str, _View, int, int]] = []  # name, view, requests and tokens sent
        for name, view in self._views.items():
            if view.pending_requests or view.pending_tokens:
                batch.append((name, view, view.pending_requests, view.pending_tokens))
                view.sending_requests += view.pending_requests
                view.sending_tokens += view.pending_tokens
                view.pending_requests = view.pending_tokens = 0
        if not batch:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for name, view, requests, tokens in batch:
                        rl, tl = view.requests_limit, view.tokens_limit
                        await self._script(keys=self._keys(name), args=[rl, tl, 0, 0, 0, requests, tokens], client=pipe)
                    answers = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        finally:
            for _, view, requests, tokens in batch:
                view.sending_requests -= requests
                view.sending_tokens -= tokens
        for (name, view, _, _), raw in zip(batch, answers, strict=True):
            self._seen(name, view.requests_limit, view.tokens_limit, float(raw[2]), float(raw[3]))

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settle_s)
            try:
                await self.settle()
            except Exception:  # never let the settler die: the next round tries again
                logger.exception("settling rate limits with redis failed")
