"""The micro-batcher with the real all-MiniLM-L6-v2 encoder, and a gate to hold the forward thread."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from encoder import Encoder
from encoder.batcher import (
    BatcherEvent,
    BatchReport,
    InputFailedError,
    MicroBatcher,
    QueueFullError,
    WorkerCrashedError,
)
from tests.gates import GatedEncoder, Recorder
from tests.gates import embed_dense as _embed
from tests.gates import hold_forward_thread as _hold_forward_thread


async def _started(encoder: Any, **kwargs: Any) -> MicroBatcher:
    batcher = MicroBatcher(encoder, observer=Recorder(), **kwargs)
    await batcher.start()
    return batcher


def _seen(batcher: MicroBatcher) -> Recorder:
    recorder = batcher.observer
    assert isinstance(recorder, Recorder)
    return recorder


@pytest.mark.anyio
async def test_concurrent_requests_share_batches(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = await _started(gated)
    try:
        warm = await _hold_forward_thread(batcher, gated)
        requests = [[f"request {i} text {j}" for j in range(3)] for i in range(8)]
        tasks = [asyncio.create_task(_embed(batcher, texts)) for texts in requests]
        await asyncio.sleep(0.05)
        gated.gate.set()
        results = await asyncio.gather(*tasks)
        await warm
        for texts, vectors in zip(requests, results, strict=True):
            np.testing.assert_allclose(vectors, minilm_encoder.embed(texts), atol=1e-5)
        assert len(gated.calls) == 2, "the 24 inputs queued behind one batch must run as one batch"
        assert _seen(batcher).batches == 2
        assert _seen(batcher).inputs == 25
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_identical_texts_in_flight_are_computed_once(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = await _started(gated)
    try:
        gated.gate.clear()
        first = asyncio.create_task(_embed(batcher, ["same text", "only mine"]))
        second = asyncio.create_task(_embed(batcher, ["same text"]))
        await asyncio.sleep(0.05)
        gated.gate.set()
        a, b = await asyncio.gather(first, second)
        np.testing.assert_array_equal(a[0], b[0])
        assert _seen(batcher).inputs == 2
        assert _seen(batcher).events[BatcherEvent.DEDUPLICATED] == 1
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_cancelled_caller_is_dropped_before_compute(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    # One pass at a time, so all queues behind the held one (pipelined, the next batch is handed to
    # the forward thread and computed: test_batcher_pipeline.py covers that).
    batcher = await _started(gated, pipeline_depth=1)
    try:
        blocker = await _hold_forward_thread(batcher, gated)
        leaving = asyncio.create_task(_embed(batcher, ["nobody waits for me", "nor me"]))
        staying = asyncio.create_task(_embed(batcher, ["I stay"]))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await asyncio.sleep(0)
        gated.gate.set()
        await blocker
        await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        lengths = [len(ids) for ids in minilm_encoder.tokenize(["hold the thread", "I stay"])]
        assert gated.calls == [[lengths[0]], [lengths[1]]], "only 'I stay' may run after the blocker"
        assert _seen(batcher).events[BatcherEvent.DROPPED] == 2
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_full_queue_refuses_at_once(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = await _started(gated, max_queue_tokens=20)
    try:
        blocker = await _hold_forward_thread(batcher, gated)
        queued = asyncio.create_task(_embed(batcher, ["a b c d e f g h i j k l"]))
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFullError) as info:
            await _embed(batcher, ["one two three four five six seven eight nine ten"])
        assert info.value.retry_after >= 1
        assert _seen(batcher).events[BatcherEvent.REJECTED] == 1
        gated.gate.set()
        await asyncio.gather(blocker, queued)
        await _embed(batcher, ["accepted again once the queue drained"])
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_out_of_memory_splits_and_fails_only_the_culprit(minilm_encoder: Encoder) -> None:
    texts = ["short one", "another short", "word " * 40, "tiny"]
    poison = len(minilm_encoder.tokenize([texts[2]])[0])
    gated = GatedEncoder(minilm_encoder, poison_length=poison)
    batcher = await _started(gated)
    try:
        ok = [t for t in texts if t != texts[2]]
        blocker = await _hold_forward_thread(
            batcher, gated
        )  # hold the thread so that both requests land in one window, one batch
        pending = asyncio.gather(_embed(batcher, ok), _embed(batcher, [texts[2]]), return_exceptions=True)
        await asyncio.sleep(0.05)
        gated.gate.set()
        await blocker
        good, bad = await pending
        assert gated.calls[1] == sorted([len(ids) for ids in minilm_encoder.tokenize(texts)], reverse=True)
        assert isinstance(bad, InputFailedError)
        assert "out of memory" in str(bad)
        np.testing.assert_allclose(good, minilm_encoder.embed(ok), atol=1e-5)
        assert _seen(batcher).events[BatcherEvent.OOM_SPLIT] >= 1
        assert _seen(batcher).events[BatcherEvent.FAILED] == 1
    finally:
        await batcher.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_logs_summarise_batching(minilm_encoder: Encoder, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    batcher = await _started(minilm_encoder)
    batcher.summary_interval_s = 0.0
    try:
        with caplog.at_level(logging.INFO, logger="encoder.batcher"):
            await _embed(batcher, ["one text", "another text", "a third"])
        lines = [r.getMessage() for r in caplog.records if r.name == "encoder.batcher"]
        assert any("1 batches, avg 3.0 inputs" in line for line in lines), lines
    finally:
        await batcher.stop()


class _FailingObserver(Recorder):
    """Raises from ``batch_done`` ``times`` times: a failure outside the forward pass."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def batch_done(self, report: BatchReport) -> None:
        super().batch_done(report)
        if self.times > 0:
            self.times -= 1
            raise RuntimeError("injected failure in the observer")


