"""The pipelined batcher: the next batch waits on the forward thread while a pass runs, and nothing
that held before (order, cancellation, out-of-memory splits, a supervised worker) changes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from encoder import Encoder
from encoder.batcher import BatcherEvent, BatchReport, MicroBatcher, WorkerCrashedError
from support.emulated_device import emulated_encoder
from tests.gates import GatedEncoder, Recorder, hold_forward_thread
from tests.gates import embed_dense as _embed


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _until(check: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("depth", [1, 2])
async def test_the_next_batch_waits_on_the_forward_thread_while_a_pass_runs(
    minilm_encoder: Encoder, depth: int
) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = MicroBatcher(gated, pipeline_depth=depth)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = await hold_forward_thread(batcher, gated, "the pass that runs")
        later = asyncio.create_task(_embed(batcher, ["queued while it runs", "and another"]))
        if depth == 2:
            await _until(lambda: batcher.passes_in_flight == 2, "the next pass to be handed over")
        else:
            await asyncio.sleep(0.2)
            assert batcher.passes_in_flight == 1, "one pass at a time"
        assert not first.done()
        gated.gate.set()
        np.testing.assert_allclose(await first, minilm_encoder.embed(["the pass that runs"]), atol=1e-5)
        expected = minilm_encoder.embed(["queued while it runs", "and another"])
        np.testing.assert_allclose(await later, expected, atol=1e-5)
        assert [len(call) for call in gated.calls] == [1, 2], "the later inputs went in one pass of their own"
        assert batcher.passes_in_flight == 0 and batcher.queue_tokens == 0
    finally:
        gated.gate.set()
        await batcher.stop()


@pytest.mark.anyio
async def test_every_caller_gets_its_own_vectors_in_order_under_a_pipelined_load(minilm_dir: Path) -> None:
    """300 concurrent callers of 1-5 texts (shared texts among them) on a device of 2 ms passes:
    every answer equals its texts' vectors computed alone."""
    encoder = emulated_encoder(minilm_dir, pass_ms=2)
    batcher = MicroBatcher(encoder, max_batch_size=16)
    await batcher.start()
    rng = random.Random(20)
    pool = [f"text {n} about {rng.choice(['cats', 'ships', 'tea', 'rain'])}" for n in range(120)]
    calls = [[rng.choice(pool) for _ in range(rng.randint(1, 5))] for _ in range(300)]
    try:

        async def call(texts: list[str]) -> np.ndarray:
            await asyncio.sleep(rng.random() * 0.05)
            return await _embed(batcher, texts)

        answers = await asyncio.wait_for(asyncio.gather(*(call(texts) for texts in calls)), 60)
        reference = dict(zip(pool, encoder.embed(pool), strict=True))
        for texts, got in zip(calls, answers, strict=True):
            np.testing.assert_allclose(got, np.stack([reference[text] for text in texts]), atol=1e-6)
        assert max(encoder.backend.log.sizes) > 1, "callers shared passes"  # type: ignore[attr-defined]
        assert batcher.queue_tokens == 0 and batcher.in_flight == 0
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_caller_cancelled_while_its_pass_waits_behind_the_running_one(minilm_encoder: Encoder) -> None:
    """The next batch is handed to the forward thread early; what nobody waits for any more when its
    pass begins is not computed (the promise of a dropped input holds with a pipeline too)."""
    gated = GatedEncoder(minilm_encoder)
    recorder = Recorder()
    batcher = MicroBatcher(gated, observer=recorder)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = await hold_forward_thread(batcher, gated, "running")
        leaving = asyncio.create_task(_embed(batcher, ["handed over, then abandoned", "and this one"]))
        staying = asyncio.create_task(_embed(batcher, ["handed over and wanted"]))
        await _until(lambda: batcher.passes_in_flight == 2, "the second pass to be handed over")
        leaving.cancel()
        queued = asyncio.create_task(_embed(batcher, ["still queued, then abandoned"]))
        await asyncio.sleep(0.05)
        queued.cancel()
        gated.gate.set()
        assert (await first).shape == (1, 384)
        np.testing.assert_allclose(await staying, minilm_encoder.embed(["handed over and wanted"]), atol=1e-5)
        for task in (leaving, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        await _until(lambda: batcher.in_flight == 0, "the passes to finish")
        wanted = len(minilm_encoder.tokenize(["handed over and wanted"])[0])
        assert gated.calls[1:] == [[wanted]], gated.calls
        assert recorder.events[BatcherEvent.DROPPED] == 3
        assert batcher.queue_tokens == 0
        again = await _embed(batcher, ["served afterwards"])
        np.testing.assert_allclose(again, minilm_encoder.embed(["served afterwards"]), atol=1e-5)
    finally:
        gated.gate.set()
        await batcher.stop()


@pytest.mark.anyio
async def test_out_of_memory_in_a_pass_splits_it_while_the_next_pass_waits(minilm_encoder: Encoder) -> None:
    texts = ["short", "a text of a few more words", "the poisoned input, longer than any other one here", "fine"]
    ids = minilm_encoder.tokenize(texts)
    assert [len(row) for row in ids].count(len(ids[2])) == 1, "only the poisoned input has its length"
    gated = GatedEncoder(minilm_encoder, poison_length=len(ids[2]))
    recorder = Recorder()
    batcher = MicroBatcher(gated, observer=recorder)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = await hold_forward_thread(batcher, gated, "holds the thread")
        calls = [asyncio.create_task(batcher.embed([text], [row])) for text, row in zip(texts, ids, strict=True)]
        behind = asyncio.create_task(_embed(batcher, ["after the split, and fine"]))
        await _until(lambda: batcher.passes_in_flight == 2, "the batch to be handed over")
        gated.gate.set()
        await first
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(result).__name__ for result in results] == ["list", "list", "InputFailedError", "list"]
        for text, result in zip(texts, results, strict=True):
            if isinstance(result, list):
                np.testing.assert_allclose(result[0].dense, minilm_encoder.embed([text])[0], atol=1e-5)
        np.testing.assert_allclose(await behind, minilm_encoder.embed(["after the split, and fine"]), atol=1e-5)
        assert recorder.events[BatcherEvent.OOM_SPLIT] >= 1
        assert batcher.queue_tokens == 0 and batcher.in_flight == 0
    finally:
        gated.gate.set()
        await batcher.stop()


class _CrashOnce(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.crashed = False

    def batch_done(self, report: BatchReport) -> None:
        super().batch_done(report)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("injected failure in the observer")


@pytest.mark.anyio
async def test_a_worker_crash_fails_both_passes_it_held_and_a_new_worker_serves(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    observer = _CrashOnce()
    batcher = MicroBatcher(gated, observer=observer)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = await hold_forward_thread(batcher, gated, "the worker dies answering this")
        behind = asyncio.create_task(_embed(batcher, ["handed over behind it"]))
        await _until(lambda: batcher.passes_in_flight == 2, "the second pass to be handed over")
        gated.gate.set()
        for task in (first, behind):
            with pytest.raises(WorkerCrashedError):
                await asyncio.wait_for(task, 10)
        vectors = await asyncio.wait_for(_embed(batcher, ["served by the new worker"]), 10)
        np.testing.assert_allclose(vectors, minilm_encoder.embed(["served by the new worker"]), atol=1e-5)
        assert observer.events[BatcherEvent.WORKER_RESTARTED] == 1
        assert batcher.running and batcher.queue_tokens == 0 and batcher.in_flight == 0
    finally:
        gated.gate.set()
        await batcher.stop()
