"""int8 and EMBED_DTYPE (issue 27, item 4).

int8 computes in float32 around its int8 weights: ONNX Runtime returns a float32 hidden state. With
``EMBED_DTYPE=float16`` the server used to start, load bge-m3's sparse and ColBERT heads in float16,
and answer every sparse or ColBERT request with a 500 (a float16 Linear on a float32 tensor). Now a
half dtype with int8 is refused before anything loads, with one line, and the heads follow the
backend's dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encoder import load_encoder
from encoder.onnx_int8 import GateFloor

NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)


def test_a_half_dtype_is_a_problem_for_int8_and_float32_is_not() -> None:
    from encoder.onnx_int8 import int8_dtype_problem

    for dtype in ("float16", "fp16", "half", "bfloat16", "bf16", " Float16 "):
        problem = int8_dtype_problem(dtype)
        assert problem is not None and "float32" in problem and "\n" not in problem
    for dtype in ("auto", "", "float32", "fp32"):
        assert int8_dtype_problem(dtype) is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_int8_with_a_half_dtype_is_refused_before_loading_with_one_line(tiny_bge_m3_dir: Path, dtype: str) -> None:
    from gateway.cli import preflight
    from gateway.settings import Settings

    problem = preflight(Settings(model=str(tiny_bge_m3_dir), quantize="int8", dtype=dtype))  # type: ignore[arg-type]
    assert problem is not None, "EMBED_QUANTIZE=int8 with a half EMBED_DTYPE was accepted"
    assert problem.startswith("EMBED_DTYPE (--dtype): ") and "int8" in problem and "\n" not in problem
    assert preflight(Settings(model=str(tiny_bge_m3_dir), quantize="int8", dtype="float32")) is None
    assert preflight(Settings(model=str(tiny_bge_m3_dir), quantize="none", dtype=dtype)) is None  # type: ignore[arg-type]


def test_load_encoder_refuses_int8_with_float16(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8 computes in float32"):
        load_encoder(
            str(tiny_bge_m3_dir), quantize="int8", dtype="float16", onnx_cache_dir=tmp_path, int8_floor=NO_FLOOR
        )


def test_the_heads_of_an_int8_encoder_are_float32_and_answer_sparse_and_colbert(
    tiny_bge_m3_dir: Path, tmp_path: Path
) -> None:
    encoder = load_encoder(str(tiny_bge_m3_dir), quantize="int8", onnx_cache_dir=tmp_path, int8_floor=NO_FLOOR)
    assert encoder.dtype == "float32"
    assert {head.weight.dtype for head in encoder.heads.values()} == {torch.float32}
    (outputs,) = encoder.encode_outputs(encoder.tokenize(["sparse and colbert"]), frozenset(encoder.outputs))
    assert outputs.sparse is not None and outputs.colbert is not None and outputs.dense is not None
