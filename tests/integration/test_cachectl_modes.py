"""``cache stats`` and ``cache purge`` in every ``EMBED_REDIS_MODE`` (issue 26, item 16).

Before, both built a one-node client from the URL whatever the mode: on a 3-master cluster ``stats``
counted the keys of the node named in the URL, ``purge --yes`` failed with CROSSSLOT, and with
``--batch 1`` it said "unlinked 9 of 9" while the other masters kept theirs; a sentinel URL was a
traceback (the client talked to the sentinel as if it were the master).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from support.processes import RedisCluster, RedisSentinelSetup, free_port

PREFIX = "ctlm"
OLD = "0123456789abcdef-aaaa1111"  # a namespace no server serves any more
KEEP = "fedcba9876543210-bbbb2222"


def _fill(client: Any, *, old: int = 30, keep: int = 10) -> list[str]:
    """``old`` dense and 5 sparse keys of OLD (64-hex digests, as BLAKE2b-256 writes them, and 32-hex
    ones, as XXH3-128 did), ``keep`` keys of KEEP, and keys that are not cache entries."""
    keys = [f"{PREFIX}:{OLD}:{i:064x}" for i in range(old // 2)]
    keys += [f"{PREFIX}:{OLD}:{i:032x}" for i in range(old - old // 2)]
    keys += [f"{PREFIX}:{OLD}:sparse:{i:064x}" for i in range(5)]
    for key in keys:
        client.set(key, b"x" * 100)
    for i in range(keep):
        client.set(f"{PREFIX}:{KEEP}:{i:064x}", b"k" * 100)
    client.set("other-app:key", b"z")
    client.hset(f"{PREFIX}:ratelimit:{{ingest}}:requests", mapping={"level": 1, "at": 0})
    return keys


def _count(client: Any, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def _stats(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[tuple[str, str], dict[str, int]]:
    assert main(["cache", "stats", *argv, "--cache-prefix", PREFIX, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    return {(row["fingerprint"], row["kind"]): row for row in body["groups"]}


def _purge(argv: list[str], capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code = main(["cache", "purge", *argv, "--cache-prefix", PREFIX, "--fingerprint", OLD, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "Traceback" not in captured.err
    return captured.out


# --- cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("cachectl-cluster"), password="ctl-secret")
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def cluster_client(cluster: RedisCluster) -> Iterator[Any]:
    client = cluster.client()
    for key in list(client.scan_iter(match="*", count=1000)):  # every primary: a clean slate per test
        client.delete(key)
    yield client
    client.close()


def test_cluster_keys_spread_over_every_master(cluster: RedisCluster, cluster_client: Any) -> None:
    """The premise of the cluster tests: else a one-node scan would count everything."""
    keys = _fill(cluster_client)
    assert len({cluster.node_of(key).port for key in keys}) == 3


@pytest.mark.parametrize("how", ["flags", "environment"])
def test_cluster_stats_count_every_master(
    cluster: RedisCluster, cluster_client: Any, capsys: pytest.CaptureFixture[str], monkeypatch, how: str
) -> None:  # type: ignore[no-untyped-def]
    _fill(cluster_client)
    if how == "flags":
        argv = ["--redis-url", cluster.url, "--redis-mode", "cluster"]
    else:
        monkeypatch.setenv("EMBED_REDIS_URL", cluster.url)
        monkeypatch.setenv("EMBED_REDIS_MODE", "cluster")
        argv = []
    groups = _stats(argv, capsys)
    assert groups[(OLD, "dense")]["keys"] == 30
    assert groups[(OLD, "sparse")]["keys"] == 5
    assert groups[(KEEP, "dense")]["keys"] == 10
    assert len(groups) == 3
    assert 30 * 100 <= groups[(OLD, "dense")]["bytes"] <= 30 * 400, "sizes sampled on the keys' own masters"


@pytest.mark.parametrize("batch", ["1", "7", "500"])
def test_cluster_purge_unlinks_on_every_master(
    cluster: RedisCluster, cluster_client: Any, capsys: pytest.CaptureFixture[str], batch: str
) -> None:
    _fill(cluster_client)
    argv = ["--redis-url", cluster.url, "--redis-mode", "cluster"]
    assert "35 keys of fingerprint" in _purge(argv, capsys)
    assert _count(cluster_client, f"{PREFIX}:{OLD}:*") == 35, "without --yes nothing is deleted"

    out = _purge(argv, capsys, "--yes", "--batch", batch)
    assert "unlinked 35 of 35" in out, out
    assert _count(cluster_client, f"{PREFIX}:{OLD}:*") == 0, "no master keeps any"
    assert _count(cluster_client, f"{PREFIX}:{KEEP}:*") == 10, "another namespace stays"
    assert cluster_client.get("other-app:key") == b"z"
    assert cluster_client.exists(f"{PREFIX}:ratelimit:{{ingest}}:requests")
    assert "0 keys of fingerprint" in _purge(argv, capsys)


def test_cluster_purge_by_the_model_fingerprint(
    cluster: RedisCluster, cluster_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(cluster_client)
    cluster_client.set(f"{PREFIX}:0123456789abcdef-cccc3333:{7:064x}", b"v")
    argv = ["--redis-url", cluster.url, "--redis-mode", "cluster", "--cache-prefix", PREFIX]
    code = main(["cache", "purge", *argv, "--fingerprint", "0123456789abcdef", "--yes"])
    assert code == 0
    assert "unlinked 36 of 36" in capsys.readouterr().out
    assert _count(cluster_client, f"{PREFIX}:0123456789abcdef*") == 0


def test_a_cluster_node_reached_as_one_node_is_refused(
    cluster: RedisCluster, cluster_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """EMBED_REDIS_MODE left at single on a cluster would count one master's keys: a line, not a number."""
    _fill(cluster_client)
    for command in (["stats"], ["purge", "--fingerprint", OLD, "--yes"]):
        code = main(["cache", *command, "--redis-url", cluster.url, "--cache-prefix", PREFIX])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 1 and captured.out == "", captured.out
        assert len(lines) == 1 and "EMBED_REDIS_MODE=cluster" in lines[0], lines
        assert "ctl-secret" not in captured.err
    assert _count(cluster_client, f"{PREFIX}:{OLD}:*") == 35


