"""The circuit breaker's two circuits, the pool's wait, the Redis mode settings and sentinel URLs.

A scripted inner cache stands in for Redis here only to drive the breaker's state machine; Redis
itself is exercised by the integration and reliability tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import pytest

from gateway import Settings
from gateway.core.cache import (
    CacheBusyError,
    CacheRefusedError,
    CacheSkippedError,
    CacheUnavailableError,
    CircuitBreakerCache,
    RedisBlobCache,
)
from gateway.core.cache.clients import parse_sentinel_url
from gateway.settings import SettingsError


class Scripted:
    """Each call pops the next outcome: ``None`` (success) or an exception to raise."""

    backend = "scripted"

    def __init__(self) -> None:
        self.reads: list[BaseException | None] = []
        self.writes: list[BaseException | None] = []
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def _next(self, outcomes: list[BaseException | None]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        await self._next(self.reads)
        return [None] * len(keys)

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        await self._next(self.writes)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_busy_pool_never_opens_the_breaker() -> None:
    inner = Scripted()
    inner.reads = [CacheBusyError("busy")] * 10
    breaker = CircuitBreakerCache(inner, failures=2, cooldown_s=60)
    for _ in range(10):
        with pytest.raises(CacheBusyError):
            await breaker.get_blobs(["k"])
    assert breaker.state == "closed" and breaker.opened == 0 and inner.calls == 10


@pytest.mark.anyio
async def test_refused_writes_open_the_write_circuit_only(caplog: pytest.LogCaptureFixture) -> None:
    """A read-only replica: reads keep working (and keep going to Redis), writes are skipped after
    ``failures`` refusals, and the breaker logs two warnings, not one per request."""
    inner = Scripted()
    inner.writes = [CacheRefusedError("READONLY")] * 100
    breaker = CircuitBreakerCache(inner, failures=3, cooldown_s=60)
    caplog.set_level(logging.DEBUG, logger="gateway.core.cache.breaker")
    refused = skipped = 0
    logged: list[bool] = []
    for _ in range(50):
        assert await breaker.get_blobs(["k"]) == [None]  # a successful read between every write
        try:
            await breaker.put_blobs([("k", b"v")])
        except CacheSkippedError:
            skipped += 1
        except CacheRefusedError as exc:
            logged.append(exc.logged)
            refused += 1
    assert (refused, skipped) == (3, 47)
    assert logged == [True] * 3, "the breaker logged them: callers need not warn again"
    assert breaker.state == "open" and breaker.opened == 1
    assert breaker.circuit.state == "closed", "reads still go to Redis"
    warnings = [r for r in caplog.records if r.name == "gateway.core.cache.breaker" and r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # the first refusal, the opening


@pytest.mark.anyio
async def test_failures_open_then_one_probe_at_a_time_closes() -> None:
    inner = Scripted()
    inner.reads = [CacheUnavailableError("down")] * 2
    breaker = CircuitBreakerCache(inner, failures=2, cooldown_s=0.05)
    for _ in range(2):
        with pytest.raises(CacheUnavailableError):
            await breaker.get_blobs(["k"])
    assert breaker.state == "open" and breaker.opened == 1
    with pytest.raises(CacheSkippedError):
        await breaker.get_blobs(["k"])
    await asyncio.sleep(0.06)
    assert breaker.state == "half-open"
    inner.gate = asyncio.Event()
    probe = asyncio.create_task(breaker.get_blobs(["k"]))
    await asyncio.sleep(0)
    with pytest.raises(CacheSkippedError):  # while the probe is out, the others are skipped
        await breaker.get_blobs(["k"])
    inner.gate.set()
    assert await probe == [None]
    assert breaker.state == "closed" and breaker.opened == 1


@pytest.mark.anyio
async def test_calls_failing_together_count_once_and_sequential_failures_still_open() -> None:
    """A pause of the process times out every call in flight at once: that is one failure, not 64
    (a crowd on a healthy Redis must not open the breaker). A dead Redis still opens it: each new
    call starts after the last counted failure."""
    inner = Scripted()
    inner.reads = [CacheUnavailableError("timed out in a stall")] * 64
    inner.gate = asyncio.Event()
    breaker = CircuitBreakerCache(inner, failures=3, cooldown_s=60)
    crowd = [asyncio.create_task(breaker.get_blobs(["k"])) for _ in range(64)]
    await asyncio.sleep(0)
    inner.gate.set()
    results = await asyncio.gather(*crowd, return_exceptions=True)
    assert all(isinstance(r, CacheUnavailableError) for r in results)
    assert breaker.state == "closed" and breaker.opened == 0 and breaker.circuit.consecutive == 1
    assert await breaker.get_blobs(["k"]) == [None], "the next call goes to Redis, and succeeds"
    inner.reads = [CacheUnavailableError("down")] * 3
    for _ in range(3):
        with pytest.raises(CacheUnavailableError):
            await breaker.get_blobs(["k"])
    assert breaker.state == "open" and breaker.opened == 1


@pytest.mark.anyio
async def test_pool_wait_runs_out_as_busy_not_as_a_redis_failure() -> None:
    cache = RedisBlobCache(
        "redis://127.0.0.1:9/0", ttl_seconds=60, timeout_s=0.1, max_connections=1, pool_timeout_s=0.05
    )
    try:
        async with cache._slot():  # the only connection is taken
            started = time.monotonic()
            with pytest.raises(CacheBusyError):
                await cache.get_blobs(["k"])
            assert time.monotonic() - started < 0.5
    finally:
        await cache.close()


@pytest.mark.anyio
async def test_a_crowd_shares_max_connections_without_errors(fresh_redis) -> None:  # type: ignore[no-untyped-def]
    # The slots bound the connections: redis-py's pool (no waiting of its own) never runs out.
    cache = RedisBlobCache(fresh_redis.url, ttl_seconds=60, timeout_s=1.0, max_connections=2, pool_timeout_s=5.0)
    try:
        await cache.put_blobs([("k", b"v")])
        found = await asyncio.gather(*(cache.get_blobs(["k", "missing"]) for _ in range(50)))
        assert found == [[b"v", None]] * 50
        clients = fresh_redis.client().client_list()
        assert len(clients) <= 3  # the cache's two and the one asking
    finally:
        await cache.close()


def test_sentinel_urls() -> None:
    target = parse_sentinel_url("rediss://app:p%40ss@s1:26380,s2,[::1]:26381/2?ssl_cert_reqs=none")
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert target.ssl is True
    assert target.options["username"] == "app" and target.options["password"] == "p@ss"
    assert target.options["db"] == 2 and target.options["ssl_cert_reqs"] == "none"
    plain = parse_sentinel_url("redis://127.0.0.1:26379")
    assert plain.sentinels == (("127.0.0.1", 26379),) and plain.ssl is False and "password" not in plain.options
    with pytest.raises(ValueError):
        parse_sentinel_url("http://s1:26379")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMBED_REDIS_MODE": "sentinel", "EMBED_REDIS_URL": "redis://s1:26379"}, "EMBED_REDIS_SENTINEL_MASTER"),
        ({"EMBED_REDIS_SENTINEL_MASTER": "m", "EMBED_REDIS_URL": "redis://r:6379"}, "not sentinel"),
        ({"EMBED_REDIS_MODE": "cluster"}, "set EMBED_REDIS_URL"),
        ({"EMBED_REDIS_MODE": "cluster", "EMBED_REDIS_URL": "redis://n1:7000/3"}, "database 0"),
        ({"EMBED_REDIS_MODE": "cluster", "EMBED_REDIS_URL": "unix:///tmp/r.sock"}, "unix://"),
        ({"EMBED_REDIS_URL": "redis://s1:26379,s2:26379/0"}, "sentinel"),
        ({"EMBED_REDIS_MODE": "ring"}, "single, cluster or sentinel"),
    ],
)
def test_bad_redis_mode_combinations_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.load(env)


def test_redis_mode_settings_load() -> None:
    settings = Settings.load(
        {
            "EMBED_REDIS_MODE": "Sentinel",
            "EMBED_REDIS_URL": "rediss://:pw@s1:26379,s2:26379/0",
            "EMBED_REDIS_SENTINEL_MASTER": "vectors",
            "EMBED_REDIS_MAX_CONNECTIONS": "200",
            "EMBED_REDIS_POOL_TIMEOUT_MS": "500",
        }
    )
    assert (settings.redis_mode, settings.redis_sentinel_master) == ("sentinel", "vectors")
    assert (settings.redis_max_connections, settings.redis_pool_timeout_ms) == (200, 500)
    assert (
        Settings.load({"EMBED_REDIS_MODE": "cluster", "EMBED_REDIS_URL": "redis://u:p@n1:7000"}).redis_mode == "cluster"
    )
