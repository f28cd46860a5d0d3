"""int8 on the CPU: export the transformer to ONNX once, quantise it, cache both, gate the quality.

``EMBED_QUANTIZE=int8`` serves the transformer through ONNX Runtime with int8 weights; pooling and
bge-m3's sparse and ColBERT heads still run in torch on the last hidden state it returns
(:class:`OnnxBackend` is an :class:`encoder.backend.Backend`).

* Export: ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and sequence axes),
  last hidden state out. Models over 2 GB keep their weights in one ``model.onnx.data`` beside it.
* Recipe (:data:`DEFAULT_RECIPE`, ``r2``): ONNX Runtime's transformer fusions, both feed-forward
  MatMuls int8 with a scale per token (:mod:`encoder.int8_rows`), ``quantize_dynamic`` for the rest
  but query/key/value (README "int8 on CPU").
* Long inputs: attention is ``MultiHeadAttention`` behind an ``If`` on "no padding in this batch";
  that branch passes no mask, so ONNX Runtime runs its memory-efficient (flash) CPU kernel, whose
  memory grows with the length, not its square. A padded batch whose score matrix
  (batch x heads x length^2) would pass :data:`MASKED_ATTENTION_BYTES` is split by
  :class:`OnnxBackend` into parts under it (a long input alone, unpadded).
* Cache: ``{cache_dir}/{model content fingerprint}/{fp32-e1|int8-<recipe>-...}/``, each folder with a
  ``manifest.json`` of xxh3 digests. A folder is built in a temporary sibling and renamed into
  place under an ``fcntl.flock`` lock, so two processes starting together build once and never see
  half a file; a folder whose files do not match their digests (or that ONNX Runtime cannot load)
  is rebuilt. A complete folder is read without the lock, so a volume built once
  (:func:`build_int8_cache`, ``embedding-gateway int8 build``) serves pods that mount it read-only.
* Gate: the fixed probe set (:mod:`encoder.int8_probe`) through float32 torch (stored with the
  int8 model) and through int8 at every start, long inputs included; below the floor
  :class:`QualityGateError`.

onnx and onnxruntime are imported only when int8 is asked for (the ``int8`` extra).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import xxhash

from encoder.int8_probe import PROBE_QUERIES, PROBE_VERSION, long_probe_texts, probe_texts
from encoder.int8_rows import RowMode, mode_matcher, quantize_rows
from encoder.model_files import ModelSpec
from encoder.pooling import normalize, pool

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_RECIPE",
    "PLAIN_RECIPE",
    "R1_RECIPE",
    "GateFloor",
    "GateResult",
    "Int8CacheError",
    "Int8Model",
    "OnnxBackend",
    "QualityGateError",
    "Recipe",
    "build_int8_cache",
    "cpu_int8_features",
    "expected_speedup",
    "for_this_cpu",
    "int8_dtype_problem",
    "long_input_attention",
    "measure_gate",
    "prepare_int8",
    "saturates_int8",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/embedding-gateway/onnx")
EXPORT_VERSION = "e1"  # bump when the export changes: old folders are then ignored
# Bump when the rewrite of the quantised graph changes: old int8 folders are then ignored.
# g2: attention as MultiHeadAttention behind an If (the memory-efficient kernel when unpadded).
GRAPH_VERSION = "g2"
OPSET = 17
_MODEL_FILE = "model.onnx"
_DATA_FILE = "model.onnx.data"
_REFERENCE_FILE = "reference.npy"
_LONG_REFERENCE_FILE = "reference-long.npy"
_MANIFEST = "manifest.json"
_TWO_GB = 2**31 - 1
_PROBE_MAX_TOKENS = 512
# The gate's long probes: two inputs of up to this many tokens (and half of it), each embedded alone.
# Long enough to run the long-input path of a model that takes 8,192 tokens, short enough for every
# start (memory is linear in the length there, so 2,048 tokens shows what 8,192 would need per token).
LONG_PROBE_TOKENS = 2048
# A padded batch whose attention scores (batch x heads x length^2 float32) would take more than
# this runs in parts under it; a part of one input has no padding and takes the memory-efficient
# kernel. With the CPU's default budget of 512 padded tokens a batch never comes near it.
MASKED_ATTENTION_BYTES = 64 << 20
_FLASH_OFF_VARIABLE = "ORT_DISABLE_FLASH_ATTENTION"  # ONNX Runtime's switch for its CPU flash kernel
_SC_LEVEL2_CACHE_SIZE = 191  # glibc's sysconf name: what ONNX Runtime asks for the L2 cache size


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


@dataclass(frozen=True, slots=True)
class GateFloor:
    """The least quality int8 may have against float32 on the probe set."""

    min_cosine: float = 0.98
    mean_cosine: float = 0.995
    top10_overlap: float = 0.95


@dataclass(frozen=True, slots=True)
class GateResult:
    """int8 against float32 on the probe set: per-text cosine and per-query top-10 overlap.

    ``long_cosine`` is the worst cosine of the long probes (``long_tokens`` the longest of them,
    0 when the model takes no more than the regular probes): held to the same worst-cosine floor.
    """

    worst_cosine: float
    mean_cosine: float
    top10_overlap: float
    texts: int
    long_cosine: float = 1.0
    long_tokens: int = 0

    def passes(self, floor: GateFloor) -> bool:
        return (
            self.worst_cosine >= floor.min_cosine
            and self.mean_cosine >= floor.mean_cosine
            and self.top10_overlap >= floor.top10_overlap
            and (self.long_tokens == 0 or self.long_cosine >= floor.min_cosine)
        )

    def describe(self) -> str:
        text = (
            f"worst cosine {self.worst_cosine:.4f}, mean cosine {self.mean_cosine:.4f}, "
            f"top-10 overlap {self.top10_overlap:.3f} over {self.texts} probe texts"
        )
        if self.long_tokens:
            text += f"; long inputs (up to {self.long_tokens} tokens, each alone): worst cosine {self.long_cosine:.4f}"
        return text


class Int8CacheError(RuntimeError):
    """The int8 cache cannot give this process a model: not writable and no valid prebuilt folder."""


class QualityGateError(RuntimeError):
    """int8 vectors are further from float32 than the floor allows: the server must not start."""

    def __init__(self, result: GateResult, floor: GateFloor, recipe: str) -> None:
        self.result, self.floor = result, floor
        super().__init__(
            f"int8 quality gate failed (recipe {recipe}): {result.describe()}; the floor is worst cosine "
            f">= {floor.min_cosine}, mean >= {floor.mean_cosine}, top-10 overlap >= {floor.top10_overlap}; "
            "serve float32 (EMBED_QUANTIZE=none) or lower EMBED_INT8_MIN_COSINE / EMBED_INT8_MIN_MEAN_COSINE / "
            "EMBED_INT8_MIN_TOP10_OVERLAP on purpose"
        )


def measure_gate(reference: np.ndarray, candidate: np.ndarray, queries: int = len(PROBE_QUERIES)) -> GateResult:
    """Compare two ``(texts, dim)`` arrays whose first ``queries`` rows are queries, the rest documents."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    got = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(1e-12)
    cosines = np.sum(ref * got, axis=1)
    k = min(10, len(ref) - queries)
    top_ref = np.argsort(-(ref[:queries] @ ref[queries:].T), axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-(got[:queries] @ got[queries:].T), axis=1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref.tolist(), top_got.tolist(), strict=True)])
    return GateResult(float(cosines.min()), float(cosines.mean()), float(overlap), len(ref))


