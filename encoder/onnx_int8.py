"""int8 on the CPU: export the transformer to ONNX once, quantise it, cache both, gate the quality.

``EMBED_QUANTIZE=int8`` serves the transformer through ONNX Runtime with int8 weights; pooling and
bge-m3's sparse and ColBERT heads still run in torch on the last hidden state it returns
(:class:`OnnxBackend` is an :class:`encoder.backend.Backend`).

* Export: ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and sequence axes),
  last hidden state out. Models over 2 GB keep their weights in one ``model.onnx.data`` beside it.
* Recipe (:data:`DEFAULT_RECIPE`): ``quantize_dynamic`` per-channel, QInt8 weights, MatMul only,
  with the nodes a sensitivity scan found fragile kept in float (README "int8 on CPU").
* Cache: ``{cache_dir}/{model content fingerprint}/{fp32-e1|int8-<recipe>}/``, each folder with a
  ``manifest.json`` of xxh3 digests. A folder is built in a temporary sibling and renamed into
  place under an ``fcntl.flock`` lock, so two processes starting together build once and never see
  half a file; a folder whose files do not match their digests (or that ONNX Runtime cannot load)
  is rebuilt.
* Gate: the fixed probe set (:mod:`encoder.int8_probe`) through float32 torch (stored with the
  int8 model) and through int8 at every start; below the floor :class:`QualityGateError`.

onnx and onnxruntime are imported only when int8 is asked for (the ``int8`` extra).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from encoder.int8_probe import PROBE_QUERIES, PROBE_VERSION, probe_texts
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
    "Int8Model",
    "OnnxBackend",
    "QualityGateError",
    "Recipe",
    "cpu_int8_features",
    "expected_speedup",
    "for_this_cpu",
    "measure_gate",
    "prepare_int8",
    "saturates_int8",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/embedding-gateway/onnx")
EXPORT_VERSION = "e1"  # bump when the export changes: old folders are then ignored
OPSET = 17
_MODEL_FILE = "model.onnx"
_DATA_FILE = "model.onnx.data"
_REFERENCE_FILE = "reference.npy"
_MANIFEST = "manifest.json"
_TWO_GB = 2**31 - 1
_PROBE_MAX_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to quantise: graph fusions, per-row MatMuls, then ``quantize_dynamic`` for what is left.

    ``fuse`` runs ONNX Runtime's transformer fusions first (``Attention``, ``SkipLayerNormalization``,
    ``BiasGelu``, ``EmbedLayerNormalization``): fewer, fused float kernels around the int8 GEMMs.
    ``per_row`` holds ``(regex, mode)`` pairs: the MatMuls whose names match are quantised per token
    (:mod:`encoder.int8_rows`). ``keep_float`` holds regular expressions searched in node names kept out
    of ``quantize_dynamic``; ``{last}`` stands for the last encoder layer's index. The name goes into
    the cache folder, ``Encoder.numerics`` and so into the cache fingerprint: change the recipe,
    change the name.
    """

    name: str
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    keep_float: tuple[str, ...] = ()
    fuse: bool = False
    per_row: tuple[tuple[str, RowMode], ...] = ()

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
# no quality there); query/key/value stay float inside ONNX Runtime's fused Attention kernel (int8
# there is per-tensor only, and cost the gate's top-10 margin).
DEFAULT_RECIPE = Recipe(
    name="r2",
    fuse=True,
    per_row=((_FFN_IN, "symmetric"), (_FFN_OUT, "asymmetric")),
    keep_float=(_SELF_ATTENTION,),
)


@dataclass(frozen=True, slots=True)
class GateFloor:
    """The least quality int8 may have against float32 on the probe set."""

    min_cosine: float = 0.98
    mean_cosine: float = 0.995
    top10_overlap: float = 0.95


@dataclass(frozen=True, slots=True)
class GateResult:
    """int8 against float32 on the probe set: per-text cosine and per-query top-10 overlap."""

    worst_cosine: float
    mean_cosine: float
    top10_overlap: float
    texts: int

    def passes(self, floor: GateFloor) -> bool:
        return (
            self.worst_cosine >= floor.min_cosine
            and self.mean_cosine >= floor.mean_cosine
            and self.top10_overlap >= floor.top10_overlap
        )

    def describe(self) -> str:
        return (
            f"worst cosine {self.worst_cosine:.4f}, mean cosine {self.mean_cosine:.4f}, "
            f"top-10 overlap {self.top10_overlap:.3f} over {self.texts} probe texts"
        )


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
    """

    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int, *, arena: bool = False) -> None:
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
        self.session: Any = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        outputs = self.session.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))


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


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def fuse_transformer(source: Path, shape: Shape) -> Any:
    """ONNX Runtime's transformer fusions over ``source``; returns the fused ``onnx.ModelProto``.

    ``model_type="bert"`` covers BERT and (XLM-)RoBERTa, whose layers export to the same graph; a
    pattern that does not match is left unfused, which costs speed, never correctness (the gate
    still compares with float32 torch).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(
        str(source),
        model_type="bert",
        num_heads=shape.heads,
        hidden_size=shape.hidden,
        optimization_options=FusionOptions("bert"),
        opt_level=0,  # python-side fusions only: the session does its own graph optimisation at load
    )
    return fused.model


