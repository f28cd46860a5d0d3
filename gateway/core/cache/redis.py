"""Redis as the shared vector cache: one node, Sentinel or Cluster (redis-py's own clients).

One node (``single``, ``sentinel``): one ``MGET`` per lookup, one pipeline of ``SET EX`` per write.
Cluster: the keys are grouped by node and, within a node, by slot (one ``MGET`` per slot, so never a
``CROSSSLOT`` error); each node gets one pipeline, all nodes at once, each with its own deadline, so a
node that fails or fails over turns only its own keys into misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.typing import EncodableT

from gateway.core.cache.base import CacheBusyError, CacheRefusedError, CacheUnavailableError
from gateway.core.cache.clients import cluster_client, sentinel_client, single_client

__all__ = ["RedisBlobCache", "RedisMode"]

logger = logging.getLogger(__name__)

RedisMode = Literal["single", "cluster", "sentinel"]

# What a client or a socket may raise; RedisClusterException (bad slots, no reachable node) is not a RedisError.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
# Error replies of a cluster in motion (MovedError is an AskError): the keys are misses, not refusals.
_MOVED = (AskError, TryAgainError, ClusterDownError)


def _describe(exc: BaseException) -> str:
    """``ReadOnlyError: You can't write against a read only replica.`` (redis-py's repr hides the message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _failure(what: str, exc: BaseException) -> CacheUnavailableError:
    if isinstance(exc, ResponseError) and not isinstance(exc, _MOVED):
        return CacheRefusedError(f"redis {what} refused: {_describe(exc)}")
    return CacheUnavailableError(f"redis {what} failed: {_describe(exc)}")


def _kept(written: object, stored: object) -> bytes | None:
    """What ``put_first``'s ``SET NX`` and ``GET`` replies say is kept: the value read back (even
    when the write was refused: another one stored it first), else the write's or the read's error."""
    if isinstance(stored, bytes):
        return stored
    for what, reply in (("write", written), ("read", stored)):
        if isinstance(reply, BaseException):
            raise _failure(what, reply)
    return None


class RedisBlobCache:
    """Every call first waits (at most ``pool_timeout_s``) for one of ``max_connections`` slots, so
    a crowd queues for a moment instead of failing (:class:`CacheBusyError` when the wait runs out:
    the process is saturated, Redis is not to blame). Then each call is bounded by ``timeout_s``
    (socket timeouts and an outer deadline), and redis-py retries once at once: a dead Redis costs
    a request milliseconds, not a hang.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int,
        timeout_s: float,
        mode: RedisMode = "single",
        sentinel_master: str = "",
        max_connections: int = 64,
        pool_timeout_s: float = 1.0,
        node_cooldown_s: float = 1.0,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.timeout_s = timeout_s
        self.mode = mode
        self.backend = "redis" if mode == "single" else f"redis-{mode}"
        self.max_connections = max_connections
        self.pool_timeout_s = pool_timeout_s
        self._gate = asyncio.Semaphore(max_connections)
        self.client: Redis | None = None
        self.cluster: _ClusterStore | None = None
        self.sentinel: Sentinel | None = None
        if mode == "cluster":
            client = cluster_client(url, timeout_s=timeout_s, max_connections=max_connections)
            self.cluster = _ClusterStore(client, timeout_s=timeout_s, node_cooldown_s=node_cooldown_s)
        elif mode == "sentinel":
            if not sentinel_master:
                raise ValueError("sentinel mode needs the master's name")
            self.sentinel, self.client = sentinel_client(
                url, sentinel_master, timeout_s=timeout_s, max_connections=max_connections
            )
        else:
            self.client = single_client(url, timeout_s=timeout_s, max_connections=max_connections)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of ``max_connections`` slots: one connection per node for the duration of one call."""
        await self._acquire()
        try:
            yield
        finally:
            self._gate.release()

    async def _acquire(self) -> None:
        if not self._gate.locked():  # a free slot: taken at once, no deadline to arm (the hit path)
            await self._gate.acquire()
            return
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                await self._gate.acquire()
        except TimeoutError:
            raise CacheBusyError(
                f"all {self.max_connections} redis connections stayed busy for {self.pool_timeout_s:g}s"
            ) from None

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        # The slot by hand, not through _slot(): an async context manager costs the hit path a few us.
        await self._acquire()
        try:
            if self.cluster is not None:
                return await self.cluster.get(keys)
            assert self.client is not None
            try:
                async with asyncio.timeout(self.timeout_s):
                    values = await self.client.mget(keys)
            except _FAILURES as exc:
                raise _failure("read", exc) from exc
        finally:
            self._gate.release()
        return [value if isinstance(value, bytes) else None for value in values]

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        async with self._slot():
            # Writes run after the response, so they may take longer than a read before giving up.
            if self.cluster is not None:
                await self.cluster.put(items, self.ttl_seconds, self.timeout_s * 4)
                return
            assert self.client is not None
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key, value in items:
                            pipe.set(key, value, ex=self.ttl_seconds)
                        await pipe.execute()
            except _FAILURES as exc:
                raise _failure("write", exc) from exc

    async def put_first(self, key: str, value: bytes) -> bytes | None:
        async with self._slot():
            if self.cluster is not None:
                return await self.cluster.put_first(key, value, self.ttl_seconds, self.timeout_s * 4)
            assert self.client is not None
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    async with self.client.pipeline(transaction=False) as pipe:
                        pipe.set(key, value, ex=self.ttl_seconds, nx=True)
                        pipe.get(key)
                        written, stored = await pipe.execute(raise_on_error=False)
            except _FAILURES as exc:
                raise _failure("write", exc) from exc
            return _kept(written, stored)

    async def ping(self) -> bool:
        try:
            async with self._slot():
                if self.cluster is not None:
                    return await self.cluster.ping()
                assert self.client is not None
                async with asyncio.timeout(self.timeout_s):
                    return bool(await self.client.ping())
        except (*_FAILURES, CacheBusyError):
            return False

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        if self.client is not None:
            await self.client.aclose()
        if self.sentinel is not None:
            for sentinel in self.sentinel.sentinels:
                await sentinel.aclose()