@pytest.mark.anyio
async def test_a_crashed_worker_fails_what_it_held_and_is_replaced(
    minilm_encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    observer = _FailingObserver(times=1)
    batcher = MicroBatcher(minilm_encoder, observer=observer)
    await batcher.start()
    try:
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(_embed(batcher, ["the worker dies after this batch"]), 10)
        # Before supervision this waited forever: the worker task was dead.
        vectors = await asyncio.wait_for(_embed(batcher, ["served by the new worker"]), 10)
        np.testing.assert_allclose(vectors, minilm_encoder.embed(["served by the new worker"]), atol=1e-5)
        assert observer.events[BatcherEvent.WORKER_RESTARTED] == 1
        assert batcher.running
        assert batcher.queue_tokens == 0
        assert batcher.in_flight == 0
        crashes = [r for r in caplog.records if "worker crashed" in r.getMessage()]
        assert len(crashes) == 1, "one log line per crash"
    finally:
        await batcher.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("depth", [1, 2])
async def test_a_small_request_waits_one_batch_behind_a_bulk_one_not_all_of_it(
    minilm_encoder: Encoder, depth: int
) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = await _started(gated, max_batch_tokens=512, pipeline_depth=depth)
    try:
        blocker = await _hold_forward_thread(batcher, gated)
        bulk_texts = [f"bulk document number {i} " + "with a fair amount of words in it " * 4 for i in range(60)]
        bulk = asyncio.create_task(_embed(batcher, bulk_texts))
        await asyncio.sleep(0.02)
        small = asyncio.create_task(_embed(batcher, ["a short query"]))
        await asyncio.sleep(0.02)
        gated.gate.set()
        await small
        batches_when_small_done = _seen(batcher).batches  # finished passes (the next may have started)
        await bulk
        await blocker
        total = _seen(batcher).batches
        assert total >= 6, "the bulk request spans several micro-batches"
        # The blocker, at most one bulk batch (plus, pipelined, the one already handed to the forward
        # thread while the blocker ran), then the query: never behind the whole bulk request.
        assert batches_when_small_done <= 2 + depth, (batches_when_small_done, total)
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_tenants_take_turns(minilm_encoder: Encoder) -> None:
    gated = GatedEncoder(minilm_encoder)
    batcher = await _started(gated, max_batch_tokens=256, max_batch_size=4)
    try:
        blocker = await _hold_forward_thread(batcher, gated)
        order: list[str] = []

        async def run(tenant: str, texts: list[str]) -> None:
            await batcher.embed(texts, await batcher.tokenize(texts), tenant=tenant)
            order.append(tenant)

        a = asyncio.create_task(run("team-a", [f"team a text {i}" for i in range(16)]))
        await asyncio.sleep(0.02)
        # Team b sends many small requests after team a's bulk one; they must not all wait for it.
        b = [asyncio.create_task(run("team-b", [f"team b text {i}"])) for i in range(3)]
        await asyncio.sleep(0.02)
        gated.gate.set()
        await asyncio.gather(a, *b, blocker)
        assert order[-1] == "team-a", order
    finally:
        await batcher.stop()
