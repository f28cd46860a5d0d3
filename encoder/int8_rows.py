"""Per-token dynamic int8 for an ONNX graph's MatMuls: one activation scale per row, not per tensor.

Why: ``quantize_dynamic`` gives every MatMul's input *one* scale for the whole batch. A transformer's
hidden states carry a few tokens with outlier values ([CLS], [SEP], punctuation) hundreds of times
larger than the rest, so one scale leaves every other token a handful of levels; all-MiniLM-L6-v2
then falls to worst cosine 0.965 and top-10 overlap 0.91 against float32. Measured in a torch
simulation of the same arithmetic, a scale per token (per row of the ``[tokens, K]`` input) brings
all six layers' MatMuls to 0.993 / 0.999 / 0.98, and the per-channel smoothing recipes (SmoothQuant)
did not help at all - the outliers are tokens, not channels (README "int8 on CPU").

ONNX Runtime has no MatMul with a per-row activation scale, so :func:`quantize_rows` builds one from
standard parts, per MatMul with a constant weight ``W [K, M]``:

* ``W`` becomes int8, symmetric, one scale per output column (``ws``); 7 bits (-63..63) where the
  CPU's int8 GEMM has no VNNI (``weight_max=63``, ONNX Runtime's ``reduce_range``): AVX2's
  ``vpmaddubsw`` adds two uint8 x int8 products in 16 bits, which saturates beyond 255 x 63 x 2
  and gave rows 14-24% wrong there;
* the input ``A [..., K]`` is viewed as ``[N, K]``; ``ReduceMin``/``ReduceMax`` give each row's range,
  and one per-axis ``QuantizeLinear`` turns it into uint8 with a scale ``s`` (and, asymmetric, a zero
  point ``z``) per row. Rows of one input are quantised once, however many MatMuls read them;
* ``MatMulIntegerToFloat`` (ONNX Runtime's fused int8 GEMM, VNNI/AMX where the CPU has them) computes
  ``F = Aq @ Wq * ws`` with a unit activation scale; the row scale is applied after:
  ``Y = F * s`` (symmetric, zero point 128), or ``Y = F * s - (s * z) ⊗ colsum(Wq * ws)``
  (asymmetric: ``A ≈ s * (Aq - z)``, and the zero point's share is subtracted exactly).

Symmetric costs one pass over the output more than ``quantize_dynamic``; asymmetric three. The
recipe picks per MatMul: asymmetric where the input is lopsided (after GELU: nothing below -0.17).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

__all__ = ["RowMode", "mode_matcher", "quantize_rows"]

RowMode = Literal["symmetric", "asymmetric"]

_EPS = 1e-12  # a row of zeros (padding) still gets a positive scale


def quantize_rows(model: Any, mode_of: Callable[[str], RowMode | None], *, weight_max: int = 127) -> list[str]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place): each MatMul with a constant weight for which
    ``mode_of(node name)`` gives a mode becomes per-row int8, its weights in ``-weight_max..weight_max``
    (127, or 63 for CPUs without VNNI). Returns the names of the rewritten nodes.
    """
    from onnx import helper

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    rewriter = _Rewriter(weight_max)
    done: list[str] = []
    for original in graph.node:
        mode = mode_of(original.name) if original.op_type == "MatMul" and original.input[1] in weights else None
        if mode is None:
            rewriter.nodes.append(original)
            continue
        rewriter.matmul(original.input[0], weights[original.input[1]], original.output[0], mode)
        done.append(original.name)
    used = {name for node in rewriter.nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.node[:]
    graph.node.extend(rewriter.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [tensor for tensor in rewriter.constants if tensor.name in used])
    if done and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


class _Rewriter:
    """Collects the new graph's nodes and constants; one instance per rewrite."""

    def __init__(self, weight_max: int) -> None:
        self.weight_max = weight_max
        self.nodes: list[Any] = []
        self.constants: list[Any] = []
        self._rows: dict[tuple[str, str], str] = {}  # (input, mode) -> prefix of its quantised rows
        self._weights = 0
        self.one = self.const("rowq/one", np.array(1.0, np.float32))
        self.eps = self.const("rowq/eps", np.array(_EPS, np.float32))
        self.zero = self.const("rowq/zero", np.array(0.0, np.float32))
        self.zp128 = self.const("rowq/zp128", np.array(128, np.uint8))
        self.levels = {
            "symmetric": self.const("rowq/127", np.array(127.0, np.float32)),
            "asymmetric": self.const("rowq/255", np.array(255.0, np.float32)),
        }
        self.first = self.const("rowq/first", np.array([0], np.int64))
        self.last_but_one = self.const("rowq/last-but-one", np.array([-1], np.int64))
        self.unit = self.const("rowq/unit", np.array([1], np.int64))

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.constants.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        domain = "com.microsoft" if op == "MatMulIntegerToFloat" else ""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def matmul(self, source: str, weight_tensor: Any, out: str, mode: RowMode) -> None:
        from onnx import numpy_helper

        weight = numpy_helper.to_array(weight_tensor).astype(np.float32)
        top = self.weight_max
        column_scale = (np.maximum(np.abs(weight).max(axis=0), _EPS) / top).astype(np.float32)
        quantised = np.clip(np.round(weight / column_scale), -top, top).astype(np.int8)
        w = f"rowq/w{self._weights}"
        self._weights += 1
        wq, ws = self.const(f"{w}/q", quantised), self.const(f"{w}/scale", column_scale)
        key = (source, mode)
        if key not in self._rows:
            self._rows[key] = self._quantise_rows(source, weight.shape[0], mode)
        p = self._rows[key]
        if mode == "symmetric":
            f = self.node("MatMulIntegerToFloat", [f"{p}/q", wq, self.one, ws, self.zp128], f"{w}/f")
            self.node("Mul", [f, f"{p}/rowscale"], out)
            return
        f = self.node("MatMulIntegerToFloat", [f"{p}/q", wq, self.one, ws], f"{w}/f")
        colsum = self.const(f"{w}/colsum", (quantised.astype(np.float32) * column_scale).sum(axis=0))
        scaled = self.node("Mul", [f, f"{p}/rowscale"], f"{w}/scaled")
        self.node("Sub", [scaled, self.node("Mul", [f"{p}/offset", colsum], f"{w}/zero-point-share")], out)

    def _quantise_rows(self, name: str, k: int, mode: RowMode) -> str:
        """Nodes that quantise ``name`` per row; returns their prefix ``p`` (``p/q``, ``p/rowscale``, ...)."""
        from onnx import TensorProto, numpy_helper

        node = self.node
        p = f"rowq/in{len(self._rows)}"
        shape = node("Shape", [name], f"{p}/shape")
        lead = node("Slice", [shape, self.first, self.last_but_one], f"{p}/lead")
        column = node("Concat", [lead, self.unit], f"{p}/column", axis=0)  # [..., 1]: per row, against the output
        flat = node("Reshape", [name, self.const(f"{p}/k", np.array([-1, k], np.int64))], f"{p}/flat")
        high = node("ReduceMax", [flat], f"{p}/max", axes=[1], keepdims=0)
        low = node("ReduceMin", [flat], f"{p}/min", axes=[1], keepdims=0)
        if mode == "symmetric":
            bound = node("Max", [high, node("Neg", [low], f"{p}/-min"), self.eps], f"{p}/absmax")
            scale = node("Div", [bound, self.levels[mode]], f"{p}/scale")
            zp = numpy_helper.from_array(np.array([128], np.uint8))
            point = node("ConstantOfShape", [node("Shape", [scale], f"{p}/rows")], f"{p}/zp", value=zp)
        else:
            low = node("Min", [low, self.zero], f"{p}/low")  # the range holds 0, as quantize_dynamic's does
            high = node("Max", [high, self.zero], f"{p}/high")
            span = node("Max", [node("Sub", [high, low], f"{p}/span0"), self.eps], f"{p}/span")
            scale = node("Div", [span, self.levels[mode]], f"{p}/scale")
            ratio = node("Div", [low, scale], f"{p}/low-in-steps")
            point_f = node("Round", [node("Neg", [ratio], f"{p}/zpf0")], f"{p}/zpf")
            point = node("Cast", [point_f], f"{p}/zp", to=TensorProto.UINT8)
            node("Reshape", [node("Mul", [scale, point_f], f"{p}/offset0"), column], f"{p}/offset")
        quantised = node("QuantizeLinear", [flat, scale, point], f"{p}/qflat", axis=0)
        node("Reshape", [quantised, shape], f"{p}/q")
        node("Reshape", [scale, column], f"{p}/rowscale")
        return p


def mode_matcher(patterns: tuple[tuple[str, RowMode], ...]) -> Callable[[str], RowMode | None]:
    """``(regex, mode)`` pairs -> the mode of the first pattern found in a node name, else None."""
    compiled = [(re.compile(pattern), mode) for pattern, mode in patterns]

    def mode_of(name: str) -> RowMode | None:
        return next((mode for pattern, mode in compiled if pattern.search(name)), None)

    return mode_of