class _ClusterStore:
    """Reads and writes split per node and slot. A node that fails is skipped for ``node_cooldown_s``
    (its keys are misses at once) and the slot map is refreshed in the background, so a promoted
    replica takes over its slots; only when every master is failing does a call fail as a whole."""

    def __init__(self, client: RedisCluster, *, timeout_s: float, node_cooldown_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.node_cooldown_s = node_cooldown_s
        self.node_failures = 0  # node calls that failed while the cluster as a whole answered
        self._down: dict[str, float] = {}  # node name -> skipped until (monotonic)
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    async def _ready(self, deadline_s: float) -> None:
        try:
            async with asyncio.timeout(deadline_s):
                await self.client.initialize()  # at once when it already knows the slots
        except _FAILURES as exc:
            raise CacheUnavailableError(f"redis cluster unreachable: {_describe(exc)}") from exc

    def _group(self, keys: Sequence[str]) -> dict[str, tuple[ClusterNode, dict[int, list[int]]]]:
        """node name -> (node, slot -> positions in ``keys``), leaving out uncovered slots and skipped nodes."""
        now = time.monotonic()
        slots_cache = self.client.nodes_manager.slots_cache
        groups: dict[str, tuple[ClusterNode, dict[int, list[int]]]] = {}
        for position, key in enumerate(keys):
            slot = self.client.keyslot(key)
            owners = slots_cache.get(slot)
            if not owners:
                continue  # a slot no master serves (its master died with no replica): a miss
            node = owners[0]
            if self._down.get(node.name, 0.0) > now:
                continue
            groups.setdefault(node.name, (node, {}))[1].setdefault(slot, []).append(position)
        return groups

    def _node_failed(self, node: ClusterNode, exc: BaseException) -> None:
        self.node_failures += 1
        if node.name not in self._down:
            logger.warning(
                "redis cluster node %s failed, its keys are misses (retried every %gs): %s",
                node.name,
                self.node_cooldown_s,
                _describe(exc),
            )
        self._down[node.name] = time.monotonic() + self.node_cooldown_s
        self._schedule_refresh()

    def _node_answered(self, node: ClusterNode) -> None:
        if self._down.pop(node.name, None) is not None:
            logger.info("redis cluster node %s answers again", node.name)

    def _schedule_refresh(self) -> None:
        """Re-read the slot map (CLUSTER SLOTS) in the background, at most once per cooldown."""
        now = time.monotonic()
        if (self._refresh is not None and not self._refresh.done()) or now - self._refreshed_at < self.node_cooldown_s:
            return
        self._refreshed_at = now
        self._refresh = asyncio.create_task(self._refresh_slots())

    async def _refresh_slots(self) -> None:
        try:
            async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                await self.client.nodes_manager.initialize()
        except _FAILURES as exc:
            logger.debug("redis cluster slot refresh failed: %r", exc)

    def _all_down(self) -> bool:
        now = time.monotonic()
        primaries = self.client.get_primaries()
        return bool(primaries) and all(self._down.get(node.name, 0.0) > now for node in primaries)

    async def _node_call(
        self, node: ClusterNode, commands: Sequence[Sequence[EncodableT]], deadline_s: float
    ) -> list[object] | BaseException:
        """One pipeline on one node: its replies (an error reply is its exception), or the failure.

        Straight on one of the node's connections (redis-py's ClusterPipeline re-resolves policies
        and nodes per command and would close the whole client on a connection error). An error
        reply such as MOVED leaves that command's keys missing and refreshes the slot map.
        """
        replies: list[object] = []
        try:
            async with asyncio.timeout(deadline_s):
                connection = node.acquire_connection()
                try:
                    await connection.send_packed_command(connection.pack_commands(commands))
                    for _ in commands:
                        try:
                            replies.append(await connection.read_response())
                        except ResponseError as exc:  # the reply was read: the connection is still in step
                            replies.append(exc)
                finally:
                    node.release(connection)  # redis-py disconnected it if a read or write failed
        except _FAILURES as exc:
            self._node_failed(node, exc)
            return exc
        self._node_answered(node)
        if any(isinstance(reply, _MOVED) for reply in replies):
            self._schedule_refresh()
        return replies

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        await self._ready(self.timeout_s)
        groups = self._group(keys)
        found: list[bytes | None] = [None] * len(keys)
        plans = [
            (node, list(slots.values()), [("MGET", *(keys[p] for p in positions)) for positions in slots.values()])
            for node, slots in groups.values()
        ]
        results = await asyncio.gather(
            *(self._node_call(node, commands, self.timeout_s) for node, _, commands in plans)
        )
        answered = 0
        for (_, position_lists, _), result in zip(plans, results, strict=True):
            if isinstance(result, BaseException):
                continue
            answered += 1
            for positions, reply in zip(position_lists, result, strict=True):
                if isinstance(reply, list):
                    for position, value in zip(positions, reply, strict=True):
                        found[position] = value if isinstance(value, bytes) else None
        if not answered and self._all_down():
            raise CacheUnavailableError("redis cluster: every master is failing")
        return found

    async def put(self, items: Sequence[tuple[str, bytes]], ttl_seconds: int, deadline_s: float) -> None:
        await self._ready(deadline_s)
        groups = self._group([key for key, _ in items])
        plans = [
            (node, [("SET", items[p][0], items[p][1], "EX", ttl_seconds) for ps in slots.values() for p in ps])
            for node, slots in groups.values()
        ]
        results = await asyncio.gather(*(self._node_call(node, commands, deadline_s) for node, commands in plans))
        written = refused = 0
        for result in results:
            if isinstance(result, BaseException):
                continue
            for reply in result:
                if isinstance(reply, ResponseError) and not isinstance(reply, _MOVED):
                    refused += 1
                elif not isinstance(reply, BaseException):
                    written += 1
        if written == 0 and refused:
            raise CacheRefusedError(f"redis cluster refused {refused} writes")
        if written == 0 and self._all_down():
            raise CacheUnavailableError("redis cluster: every master is failing")

    async def put_first(self, key: str, value: bytes, ttl_seconds: int, deadline_s: float) -> bytes | None:
        """``SET NX`` then ``GET`` of one key, in one pipeline on the master of its slot."""
        await self._ready(deadline_s)
        groups = self._group([key])
        if not groups:
            raise CacheUnavailableError("redis cluster: no master answers for the key's slot")
        ((node, _),) = groups.values()
        commands = [("SET", key, value, "NX", "EX", ttl_seconds), ("GET", key)]
        result = await self._node_call(node, commands, deadline_s)
        if isinstance(result, BaseException):
            raise _failure("write", result)
        return _kept(*result)

    async def ping(self) -> bool:
        try:
            await self._ready(self.timeout_s)
            async with asyncio.timeout(self.timeout_s):
                answers = await asyncio.gather(
                    *(self.client.ping(target_nodes=node) for node in self.client.get_primaries()),
                    return_exceptions=True,
                )
        except (*_FAILURES, CacheUnavailableError):
            return False
        return any(answer is True for answer in answers)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh
        await self.client.aclose()