def _save(proto: Any, path: Path, large: bool) -> None:
    import onnx

    if large:  # over 2 GB a protobuf cannot hold the weights: one data file beside the graph
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def quantize(source: Path, target: Path, recipe: Recipe, shape: Shape) -> dict[str, list[str]]:
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
    try:
        if recipe.fuse or recipe.per_row:
            proto = fuse_transformer(source, shape) if recipe.fuse else onnx.load(str(source))
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
    return {"kept_float": excluded, "per_row": per_row}  # over 2 GB: model.onnx.data beside model.onnx


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


# --- putting it together ----------------------------------------------------------------------------
def prepare_int8(
    spec: ModelSpec,
    tokenizer: Any,
    *,
    cache_dir: Path | str | None = None,
    threads: int = 1,
    floor: GateFloor | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
) -> Int8Model:
    """The int8 backend for ``spec``: reused from the cache or built (export, quantise), then gated.

    Raises :class:`QualityGateError` when the probe set says int8 is too far from float32.
    ``recipe`` is adapted to this CPU first (:func:`for_this_cpu`).
    """
    started = time.perf_counter()
    recipe = for_this_cpu(recipe)
    floor = floor or GateFloor()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / spec.fingerprint()
    int8_name, fp32_name = f"int8-{recipe.name}-{EXPORT_VERSION}-{PROBE_VERSION}", f"fp32-{EXPORT_VERSION}"
    ids = probe_ids(spec, tokenizer)
    steps: dict[str, float] = {}
    built = False
    with _locked(root):
        folder = root / int8_name
        backend = _load_checked(folder, threads)
        if backend is None:
            built = True
            backend = _build(
                root=root,
                fp32_name=fp32_name,
                int8_name=int8_name,
                spec=spec,
                ids=ids,
                pad=pad,
                recipe=recipe,
                steps=steps,
                threads=threads,
            )
    reference = np.load(folder / _REFERENCE_FILE)
    gate_started = time.perf_counter()
    result = measure_gate(reference, embed_ids(backend.forward, ids, spec, pad))
    steps["gate"] = time.perf_counter() - gate_started
    prepared = Int8Model(backend, recipe, folder, built, time.perf_counter() - started, result, steps)
    logger.info(
        "int8 model %s in %.1fs (%s) at %s; gate: %s",
        "built" if built else "reused",
        prepared.seconds,
        ", ".join(f"{name} {seconds:.1f}s" for name, seconds in steps.items()),
        folder,
        result.describe(),
    )
    if not result.passes(floor):
        raise QualityGateError(result, floor, recipe.name)
    return prepared


def _load_checked(folder: Path, threads: int) -> OnnxBackend | None:
    if not artifact_ok(folder):
        if folder.exists():
            logger.warning("int8 cache %s is incomplete or corrupt: rebuilding it", folder)
        return None
    try:
        return OnnxBackend(folder / _MODEL_FILE, threads)
    except Exception as exc:  # ONNX Runtime raises its own types for a file it cannot load
        logger.warning("int8 cache %s does not load (%s): rebuilding it", folder, exc)
        return None


def _build(
    *,
    root: Path,
    fp32_name: str,
    int8_name: str,
    spec: ModelSpec,
    ids: list[list[int]],
    pad: int,
    recipe: Recipe,
    steps: dict[str, float],
    threads: int,
) -> OnnxBackend:
    clock = time.perf_counter()
    model = load_float_model(spec)
    steps["load"] = time.perf_counter() - clock
    fp32 = root / fp32_name
    if not artifact_ok(fp32):
        clock = time.perf_counter()

        def export(tmp: Path) -> None:
            export_onnx(model, tmp, pad)
            _write_manifest(tmp, {"export": EXPORT_VERSION, "opset": OPSET, "torch": torch.__version__})

        _publish(root, fp32_name, export)
        steps["export"] = time.perf_counter() - clock

    def build(tmp: Path) -> None:
        clock = time.perf_counter()
        config: Any = model.config
        shape = Shape(heads=int(config.num_attention_heads), hidden=int(config.hidden_size))
        treated = quantize(fp32 / _MODEL_FILE, tmp / _MODEL_FILE, recipe, shape)
        steps["quantise"] = time.perf_counter() - clock
        clock = time.perf_counter()
        np.save(tmp / _REFERENCE_FILE, embed_ids(torch_forward(model), ids, spec, pad))
        steps["reference"] = time.perf_counter() - clock
        _write_manifest(tmp, {"recipe": recipe.name, "probe": PROBE_VERSION, **treated})

    folder = _publish(root, int8_name, build)
    return OnnxBackend(folder / _MODEL_FILE, threads)
