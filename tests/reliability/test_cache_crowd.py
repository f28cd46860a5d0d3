"""Issue 14 (2): a crowd of polite clients must not collapse the cache.

redis-py's default pool fails at once when its 100 connections are in use, and a gateway that
counts that as a Redis failure opens its breaker and turns hits into misses (and misses into
forward passes) exactly when it is busiest. Here 300 keep-alive clients send only cached texts.
"""

from __future__ import annotations

import json
import time

import pytest

from bench.loadgen import run_load
from tests.helpers import embed, fetch_stats
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

CLIENTS = 300
ROUNDS = 8  # requests per client: about 2,400 requests, a few seconds on two cores


def _drain(gateway) -> None:  # type: ignore[no-untyped-def]
    service = gateway.server.config.app.state.runtime.service
    deadline = time.monotonic() + 10
    while service.pending_writes and time.monotonic() < deadline:
        time.sleep(0.01)


def test_300_clients_of_cached_texts_all_hit(gateway_factory, fresh_redis: RedisServer) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=fresh_redis.url)
    texts = [f"crowd text number {i}" for i in range(64)]
    for start in range(0, len(texts), 32):
        embed(live.url, texts[start : start + 32])
    _drain(live)
    before = fetch_stats(live.url)["cache"]

    bodies = [
        json.dumps({"input": [texts[i % len(texts)]], "encoding_format": "base64"}).encode()
        for i in range(CLIENTS * ROUNDS)
    ]
    result = run_load(f"{live.url}/v1/embeddings", bodies, CLIENTS)

    after = fetch_stats(live.url)["cache"]
    lookups = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    numbers = (
        f"{result.statuses} in {result.seconds:.1f}s; hits {after['hits'] - before['hits']} of {lookups} lookups, "
        f"errors {after['errors'] - before['errors']}, breaker opened {after['circuit_opened']}"
    )
    print(numbers)
    assert result.statuses == {200: len(bodies)}, numbers
    assert after["errors"] == before["errors"], numbers
    assert after["circuit_opened"] == 0, numbers
    assert after["hits"] - before["hits"] == len(bodies), numbers
