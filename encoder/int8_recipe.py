"""How int8 quantises a model: :class:`Recipe`, and the recipes measured (``plain``, ``r1``, ``r2``).

A recipe is the whole arithmetic of an int8 model: which graph fusions run first, which MatMuls are
int8 with a scale per token (:mod:`encoder.int8_rows`), which stay float32, and how
``quantize_dynamic`` treats the rest. Its name goes into the cache folder, ``Encoder.numerics`` and
so the cache fingerprint, so vectors of two recipes never share cache keys: change a recipe's
arithmetic, change its name. :data:`DEFAULT_RECIPE` is the one served; the others stay for
comparison (``python -m bench.int8``). How a CPU without VNNI must run a recipe is
:func:`encoder.int8_machine.for_this_cpu`; applying one to an exported graph is
:mod:`encoder.int8_quantize`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from encoder.int8_rows import RowMode

__all__ = ["DEFAULT_RECIPE", "PLAIN_RECIPE", "R1_RECIPE", "Recipe"]


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to quantise: graph fusions, per-row MatMuls, then ``quantize_dynamic`` for what is left.

    ``fuse`` runs ONNX Runtime's transformer fusions first (``Attention``, ``SkipLayerNormalization``,
    ``BiasGelu``, ``EmbedLayerNormalization``): fewer, fused float kernels around the int8 GEMMs.
    ``per_row`` holds ``(regex, mode)`` pairs: the MatMuls whose names match are quantised per token
    (:mod:`encoder.int8_rows`). ``keep_float`` holds regular expressions searched in node names kept out
    of ``quantize_dynamic``; ``{last}`` stands for the last encoder layer's index. ``flash`` (with
    ``fuse``) fuses attention as ``MultiHeadAttention`` behind an ``If``, so that a batch without
    padding runs ONNX Runtime's memory-efficient kernel (same arithmetic: float32 attention).
    The name goes into the cache folder, ``Encoder.numerics`` and so into the cache fingerprint:
    change the recipe's arithmetic, change the name.
    """

    name: str
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    keep_float: tuple[str, ...] = ()
    fuse: bool = False
    per_row: tuple[tuple[str, RowMode], ...] = ()
    flash: bool = False

    def nodes_to_exclude(self, node_names: Sequence[str]) -> list[str]:
        layers = [int(m.group(1)) for name in node_names if (m := re.search(r"/layer\.(\d+)/", name))]
        last = max(layers, default=0)
        patterns = [re.compile(p.replace("{last}", str(last))) for p in self.keep_float]
        return [name for name in node_names if any(p.search(name) for p in patterns)]


_FFN_IN = r"/intermediate/dense/MatMul$"
_FFN_OUT = r"/layer\.\d+/output/dense/MatMul$"
_SELF_ATTENTION = r"/attention/self/"

# The plain recipe from the measurements, for comparison (bench/int8.py prints it).
PLAIN_RECIPE = Recipe(name="plain-pc1", op_types=("MatMul", "Gather"))
# The first recipe that passed the gate (by keeping both feed-forward MatMuls in float): 1.15x.
R1_RECIPE = Recipe(name="r1", keep_float=(_FFN_IN, _FFN_OUT))
# Chosen (README "int8 on CPU" has the scan): one scale per tensor is what breaks the gate (outlier
# tokens), so the feed-forward MatMuls - two thirds of the work - are int8 with a scale per token:
# symmetric into the first (post-LayerNorm input), asymmetric into the second (post-GELU input, all
# but positive). The attention output projection keeps quantize_dynamic's per-tensor scale (it costs
# no quality there); query/key/value stay float32 MatMuls into ONNX Runtime's MultiHeadAttention
# kernel (int8 attention is per-tensor only there, and cost the gate's top-10 margin), which without
# padding takes memory linear in the length (issue 27: the fused Attention kernel took +4 GB for
# one 8,192-token bge-m3 input).
DEFAULT_RECIPE = Recipe(
    name="r2",
    fuse=True,
    per_row=((_FFN_IN, "symmetric"), (_FFN_OUT, "asymmetric")),
    keep_float=(_SELF_ATTENTION,),
    flash=True,
)
