"""``embedding-gateway cache stats | purge | warm``: look after the vector cache from a shell.

* ``stats``: keys and bytes per cache namespace and output kind. Every key is counted with SCAN
  (on every primary of a cluster); bytes come from ``MEMORY USAGE`` of a sample of each group's
  keys, scaled to the group.
* ``purge --fingerprint FP``: counts the namespace's keys; with ``--yes`` UNLINKs them in batches
  (a progress bar on stderr) and reports how many Redis really removed. For the vectors of a model
  that is no longer served. ``FP`` is a namespace as ``stats`` prints it, or the model fingerprint
  alone (every namespace of that model).
* ``warm FILE --url URL``: lives in ``gateway.cachectl_warm`` (it talks to a running gateway over
  HTTP, not to Redis); ``warm`` and ``WarmReport`` are re-exported here.

Keys look like ``{prefix}:{namespace}[:{kind}]:{hex digest of the text}``, where the namespace is
``{model fingerprint}-{numerics tag}`` (``/stats`` ``cache.namespace``; see ``gateway.core.cache.base``
and ``gateway.core.outputs``).

``stats`` and ``purge`` reach Redis as the server does, through the cache's own clients
(``gateway.core.cache.clients``) for ``EMBED_REDIS_MODE``: one node, the master the sentinels name,
or a cluster, where every primary is scanned and UNLINK is split by slot (a cluster refuses one
command over keys of several slots: CROSSSLOT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from gateway.cachectl_warm import WarmReport, add_warm_parser, run_warm, warm
from gateway.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    Client: TypeAlias = Redis | RedisCluster

__all__ = ["KeyGroup", "WarmReport", "add_parsers", "connect", "parse_key", "purge", "run", "scan_groups", "warm"]

# The text's digest: 32 hex digits (XXH3-128, as keys were first written) or 64 (BLAKE2b-256 then BLAKE2s-256). Both
# count, so entries written before a digest change are still seen, sized and purged until they expire.
_HASH = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{64})$")
_GLOB = re.compile(r"([*?\[\]\\])")
# An operator's command, not a request: a SCAN page or an UNLINK of a big batch may take seconds on a
# busy node, but a node that does not answer must end the command with a line, not hang it.
_TIMEOUT_S = 30.0
_CONNECTIONS = 4  # per node; the commands here make one call at a time


def _escape(text: str) -> str:
    return _GLOB.sub(r"\\\1", text)


@dataclass(slots=True)
class KeyGroup:
    fingerprint: str
    kind: str  # dense, sparse, colbert, ...
    keys: int = 0
    sampled: list[bytes | str] = field(default_factory=list)
    sampled_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Estimated: the sample's mean times the number of keys."""
        return round(self.bytes_per_entry * self.keys)

    @property
    def bytes_per_entry(self) -> float:
        """The sample's mean ``MEMORY USAGE`` (value, key and Redis' overhead): what EMBED_CACHE_DTYPE changes."""
        return self.sampled_bytes / len(self.sampled) if self.sampled else 0.0


def parse_key(key: str, prefix: str) -> tuple[str, str] | None:
    """(fingerprint, kind) of a cache key, or None for a key that is not a cached output."""
    if not key.startswith(prefix + ":"):
        return None
    parts = key[len(prefix) + 1 :].split(":")
    if len(parts) == 2 and _HASH.match(parts[1]):
        return parts[0], "dense"
    if len(parts) == 3 and _HASH.match(parts[2]):
        return parts[0], parts[1]
    return None