# --- sentinel ------------------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[RedisSentinelSetup]:
    setup = RedisSentinelSetup(tmp_path, master_name="vectors", password="ctl-sentinel")
    setup.start()
    yield setup
    setup.stop()


def test_sentinel_stats_and_purge_talk_to_the_master(
    sentinel_setup: RedisSentinelSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    master = sentinel_setup._client(sentinel_setup.master)
    _fill(master)
    url = sentinel_setup.url(free_port())  # a dead sentinel first, then the live one
    argv = ["--redis-url", url, "--redis-mode", "sentinel", "--redis-sentinel-master", "vectors"]
    groups = _stats(argv, capsys)
    assert groups[(OLD, "dense")]["keys"] == 30 and groups[(KEEP, "dense")]["keys"] == 10
    assert "unlinked 35 of 35" in _purge(argv, capsys, "--yes", "--batch", "4")
    assert _count(master, f"{PREFIX}:{OLD}:*") == 0
    assert _count(master, f"{PREFIX}:{KEEP}:*") == 10


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
        ["--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--redis-mode", "cluster"],
        ["--redis-url", f"redis://127.0.0.1:{free_port()}", "--redis-mode", "sentinel", "--redis-sentinel-master", "m"],
    ],
)
def test_an_unreachable_redis_is_one_line_and_exit_1(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cache", "stats", *argv, "--cache-prefix", PREFIX])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith("embedding-gateway cache:"), lines[0]
