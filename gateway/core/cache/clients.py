"""redis-py's own clients for the three ways to run Redis: one node, Sentinel, Cluster.

* ``single``: ``redis://[user:password@]host:port/db`` (also ``rediss://`` for TLS, ``unix://``), a
  pool of ``max_connections``; :class:`~gateway.core.cache.redis.RedisBlobCache` holds one of as many
  slots per call (and waits for a free one instead of failing), so the pool never runs out and needs
  no waiting of its own (redis-py's ``BlockingConnectionPool`` cost the hit path ~10 us a call).
* ``sentinel``: ``redis://[user:password@]host1:26379,host2:26379/db`` lists the sentinels; the
  credentials and TLS are for the master (and the sentinels get TLS too), the master's name is
  ``EMBED_REDIS_SENTINEL_MASTER``. redis-py asks the sentinels for the master on every new connection
  and drops connections to a master that was demoted.
* ``cluster``: ``redis://[user:password@]any-node:port`` (db 0); redis-py discovers the others.

Every client bounds its sockets by ``timeout_s`` and retries at most once, at once: a dead Redis
costs a request milliseconds, not a hang. Query-string options of redis-py's own URL syntax
(``?ssl_cert_reqs=none&ssl_ca_certs=/path``) pass through in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

__all__ = ["SentinelTarget", "cluster_client", "parse_sentinel_url", "sentinel_client", "single_client"]

SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """The sentinels of ``redis://[user:password@]host1:26379,host2:26379/db`` and the master's options."""

    sentinels: tuple[tuple[str, int], ...]
    options: dict[str, Any]  # db, username, password, ssl and redis-py's query-string options
    ssl: bool


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split a URL with several ``host:port`` (comma-separated) into the sentinels and the options."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ValueError("a sentinel URL is redis://[user:password@]host1:26379,host2:26379/db (or rediss://)")
    netloc, slash, tail = rest.partition("/")
    if "?" in netloc:  # no path: redis://host:26379?ssl_cert_reqs=none
        netloc, _, query = netloc.partition("?")
        tail = f"?{query}"
    credentials, at, hosts = netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for piece in hosts.split(","):
        if not piece.strip():
            continue
        parts = urlsplit(f"//{piece.strip()}")
        if not parts.hostname:
            raise ValueError(f"sentinel URL: {piece!r} is not host:port")
        sentinels.append((parts.hostname, parts.port or SENTINEL_PORT))
    if not sentinels:
        raise ValueError("sentinel URL: no sentinel host:port listed")
    first = f"{scheme}://{credentials}{at}{sentinels[0][0]}:{sentinels[0][1]}{slash}{tail}"
    options: dict[str, Any] = dict(parse_url(first))
    options.pop("host", None)
    options.pop("port", None)
    ssl = options.pop("connection_class", None) is SSLConnection
    return SentinelTarget(tuple(sentinels), options, ssl)


def _socket_options(timeout_s: float) -> dict[str, Any]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def single_client(url: str, *, timeout_s: float, max_connections: int) -> Redis:
    """One Redis node; callers take at most ``max_connections`` connections at once (the cache's slots)."""
    pool = ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        **_socket_options(timeout_s),
    )
    return Redis.from_pool(pool)


def sentinel_client(url: str, master: str, *, timeout_s: float, max_connections: int) -> tuple[Sentinel, Redis]:
    """The sentinels, and a client of the master they name (it follows failovers)."""
    target = parse_sentinel_url(url)
    # No retries against a sentinel (redis-py's default backs off for seconds): the next one is asked.
    sentinel_options: dict[str, Any] = {**_socket_options(timeout_s), "retry": Retry(NoBackoff(), 0)}
    if target.ssl:
        ssl_options = {key: value for key, value in target.options.items() if key.startswith("ssl_")}
        sentinel_options.update(ssl=True, **ssl_options)
    make_sentinel: Callable[..., Sentinel] = Sentinel  # redis-py leaves Sentinel.__init__ unannotated
    sentinel = make_sentinel(
        list(target.sentinels),
        sentinel_kwargs=sentinel_options,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        **_socket_options(timeout_s),
        **target.options,
    )
    client = sentinel.master_for(master, max_connections=max_connections, ssl=target.ssl)
    return sentinel, client


def cluster_client(url: str, *, timeout_s: float, max_connections: int) -> RedisCluster:
    """A cluster found from any one node. ``max_connections`` is per node. No cluster-level retries:
    redis-py's would close every connection of every node and sleep, under a request's deadline."""
    return RedisCluster.from_url(
        url,
        max_connections=max_connections,
        require_full_coverage=False,  # a lost master costs its own slots, not the whole cache
        retry=Retry(NoBackoff(), 0),
        # Reads are bounded by the caller's deadline per node; a socket timeout would arm a timer
        # for every reply of a pipeline (one per slot), which costs more than the replies.
        socket_timeout=None,
        socket_connect_timeout=timeout_s,
    )
