"""The core request path in-process: no server, no Litestar; the real encoder, batcher and a cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest

from encoder import Encoder
from encoder.batcher import MicroBatcher
from gateway.core.cache import MemoryBlobCache
from gateway.core.errors import InvalidInputError, OutputNotSupportedError
from gateway.core.outputs import COLBERT, DENSE, SPARSE, Answer, ResponseOptions
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import LiveState, Telemetry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def service(minilm_encoder: Encoder) -> AsyncIterator[EmbeddingService]:
    telemetry = Telemetry()
    batcher = MicroBatcher(minilm_encoder, observer=telemetry)
    await batcher.start()
    yield EmbeddingService(
        encoder=minilm_encoder,
        batcher=batcher,
        cache=MemoryBlobCache(max_bytes=1 << 20, ttl_seconds=60),
        telemetry=telemetry,
        cache_prefix="unit",
        max_request_tokens=60,
        truncate=False,
    )
    await batcher.stop()


@pytest.mark.anyio
async def test_dedupes_keeps_order_and_serves_repeats_from_the_cache(
    service: EmbeddingService, minilm_encoder: Encoder
) -> None:
    texts = ["alpha", "beta", "alpha", "gamma"]
    first = await service.embed(texts, DENSE)
    assert (first.hits, first.misses) == (0, 3)
    np.testing.assert_allclose(np.stack(first.values), minilm_encoder.embed(texts), atol=1e-5)
    assert first.tokens == [len(ids) for ids in minilm_encoder.tokenize(texts)]
    await service.drain(5)
    second = await service.embed(texts, DENSE)
    assert (second.hits, second.misses) == (3, 0)
    np.testing.assert_array_equal(np.stack(second.values), np.stack(first.values))
    assert second.tokens == first.tokens
    snapshot = service.telemetry.snapshot(LiveState())
    assert (snapshot.cache.hits, snapshot.cache.misses, snapshot.cache.writes) == (3, 3, 3)
    assert snapshot.inputs == 8
    assert snapshot.encoder.batches >= 1


@pytest.mark.anyio
async def test_limits_are_domain_errors(service: EmbeddingService) -> None:
    with pytest.raises(InvalidInputError) as too_long:
        await service.embed(["word " * 400], DENSE)
    assert too_long.value.code == "context_length_exceeded"
    assert "input[0]" in too_long.value.message
    with pytest.raises(InvalidInputError, match="at most 60 per request"):
        await service.embed([f"text number {i} here" for i in range(12)], DENSE)


@pytest.mark.anyio
async def test_an_output_without_its_head_names_the_file_and_no_path(service: EmbeddingService) -> None:
    for output, missing in ((SPARSE, "sparse_linear.pt"), (COLBERT, "colbert_linear.pt")):
        with pytest.raises(OutputNotSupportedError) as info:
            await service.embed(["x"], output)
        assert missing in info.value.message
        assert str(service.encoder.path) not in info.value.message
        assert "/" not in info.value.message


def test_dense_answer_truncates_renormalises_and_writes_base64() -> None:
    vector = np.arange(1, 9, dtype=np.float32)
    vector /= np.linalg.norm(vector)
    answer = Answer([vector], [5], "m")
    short = DENSE.respond(answer, ResponseOptions(dimensions=3))
    got = np.array(msgspec.json.decode(short.data[0].embedding))  # float: a pre-encoded JSON fragment
    np.testing.assert_allclose(got, vector[:3] / np.linalg.norm(vector[:3]), rtol=1e-6)
    encoded = DENSE.respond(answer, ResponseOptions(encoding_format="base64"))
    assert isinstance(encoded.data[0].embedding, memoryview)
    assert bytes(encoded.data[0].embedding) == vector.astype("<f4").tobytes()
    assert encoded.usage.total_tokens == 5


@pytest.mark.anyio
async def test_the_memory_cache_is_bounded_in_bytes_whatever_the_kind() -> None:
    """Before: it counted items; 100,000 ColBERT entries of 256 tokens would be about 40 GB."""
    cache = MemoryBlobCache(max_bytes=4 << 20, ttl_seconds=60)
    colbert_like = bytes(417_000)  # a 256-token ColBERT matrix of 384-d float32 rows, sealed
    await cache.put_blobs([(f"colbert-{i}", colbert_like) for i in range(50)])
    assert cache.bytes <= 4 << 20
    assert 5 <= len(cache) <= 10
    assert await cache.get_blobs(["colbert-49", "colbert-0"]) == [colbert_like, None], "LRU keeps the newest"
    dense = bytes(1_550)
    await cache.put_blobs([(f"dense-{i}", dense) for i in range(1000)])
    assert cache.bytes <= 4 << 20
    assert (await cache.get_blobs(["dense-999"]))[0] == dense
    await cache.put_blobs([("huge", bytes(8 << 20))])  # bigger than the whole cache: not kept
    assert (await cache.get_blobs(["huge"]))[0] is None
    assert (await cache.get_blobs(["dense-999"]))[0] == dense
