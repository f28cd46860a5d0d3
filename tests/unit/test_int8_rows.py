"""Per-token int8 MatMuls (encoder/int8_rows.py): the arithmetic, on small graphs run by ONNX Runtime.

The reason for the rewrite is in the second test: one outlier token wrecks ``quantize_dynamic``'s
single activation scale for every other token, and per-row scales do not care.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from encoder.int8_rows import RowMode, mode_matcher, quantize_rows
from encoder.onnx_int8 import DEFAULT_RECIPE, cpu_int8_features, for_this_cpu, saturates_int8

K, M = 64, 48
SATURATES = saturates_int8(cpu_int8_features())
WEIGHT_MAX = 63 if SATURATES else 127  # as the served recipe quantises on this CPU


def _graph(weights: dict[str, np.ndarray], chain: bool = False) -> onnx.ModelProto:
    """``x [batch, tokens, K]`` through one MatMul per weight (all reading x, or chained when ``chain``)."""
    nodes, outputs, source = [], [], "x"
    for name in weights:
        nodes.append(helper.make_node("MatMul", [source, name], [f"{name}_out"], name=f"/{name}/MatMul"))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None))
        if chain:
            source = f"{name}_out"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", K])],
        outputs,
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> list[np.ndarray]:
    data = model if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(str(data) if isinstance(data, Path) else data, providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, {"x": x})]


def _rewritten(
    weights: dict[str, np.ndarray], mode: RowMode, chain: bool = False, weight_max: int = WEIGHT_MAX
) -> onnx.ModelProto:
    model = _graph(weights, chain)
    done = quantize_rows(model, mode_matcher(((r"MatMul$", mode),)), weight_max=weight_max)
    assert done == [f"/{name}/MatMul" for name in weights]
    return model


def _relative_row_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_a_per_row_matmul_is_close_to_float_in_every_row(mode: RowMode) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((K, M)) / np.sqrt(K)
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    x[1] *= 40.0  # rows of very different ranges: each keeps its own scale
    (got,) = _run(_rewritten({"w": weight}, mode), x)
    want = x @ weight.astype(np.float32)
    assert got.shape == want.shape
    assert _relative_row_errors(got, want).max() < 0.02


def test_one_outlier_token_spoils_per_tensor_int8_but_not_per_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((K, M)) / np.sqrt(K)
    x = rng.standard_normal((2, 16, K)).astype(np.float32)
    x[0, 0, :4] = 300.0  # a [CLS]-like token with massive activations
    want = x @ weight.astype(np.float32)
    plain = tmp_path / "plain.onnx"
    onnx.save(_graph({"w": weight}), str(tmp_path / "float.onnx"))
    quantize_dynamic(tmp_path / "float.onnx", plain, per_channel=True, weight_type=QuantType.QInt8)
    per_tensor = _relative_row_errors(_run(plain, x)[0], want)[1]  # the other sequence's rows
    per_row = _relative_row_errors(_run(_rewritten({"w": weight}, "symmetric"), x)[0], want)[1]
    assert np.median(per_tensor) > 0.1, "one scale for the whole tensor: the ordinary tokens lose their bits"
    assert per_row.max() < 0.02


def test_lopsided_rows_are_where_asymmetric_wins() -> None:
    rng = np.random.default_rng(3)
    weight = rng.integers(-WEIGHT_MAX, WEIGHT_MAX + 1, (K, M)).astype(np.float64)
    weight[0] = WEIGHT_MAX  # every column's absmax is the top level: int8 holds W exactly, the error is A's alone
    x = np.abs(rng.standard_normal((2, 8, K))).astype(np.float32) - 0.05  # post-GELU-like: nearly all positive
    want = x @ weight.astype(np.float32)
    (sym,) = _run(_rewritten({"w": weight}, "symmetric"), x)
    (asym,) = _run(_rewritten({"w": weight}, "asymmetric"), x)
    # half the range unused by symmetric: about twice its step, about twice its error
    assert _relative_row_errors(asym, want).mean() < 0.7 * _relative_row_errors(sym, want).mean()


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_padding_rows_of_zeros_stay_zero_and_finite(mode: RowMode) -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((K, M)) / np.sqrt(K)
    x = rng.standard_normal((2, 4, K)).astype(np.float32)
    x[1, 2:] = 0.0
    (got,) = _run(_rewritten({"w": weight}, mode), x)
    assert np.isfinite(got).all()
    assert np.abs(got[1, 2:]).max() < 1e-6


def test_shared_inputs_are_quantised_once_and_unmatched_matmuls_stay_float() -> None:
    rng = np.random.default_rng(5)
    weights = {name: rng.standard_normal((K, K)) / np.sqrt(K) for name in ("q", "k", "v")}
    model = _graph(weights)
    done = quantize_rows(model, mode_matcher(((r"/(q|k)/MatMul$", "asymmetric"),)), weight_max=WEIGHT_MAX)
    assert done == ["/q/MatMul", "/k/MatMul"]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") == 1, "q and k read one input: its rows are quantised once"
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("MatMul") == 1
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    got = dict(zip(("q", "k", "v"), _run(model, x), strict=True))
    assert np.allclose(got["v"], x @ weights["v"].astype(np.float32), atol=1e-5), "v was not asked for: float"
    for name in ("q", "k"):
        assert _relative_row_errors(got[name], x @ weights[name].astype(np.float32)).max() < 0.02


def test_a_chain_of_per_row_matmuls_runs_with_dynamic_shapes() -> None:
    rng = np.random.default_rng(6)
    weights = {"a": rng.standard_normal((K, K)) / np.sqrt(K), "b": rng.standard_normal((K, K)) / np.sqrt(K)}
    model = _rewritten(weights, "asymmetric", chain=True)
    for shape in ((1, 1, K), (3, 7, K), (2, 33, K)):  # one session, new batch and length each call
        x = rng.standard_normal(shape).astype(np.float32)
        want = x @ weights["a"].astype(np.float32) @ weights["b"].astype(np.float32)
        got = _run(model, x)[1]
        assert got.shape == want.shape
        assert _relative_row_errors(got, want).max() < 0.03


@pytest.mark.skipif(not SATURATES, reason="this CPU's int8 GEMM has VNNI or AMX (or is not x86): nothing saturates")
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_full_range_weights_saturate_without_vnni_and_7_bit_ones_do_not(mode: RowMode) -> None:
    """Why the recipe takes 7-bit weights on x86 without VNNI: (v)pmaddubsw adds products in 16 bits."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((K, M)) / np.sqrt(K)
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    want = x @ weight.astype(np.float32)
    (full,) = _run(_rewritten({"w": weight}, mode, weight_max=127), x)
    (seven,) = _run(_rewritten({"w": weight}, mode, weight_max=63), x)
    assert _relative_row_errors(full, want).max() > 0.05
    assert _relative_row_errors(seven, want).max() < 0.02


def test_the_recipe_takes_7_bit_weights_only_where_the_gemm_saturates() -> None:
    assert for_this_cpu(DEFAULT_RECIPE, ["avx512_vnni", "avx512f", "avx2"], "x86_64") == DEFAULT_RECIPE
    assert for_this_cpu(DEFAULT_RECIPE, ["amx_int8", "avx2"], "x86_64") == DEFAULT_RECIPE
    assert for_this_cpu(DEFAULT_RECIPE, [], "aarch64") == DEFAULT_RECIPE  # NEON/SVE: 32-bit sums
    seven = for_this_cpu(DEFAULT_RECIPE, ["avx512f", "avx2"], "x86_64")
    assert seven.reduce_range and seven.name == f"{DEFAULT_RECIPE.name}-7bit"  # its own cache folder and namespace
    assert for_this_cpu(seven, ["avx2"], "x86_64") == seven