class OnnxBackend:
    """An ONNX Runtime CPU session over an exported transformer (float32 or int8 weights).

    The CPU memory arena is off: with a new sequence length in nearly every batch the arena only
    grows to the largest batch seen and keeps it, while ``malloc`` gives memory back (README's
    int8 section has the figures). Memory patterns are off too: they only help fixed shapes. The
    intra-op threads do not spin-wait for the next kernel: in the server they share the cores with
    the event loop and the tokenizer, and spinning took those cores (over HTTP, 32-text requests at
    concurrency 4: 44-60 texts/s spinning, 63-66 not; README "int8 on CPU").

    ``heads`` (the model's attention heads; 0: unknown) bounds a padded batch's attention: the
    masked kernel holds batch x heads x length^2 float32 scores, so a padded batch over
    ``attention_bytes`` runs in parts under it, longest first, each cut to its own longest; a part
    of one input has no padding and takes the memory-efficient kernel (:data:`DEFAULT_RECIPE`).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        threads: int,
        *,
        arena: bool = False,
        heads: int = 0,
        attention_bytes: int = MASKED_ATTENTION_BYTES,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = model_path
        self.threads = threads
        self.heads = heads
        self.attention_bytes = attention_bytes
        self.session: Any = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        batch, longest = input_ids.shape
        if batch > 1 and self._scores_bytes(batch, longest) > self.attention_bytes and not attention_mask.all():
            return torch.from_numpy(self._in_parts(input_ids, attention_mask))
        return torch.from_numpy(self._run(input_ids, attention_mask))

    def _scores_bytes(self, batch: int, length: int) -> int:
        return batch * self.heads * length * length * 4

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        outputs = self.session.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(outputs[0], dtype=np.float32)

    def _in_parts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The batch in parts under the score budget, longest rows first; padding rows are zeros."""
        lengths = attention_mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable").tolist()
        parts: list[list[int]] = []
        for row in order:  # a part's longest is its first row: a row fits while the part's scores do
            if parts and self._scores_bytes(len(parts[-1]) + 1, int(lengths[parts[-1][0]])) <= self.attention_bytes:
                parts[-1].append(row)
            else:
                parts.append([row])
        out: np.ndarray | None = None
        for part in parts:
            width = max(1, int(lengths[part[0]]))
            hidden = self._run(
                np.ascontiguousarray(input_ids[part, :width]), np.ascontiguousarray(attention_mask[part, :width])
            )
            if out is None:
                out = np.zeros((len(lengths), input_ids.shape[1], hidden.shape[-1]), dtype=np.float32)
            out[part, :width] = hidden
        assert out is not None  # at least one part: batch > 1
        return out


