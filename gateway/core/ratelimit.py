"""Per-key token buckets for requests and tokens per minute, shared by every replica through Redis.

A bucket holds up to ``limit`` units and refills at ``limit / 60`` per second. A request of a key
with limits is admitted in two steps:

1. **admission** (the API-key middleware, before the body is read): it takes one request from the
   requests bucket, and is refused while that bucket holds less than one request or the tokens
   bucket less than one token (a key in debt waits for the debt to refill: no work is done for it);
2. **reservation** (:meth:`RateLimiter.reserve`, once the request's token count is known: the
   cached inputs' counts come with the cache lookup, the others from the tokenizer, so before the
   encoder does any work): it takes the request's tokens only if the tokens bucket holds them all,
   else the request is refused (429, with the wait until the bucket holds them). A request of more
   tokens than the key's whole limit could never pass, so it is refused with a plain 400 by the
   caller instead of a 429 that no wait cures. Reserved tokens stay taken when the client hangs up
   (the work was queued for it); the caller gives them back only when the server failed the request.

So concurrent requests of one key cannot all pass on an empty ledger: each one's tokens are taken
before the next one is checked, atomically in Redis or in this process.

With Redis (the cache's mode: one node, Sentinel's master, or a Cluster, where both buckets of a
key sit in one slot through a hash tag), one Lua script reads, refills, checks and takes a key's
buckets atomically with Redis' own clock: two replicas see one bucket. Without Redis each process
keeps its own buckets, so ``EMBED_WORKERS > 1`` without Redis is refused at start
(:func:`unshared_limits_problem`): every worker would multiply each limit.

A Redis round trip per request would cost the hit path more than everything else it does, so each
replica keeps, per key, the levels Redis answered last (its *view*) and what it took since:

* **far** from the limits (the view, less this replica's own unsettled usage and this request, keeps
  more than ``near`` = 20% of both limits, the view is at most ``4 x settle_s`` = 0.2 s old, and
  the unsettled usage, this request included, stays within ``unsettled`` = 5% of each limit) it
  admits and reserves locally; a background task settles every key's usage with Redis every
  ``settle_s`` = 50 ms (one pipeline of script calls) and reads the new levels back;
* **near** a limit (or with a stale view, or a full unsettled share) every admission and
  reservation is one awaited script call that settles the key's unsettled usage first, so the
  first request past a limit is refused, whichever replica gets it.

The bound: Redis checks exactly, so what the replicas serve exceeds a key's limit (plus what
refilled) only by usage that was unsettled somewhere when Redis said yes: at most the unsettled
share of each replica, which never holds a request larger than 5% of the limit. With requests of
at least 5% of the limit that is at most one request per replica; with smaller ones it is at most
5% of the limit per replica, and only when the other replicas took more than the 20% margin within
the 0.2 s a view lives. (Each process is a replica here: ``EMBED_WORKERS`` workers count one each.)

When Redis fails (an error, or no answer within ``timeout_s``; waiting for one of the
``max_connections`` connections is not timed, so a burst of clients is no failure) this process
falls back to its own buckets for ``retry_s``, and they start from the views: each key's last known
levels, refilled since, less what this replica took without Redis' word (unsettled, or in a call
that failed). A key in debt stays in debt through a Redis hiccup. What this process takes meanwhile,
and what it held unsettled, is kept per key as *owed* and settled with Redis (by the next settling
round, or the key's next call) once Redis answers again, so an outage does not hand each key its
limit again once per replica. Usage in a call that timed out is not sent again (a paused Redis runs
the call when it resumes); a request whose admission timed out is so counted twice at most.

A bucket that Redis holds no state for (a restart without persistence) starts from the level this
replica last knew (its view refilled since, or its own bucket), passed with every call, not full:
a restart does not refill every key's minute. Keys this replica never saw start full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.cache.clients import cluster_client, sentinel_client, single_client
from gateway.core.errors import InvalidInputError
from gateway.core.keys import ApiKey
from gateway.settings import ENV_PREFIX, Settings

__all__ = ["Admission", "Levels", "RateLimiter", "format_reset", "over_tokens_limit", "unshared_limits_problem"]

logger = logging.getLogger(__name__)

WINDOW_S = 60.0  # limits are per minute

RedisMode = Literal["single", "cluster", "sentinel"]

# What a failing Redis raises: a cluster's own errors (no node reachable) are not RedisErrors.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

# KEYS: requests bucket, tokens bucket. ARGV: 1-2 requests and tokens limits (0: none); 3-4 requests
# and tokens to take; 5-6 requests and tokens the buckets must hold for the take (0: no check);
# 7-8 requests and tokens to settle (usage a replica took locally: taken before the check, whatever
# it says); 9-10 the requests and tokens levels a bucket that Redis holds no state for starts from
# (the replica's last known level, so a Redis restart without persistence refills nothing; '': full).
# A negative take or settle gives back, never above the limit. Returns {admitted, blocked (0, 1
# requests, 2 tokens), requests level, tokens level}, the levels as strings (Lua numbers would be cut
# to integers).
_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local function level(key, limit, start)
  if limit <= 0 then return 0 end
  local state = redis.call('HMGET', key, 'level', 'at')
  local value = tonumber(state[1]) or math.min(limit, tonumber(start) or limit)
  local at = tonumber(state[2]) or now
  return math.min(limit, value + math.max(0, now - at) * limit / 60)
end
local rl, tl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rv, tv = level(KEYS[1], rl, ARGV[9]), level(KEYS[2], tl, ARGV[10])
if rl > 0 then rv = math.min(rl, rv - tonumber(ARGV[7])) end
if tl > 0 then tv = math.min(tl, tv - tonumber(ARGV[8])) end
local need_r, need_t = tonumber(ARGV[5]), tonumber(ARGV[6])
local blocked = 0
if rl > 0 and need_r > 0 and rv < need_r then blocked = 1
elseif tl > 0 and need_t > 0 and tv < need_t then blocked = 2 end
if blocked == 0 then
  if rl > 0 then rv = math.min(rl, rv - tonumber(ARGV[3])) end
  if tl > 0 then tv = math.min(tl, tv - tonumber(ARGV[4])) end
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


def over_tokens_limit(name: str | None, limit: int, tokens: str) -> InvalidInputError:
    """The 400 for a request of more ``tokens`` (a count, or "more than N") than key ``name`` may use
    in a minute: no wait would let it through, so it is no 429."""
    return InvalidInputError(
        f"This request holds {tokens} tokens, more than key '{name}' may use in a minute "
        f"(tokens per min (TPM): Limit {limit}); split it into requests of at most {limit} tokens.",
        param="input",
        code="request_too_large",
    )


def unshared_limits_problem(settings: Settings, keys: Sequence[ApiKey]) -> str | None:
    """Why these settings cannot enforce the keys' limits, as one line, or None.

    ``EMBED_WORKERS > 1`` runs that many HTTP worker processes; without Redis each would keep its
    own buckets and admit a key's whole limit, so every limit would be multiplied by the workers.
    """
    if settings.workers <= 1 or settings.redis_url.strip() or not any(key.limited for key in keys):
        return None
    return (
        f"{ENV_PREFIX}WORKERS (--workers): {settings.workers} workers without {ENV_PREFIX}REDIS_URL would each "
        f"keep their own rate-limit buckets, so every key's limits in {ENV_PREFIX}API_KEYS_FILE would be "
        f"multiplied by {settings.workers}; set {ENV_PREFIX}REDIS_URL (the workers then share the buckets) "
        f"or {ENV_PREFIX}WORKERS=1"
    )


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
    need: float = 1.0  # tokens the tokens bucket had to hold: 1 at admission, the request's count at reservation

    @property
    def retry_after(self) -> float:
        """Seconds until the blocking bucket holds what was asked of it."""
        levels = self.levels
        if self.blocked == "requests" and levels.requests_limit:
            return max(0.0, 1 - levels.requests) * WINDOW_S / levels.requests_limit
        if self.blocked == "tokens" and levels.tokens_limit:
            return max(0.0, self.need - levels.tokens) * WINDOW_S / levels.tokens_limit + 0.001
        return 0.0


_BLOCKED: dict[int, Literal["requests", "tokens"] | None] = {0: None, 1: "requests", 2: "tokens"}


class _LocalBuckets:
    """The same arithmetic as the Lua script, for one process."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def _level(self, bucket: str, limit: int, now: float) -> float:
        value, at = self._state.get(bucket, (float(limit), now))
        return min(float(limit), value + max(0.0, now - at) * limit / WINDOW_S)

    def run(
        self, name: str, rl: int, tl: int, take: tuple[int, int], need: tuple[float, float]
    ) -> tuple[int, float, float]:
        now = time.monotonic()
        rv = self._level(f"{name}:r", rl, now) if rl else 0.0
        tv = self._level(f"{name}:t", tl, now) if tl else 0.0
        blocked = 0
        if rl and need[0] and rv < need[0]:
            blocked = 1
        elif tl and need[1] and tv < need[1]:
            blocked = 2
        if not blocked:
            rv = min(float(rl), rv - take[0]) if rl else 0.0
            tv = min(float(tl), tv - take[1]) if tl else 0.0
        if rl:
            self._state[f"{name}:r"] = (rv, now)
        if tl:
            self._state[f"{name}:t"] = (tv, now)
        return blocked, rv, tv

    def levels(self, name: str, rl: int, tl: int, now: float) -> tuple[float, float] | None:
        """The key's levels now, or None when this process never decided for it."""
        if f"{name}:r" not in self._state and f"{name}:t" not in self._state:
            return None
        return (self._level(f"{name}:r", rl, now) if rl else 0.0, self._level(f"{name}:t", tl, now) if tl else 0.0)

    def seed(self, name: str, limits: tuple[int, int], levels: tuple[float, float], now: float) -> None:
        """Set a key's levels (what Redis said last) before this process decides alone."""
        (rl, tl), (rv, tv) = limits, levels
        if rl:
            self._state[f"{name}:r"] = (rv, now)
        if tl:
            self._state[f"{name}:t"] = (tv, now)


