"""Issue 26: key limits are shared through the same Redis as the cache in every mode: a real 3-master
Redis Cluster (with a password), and a master and replica behind Sentinel (a dead sentinel listed
first). Two replicas see one bucket; a server with Sentinel and a limited key starts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.keys import ApiKey
from gateway.core.ratelimit import RateLimiter
from support.processes import RedisCluster, RedisSentinelSetup, free_port

pytestmark = pytest.mark.slow

LIMIT = 20
KEYS = f"""
[[keys]]
name = "tenant"
key = "sk-tenant"
requests_per_minute = {LIMIT}
tokens_per_minute = 100000
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("limits-cluster"), password="cluster-secret")
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[RedisSentinelSetup]:
    setup = RedisSentinelSetup(tmp_path, master_name="limits", password="sentinel-secret")
    setup.start()
    yield setup
    setup.stop()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def _alternate(urls: list[str], count: int) -> list[int]:
    """``count`` requests of the limited key, taking turns between the replicas."""
    statuses: list[int] = []
    with httpx.Client(timeout=30, headers={"authorization": "Bearer sk-tenant"}) as http:
        for index in range(count):
            answer = http.post(f"{urls[index % len(urls)]}/v1/embeddings", json={"input": "one shared limit"})
            statuses.append(answer.status_code)
    return statuses


def _assert_one_limit(statuses: list[int], elapsed: float) -> None:
    assert set(statuses) == {200, 429}, statuses
    admitted = statuses.count(200)
    # Exactly the limit (what refilled meanwhile aside), whichever replica took each request.
    assert LIMIT <= admitted <= LIMIT + elapsed * LIMIT / 60 + 1, statuses


def test_two_replicas_share_one_limit_in_cluster_mode(gateway_factory, cluster: RedisCluster, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {"redis_url": cluster.url, "redis_mode": "cluster", "cache_prefix": "limits-cluster"}
    replicas = [gateway_factory(api_keys_file=str(keys_file), **settings) for _ in range(2)]
    started = time.monotonic()
    statuses = _alternate([live.url for live in replicas], 4 * LIMIT)
    _assert_one_limit(statuses, time.monotonic() - started)
    client = cluster.client()
    try:
        buckets = sorted(
            name.decode() for name in client.scan_iter(match="limits-cluster:ratelimit:*", target_nodes="all")
        )
        assert buckets == [
            "limits-cluster:ratelimit:{tenant}:requests",
            "limits-cluster:ratelimit:{tenant}:tokens",
        ]
        assert len({client.keyslot(name) for name in buckets}) == 1, "both buckets share one slot"
        # Off the node the URL names: a client of that one node alone would be sent elsewhere (MOVED).
        assert cluster.node_of(buckets[0]).port != cluster.nodes[0].port
    finally:
        client.close()


def test_a_sentinel_server_with_a_limited_key_starts_and_replicas_share_one_limit(  # type: ignore[no-untyped-def]
    gateway_factory, sentinel_setup: RedisSentinelSetup, keys_file: Path
) -> None:
    settings: dict[str, Any] = {
        "redis_url": sentinel_setup.url(free_port()),  # a sentinel that is down, then the live one
        "redis_mode": "sentinel",
        "redis_sentinel_master": "limits",
        "cache_prefix": "limits-sentinel",
    }
    replicas = [gateway_factory(api_keys_file=str(keys_file), **settings) for _ in range(2)]
    started = time.monotonic()
    statuses = _alternate([live.url for live in replicas], 4 * LIMIT)
    _assert_one_limit(statuses, time.monotonic() - started)
    master = sentinel_setup._client(sentinel_setup.master)
    assert float(master.hget("limits-sentinel:ratelimit:{tenant}:requests", "level")) < 1.5


@pytest.fixture
async def cluster_limiters(cluster: RedisCluster) -> AsyncIterator[list[RateLimiter]]:
    # settle_s: the background round never runs here; the test settles by hand.
    made = [RateLimiter(redis_url=cluster.url, mode="cluster", prefix="settle-cluster", settle_s=60) for _ in range(2)]
    for limiter in made:
        await limiter.connect()
    yield made
    for limiter in made:
        await limiter.close()


@pytest.mark.anyio
async def test_usage_admitted_locally_settles_into_every_slot_of_a_cluster(
    cluster: RedisCluster, cluster_limiters: list[RateLimiter]
) -> None:
    """Far from their limits many keys are admitted locally and settled in one pipeline per round:
    in a cluster that pipeline spans every master (and loads the script where it is missing)."""
    keys = [ApiKey(key=f"k{index}", name=f"tenant-{index}", requests_per_minute=6000) for index in range(24)]
    started = time.monotonic()
    for limiter in cluster_limiters:
        for key in keys:
            for _ in range(6):  # the first asks Redis, the others are admitted locally
                assert (await limiter.admit(key)).admitted
    client = cluster.client()
    try:
        for node in cluster.nodes:  # as after a restart or a failover: masters without the script
            cluster.node_client(node).script_flush()
        for limiter in cluster_limiters:
            await limiter.settle()
            assert limiter._redis_up(), "a settling round must not fall back to this process"
        names = [f"settle-cluster:ratelimit:{{{key.name}}}:requests" for key in keys]
        assert len({cluster.node_of(name).port for name in names}) == 3, "the keys must cover every master"
        levels = [float(client.hget(name, "level")) for name in names]
    finally:
        client.close()
    refill = (time.monotonic() - started) * 100  # 6000 per minute
    assert all(6000 - 12 <= level <= 6000 - 12 + refill for level in levels), levels
