"""Quantise an exported graph with a :class:`~encoder.int8_recipe.Recipe`: fuse, per-row, dynamic.

Three passes over the float32 ONNX graph, in order:

1. ONNX Runtime's transformer fusions (:func:`fuse_transformer`), and with ``flash`` every masked
   ``MultiHeadAttention`` put behind an ``If`` on "no padding" (:func:`branch_attention`), so an
   unpadded batch runs the memory-efficient attention kernel;
2. the recipe's per-row MatMuls, int8 with a scale per token (:mod:`encoder.int8_rows`);
3. ``quantize_dynamic`` for the remaining MatMuls, but those the recipe keeps in float32.

:func:`quantize` runs all three into a target file and returns what it treated specially (for the
cache folder's manifest). :data:`GRAPH_VERSION` names the rewrite in the cache: bump it when the
rewrite changes. onnx and onnxruntime are imported only when a graph is quantised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder.int8_recipe import Recipe
from encoder.int8_rows import mode_matcher, quantize_rows
from encoder.onnx_export import _DATA_FILE

__all__ = ["GRAPH_VERSION", "Shape", "branch_attention", "fuse_transformer", "quantize"]

logger = logging.getLogger("encoder.onnx_int8")  # int8's one logger, whichever step logs

# Bump when the rewrite of the quantised graph changes: old int8 folders are then ignored.
# g2: attention as MultiHeadAttention behind an If (the memory-efficient kernel when unpadded).
GRAPH_VERSION = "g2"


@dataclass(frozen=True, slots=True)
class Shape:
    """What the fusions need to know of the transformer."""

    heads: int
    hidden: int


def fuse_transformer(source: Path, shape: Shape, *, flash: bool = False) -> Any:
    """ONNX Runtime's transformer fusions over ``source``; returns the fused ``onnx.ModelProto``.

    ``model_type="bert"`` covers BERT and (XLM-)RoBERTa, whose layers export to the same graph; a
    pattern that does not match is left unfused, which costs speed, never correctness (the gate
    still compares with float32 torch). ``flash``: attention fuses to ``MultiHeadAttention``
    (query, key and value as three MatMuls in front of it) and each one goes behind an ``If``
    (:func:`branch_attention`).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_multi_head_attention = flash
    fused = optimize_model(
        str(source),
        model_type="bert",
        num_heads=shape.heads,
        hidden_size=shape.hidden,
        optimization_options=options,
        opt_level=0,  # python-side fusions only: the session does its own graph optimisation at load
    )
    proto = fused.model
    if flash:
        branch_attention(proto)
    return proto


def branch_attention(proto: Any, mask_input: str = "attention_mask") -> int:
    """Put every masked ``MultiHeadAttention`` node of ``proto`` behind an ``If`` on "no padding".

    ONNX Runtime's CPU ``MultiHeadAttention`` runs its memory-efficient (flash) kernel only when it
    gets no mask: then the scores are computed block by block, in memory linear in the length. The
    masked kernel - like the fused ``Attention`` one - holds all ``batch x heads x length^2`` scores
    (4 GB for one 8,192-token input of bge-m3). So each node becomes ``If(min(mask) == 1)``: the
    ``then`` branch is the same node without its mask (a batch without padding needs none), the
    ``else`` branch the node as it was. Query, key, value and their projections stay outside, so
    nothing is computed or stored twice. Returns how many nodes it branched.
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    unpadded = "attention_unpadded"
    constants = {tensor.name for tensor in graph.initializer}
    passed: set[str] = set()
    branched: list[Any] = []
    for node in graph.node:
        if node.op_type != "MultiHeadAttention" or len(node.input) < 5 or not node.input[4]:
            branched.append(node)
            continue
        # A branch reads its inputs from the outer graph. Constants go through an Identity there:
        # tools that clean a graph (quantize_dynamic's among them) drop an initializer that no
        # top-level node reads.
        for index, name in enumerate(node.input):
            if name in constants:
                if name not in passed:
                    branched.append(helper.make_node("Identity", [name], [f"{name}_outer"], name=f"{name}_Outer"))
                    passed.add(name)
                node.input[index] = f"{name}_outer"

        def branch(suffix: str, inputs: list[str], node: Any = node) -> Any:
            inner = helper.make_node(
                "MultiHeadAttention",
                inputs,
                [f"{node.name}_{suffix}"],
                name=f"{node.name}_{suffix}",
                domain=node.domain,
            )
            inner.attribute.extend(node.attribute)
            output = helper.make_tensor_value_info(f"{node.name}_{suffix}", TensorProto.FLOAT, None)
            return helper.make_graph([inner], f"{node.name}_{suffix}", [], [output])

        branched.append(
            helper.make_node(
                "If",
                [unpadded],
                list(node.output[:1]),
                name=f"{node.name}_If",
                then_branch=branch("unpadded", list(node.input[:4])),
                else_branch=branch("masked", list(node.input)),
            )
        )
    count = sum(1 for node in branched if node.op_type == "If")
    if count:
        condition = [
            helper.make_node("ReduceMin", [mask_input], ["attention_mask_min"], name="AttentionMaskMin", keepdims=0),
            helper.make_node("Cast", ["attention_mask_min"], [unpadded], name="AttentionUnpadded", to=TensorProto.BOOL),
        ]
        del graph.node[:]
        graph.node.extend([*condition, *branched])
    return count


def _save(proto: Any, path: Path, large: bool) -> None:
    import onnx

    if large:  # over 2 GB a protobuf cannot hold the weights: one data file beside the graph
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def quantize(source: Path, target: Path, recipe: Recipe, shape: Shape) -> dict[str, Any]:
    """Quantise ``source`` to ``target`` with ``recipe``; returns the nodes it treated specially.

    Fusions and per-row MatMuls go to a staging file beside ``target`` first, then
    ``quantize_dynamic`` takes what is left; the staging file is removed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = source.with_name(_DATA_FILE).exists()
    staged = source
    per_row: list[str] = []
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(max(level, logging.ERROR))  # the fusions and the quantiser log every node
    branched = 0
    try:
        if recipe.fuse or recipe.per_row:
            proto = fuse_transformer(source, shape, flash=recipe.flash) if recipe.fuse else onnx.load(str(source))
            branched = sum(1 for node in proto.graph.node if node.op_type == "If")
            if recipe.flash and not branched:
                logger.warning("int8: attention did not fuse; long inputs take memory in the square of their length")
            per_row = quantize_rows(proto, mode_matcher(recipe.per_row), weight_max=63 if recipe.reduce_range else 127)
            staged = target.with_name("staged.onnx")
            _save(proto, staged, large)
            del proto
        graph = onnx.load(str(staged), load_external_data=False).graph
        names = [node.name for node in graph.node if node.op_type in recipe.op_types]
        excluded = recipe.nodes_to_exclude(names)
        quantize_dynamic(
            staged,
            target,
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=large,
            # DefaultTensorType: shape inference cannot type the outputs of ONNX Runtime's own fused ops
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root_logger.setLevel(level)
        if staged != source:
            staged.unlink(missing_ok=True)
            staged.with_name(staged.name + ".data").unlink(missing_ok=True)
    # over 2 GB: model.onnx.data beside model.onnx
    return {"kept_float": excluded, "per_row": per_row, "attention_branched": branched}