@dataclass(slots=True)
class _View:
    """One key's buckets as Redis answered them last, and what this replica took since."""

    requests_limit: int  # 0: none
    tokens_limit: int
    requests: float
    tokens: float
    at: float  # time.monotonic() of that answer
    pending_requests: int = 0  # taken here, not yet sent to Redis
    pending_tokens: int = 0
    sending_requests: int = 0  # on their way to Redis in a call that has not answered yet
    sending_tokens: int = 0


@dataclass(slots=True)
class _Owed:
    """What this process took for one key without Redis' word (Redis failing), still to be settled."""

    requests_limit: int
    tokens_limit: int
    requests: int = 0
    tokens: int = 0


class _RedisDown(Exception):
    """Redis failed while this call waited for a connection: this process decides."""


_FALLBACK = (*_FAILURES, _RedisDown)  # what makes this process decide alone


def _timed_out(exc: BaseException) -> bool:
    """Whether a failed call may have been applied all the same: it was sent, and a paused or slow
    Redis runs it when it gets to it. Its usage is not sent again (it counts in this process's
    buckets meanwhile); a call refused or cut otherwise is."""
    return isinstance(exc, (TimeoutError, RedisTimeoutError))


class RateLimiter:
    """Buckets for the keys that have limits; ``connect`` (in the app's lifespan) shares them via Redis,
    with a client of the same ``mode`` as the cache's."""

    def __init__(
        self,
        *,
        redis_url: str = "",
        mode: RedisMode = "single",
        sentinel_master: str = "",
        max_connections: int = 64,
        prefix: str = "emb",
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
        settle_s: float = 0.05,
        near: float = 0.2,
        unsettled: float = 0.05,
    ) -> None:
        if redis_url and mode == "sentinel" and not sentinel_master:
            raise ValueError("sentinel mode needs the master's name")
        self.redis_url = redis_url
        self.mode = mode
        self.sentinel_master = sentinel_master
        self.max_connections = max_connections
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s  # after a Redis failure, local buckets for this long
        self.settle_s = settle_s  # how often usage taken locally is settled with Redis
        self.near = near  # within this share of a limit, every admission and reservation asks Redis
        self.unsettled = unsettled  # the most of a limit a replica takes without telling Redis
        self.fresh_s = 4 * settle_s  # an older view is not trusted to admit locally
        self._local = _LocalBuckets()
        self._client: Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._script: AsyncScript | None = None
        # The client's pools refuse a call past max_connections (per node) at once instead of waiting:
        # a burst of calls near a limit waits here for a connection (within the call's deadline), so
        # a busy moment is not taken for a failed Redis.
        self._gate = asyncio.Semaphore(max_connections)
        self._down_until = 0.0
        self._views: dict[str, _View] = {}
        self._owed: dict[str, _Owed] = {}  # taken while Redis failed: settled once it answers again
        self._keys_of: dict[str, list[str]] = {}
        self._settler: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[Any]] = set()

    @property
    def shared(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        if not self.redis_url or self._client is not None:
            return
        client: Redis | RedisCluster
        url, timeout_s, most = self.redis_url, self.timeout_s, self.max_connections
        if self.mode == "cluster":
            client = cluster_client(url, timeout_s=timeout_s, max_connections=most)
        elif self.mode == "sentinel":
            self._sentinel, client = sentinel_client(
                url, self.sentinel_master, timeout_s=timeout_s, max_connections=most
            )
        else:
            client = single_client(url, timeout_s=timeout_s, max_connections=most)
        self._client = client
        self._script = client.register_script(_SCRIPT)  # EVALSHA, loaded again after NOSCRIPT
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
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
            self._sentinel = None

    def _keys(self, name: str) -> list[str]:
        # One hash tag per key name: both buckets sit in one Redis Cluster slot (one script, one slot).
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
        """Decide alone for ``retry_s``, starting from what Redis said last: a key in debt stays in debt.
        What the views held unsettled is owed to Redis, settled once it answers again."""
        now = time.monotonic()
        already = now < self._down_until  # another call in flight failed first: say it once
        self._down_until = now + self.retry_s
        for name, view in self._views.items():
            rl, tl = view.requests_limit, view.tokens_limit
            age = max(0.0, now - view.at)
            owed = self._owed.get(name)
            owed_requests, owed_tokens = (owed.requests, owed.tokens) if owed is not None else (0, 0)
            # Usage on its way in a call that failed may or may not have reached Redis: count it.
            rv = min(rl, view.requests + age * rl / WINDOW_S) - view.sending_requests - view.pending_requests
            tv = min(tl, view.tokens + age * tl / WINDOW_S) - view.sending_tokens - view.pending_tokens
            self._local.seed(name, (rl, tl), (rv - owed_requests, tv - owed_tokens), now)
            self._owe(name, rl, tl, view.pending_requests, view.pending_tokens)
            view.pending_requests = view.pending_tokens = 0
        self._views.clear()
        if not already:
            logger.warning("rate limits fall back to this process for %.0f s: redis failed: %r", self.retry_s, exc)

    def _owe(self, name: str, rl: int, tl: int, requests: int, tokens: int) -> None:
        """Keep ``requests`` and ``tokens`` taken without Redis' word, to settle once it answers."""
        requests, tokens = requests if rl else 0, tokens if tl else 0
        if not requests and not tokens:
            return
        owed = self._owed.get(name)
        if owed is None:
            self._owed[name] = _Owed(rl, tl, requests, tokens)
            return
        owed.requests_limit, owed.tokens_limit = rl, tl
        owed.requests += requests
        owed.tokens += tokens

    def _carry(self, name: str, view: _View | None) -> tuple[int, int]:
        """Take ``name``'s unsettled usage (the view's and what is owed) for one call to settle."""
        requests = tokens = 0
        if view is not None:
            requests, tokens = view.pending_requests, view.pending_tokens
            view.pending_requests = view.pending_tokens = 0
        owed = self._owed.pop(name, None)
        if owed is not None:
            requests += owed.requests
            tokens += owed.tokens
        if view is not None:
            view.sending_requests += requests
            view.sending_tokens += tokens
        return requests, tokens

    def _unsent(self, name: str, view: _View | None, limits: tuple[int, int], usage: tuple[int, int]) -> None:
        """Usage a call carried that did not reach Redis: the next call or round settles it."""
        if view is not None and self._views.get(name) is view:
            view.pending_requests += usage[0]
            view.pending_tokens += usage[1]
        else:
            self._owe(name, *limits, *usage)

    def _starts(
        self, name: str, limits: tuple[int, int], view: _View | None, usage: tuple[int, int]
    ) -> tuple[float | str, float | str]:
        """The levels a bucket that Redis holds no state for (a restart without persistence) starts
        from: this replica's view refilled since, or its own bucket before the ``usage`` this call
        settles; '' (full) when it knows nothing of the key."""
        (rl, tl), now = limits, time.monotonic()
        if view is not None and (view.requests_limit, view.tokens_limit) == (rl, tl):
            age = max(0.0, now - view.at)
            rv, tv = view.requests + age * rl / WINDOW_S, view.tokens + age * tl / WINDOW_S
        else:
            local = self._local.levels(name, rl, tl, now)
            if local is None:
                return "", ""
            rv, tv = local[0] + usage[0], local[1] + usage[1]
        return (min(float(rl), rv) if rl else "", min(float(tl), tv) if tl else "")

    def _far(
        self, view: _View, rl: int, tl: int, *, requests: int, tokens: int, now: float
    ) -> tuple[float, float] | None:
        """The key's levels after taking ``requests`` and ``tokens`` here, or None when Redis must decide."""
        age = now - view.at
        if age > self.fresh_s or not self.unsettled:  # stale, or every admission asks Redis
            return None
        rv = tv = 0.0
        if rl:
            pending = view.pending_requests + requests
            rv = min(rl, view.requests + age * rl / WINDOW_S) - view.sending_requests - pending
            # Usage on its way to Redis (a settling call in flight) is still unsettled: counted too.
            if rv < self.near * rl or view.sending_requests + pending > self.unsettled * rl:
                return None
        if tl:
            pending = view.pending_tokens + tokens
            tv = min(tl, view.tokens + age * tl / WINDOW_S) - view.sending_tokens - pending
            if tv < self.near * tl or view.sending_tokens + pending > self.unsettled * tl:
                return None
        return rv, tv

    async def _call(
        self, name: str, rl: int, tl: int, take: tuple[int, int], need: tuple[float, float]
    ) -> tuple[int, float, float]:
        """One awaited script call that also settles ``name``'s unsettled usage; on failure it falls
        back (:meth:`_failed`) and raises."""
        assert self._script is not None
        view = self._views.get(name)
        requests, tokens = self._carry(name, view)
        starts = self._starts(name, (rl, tl), view, (requests, tokens))
        args = [rl, tl, take[0], take[1], need[0], need[1], requests, tokens, *starts]
        try:
            # Waiting for a connection (a burst near a limit) is no Redis failure: only the call is timed.
            async with self._gate:
                if not self._redis_up():  # another call failed meanwhile
                    raise _RedisDown
                async with asyncio.timeout(self.timeout_s):
                    raw = await self._script(keys=self._keys(name), args=args)
        except _FAILURES as exc:
            # Before the ``finally``: this call's settled usage still counts (as sending) in the levels
            # the local buckets start from.
            self._failed(exc)
            if not _timed_out(exc):
                self._unsent(name, view, (rl, tl), (requests, tokens))
            raise
        except (_RedisDown, asyncio.CancelledError):  # the caller left: what it carried is settled later
            self._unsent(name, view, (rl, tl), (requests, tokens))
            raise
        finally:
            if view is not None:
                view.sending_requests -= requests
                view.sending_tokens -= tokens
        blocked, rv, tv = int(raw[1]), float(raw[2]), float(raw[3])
        self._seen(name, rl, tl, rv, tv)
        return blocked, rv, tv

    def _seen(self, name: str, rl: int, tl: int, rv: float, tv: float) -> None:
        view = self._views.get(name)
        if view is None or (view.requests_limit, view.tokens_limit) != (rl, tl):
            self._views[name] = _View(rl, tl, rv, tv, time.monotonic())
        else:
            view.requests, view.tokens, view.at = rv, tv, time.monotonic()

    async def _run(self, key: ApiKey, take: tuple[int, int], need: tuple[float, float]) -> tuple[int, float, float]:
        assert key.name is not None, "only named keys have limits"
        rl, tl = key.requests_per_minute or 0, key.tokens_per_minute or 0
        if self._redis_up():
            with contextlib.suppress(*_FALLBACK):  # _call has fallen back: this process decides
                return await self._call(key.name, rl, tl, take, need)
        blocked, rv, tv = self._local.run(key.name, rl, tl, take, need)
        if not blocked:
            self._owe(key.name, rl, tl, *take)
        return blocked, rv, tv

    def _local_far(self, key: ApiKey, *, requests: int, tokens: int) -> tuple[float, float] | None:
        """Take ``requests`` and ``tokens`` locally when the key is far from its limits, else None."""
        if self._script is None or key.name is None:
            return None
        view = self._views.get(key.name)
        now = time.monotonic()
        if view is None or now < self._down_until or key.name in self._owed:
            return None
        rl, tl = key.requests_per_minute or 0, key.tokens_per_minute or 0
        far = self._far(view, rl, tl, requests=requests, tokens=tokens, now=now)
        if far is not None:
            if rl:
                view.pending_requests += requests
            if tl:
                view.pending_tokens += tokens
        return far

    async def admit(self, key: ApiKey) -> Admission:
        """Take one request from ``key``'s buckets, unless its requests bucket holds less than one
        request or its tokens bucket less than one token."""
        return await self._take(key, (1, 0), (1, 1))

    async def reserve(self, key: ApiKey, tokens: int) -> Admission:
        """Take an admitted request's ``tokens`` from ``key``'s tokens bucket if it holds them all; else
        take nothing and say so (``need``: ``tokens``). The caller refuses a request of more tokens
        than the whole limit before asking: no bucket ever holds it."""
        return await self._take(key, (0, tokens), (0, tokens))

    async def _take(self, key: ApiKey, take: tuple[int, int], need: tuple[float, float]) -> Admission:
        far = self._local_far(key, requests=take[0], tokens=take[1])
        if far is not None:
            return Admission(True, None, Levels(key.requests_per_minute, key.tokens_per_minute, *far), need[1])
        blocked, rv, tv = await self._run(key, take, need)
        levels = Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)
        return Admission(blocked == 0, _BLOCKED[blocked], levels, need[1])

    async def charge(self, key: ApiKey, tokens: int) -> Levels:
        """Take ``tokens`` (negative: give them back) without a check, at once: the bucket may go into debt."""
        _, rv, tv = await self._run(key, (0, tokens), (0, 0))
        return Levels(key.requests_per_minute, key.tokens_per_minute, rv, tv)

    def adjust_later(self, key: ApiKey, tokens: int) -> None:
        """:meth:`charge` without waiting: far from the limit with the next settling round, near it
        with a call of its own; while Redis fails, in this process's buckets now (owed to Redis)."""
        if not tokens or not key.tokens_per_minute or key.name is None:
            return
        if not self._redis_up():
            rl, tl = key.requests_per_minute or 0, key.tokens_per_minute
            self._local.run(key.name, rl, tl, (0, tokens), (0, 0))
            self._owe(key.name, rl, tl, 0, tokens)
            return
        if tokens < 0:
            view = self._views.get(key.name)
            if view is not None:  # giving back never needs Redis' word first: the next round takes it
                view.pending_tokens += tokens
                return
        elif self._local_far(key, requests=0, tokens=tokens) is not None:
            return
        task = asyncio.create_task(self.charge(key, tokens))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def settle(self) -> None:
        """Send every key's unsettled usage (and what was taken while Redis failed) to Redis in one
        pipeline and read the levels back."""
        if not self._redis_up() or self._client is None or self._script is None:
            return
        batch: list[tuple[str, _View | None, int, int, int, int]] = []  # name, view, limits, usage sent
        for name, current in self._views.items():
            if current.pending_requests or current.pending_tokens or name in self._owed:
                limits = (current.requests_limit, current.tokens_limit)
                batch.append((name, current, *limits, *self._carry(name, current)))
        for name in [name for name in self._owed if name not in self._views]:
            owed = self._owed[name]
            batch.append((name, None, owed.requests_limit, owed.tokens_limit, *self._carry(name, None)))
        if not batch:
            return
        script = self._script
        calls = [
            (
                self._keys(name),
                [rl, tl, 0, 0, 0, 0, requests, tokens, *self._starts(name, (rl, tl), view, (requests, tokens))],
            )
            for name, view, rl, tl, requests, tokens in batch
        ]
        try:
            async with self._gate:  # waiting for a connection is no Redis failure: only the calls are timed
                if not self._redis_up():
                    raise _RedisDown
                async with asyncio.timeout(self.timeout_s):
                    async with self._client.pipeline(transaction=False) as pipe:
                        # AsyncScript queues into either pipeline, though redis-py's annotations name
                        # only the clients (a cluster's pipeline is no RedisCluster).
                        queue: Any = pipe
                        for keys, args in calls:
                            await script(keys=keys, args=args, client=queue)
                        answers: list[Any] = await pipe.execute(raise_on_error=False)
                    # A cluster pipeline does not load scripts first (a plain one does): a master that
                    # lacks ours answers NOSCRIPT for its keys alone, and nothing of theirs ran. Those
                    # calls go again one by one, which loads it there.
                    for index, answer in enumerate(answers):
                        if isinstance(answer, NoScriptError):
                            keys, args = calls[index]
                            answers[index] = await script(keys=keys, args=args)
                        elif isinstance(answer, BaseException):
                            raise answer
        except (*_FALLBACK, asyncio.CancelledError) as exc:
            if isinstance(exc, _FAILURES):
                self._failed(exc)
            if not _timed_out(exc):
                for name, view, rl, tl, requests, tokens in batch:
                    self._unsent(name, view, (rl, tl), (requests, tokens))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            for _, view, _, _, requests, tokens in batch:
                if view is not None:
                    view.sending_requests -= requests
                    view.sending_tokens -= tokens
        for (name, _, rl, tl, _, _), raw in zip(batch, answers, strict=True):
            self._seen(name, rl, tl, float(raw[2]), float(raw[3]))

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settle_s)
            try:
                await self.settle()
            except Exception:  # never let the settler die: the next round tries again
                logger.exception("settling rate limits with redis failed")
