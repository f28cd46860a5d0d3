"""Issue 14 (9): a gateway pointed at a read-only replica. Reads keep hitting, the refused writes open
the write circuit once (logged once), instead of one warning per request forever."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.helpers import embed, fetch_stats
from tests.servers import RedisServer

pytestmark = pytest.mark.slow


def test_read_only_replica_hits_and_stops_writing(
    gateway_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    try:
        prefix = f"readonly-{time.monotonic_ns()}"
        writer = gateway_factory(redis_url=master.url, cache_prefix=prefix)
        cached = [f"replicated text {i}" for i in range(4)]
        embed(writer.url, cached)
        deadline = time.monotonic() + 10
        while replica.client().dbsize() < len(cached) and time.monotonic() < deadline:
            time.sleep(0.05)

        reader = gateway_factory(
            redis_url=replica.url, cache_prefix=prefix, cache_breaker_failures=3, cache_breaker_seconds=30
        )
        caplog.set_level(logging.DEBUG, logger="gateway.core.cache.breaker")
        for i in range(20):
            embed(reader.url, [*cached, f"new text {i}"])  # four hits, one miss whose write is refused
        service = reader.server.config.app.state.runtime.service
        deadline = time.monotonic() + 5
        while service.pending_writes and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = fetch_stats(reader.url)["cache"]
        assert stats["hits"] == 20 * len(cached), "reads from the replica keep hitting"
        assert stats["writes"] == 0
        assert stats["errors"] == 3, "three refused writes, then the write circuit skips the rest"
        assert stats["circuit"] == "open" and stats["circuit_opened"] == 1
        breaker_warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "gateway.core.cache.breaker" and r.levelno >= logging.WARNING
        ]
        assert len(breaker_warnings) == 2 and "read only replica" in breaker_warnings[0], breaker_warnings
    finally:
        replica.stop()
        master.stop()