@dataclass(frozen=True, slots=True)
class Int8Model:
    """What :func:`prepare_int8` gives the encoder, and what the start log reports."""

    backend: OnnxBackend
    recipe: Recipe
    folder: Path
    built: bool  # False: reused from the cache
    seconds: float
    gate: GateResult
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def numerics(self) -> str:
        return f"onnxruntime:int8:{self.recipe.name}"


# --- CPU features ---------------------------------------------------------------------------------
_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_int8_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The int8-relevant flags of this CPU, best first (empty where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in _INT8_FLAGS if flag in flags]


def saturates_int8(features: Sequence[str], machine: str | None = None) -> bool:
    """Does this CPU's int8 GEMM saturate on full-range int8 weights? On x86 without VNNI or AMX,
    ONNX Runtime multiplies uint8 x int8 with ``(v)pmaddubsw``, which adds each pair of products in
    16 bits: 255 x 127 x 2 overflows it, 255 x 63 x 2 does not (hence ``reduce_range``)."""
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    return x86 and not any(flag in features for flag in ("amx_int8", "avx512_vnni", "avx_vnni"))


def for_this_cpu(recipe: Recipe, features: Sequence[str] | None = None, machine: str | None = None) -> Recipe:
    """``recipe`` as this CPU must run it: with 7-bit weights (``reduce_range``, name ``<name>-7bit``:
    another cache folder and cache namespace) where its int8 GEMM would saturate on 8-bit ones."""
    features = cpu_int8_features() if features is None else features
    if recipe.reduce_range or not saturates_int8(features, machine):
        return recipe
    return replace(recipe, name=f"{recipe.name}-7bit", reduce_range=True)


