"""Putting int8 together: :func:`prepare_int8` at every start, :func:`build_int8_cache` once ahead.

:func:`prepare_int8` is what ``load_encoder(quantize="int8")`` calls: it finds this model's int8
folder in the cache (:mod:`encoder.int8_cache`) or builds it - load float32, export
(:mod:`encoder.onnx_export`), quantise (:mod:`encoder.int8_quantize`), store the float32 reference
vectors - then gates it (:mod:`encoder.int8_gate`) and returns an :class:`Int8Model`, whose
``backend`` the encoder computes with. :func:`build_int8_cache` (``embedding-gateway int8 build``)
runs the same for a volume that pods then mount read-only, one folder per CPU variant.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from encoder.int8_cache import (
    _LONG_REFERENCE_FILE,
    _NO_ROOM,
    _REFERENCE_FILE,
    DEFAULT_CACHE_DIR,
    Int8CacheError,
    _load_checked,
    _locked,
    _publish,
    _write_manifest,
    artifact_ok,
)
from encoder.int8_gate import (
    GateFloor,
    GateResult,
    QualityGateError,
    embed_ids,
    long_probe_ids,
    measure_gate,
    measure_long,
    probe_ids,
    torch_forward,
)
from encoder.int8_machine import cpu_int8_features, for_this_cpu, long_input_attention, saturates_int8
from encoder.int8_probe import PROBE_VERSION
from encoder.int8_quantize import GRAPH_VERSION, Shape, quantize
from encoder.int8_recipe import DEFAULT_RECIPE, Recipe
from encoder.model_files import ModelSpec
from encoder.onnx_backend import OnnxBackend
from encoder.onnx_export import _MODEL_FILE, EXPORT_VERSION, OPSET, export_onnx, load_float_model

__all__ = ["Int8Model", "build_int8_cache", "prepare_int8"]

logger = logging.getLogger("encoder.onnx_int8")  # int8's one logger, whichever step logs


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
