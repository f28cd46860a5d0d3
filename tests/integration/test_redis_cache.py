"""The vector cache against a real redis-server started by the suite."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder, load_encoder
from gateway import Settings, create_app
from gateway.core.cache.formats import pack_dense
from support.collisions import xxh3_128_collision
from tests.helpers import embed, fetch_stats, vectors
from tests.servers import RedisServer, ThreadedGateway

TEXTS = ["first text", "second text", "third text, a little longer", "fourth: 四番目"]


def _drain(gateway: ThreadedGateway) -> None:
    """Wait for the background write-back of the last request (it runs after the response)."""
    service = gateway.server.config.app.state.runtime.service  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while service.pending_writes and time.monotonic() < deadline:
        time.sleep(0.01)


def test_repeat_is_served_from_redis_with_a_ttl(
    gateway_factory, redis_server: RedisServer, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=redis_server.url, cache_ttl_seconds=3600)
    first = embed(live.url, TEXTS)
    _drain(live)
    before = fetch_stats(live.url)
    assert before["cache"]["misses"] == 4
    assert before["cache"]["writes"] == 4
    second = embed(live.url, TEXTS)
    after = fetch_stats(live.url)
    assert after["cache"]["hits"] - before["cache"]["hits"] == len(TEXTS)
    assert after["encoder"]["batches"] == before["encoder"]["batches"], "a full hit must not run the model"
    np.testing.assert_array_equal(vectors(first), vectors(second))
    np.testing.assert_allclose(vectors(second), minilm_encoder.embed(TEXTS), atol=1e-6)
    assert second.json()["usage"] == first.json()["usage"], "hits report the stored token counts"

    client = redis_server.client()
    runtime = live.server.config.app.state.runtime  # type: ignore[attr-defined]
    keys = [runtime.service.key(text) for text in TEXTS]
    assert all(key.startswith(f"{runtime.settings.cache_prefix}:{minilm_encoder.fingerprint}-") for key in keys)
    assert all(key.startswith(f"{runtime.settings.cache_prefix}:{runtime.service.namespace}:") for key in keys)
    ttls = [client.ttl(key) for key in keys]
    assert all(3500 < ttl <= 3600 for ttl in ttls), ttls
    for key in client.scan_iter(f"{runtime.settings.cache_prefix}:*"):
        value = client.get(key)
        assert all(text.encode() not in value for text in TEXTS), "input text must never be stored"


def test_another_fingerprint_never_reads_these_keys(
    gateway_factory, redis_server: RedisServer, minilm_dir: Path, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    shared_prefix = "shared-prefix"
    live = gateway_factory(redis_url=redis_server.url, cache_prefix=shared_prefix)
    embed(live.url, TEXTS)
    _drain(live)
    other = load_encoder(str(minilm_dir), max_tokens=128, truncate=True)
    assert other.fingerprint != minilm_encoder.fingerprint
    settings = Settings(
        model=str(minilm_dir), model_name="all-MiniLM-L6-v2", redis_url=redis_server.url, cache_prefix=shared_prefix
    )
    with ThreadedGateway(create_app(settings, encoder=other)) as second:
        embed(second.url, TEXTS)
        stats = fetch_stats(second.url)
    assert stats["cache"]["hits"] == 0
    assert stats["cache"]["misses"] == len(TEXTS)


@pytest.mark.parametrize("corruption", ["short", "garbage", "other-dimension", "flipped-bit"])
def test_corrupt_values_are_misses_and_get_overwritten(
    gateway_factory, redis_server: RedisServer, minilm_encoder: Encoder, corruption: str
) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=redis_server.url)
    runtime = live.server.config.app.state.runtime  # type: ignore[attr-defined]
    key = runtime.service.key(TEXTS[0])
    good = pack_dense(4, minilm_encoder.embed([TEXTS[0]])[0])
    bad = {
        "short": good[:100],
        "garbage": bytes(range(256)) * 6,
        "other-dimension": pack_dense(4, np.ones(512, dtype=np.float32)),
        "flipped-bit": good[:50] + bytes([good[50] ^ 1]) + good[51:],
    }[corruption]
    client = redis_server.client()
    client.set(key, bad)
    response = embed(live.url, [TEXTS[0]])
    np.testing.assert_allclose(vectors(response)[0], minilm_encoder.embed([TEXTS[0]])[0], atol=1e-6)
    assert fetch_stats(live.url)["cache"]["misses"] == 1
    _drain(live)
    assert client.get(key) != bad, "the corrupt value must be overwritten"
    assert fetch_stats(live.url)["cache"]["hits"] == 0
    embed(live.url, [TEXTS[0]])
    assert fetch_stats(live.url)["cache"]["hits"] == 1


def test_redis_down_then_back_on_the_same_port(
    gateway_factory, fresh_redis: RedisServer, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=fresh_redis.url, cache_timeout_ms=200)
    embed(live.url, TEXTS[:2])
    _drain(live)
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"

    fresh_redis.stop()
    started = time.monotonic()
    response = embed(live.url, TEXTS)
    assert time.monotonic() - started < 3, "a dead Redis must not stall requests"
    np.testing.assert_allclose(vectors(response), minilm_encoder.embed(TEXTS), atol=1e-6)
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["cache"] == {"backend": "redis", "status": "unreachable"}
    assert fetch_stats(live.url)["cache"]["errors"] >= 1

    fresh_redis.start()  # same port, empty: the first request refills it, the second hits
    embed(live.url, TEXTS)
    _drain(live)
    hits_before = fetch_stats(live.url)["cache"]["hits"]
    embed(live.url, TEXTS)
    assert fetch_stats(live.url)["cache"]["hits"] - hits_before == len(TEXTS)
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_memory_cache_when_no_redis_url(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url="")
    embed(live.url, TEXTS)
    embed(live.url, TEXTS)
    stats = fetch_stats(live.url)
    assert stats["cache"]["backend"] == "memory"
    assert stats["cache"]["hits"] == len(TEXTS)


def test_cache_off_always_computes(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(cache=False)
    embed(live.url, TEXTS)
    embed(live.url, TEXTS)
    stats = fetch_stats(live.url)
    assert stats["cache"]["backend"] == "off"
    assert stats["cache"]["hits"] == 0
    assert stats["encoder"]["inputs"] == 2 * len(TEXTS)


def _replica(encoder: Encoder, redis_url: str, prefix: str, **fields: object) -> ThreadedGateway:
    settings = Settings(
        model=str(encoder.path), model_name="all-MiniLM-L6-v2", redis_url=redis_url, cache_prefix=prefix, **fields
    )  # type: ignore[arg-type]
    return ThreadedGateway(create_app(settings, encoder=encoder))


def test_replicas_with_other_numerics_never_serve_each_others_vectors(
    redis_server: RedisServer, minilm_dir: Path, minilm_encoder: Encoder
) -> None:
    """Before: a bf16 gateway and an fp32 gateway shared one fingerprint (vectors differ by up to 0.0019)."""
    bf16 = load_encoder(str(minilm_dir), dtype="bfloat16", truncate=True)
    assert bf16.fingerprint == minilm_encoder.fingerprint, "same files: the model fingerprint alone cannot tell"
    texts = ["numerics are part of the key", "so are runtimes and quantisation"]
    with _replica(minilm_encoder, redis_server.url, "numerics") as fp32_gateway:
        fp32 = vectors(embed(fp32_gateway.url, texts))
        _drain(fp32_gateway)
    with _replica(bf16, redis_server.url, "numerics") as bf16_gateway:
        got = vectors(embed(bf16_gateway.url, texts))
        assert fetch_stats(bf16_gateway.url)["cache"]["hits"] == 0
    assert not np.array_equal(got, fp32), "the bf16 replica computed its own vectors"
    # On purpose, with the documented setting: replicas differing only in numerics share vectors.
    with _replica(minilm_encoder, redis_server.url, "shared", cache_share_numerics=True) as first:
        embed(first.url, texts)
        _drain(first)
    with _replica(bf16, redis_server.url, "shared", cache_share_numerics=True) as second:
        np.testing.assert_array_equal(vectors(embed(second.url, texts)), fp32)
        assert fetch_stats(second.url)["cache"]["hits"] == len(texts)


def test_a_truncated_vector_is_never_served_to_a_replica_that_does_not_truncate(
    redis_server: RedisServer, minilm_dir: Path, minilm_encoder: Encoder
) -> None:
    """Before: a replica with truncation on wrote the truncated vector of a long text, and a replica
    with truncation off served it for that text instead of answering 400."""
    long_text = "a long document that goes on and on " * 120
    strict_encoder = load_encoder(str(minilm_dir), truncate=False)
    with _replica(minilm_encoder, redis_server.url, "trunc", truncate=True) as lenient:
        embed(lenient.url, [long_text])
        _drain(lenient)
    with _replica(strict_encoder, redis_server.url, "trunc", truncate=False) as strict:
        response = httpx.post(f"{strict.url}/v1/embeddings", json={"input": long_text}, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_crafted_hash_collision_never_serves_the_other_texts_vector(
    gateway_factory, redis_server: RedisServer, minilm_encoder: Encoder
) -> None:  # type: ignore[no-untyped-def]
    """Two texts with the same XXH3-128 (built from its public secret): one tenant caches ``a``, another
    asks for ``b`` and must get ``b``'s own vector and token count, not ``a``'s."""
    a, b = xxh3_128_collision()
    true_a, true_b = minilm_encoder.embed([a, b])
    assert float(np.dot(true_a, true_b)) < 0.95, "the pair must differ in meaning for the test to mean anything"
    live = gateway_factory(redis_url=redis_server.url)
    first = embed(live.url, [a])
    _drain(live)
    second = embed(live.url, [b])
    np.testing.assert_allclose(vectors(first)[0], true_a, atol=1e-6)
    np.testing.assert_allclose(vectors(second)[0], true_b, atol=1e-6)
    assert second.json()["usage"]["prompt_tokens"] == len(minilm_encoder.tokenize([b])[0])
    runtime = live.server.config.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.service.key(a) != runtime.service.key(b)