def expected_speedup(features: Sequence[str]) -> str:
    """What int8 should give over float32 with these CPU flags, from our measurements."""
    if "amx_int8" in features:
        return (
            "AMX int8: ONNX Runtime's int8 GEMMs run on AMX or VNNI; expect at least the VNNI figure "
            "(not measured here); measure with python -m bench.int8"
        )
    if "avx512_vnni" in features or "avx_vnni" in features:
        return (
            "VNNI: recipe r2 measured 1.82x torch float32 in-process and 1.57x through the server on a quiet "
            "2-core AMD EPYC with AVX-512 VNNI (all-MiniLM-L6-v2); measure with python -m bench.int8"
        )
    if "avx2" in features:
        return (
            "AVX2 without VNNI: weights at 7 bits (recipe r2-7bit; 8-bit ones saturate there); measured 1.18x "
            "torch float32 in-process on a quiet 2-core AMD EPYC with AVX2 only (all-MiniLM-L6-v2); "
            "measure with python -m bench.int8 before switching"
        )
    return "no AVX2: int8 is unlikely to help; keep float32"


# --- the cache --------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, info: dict[str, Any]) -> None:
    files = {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MANIFEST}
    (folder / _MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True))


def artifact_ok(folder: Path) -> bool:
    """Does ``folder`` hold every file its manifest lists, byte for byte?"""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        return _MODEL_FILE in files and all(_digest(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(root: Path, name: str, build: Any) -> Path:
    """Build ``root/name`` with ``build(tmp_folder)`` into a temporary sibling, then rename it in.

    Called with the lock held, so any ``.tmp-*`` sibling is a leftover of a crashed builder.
    """
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is as readable as a file
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- export and quantisation ------------------------------------------------------------------------
class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden


def load_float_model(spec: ModelSpec) -> torch.nn.Module:
    """The transformer in float32 with eager attention (a plain MatMul/Softmax graph to export)."""
    from transformers import AutoModel

    model: torch.nn.Module = AutoModel.from_pretrained(
        str(spec.transformer_path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def export_onnx(model: torch.nn.Module, folder: Path, pad_token_id: int) -> Path:
    """Write ``folder/model.onnx``: ids and mask in, last hidden state out, batch and length dynamic."""
    import warnings

    import onnx

    wrapper = _LastHidden(model).eval()  # eval on the wrapper too: the exporter restores its mode after
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 5, 6, 3] + [pad_token_id] * 4], dtype=torch.int64)
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [4]])).to(torch.int64)  # a padded row: trace the mask
    target = folder / _MODEL_FILE
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(target),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model.eval()
    extra = [p for p in folder.iterdir() if p.name != _MODEL_FILE]
    if extra:  # over 2 GB the exporter writes one file per tensor: gather them into one
        proto = onnx.load(str(target))
        for path in extra:
            path.unlink()
        onnx.save_model(proto, str(target), save_as_external_data=True, location=_DATA_FILE)
    return target


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


# --- the probe set ----------------------------------------------------------------------------------
def probe_ids(spec: ModelSpec, tokenizer: Any) -> list[list[int]]:
    """The probe texts as the encoder would tokenise them (cut at 512 tokens or the model's limit)."""
    texts = [text.strip() for text in probe_texts()]
    if spec.do_lower_case:
        texts = [text.lower() for text in texts]
    limit = min(spec.max_tokens, _PROBE_MAX_TOKENS)
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit, verbose=False)
    ids: list[list[int]] = encoded["input_ids"]
    return ids