async def _scan(client: Client, match: str, count: int) -> AsyncIterator[bytes | str]:
    """Every key matching ``match``: SCAN on the node, or on each primary of a cluster in turn (a
    cluster node's SCAN sees only the slots it serves). Each page is bounded by :data:`_TIMEOUT_S`."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            cursor = -1
            while cursor != 0:
                async with asyncio.timeout(_TIMEOUT_S):
                    # A cluster's SCAN answers ({node name: cursor}, keys); redis-py types it as one node's.
                    reply: Any = await client.scan(cursor=max(cursor, 0), match=match, count=count, target_nodes=node)
                cursors, keys = reply
                cursor = int(cursors[node.name])
                for key in keys:
                    yield key
        return
    cursor = -1
    while cursor != 0:
        async with asyncio.timeout(_TIMEOUT_S):
            cursor, keys = await client.scan(cursor=max(cursor, 0), match=match, count=count)
        for key in keys:
            yield key


async def scan_groups(client: Client, prefix: str, *, sample: int = 200, count: int = 1000) -> list[KeyGroup]:
    """Count every cached output under ``prefix`` by (fingerprint, kind); size a sample of each group."""
    groups: dict[tuple[str, str], KeyGroup] = {}
    async for raw in _scan(client, f"{_escape(prefix)}:*", count):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        parsed = parse_key(key, prefix)
        if parsed is None:
            continue
        group = groups.get(parsed)
        if group is None:
            group = groups[parsed] = KeyGroup(*parsed)
        group.keys += 1
        if len(group.sampled) < sample:
            group.sampled.append(raw)
    for group in groups.values():
        # A cluster pipeline sends each MEMORY USAGE to its key's master (one round trip per node).
        pipe = client.pipeline(transaction=False)
        for sampled_key in group.sampled:
            pipe.memory_usage(sampled_key, samples=0)
        async with asyncio.timeout(_TIMEOUT_S):
            sizes = await pipe.execute()
        group.sampled_bytes = sum(int(size or 0) for size in sizes)
    return sorted(groups.values(), key=lambda g: (-g.keys, g.fingerprint, g.kind))


async def _matching(client: Client, prefix: str, fingerprint: str, count: int) -> AsyncIterator[bytes | str]:
    """Keys of the namespace ``fingerprint`` (``stats``' first column), or of every namespace of the
    model fingerprint ``fingerprint`` (its part before ``-``: all numerics and truncation variants)."""
    async for raw in _scan(client, f"{_escape(prefix)}:{_escape(fingerprint)}*", count):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        parsed = parse_key(key, prefix)
        if parsed is not None and (parsed[0] == fingerprint or parsed[0].startswith(fingerprint + "-")):
            yield raw


async def _unlink(client: Client, keys: list[bytes | str]) -> int:
    """How many of ``keys`` Redis removed. On a cluster redis-py sends one UNLINK per slot (pipelined
    per node) and sums the replies, so a batch over many slots is never CROSSSLOT."""
    async with asyncio.timeout(_TIMEOUT_S):
        return int(await client.unlink(*keys))


async def purge(
    client: Client, prefix: str, fingerprint: str, *, yes: bool, batch: int = 500, progress: bool = True
) -> tuple[int, int]:
    """(keys found, keys Redis unlinked) for ``fingerprint``; without ``yes`` nothing is deleted."""
    from tqdm import tqdm

    found = 0
    async for _ in _matching(client, prefix, fingerprint, max(batch, 100)):
        found += 1
    if not yes or not found:
        return found, 0
    removed = 0
    with tqdm(total=found, unit="keys", desc=f"unlink {fingerprint}", disable=not progress, file=sys.stderr) as bar:
        pending: list[bytes | str] = []
        async for key in _matching(client, prefix, fingerprint, max(batch, 100)):
            pending.append(key)
            if len(pending) >= batch:
                removed += await _unlink(client, pending)
                bar.update(len(pending))
                pending = []
        if pending:
            removed += await _unlink(client, pending)
            bar.update(len(pending))
    return found, removed


# --- CLI ---------------------------------------------------------------------------------------


STATS_DESCRIPTION = """\
Count the cached vectors in Redis, grouped by cache namespace (one per model and numeric format,
as /stats shows it) and by output kind (dense, sparse, colbert). Every key is counted; the bytes
are estimated from a sample of each group. Redis is reached with the same settings as serve:
EMBED_REDIS_URL (--redis-url), EMBED_REDIS_MODE and EMBED_CACHE_PREFIX."""

PURGE_DESCRIPTION = """\
Delete the cached vectors of one namespace, for example those of a model that is no longer served.
Without --yes it only counts them. --fingerprint takes a namespace as "cache stats" prints it, or
the model fingerprint alone (the part before the dash) to delete every namespace of that model.
Redis is reached with the same settings as serve."""


def add_parsers(commands: Any, settings_flags: Any) -> None:
    """``cache stats | purge | warm`` under ``embedding-gateway`` (``settings_flags``: serve's flags)."""
    cache = commands.add_parser(
        "cache",
        help="look after the vector cache: stats, purge, warm",
        description="Look after the vector cache: count it (stats), delete a model's vectors (purge), "
        "or fill it from a corpus through a running gateway (warm).",
    )
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="{stats,purge,warm}")
    raw = argparse.RawDescriptionHelpFormatter
    stats = actions.add_parser(
        "stats", help="count cached vectors and their bytes", description=STATS_DESCRIPTION, formatter_class=raw
    )
    stats.add_argument("--sample", type=int, default=200, help="keys per group whose size is measured (default: 200)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    settings_flags(stats)
    purge_ = actions.add_parser(
        "purge",
        help="delete one namespace's vectors (only counts them without --yes)",
        description=PURGE_DESCRIPTION,
        formatter_class=raw,
    )
    purge_.add_argument(
        "--fingerprint", required=True, help="the namespace to delete (as stats prints it), or a model fingerprint"
    )
    purge_.add_argument("--yes", action="store_true", help="really delete (without it: count only)")
    purge_.add_argument("--batch", type=int, default=500, help="keys deleted per Redis command (default: 500)")
    settings_flags(purge_)
    add_warm_parser(actions)


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Client]:
    """A client of the cache's Redis as ``settings`` name it (``EMBED_REDIS_MODE``), built by the
    cache's own ``gateway.core.cache.clients``: the node, the master the sentinels name now, or the
    cluster (its slot map loaded). Closed, with the sentinels' connections, on the way out."""
    from gateway.core.cache.clients import cluster_client, sentinel_client, single_client

    url = settings.redis_url.strip()
    if not url:
        raise SystemExit("embedding-gateway cache: set EMBED_REDIS_URL (or --redis-url): the cache is in Redis")
    if settings.redis_mode == "cluster":
        cluster = cluster_client(url, timeout_s=_TIMEOUT_S, max_connections=_CONNECTIONS)
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                await cluster.initialize()
            yield cluster
        finally:
            await cluster.aclose()
        return
    sentinel = None
    if settings.redis_mode == "sentinel":
        sentinel, client = sentinel_client(
            url, settings.redis_sentinel_master.strip(), timeout_s=_TIMEOUT_S, max_connections=_CONNECTIONS
        )
    else:
        client = single_client(url, timeout_s=_TIMEOUT_S, max_connections=_CONNECTIONS)
    try:
        if settings.redis_mode == "single":
            await _refuse_a_cluster_node(client)
        yield client
    finally:
        await client.aclose()
        for node in sentinel.sentinels if sentinel is not None else ():
            await node.aclose()


async def _refuse_a_cluster_node(client: Redis) -> None:
    """A cluster node reached as one node would count only its own slots and refuse a purge batch
    (CROSSSLOT): say which setting is missing instead of a wrong count."""
    from redis.exceptions import ResponseError

    try:
        async with asyncio.timeout(_TIMEOUT_S):
            info = await client.info("cluster")
    except ResponseError:  # a hosted Redis may refuse INFO: such a one is not a cluster node we can tell
        return
    if int(info.get("cluster_enabled", 0)):
        raise _CacheCommandError(
            "EMBED_REDIS_URL names a cluster node: set EMBED_REDIS_MODE=cluster (--redis-mode cluster) "
            "so every master is counted"
        )


class _CacheCommandError(Exception):
    """A cache command that cannot go on: one line on stderr, exit 1."""


def _settings(args: argparse.Namespace, redis_url: str, prefix: str | None) -> Settings:
    """The settings ``stats`` and ``purge`` run with: the command's flags over ``EMBED_*`` (as ``serve``
    reads them, so ``EMBED_REDIS_MODE`` and the sentinel master count), ``redis_url`` and ``prefix``
    over both when given."""
    overrides = {name: getattr(args, name, None) for name in Settings.field_names()}
    if redis_url:
        overrides["redis_url"] = redis_url
    if prefix is not None:
        overrides["cache_prefix"] = prefix
    return Settings.load(overrides=overrides)


def run(
    args: argparse.Namespace, redis_url: str = "", prefix: str | None = None, *, settings: Settings | None = None
) -> int:
    """One ``cache`` command. ``stats`` and ``purge`` reach Redis as ``settings`` say (default: loaded
    from ``args`` and the environment, with ``redis_url`` and ``prefix`` over them)."""
    if args.cache_command == "warm":
        return run_warm(args)
    settings = settings or _settings(args, redis_url, prefix)
    from redis.asyncio.sentinel import MasterNotFoundError
    from redis.exceptions import RedisClusterException, RedisError

    try:
        return asyncio.run(_redis_command(args, settings))
    except _CacheCommandError as exc:
        print(f"embedding-gateway cache: {exc}", file=sys.stderr)
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:  # cluster errors are apart
        # redis-py's messages name the host and port, never the password of the URL.
        detail = str(exc) or f"no answer within {_TIMEOUT_S:.0f} s"  # asyncio's timeout has no message
        if isinstance(exc, MasterNotFoundError):  # its message holds the repr of every sentinel's client
            reasons = [part.rpartition(" - ")[2] for part in detail.split(", <redis") if " - " in part]
            detail = f"no sentinel names a master {settings.redis_sentinel_master.strip()!r}"
            detail += f" ({'; '.join(reasons)})" if reasons else ""
        print(f"embedding-gateway cache: {settings.redis_mode} Redis: {type(exc).__name__}: {detail}", file=sys.stderr)
    return 1


async def _redis_command(args: argparse.Namespace, settings: Settings) -> int:
    prefix = settings.cache_prefix
    async with connect(settings) as client:
        if args.cache_command == "stats":
            groups = await scan_groups(client, prefix, sample=args.sample)
        else:
            found, removed = await purge(client, prefix, args.fingerprint, yes=args.yes, batch=args.batch)
    if args.cache_command == "stats":
        _print_stats(groups, prefix, as_json=args.json)
        return 0
    if args.yes:
        print(f"unlinked {removed} of {found} keys of fingerprint {args.fingerprint} (prefix {prefix!r})")
    else:
        print(f"{found} keys of fingerprint {args.fingerprint} (prefix {prefix!r}); pass --yes to delete them")
    return 0


def _print_stats(groups: list[KeyGroup], prefix: str, *, as_json: bool) -> None:
    rows = [
        {
            "fingerprint": g.fingerprint,
            "kind": g.kind,
            "keys": g.keys,
            "bytes": g.bytes,
            "bytes_per_entry": round(g.bytes_per_entry),
            "sampled": len(g.sampled),
        }
        for g in groups
    ]
    if as_json:
        print(json.dumps({"prefix": prefix, "groups": rows}))
        return
    width = max([len("namespace"), *(len(str(row["fingerprint"])) for row in rows)])
    print(f"{'namespace':<{width}} {'kind':<8} {'keys':>12} {'bytes (est.)':>14} {'bytes/entry':>12} {'sampled':>8}")
    for row in rows:
        print(
            f"{row['fingerprint']:<{width}} {row['kind']:<8} {row['keys']:>12,} {row['bytes']:>14,} "
            f"{row['bytes_per_entry']:>12,} {row['sampled']:>8}"
        )
    print(f"{'total':<{width + 9}} {sum(g.keys for g in groups):>12,} {sum(g.bytes for g in groups):>14,}")
