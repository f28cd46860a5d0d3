"""Issue 26 #13: what the micro-batcher's planning costs with a long queue, old against new, one run.

    .venv/bin/python -m bench.planning                       # 20,000 and 100,000 callers
    .venv/bin/python -m bench.planning --callers 20000 --old-limit 60 --freeze

N one-text callers (each its own ``embed`` call, so its own flow) are queued at once in front of a
zero-cost encoder (``encode`` returns zeros at once), so the time to serve them all is the
batcher's own: queueing, planning, answering. Token lengths are drawn from 4..64 (seeded), as
short queries are; the batch budget is the GPU default (16,384 tokens, 128 inputs), where a fast
encoder makes planning matter most.

"old" is the batcher before the incremental planner: ``encoder/batcher.py`` and
``encoder/packing.py`` as they were at commit b557e08 (``git show``, loaded as modules), which
re-sorted and re-planned the whole queue for every batch (and scanned it for every new caller);
"new" is the working tree's. Each run is a child process of its own (same imports, so the same
heap for the garbage collector to walk), killed after ``--old-limit`` seconds for the old one:
its event loop is blocked inside planning, so it could not even notice a deadline. ``--freeze``
adds a row for the new batcher after ``gc.freeze()`` (what a server can do once its model is
loaded, so that full collections stop walking torch's objects).

Also printed: forward passes, inputs per pass, padding (the share of padded tokens that are
padding), and the new planner's examined count per pass. Targets (2 cores): 20,000 callers in
<= 2 s, 100,000 in <= 10 s. Other processes on the machine skew these figures: compare rows of
one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class FreeEncoder:
    """Encoder-like, zero cost: zero vectors at once."""

    torch_device = torch.device("cpu")
    dim = 8

    def encode(self, token_ids: list[list[int]]) -> np.ndarray:
        return np.zeros((len(token_ids), self.dim), dtype=np.float32)


@dataclass
class Counted:
    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    padded: int = 0

    def batch_done(self, report: Any) -> None:
        self.batches += 1
        self.inputs += report.size
        self.tokens += report.tokens
        self.padded += report.padded_tokens

    def batcher_event(self, event: Any, count: int = 1) -> None:
        pass


# The last commit whose batcher re-planned the whole queue for every batch: the baseline.
OLD_COMMIT = "b557e08"


def _load(name: str, source: str, folder: Path) -> ModuleType:
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _old_module() -> ModuleType:
    """The batcher of :data:`OLD_COMMIT`, importing that commit's ``encoder.packing`` (the rest of
    ``encoder``, the model and output kinds, is the working tree's: the bench uses neither)."""

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    import encoder.packing as current_packing

    folder = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    old_packing = _load("old_packing", show("encoder/packing.py"), folder)
    sys.modules["encoder.packing"] = old_packing  # what the old batcher's ``from encoder.packing`` gets
    try:
        return _load("old_batcher", show("encoder/batcher.py"), folder)
    finally:
        sys.modules["encoder.packing"] = current_packing


async def _serve(module: ModuleType, callers: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ids = [[101, *([7] * rng.randint(2, 62)), 102] for _ in range(callers)]
    observer = Counted()
    batcher = module.MicroBatcher(
        FreeEncoder(), max_batch_tokens=16384, max_batch_size=128, max_queue_tokens=10**9, observer=observer
    )
    await batcher.start()
    started = time.perf_counter()
    calls = [asyncio.ensure_future(batcher.embed([f"caller {i}"], [ids[i]])) for i in range(callers)]
    await asyncio.gather(*calls)
    seconds = time.perf_counter() - started
    examined = getattr(batcher, "planning_work", None)
    await batcher.stop()
    return {
        "seconds": seconds,
        "finished": True,
        "batches": observer.batches,
        "per_batch": observer.inputs / max(1, observer.batches),
        "padding": 1 - observer.tokens / max(1, observer.padded),
        "examined": None if examined is None else examined / max(1, observer.batches),
    }


def _child(side: str, callers: int, seed: int, freeze: bool) -> None:
    """Run one measurement in this process and print it as JSON (the parent's protocol)."""
    import gc

    import encoder.batcher as new

    module = new if side == "new" else _old_module()
    if freeze:
        gc.collect()
        gc.freeze()
    print(json.dumps(asyncio.run(_serve(module, callers, seed))))


def _measure(side: str, callers: int, seed: int, limit: float, freeze: bool = False) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.planning", "--child", side, "--callers", str(callers), "--seed", str(seed)]
    if freeze:
        command.append("--freeze")
    started = time.perf_counter()  # the limit includes the child's start (imports): a few seconds
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=True)
    except subprocess.TimeoutExpired:
        return {
            "seconds": time.perf_counter() - started,
            "finished": False,
            "batches": 0,
            "per_batch": 0.0,
            "padding": 0.0,
            "examined": None,
        }
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _row(name: str, callers: int, result: dict[str, Any]) -> str:
    if not result["finished"]:
        return f"{name:11} {callers:>8,} > {result['seconds']:6.1f} s  (stopped: not finished)"
    examined = "" if result["examined"] is None else f"{result['examined']:9.1f}"
    return (
        f"{name:11} {callers:>8,} {result['seconds']:8.2f} s {result['batches']:>8,} {result['per_batch']:>7.1f} "
        f"{100 * result['padding']:>6.1f}% {examined}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--old-limit", type=float, default=60.0, help="stop the old batcher after this many seconds")
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--freeze", action="store_true", help="also time the new batcher after gc.freeze()")
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.callers[0], args.seed, args.freeze)
        return

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'':11} {'callers':>8} {'served in':>10} {'passes':>8} {'inputs':>7} {'padding':>7} {'examined/pass':>9}")
    for callers in args.callers:
        before = _measure("old", callers, args.seed, args.old_limit)
        print(_row("old", callers, before), flush=True)
        after = _measure("new", callers, args.seed, 600.0)
        print(_row("new", callers, after), flush=True)
        if args.freeze:
            print(_row("new, frozen", callers, _measure("new", callers, args.seed, 600.0, freeze=True)), flush=True)
        prefix = "" if before["finished"] else ">"
        print(f"{'':11} new is {prefix}{before['seconds'] / after['seconds']:.1f}x as fast", flush=True)


if __name__ == "__main__":
    main()