def long_probe_ids(spec: ModelSpec, tokenizer: Any, tokens: int = LONG_PROBE_TOKENS) -> list[list[int]]:
    """The gate's long probes: two inputs cut at ``tokens`` and half of it (at most the model's limit),
    none when the model takes no more than the regular probes already have (512 tokens)."""
    longest = min(spec.max_tokens, tokens)
    if longest <= _PROBE_MAX_TOKENS:
        return []
    ids: list[list[int]] = []
    for raw, limit in zip(long_probe_texts(longest * 12), (longest, longest // 2), strict=True):
        text = raw.strip().lower() if spec.do_lower_case else raw.strip()
        encoded = tokenizer([text], add_special_tokens=True, truncation=True, max_length=limit, verbose=False)
        ids.append(encoded["input_ids"][0])
    return ids


def embed_ids(forward: Any, ids: list[list[int]], spec: ModelSpec, pad_token_id: int, batch: int = 16) -> np.ndarray:
    """Pooled, normalised vectors of ``ids`` with ``forward(ids, mask) -> hidden`` (length-sorted batches)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), spec.dim), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        longest = max(len(ids[i]) for i in rows)
        input_ids = np.full((len(rows), longest), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        with torch.inference_mode():
            hidden = forward(input_ids, mask)
            vectors = normalize(pool(hidden.float(), torch.from_numpy(mask), spec.pooling))
        out[rows] = vectors.numpy()
    return out


def torch_forward(model: torch.nn.Module) -> Any:
    def forward(input_ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            hidden: torch.Tensor = model(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)
            ).last_hidden_state
        return hidden

    return forward


def measure_long(reference: np.ndarray, candidate: np.ndarray, ids: list[list[int]]) -> tuple[float, int]:
    """Worst cosine of the long probes and their longest length (``(1.0, 0)`` without any)."""
    if not ids:
        return 1.0, 0
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    got = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(1e-12)
    return float(np.sum(ref * got, axis=1).min()), max(map(len, ids))


# --- the environment ---------------------------------------------------------------------------------
_HALF_DTYPES = {"float16", "fp16", "half", "bfloat16", "bf16"}


def int8_dtype_problem(dtype: str) -> str | None:
    """Why ``dtype`` cannot go with int8, as one line (``None``: auto or float32 are fine).

    int8 computes in float32 around its int8 weights, and ONNX Runtime returns a float32 hidden
    state: a half dtype would apply to nothing but bge-m3's sparse and ColBERT heads, which then fail
    on that float32 tensor (a 500 per request), and no cache namespace would say it.
    """
    name = dtype.strip().lower()
    if name not in _HALF_DTYPES:
        return None
    return (
        f"{name} does not go with int8: int8 computes in float32 around its int8 weights on the CPU "
        "(bge-m3's sparse and ColBERT heads included); set it to auto or float32, or serve without int8"
    )


def _l2_cache_bytes() -> int | None:
    """This CPU's L2 cache size as ONNX Runtime reads it on Linux (glibc's sysconf); None: not asked."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.sysconf.restype = ctypes.c_long
        return int(libc.sysconf(_SC_LEVEL2_CACHE_SIZE))
    except (OSError, AttributeError):
        return None


def long_input_attention() -> str:
    """How int8 attends long inputs here, for the start log: memory-efficient, or why not.

    ONNX Runtime's CPU flash kernel sizes its blocks from the L2 cache size and is off where it
    cannot read one (it asks glibc's sysconf on Linux) or where ``ORT_DISABLE_FLASH_ATTENTION`` is
    set; then an input's attention scores take heads x length^2 x 4 bytes (bge-m3, 8,192 tokens: 4 GB).
    """
    setting = os.environ.get(_FLASH_OFF_VARIABLE, "").strip().lower()
    if setting not in ("", "0", "false"):
        return (
            f"NOT memory-efficient: {_FLASH_OFF_VARIABLE}={setting} turns ONNX Runtime's flash kernel off, so one "
            "input's attention takes heads x length^2 x 4 bytes; unset it, or cap EMBED_MAX_INPUT_TOKENS"
        )
    l2 = _l2_cache_bytes()
    if l2 is not None and l2 <= 0:
        return (
            "NOT memory-efficient: ONNX Runtime cannot read this CPU's L2 cache size (sysconf), so its flash "
            "kernel is off and one input's attention takes heads x length^2 x 4 bytes; cap EMBED_MAX_INPUT_TOKENS "
            "or serve float32"
        )
    where = f"L2 {l2 // 1024} KiB" if l2 else "L2 size not checked on this platform"
    return f"memory-efficient (ONNX Runtime's flash kernel for unpadded batches; {where})"


# --- putting it together ----------------------------------------------------------------------------
def prepare_int8(
    spec: ModelSpec,
    tokenizer: Any,
    *,
    cache_dir: Path | str | None = None,
    threads: int = 1,
    floor: GateFloor | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
    adapt: bool = True,
) -> Int8Model:
    """The int8 backend for ``spec``: reused from the cache or built (export, quantise), then gated.

    Raises :class:`QualityGateError` when the probe set says int8 is too far from float32, and
    :class:`Int8CacheError` when the cache holds no valid model and cannot be written (a read-only
    volume: build it first with :func:`build_int8_cache`). ``recipe`` is adapted to this CPU first
    (:func:`for_this_cpu`) unless ``adapt`` is false. A complete, valid folder is used without the
    lock: folders are only ever renamed into place whole, so a reader never sees half of one.
    """
    started = time.perf_counter()
    recipe = for_this_cpu(recipe) if adapt else recipe
    floor = floor or GateFloor()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / spec.fingerprint()
    int8_name = f"int8-{recipe.name}-{EXPORT_VERSION}-{GRAPH_VERSION}-{PROBE_VERSION}"
    fp32_name = f"fp32-{EXPORT_VERSION}"
    ids = probe_ids(spec, tokenizer)
    long_ids = long_probe_ids(spec, tokenizer)
    steps: dict[str, float] = {}
    folder = root / int8_name
    backend = _load_checked(folder, threads, quiet=True)
    built = False
    if backend is None:
        with _locked(root, int8_name):
            backend = _load_checked(folder, threads)
            if backend is None:
                built = True
                backend = _build(
                    root=root,
                    fp32_name=fp32_name,
                    int8_name=int8_name,
                    spec=spec,
                    ids=ids,
                    long_ids=long_ids,
                    pad=pad,
                    recipe=recipe,
                    steps=steps,
                    threads=threads,
                )
    reference = np.load(folder / _REFERENCE_FILE)
    gate_started = time.perf_counter()
    result = measure_gate(reference, embed_ids(backend.forward, ids, spec, pad))
    if long_ids:  # each alone, as the batcher serves a long input on the CPU: the unpadded kernel
        long_reference = np.load(folder / _LONG_REFERENCE_FILE)
        long_cosine, long_tokens = measure_long(
            long_reference, embed_ids(backend.forward, long_ids, spec, pad, batch=1), long_ids
        )
        result = replace(result, long_cosine=long_cosine, long_tokens=long_tokens)
    steps["gate"] = time.perf_counter() - gate_started
    prepared = Int8Model(backend, recipe, folder, built, time.perf_counter() - started, result, steps)
    logger.info(
        "int8 model %s in %.1fs (%s) at %s; gate: %s; attention for long inputs: %s",
        "built" if built else "reused",
        prepared.seconds,
        ", ".join(f"{name} {seconds:.1f}s" for name, seconds in steps.items()),
        folder,
        result.describe(),
        long_input_attention(),
    )
    if not result.passes(floor):
        raise QualityGateError(result, floor, recipe.name)
    return prepared


def _load_checked(folder: Path, threads: int, *, quiet: bool = False) -> OnnxBackend | None:
    if not artifact_ok(folder):
        if folder.exists() and not quiet:
            logger.warning("int8 cache %s is incomplete or corrupt: rebuilding it", folder)
        return None
    try:
        heads = int(json.loads((folder / _MANIFEST).read_text()).get("heads", 0))
        return OnnxBackend(folder / _MODEL_FILE, threads, heads=heads)
    except Exception as exc:  # ONNX Runtime raises its own types for a file it cannot load
        if not quiet:
            logger.warning("int8 cache %s does not load (%s): rebuilding it", folder, exc)
        return None


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Hold ``root/.lock`` (only builders take it); a cache that cannot be written is one clear error."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = (root / ".lock").open("a+")
    except OSError as exc:
        raise Int8CacheError(
            f"the int8 cache {root} cannot be written ({exc.strerror or exc}) and holds no complete, valid {name} "
            "(missing, incomplete or corrupt): build it onto that volume once with `embedding-gateway int8 build` "
            "(same EMBED_MODEL, EMBED_REVISION and EMBED_ONNX_CACHE_DIR; README, int8 on CPU)"
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _build(
    *,
    root: Path,
    fp32_name: str,
    int8_name: str,
    spec: ModelSpec,
    ids: list[list[int]],
    long_ids: list[list[int]],
    pad: int,
    recipe: Recipe,
    steps: dict[str, float],
    threads: int,
) -> OnnxBackend:
    clock = time.perf_counter()
    model = load_float_model(spec)
    steps["load"] = time.perf_counter() - clock
    config: Any = model.config
    shape = Shape(heads=int(config.num_attention_heads), hidden=int(config.hidden_size))
    fp32 = root / fp32_name
    try:
        if not artifact_ok(fp32):
            clock = time.perf_counter()

            def export(tmp: Path) -> None:
                export_onnx(model, tmp, pad)
                _write_manifest(tmp, {"export": EXPORT_VERSION, "opset": OPSET, "torch": torch.__version__})

            _publish(root, fp32_name, export)
            steps["export"] = time.perf_counter() - clock

        def build(tmp: Path) -> None:
            clock = time.perf_counter()
            treated = quantize(fp32 / _MODEL_FILE, tmp / _MODEL_FILE, recipe, shape)
            steps["quantise"] = time.perf_counter() - clock
            clock = time.perf_counter()
            np.save(tmp / _REFERENCE_FILE, embed_ids(torch_forward(model), ids, spec, pad))
            if long_ids:
                np.save(tmp / _LONG_REFERENCE_FILE, embed_ids(torch_forward(model), long_ids, spec, pad, batch=1))
            steps["reference"] = time.perf_counter() - clock
            info = {"recipe": recipe.name, "probe": PROBE_VERSION, "graph": GRAPH_VERSION, "heads": shape.heads}
            _write_manifest(tmp, {**info, **treated})

        folder = _publish(root, int8_name, build)
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        raise Int8CacheError(f"cannot write the int8 cache at {root}: {exc}") from exc
    return OnnxBackend(folder / _MODEL_FILE, threads, heads=shape.heads)


# --- the build command ------------------------------------------------------------------------------
def build_int8_cache(
    model: str,
    *,
    cache_dir: Path | str | None = None,
    revision: str | None = None,
    threads: int | None = None,
    floor: GateFloor | None = None,
    all_variants: bool = False,
    out: TextIO | None = None,
) -> int:
    """``embedding-gateway int8 build``: export, quantise and gate ``model`` into ``cache_dir`` once.

    Run it as a Job (or an init container) onto the volume the pods then mount read-only at
    ``EMBED_ONNX_CACHE_DIR``; with the same model, revision and cache folder the pods find a
    complete folder and only gate it at start. It builds the variant for this CPU (8-bit weights,
    or 7-bit where the CPU's int8 GEMM has no VNNI); ``all_variants`` builds both, for pods that
    may land on either kind of node (a variant this CPU would compute wrongly is built but not
    gated here: the pods gate it at start). Prints one line per folder; returns the exit code: 0,
    or 2 when a gate fails or the cache cannot be written (the reason on stderr, one line).
    """
    from transformers import AutoTokenizer

    from encoder.device import configure_cpu_threads
    from encoder.model_files import read_model_spec, resolve_model_dir

    out = out or sys.stdout
    threads = configure_cpu_threads(threads)
    spec = read_model_spec(resolve_model_dir(model, revision))
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    here = for_this_cpu(DEFAULT_RECIPE)
    recipes = [here]
    if all_variants:
        recipes += [r for r in (DEFAULT_RECIPE, for_this_cpu(DEFAULT_RECIPE, ["avx2"], "x86_64")) if r != here]
    no_floor = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)
    for recipe in recipes:
        faithful = recipe.reduce_range or not saturates_int8(cpu_int8_features())
        try:
            prepared = prepare_int8(
                spec,
                tokenizer,
                cache_dir=cache_dir,
                threads=threads,
                floor=floor if faithful else no_floor,
                recipe=recipe,
                adapt=False,
            )
        except (QualityGateError, Int8CacheError) as exc:
            print(f"embedding-gateway: int8 build failed: {exc}", file=sys.stderr)
            return 2
        gate = f"gate: {prepared.gate.describe()}" if faithful else "not gated here (this CPU's int8 GEMM saturates)"
        size = sum(p.stat().st_size for p in prepared.folder.iterdir() if p.is_file())
        print(
            f"int8 {recipe.name}: {'built' if prepared.built else 'reused'} {prepared.folder} "
            f"({size / 1e6:.0f} MB, {prepared.seconds:.1f}s); {gate}",
            file=out,
        )
    print(
        f"done: mount {Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()} read-only at EMBED_ONNX_CACHE_DIR", file=out
    )
    return 0
