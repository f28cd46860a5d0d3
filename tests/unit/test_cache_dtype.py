"""EMBED_CACHE_DTYPE (issue 24): float16 and int8 storage for dense, sparse and ColBERT outputs.

The vector served is the vector stored: a miss is answered as its later hit will be, bit for bit;
each storage type has its own namespace; the gate measures the type on the model's own outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoder import Encoder
from encoder.batcher import MicroBatcher
from encoder.kinds import SparseWeights
from gateway.core.cache import MemoryBlobCache
from gateway.core.cache.formats import (
    CACHE_DTYPES,
    pack_colbert,
    pack_dense,
    pack_sparse,
    unpack_colbert,
    unpack_dense,
    unpack_sparse,
)
from gateway.core.outputs import COLBERT, DENSE, SPARSE
from gateway.core.service import EmbeddingService
from gateway.core.storage_gate import check_storage
from gateway.core.telemetry import Telemetry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_each_format_round_trips_smaller_and_refuses_damage(dtype: Any) -> None:
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(384).astype(np.float32)
    matrix = rng.standard_normal((9, 128)).astype(np.float32)
    weights = SparseWeights(np.array([3, 17, 250_001]), rng.random(3).astype(np.float32))
    floor = {"float32": 1 - 1e-6, "float16": 0.99999, "int8": 0.999}[dtype]
    dense = pack_dense(5, vector, dtype)
    tokens, restored = unpack_dense(dense, 384)  # type: ignore[misc]
    assert tokens == 5 and restored.dtype == np.float32 and _cosine(vector, restored) >= floor
    assert unpack_dense(dense, 383) is None and unpack_dense(dense[:-1], 384) is None
    flipped = bytearray(dense)
    flipped[12] ^= 1
    assert unpack_dense(bytes(flipped), 384) is None
    rows = unpack_colbert(pack_colbert(5, matrix, dtype), 128)
    assert rows is not None and rows[1].shape == (9, 128)
    assert min(_cosine(a, b) for a, b in zip(matrix, rows[1], strict=True)) >= floor
    sparse = unpack_sparse(pack_sparse(5, weights, dtype), 0)
    assert sparse is not None and sparse[1].indices.tolist() == [3, 17, 250_001]
    assert _cosine(weights.values, sparse[1].values) >= floor
    empty = unpack_sparse(pack_sparse(1, SparseWeights(np.zeros(0, dtype=np.int64), np.zeros(0, np.float32)), dtype), 0)
    assert empty is not None and len(empty[1].indices) == 0
    zero = unpack_dense(pack_dense(1, np.zeros(384, dtype=np.float32), dtype), 384)
    assert zero is not None and not zero[1].any()
    sizes = {d: len(pack_dense(5, vector, d)) for d in CACHE_DTYPES}
    assert sizes["float16"] <= 0.51 * sizes["float32"] and sizes["int8"] <= 0.29 * sizes["float32"]


async def _service(encoder: Encoder, cache: MemoryBlobCache, dtype: Any) -> tuple[EmbeddingService, MicroBatcher]:
    telemetry = Telemetry()
    batcher = MicroBatcher(encoder, observer=telemetry)
    await batcher.start()
    service = EmbeddingService(
        encoder=encoder,
        batcher=batcher,
        cache=cache,
        telemetry=telemetry,
        cache_prefix="dtype",
        max_request_tokens=100_000,
        truncate=True,
        cache_dtype=dtype,
    )
    return service, batcher


@pytest.fixture(scope="module")
def tiny_m3(tiny_bge_m3_dir: Path) -> Encoder:
    from encoder import load_encoder

    return load_encoder(str(tiny_bge_m3_dir))


@pytest.mark.anyio
@pytest.mark.parametrize("dtype", CACHE_DTYPES)
async def test_a_hit_is_bit_identical_to_its_miss(tiny_m3: Encoder, dtype: Any) -> None:
    cache = MemoryBlobCache(max_bytes=1 << 24, ttl_seconds=60)
    service, batcher = await _service(tiny_m3, cache, dtype)
    texts = ["the vector served is the vector stored", "ein zweiter Text", "短い"]
    try:
        for output in (DENSE, SPARSE, COLBERT):
            miss = await service.embed(texts, output)
            await service.drain(5)
            hit = await service.embed(texts, output)
            assert (miss.misses, hit.hits) == (3, 3), output.kind
            for first, again in zip(miss.values, hit.values, strict=True):
                if isinstance(first, SparseWeights):
                    assert first.indices.tobytes() == again.indices.tobytes()
                    assert first.values.tobytes() == again.values.tobytes(), (dtype, output.kind)
                else:
                    assert first.tobytes() == again.tobytes(), (dtype, output.kind)
        exact = tiny_m3.embed(texts)
        served = np.stack((await service.embed(texts, DENSE)).values)
        floor = {"float32": 1 - 1e-6, "float16": 0.99999, "int8": 0.999}[dtype]
        assert min(_cosine(a, b) for a, b in zip(exact, served, strict=True)) >= floor
        assert (dtype == "float32") == bool(np.array_equal(exact, served))  # stored smaller: rounded
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_each_storage_type_has_its_own_namespace(minilm_encoder: Encoder) -> None:
    cache = MemoryBlobCache(max_bytes=1 << 24, ttl_seconds=60)
    services = [await _service(minilm_encoder, cache, dtype) for dtype in CACHE_DTYPES]
    try:
        namespaces = {service.namespace for service, _ in services}
        assert len(namespaces) == 3
        for service, _ in services:
            first = await service.embed(["one text, three stores"], DENSE)
            await service.drain(5)
            assert first.misses == 1, f"{service.cache_dtype} read another type's entry"
        legacy = EmbeddingService(
            encoder=minilm_encoder,
            batcher=services[0][1],
            cache=cache,
            telemetry=Telemetry(),
            cache_prefix="dtype",
            max_request_tokens=100_000,
            truncate=True,
        )
        assert legacy.namespace == services[0][0].namespace  # float32 keeps the keys it always had
    finally:
        for _, batcher in services:
            await batcher.stop()


def test_the_gate_measures_every_output_and_refuses_below_its_floor(tiny_m3: Encoder) -> None:
    for dtype in ("float16", "int8"):
        gate = check_storage(tiny_m3, dtype)
        assert set(gate.worst) == {"dense", "sparse", "colbert"}
        assert gate.passed, gate.describe()
        assert gate.bytes_per_entry["dense"] > 0
    strict = check_storage(tiny_m3, "int8", floor=0.9999999)
    assert not strict.passed and "int8" in strict.describe() and "0.9999999" in strict.describe()


def test_a_vector_cut_short_keeps_its_precision_under_int8(minilm_encoder: Encoder) -> None:
    """``dimensions`` cuts the stored vector: int8's small head blocks keep every cut to a power of
    two as close as the whole (one scale per vector rounded small leading values to 0: a cut to one
    dimension was the zero vector)."""
    from encoder.int8_probe import probe_texts
    from gateway.core.outputs import shorten

    exact = minilm_encoder.embed(probe_texts())
    stored = [unpack_dense(pack_dense(1, row, "int8"), 384, "int8") for row in exact]
    for width in (1, 2, 4, 8, 16, 32, 64, 128, 256, 384):
        cut = shorten([pair[1] for pair in stored if pair is not None], width)
        reference = shorten(list(exact), width)
        worst = min(_cosine(a, b) for a, b in zip(reference, cut, strict=True))
        assert worst >= 0.999, (width, worst)
    assert unpack_dense(pack_dense(1, exact[0], "int8"), 384, "float32") is None, "a float32 reader takes no int8"
