"""Each caller gets (and costs) only the output kinds it asked for, even in a shared forward pass.

Uses the tiny bge-m3-shaped folder (random weights, bge-m3's heads) from the shared fixtures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoder import Encoder, load_encoder
from encoder.batcher import MicroBatcher
from encoder.kinds import OutputKind, Outputs
from support.factories import SAMPLE_LINES

DENSE, SPARSE, COLBERT = OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT
ALL = frozenset({DENSE, SPARSE, COLBERT})


@pytest.fixture(scope="module")
def bge(tiny_bge_m3_dir: Path) -> Encoder:
    return load_encoder(str(tiny_bge_m3_dir), device="cpu")  # float32: parity to 1e-5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Counting:
    """Delegates to the encoder and records the rows of every forward pass."""

    def __init__(self, encoder: Encoder) -> None:
        self.inner = encoder
        self.passes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self.passes.append(len(token_ids))
        return self.inner.encode(token_ids)

    def encode_outputs(self, token_ids: Sequence[Sequence[int]], kinds: Any) -> list[Outputs]:
        self.passes.append(len(token_ids))
        return self.inner.encode_outputs(token_ids, kinds)


def _same(got: Outputs, expected: Outputs, kinds: frozenset[OutputKind]) -> None:
    """``got`` has exactly ``kinds``, with the values of ``expected``."""
    assert got.tokens == expected.tokens
    assert (got.dense is not None) == (DENSE in kinds)
    assert (got.sparse is not None) == (SPARSE in kinds)
    assert (got.colbert is not None) == (COLBERT in kinds)
    if got.dense is not None:
        assert expected.dense is not None
        np.testing.assert_allclose(got.dense, expected.dense, atol=1e-5)
    if got.sparse is not None:
        assert expected.sparse is not None
        np.testing.assert_array_equal(got.sparse.indices, expected.sparse.indices)
        np.testing.assert_allclose(got.sparse.values, expected.sparse.values, atol=1e-5)
    if got.colbert is not None:
        assert expected.colbert is not None
        assert got.colbert.shape == expected.colbert.shape
        np.testing.assert_allclose(got.colbert, expected.colbert, atol=1e-5)


@pytest.mark.anyio
async def test_a_dense_only_caller_batched_with_a_colbert_caller_gets_no_colbert(bge: Encoder) -> None:
    counting = _Counting(bge)
    batcher = MicroBatcher(counting)  # type: ignore[arg-type]
    await batcher.start()
    try:
        dense_text, colbert_text = SAMPLE_LINES[0], SAMPLE_LINES[3] + " " + SAMPLE_LINES[1]
        ids = await batcher.tokenize([dense_text, colbert_text])
        # Both calls queue before the worker wakes: one forward pass for the two of them.
        (dense_only,), (with_colbert,) = await asyncio.gather(
            batcher.embed([dense_text], ids[:1]),
            batcher.embed([colbert_text], ids[1:], kinds=frozenset({COLBERT})),
        )
        assert counting.passes == [2], "both callers shared one forward pass"
        _same(dense_only, Outputs(len(ids[0]), dense=bge.encode(ids[:1])[0]), frozenset({DENSE}))
        alone = bge.encode_outputs(ids[1:], frozenset({DENSE, COLBERT}))[0]
        _same(with_colbert, alone, frozenset({DENSE, COLBERT}))
    finally:
        await batcher.stop()


def test_encode_outputs_computes_each_rows_own_kinds(bge: Encoder) -> None:
    texts = [SAMPLE_LINES[2], SAMPLE_LINES[5] * 2, "short", SAMPLE_LINES[4]]
    ids = bge.tokenize(texts)
    asked = [frozenset({DENSE}), frozenset({DENSE, SPARSE}), frozenset({DENSE, COLBERT}), frozenset({SPARSE})]
    got = bge.encode_outputs(ids, asked)
    for row, kinds in enumerate(asked):
        # Parity with the row computed alone (no padding at all), every kind at once.
        _same(got[row], bge.encode_outputs(ids[row : row + 1], ALL)[0], kinds)
