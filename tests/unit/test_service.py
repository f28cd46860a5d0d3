"""The core request path in-process: no server, no Litestar; the real encoder, batcher and a cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest

from encoder import Encoder
from encoder.batcher import MicroBatcher
from encoder.kinds import OutputKind
from gateway.core.cache import MemoryBlobCache
from gateway.core.errors import InvalidInputError, OutputNotSupportedError, OverloadedError
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


class _SwitchingEncoder:
    """The encoder as a worker sees it through the engine link: its fingerprint can change under it
    (the engine restarted on a model folder changed in place)."""

    def __init__(self, real: Encoder) -> None:
        self._real = real
        self.fingerprint = real.fingerprint

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


class _RestartingBatcher:
    """Computes with the real batcher, but the engine 'restarts' with a new model during the pass."""

    def __init__(self, real: MicroBatcher, encoder: _SwitchingEncoder) -> None:
        self._real, self._encoder = real, encoder

    async def tokenize(self, texts: list[str], *, truncate: bool | None = None) -> list[list[int]]:
        return await self._real.tokenize(texts, truncate=truncate)

    async def embed(self, texts: list[str], token_ids: list[list[int]], **kwargs: object) -> object:
        results = await self._real.embed(texts, token_ids, **kwargs)  # type: ignore[arg-type]
        self._encoder.fingerprint = "0123456789abcdef"
        return results


@pytest.mark.anyio
async def test_the_namespace_follows_the_engines_fingerprint_and_a_switch_mid_pass_is_retried_not_cached(
    minilm_encoder: Encoder,
) -> None:
    telemetry = Telemetry()
    real = MicroBatcher(minilm_encoder, observer=telemetry)
    await real.start()
    encoder = _SwitchingEncoder(minilm_encoder)
    cache = MemoryBlobCache(max_bytes=1 << 20, ttl_seconds=60)
    service = EmbeddingService(
        encoder=encoder,  # type: ignore[arg-type]
        batcher=_RestartingBatcher(real, encoder),  # type: ignore[arg-type]
        cache=cache,
        telemetry=telemetry,
        cache_prefix="unit",
        max_request_tokens=600,
        truncate=True,
    )
    try:
        before = service.namespace
        with pytest.raises(OverloadedError, match="model changed"):
            await service.embed(["computed by the old model, answered after the switch"], DENSE)
        await service.drain(5)
        assert service.namespace != before, "the namespace follows the fingerprint"
        assert before.startswith(minilm_encoder.fingerprint)
        assert service.namespace.startswith("0123456789abcdef")
        assert len(cache) == 0, "vectors computed across a model switch are cached under neither namespace"
    finally:
        await real.stop()


class _CountingBatcher:
    """The real batcher, counting the characters handed to the tokenizer."""

    def __init__(self, real: MicroBatcher) -> None:
        self._real = real
        self.characters = 0

    async def tokenize(self, texts: list[str], *, truncate: bool | None = None) -> list[list[int]]:
        self.characters += sum(len(text) for text in texts)
        return await self._real.tokenize(texts, truncate=truncate)

    async def embed(self, *args: object, **kwargs: object) -> object:
        return await self._real.embed(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_request_over_its_token_limit_is_refused_before_all_of_it_is_tokenised(
    minilm_encoder: Encoder,
) -> None:
    telemetry = Telemetry()
    real = MicroBatcher(minilm_encoder, observer=telemetry)
    await real.start()
    counting = _CountingBatcher(real)
    service = EmbeddingService(
        encoder=minilm_encoder,
        batcher=counting,  # type: ignore[arg-type]
        cache=None,
        telemetry=telemetry,
        cache_prefix="unit",
        max_request_tokens=2_000,
        truncate=True,
    )
    texts = [f"text {i} " + "word " * 1_500 for i in range(500)]  # 256 tokens each after truncation
    try:
        with pytest.raises(InvalidInputError, match="at most 2000 per request"):
            await service.embed(texts, DENSE)
        whole = sum(len(text) for text in texts)
        assert counting.characters < whole / 10, (counting.characters, whole)
        before = counting.characters
        with pytest.raises(InvalidInputError, match="at most 2000 per request"):
            await service.embed([f"{i}" for i in range(2_001)], DENSE)  # a token each at least: refused unread
        assert counting.characters == before
    finally:
        await real.stop()


def test_vectors_cached_by_an_older_generation_of_this_code_are_never_read(minilm_encoder: Encoder) -> None:
    from gateway.core.service import CACHE_GENERATION, cache_namespace

    now = cache_namespace(minilm_encoder.fingerprint, minilm_encoder.numerics, truncate=True)
    older = cache_namespace(
        minilm_encoder.fingerprint, minilm_encoder.numerics, truncate=True, generation=CACHE_GENERATION - 1
    )
    assert now != older
    assert now.startswith(minilm_encoder.fingerprint) and older.startswith(minilm_encoder.fingerprint)


@pytest.mark.anyio
async def test_several_outputs_take_one_pass_and_write_only_what_missed(tiny_bge_m3_dir: object) -> None:
    """bge-m3 ranking asks dense, sparse and ColBERT of each text (issue 22's review: three passes,
    three times the counted tokens): one lookup, one pass for a text that misses any output, only
    the missing kinds written back, the inputs and tokens counted once."""
    from encoder import load_encoder

    encoder = load_encoder(str(tiny_bge_m3_dir))
    telemetry = Telemetry()
    batcher = MicroBatcher(encoder, observer=telemetry)
    await batcher.start()
    cache = MemoryBlobCache(max_bytes=1 << 20, ttl_seconds=60)
    service = EmbeddingService(
        encoder=encoder,
        batcher=batcher,
        cache=cache,
        telemetry=telemetry,
        cache_prefix="unit",
        max_request_tokens=1000,
        truncate=False,
    )
    try:
        await service.embed(["cached dense"], DENSE)  # one kind of one text already cached
        await service.drain(5)
        batches = telemetry.counters.batches
        texts = ["cached dense", "new text", "cached dense"]
        dense, sparse, colbert = await service.embed_outputs(texts, [DENSE, SPARSE, COLBERT])
        await service.drain(5)
        assert telemetry.counters.batches == batches + 1, "one pass for every kind"
        assert (dense.hits, dense.misses) == (0, 2)  # a text misses when any of its kinds does
        kinds = frozenset({OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT})
        expected = encoder.encode_outputs(encoder.tokenize(["cached dense", "new text"]), kinds)
        for row, index in ((0, 0), (1, 1), (2, 0)):
            np.testing.assert_allclose(dense.values[row], expected[index].dense, atol=1e-5)
            np.testing.assert_allclose(sparse.values[row].values, expected[index].sparse.values, atol=1e-5)
            np.testing.assert_allclose(colbert.values[row], expected[index].colbert, atol=1e-5)
        assert dense.tokens == sparse.tokens == [expected[i].tokens for i in (0, 1, 0)]
        assert telemetry.counters.inputs == 1 + 3 and telemetry.counters.tokens == expected[0].tokens + sum(
            dense.tokens
        )
        assert telemetry.counters.cache_writes == 1 + 5  # the first dense, then all but that one
        again = await service.embed_outputs(texts, [DENSE, SPARSE, COLBERT])
        assert (again[0].hits, again[0].misses) == (2, 0)
        assert telemetry.counters.batches == batches + 1
    finally:
        await batcher.stop()
