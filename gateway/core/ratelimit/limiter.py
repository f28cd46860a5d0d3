"""The rate limiter: admission and reservation against a key's buckets, shared through Redis.

:class:`RateLimiter` is what the HTTP layer calls (:meth:`RateLimiter.admit` before the body is read,
:meth:`RateLimiter.reserve` once the token count is known, :meth:`RateLimiter.charge` and
:meth:`RateLimiter.adjust_later` to correct it). Far from a key's limits it decides here, from the
replica's views (:mod:`~gateway.core.ratelimit.views`); near them, or with a stale view, it awaits
one script call (:mod:`~gateway.core.ratelimit.buckets`); a background task settles the usage taken
here every ``settle_s``. When Redis fails, this process decides alone for ``retry_s``.

The whole design, and the bound on what replicas may serve over a limit, is in the package's
docstring (:mod:`gateway.core.ratelimit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.cache.clients import cluster_client, sentinel_client, single_client
from gateway.core.keys import ApiKey
from gateway.core.ratelimit.buckets import BUCKETS_SCRIPT, LocalBuckets
from gateway.core.ratelimit.levels import BLOCKED, Admission, Levels
from gateway.core.ratelimit.views import Owed, ReplicaViews, View

__all__ = ["RateLimiter", "RedisMode"]

# Named as the module was before it became a package: log lines read as before.
logger = logging.getLogger("gateway.core.ratelimit")

RedisMode = Literal["single", "cluster", "sentinel"]

# What a failing Redis raises: a cluster's own errors (no node reachable) are not RedisErrors.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class _RedisDown(Exception):
    """Redis failed while this call waited for a connection: this process decides."""


_FALLBACK = (*_FAILURES, _RedisDown)  # what makes this process decide alone


def _timed_out(exc: BaseException) -> bool:
    """Whether a failed call may have been applied all the same: it was sent, and a paused or slow
    Redis runs it when it gets to it. Its usage is not sent again (it counts in this process's
    buckets meanwhile); a call refused or cut otherwise is."""
    return isinstance(exc, (TimeoutError, RedisTimeoutError))


class RateLimiter(ReplicaViews):
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
        self._local = LocalBuckets()
        self._client: Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._script: AsyncScript | None = None
        # The client's pools refuse a call past max_connections (per node) at once instead of waiting:
        # a burst of calls near a limit waits here for a connection (within the call's deadline), so
        # a busy moment is not taken for a failed Redis.
        self._gate = asyncio.Semaphore(max_connections)
        self._down_until = 0.0
        self._views: dict[str, View] = {}
        self._owed: dict[str, Owed] = {}  # taken while Redis failed: settled once it answers again
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
        self._script = client.register_script(BUCKETS_SCRIPT)  # EVALSHA, loaded again after NOSCRIPT
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
        return Admission(blocked == 0, BLOCKED[blocked], levels, need[1])

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
        batch: list[tuple[str, View | None, int, int, int, int]] = []  # name, view, limits, usage sent
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
