"""The micro-batcher's queue with a zero-cost encoder: fair turns, planning work, supervision.

``_FreeEncoder`` answers at once with zero vectors, so only the batcher itself is exercised. Each
input's first token id marks its tenant, so a test reads who got which batch from the encoder's
record. With ``stepped=True`` every forward pass waits for a permit: the test releases passes one
at a time. The worker plans the next batch in the same loop step that finishes a batch, so once
the observer has seen ``k`` batches, batch ``k + 1`` is already chosen from what was queued then.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from encoder.batcher import DENSE_ONLY, BatcherEvent, BatchReport, MicroBatcher, WorkerCrashedError
from encoder.kinds import Outputs
from tests.gates import Recorder

MARKS = {1: "b", 2: "x", 3: "z"}
MARK_OF = {name: mark for mark, name in MARKS.items()}


class _FreeEncoder:
    """Encoder-like: ``encode`` returns zero vectors at once (after a permit when stepped)."""

    torch_device = torch.device("cpu")
    dim = 4

    def __init__(self, *, stepped: bool = False) -> None:
        self.batches: list[list[list[int]]] = []
        self.entered = 0
        self.permits = threading.Semaphore(0) if stepped else None

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered += 1
        if self.permits is not None:
            self.permits.acquire(timeout=10)
        self.batches.append([list(ids) for ids in token_ids])
        return np.zeros((len(token_ids), self.dim), dtype=np.float32)

    def owners(self, batches: slice) -> list[list[str]]:
        return [[MARKS[ids[0]] for ids in batch] for batch in self.batches[batches]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _started(encoder: Any, **kwargs: Any) -> MicroBatcher:
    # The queue's own order, one pass at a time: pipelined, one batch more is taken while a pass runs
    # (formed from what was queued then), which tests/unit/test_batcher_pipeline.py covers.
    kwargs.setdefault("pipeline_depth", 1)
    batcher = MicroBatcher(encoder, observer=Recorder(), **kwargs)
    await batcher.start()
    return batcher


def _seen(batcher: MicroBatcher) -> Recorder:
    recorder = batcher.observer
    assert isinstance(recorder, Recorder)
    return recorder


async def _until(condition: Callable[[], bool], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batcher"
        await asyncio.sleep(0.001)


async def _call(batcher: MicroBatcher, tenant: str, texts: list[str]) -> list[Outputs]:
    """Three-token inputs marked with their tenant: all of one length, so only fairness orders them."""
    return await batcher.embed(texts, [[MARK_OF[tenant], 5, 5] for _ in texts], tenant=tenant)


async def _hold(batcher: MicroBatcher, encoder: _FreeEncoder) -> asyncio.Task[list[Outputs]]:
    """Start a one-text call of tenant z and return once its pass waits for a permit."""
    blocker = asyncio.create_task(_call(batcher, "z", ["hold the thread"]))
    await _until(lambda: encoder.entered == 1)
    return blocker


async def _returning_tenant_share(
    first_visit: Callable[[MicroBatcher], Awaitable[asyncio.Task[list[Outputs]] | None]],
) -> list[list[str]]:
    """Tenant b queues 20 inputs; tenant x makes ``first_visit`` (work that never computes for x);
    b gets five passes alone; then x comes back with 6 inputs. Returns who got the 4 passes
    planned after x came back (batches of 2)."""
    encoder = _FreeEncoder(stepped=True)
    batcher = await _started(encoder, max_batch_size=2)
    try:
        blocker = await _hold(batcher, encoder)
        bulk = asyncio.create_task(_call(batcher, "b", [f"b{i}" for i in range(20)]))
        await _until(lambda: batcher.queue_tokens == 60 + 3)
        visit = await first_visit(batcher)
        assert encoder.permits is not None
        encoder.permits.release(6)  # the blocker and five of b's passes, while x is away
        await _until(lambda: _seen(batcher).batches == 6)
        if visit is not None:
            await asyncio.wait_for(visit, 1)  # over before x comes back
        # The seventh pass (b's) is already planned; x is back for everything after it.
        back = asyncio.create_task(_call(batcher, "x", [f"x{i}" for i in range(6)]))
        await _until(lambda: batcher.queue_tokens >= 6 * 3)
        encoder.permits.release(100)
        await asyncio.wait_for(asyncio.gather(bulk, back, blocker), 10)
        return encoder.owners(slice(7, 11))
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_tenant_whose_request_was_all_deduplicated_gets_its_fair_share_when_it_returns() -> None:
    async def deduplicated(batcher: MicroBatcher) -> asyncio.Task[list[Outputs]]:
        # x asks for a text b already queued: x's whole request joins b's input and computes nothing.
        joined = asyncio.create_task(_call(batcher, "x", ["b0"]))
        await _until(lambda: _seen(batcher).events[BatcherEvent.DEDUPLICATED] == 1)
        return joined

    following = await _returning_tenant_share(deduplicated)
    x_inputs = sum(batch.count("x") for batch in following)
    # A fair turn is one pass in two: 4 of these 8 inputs. A stale count gave x every pass.
    assert x_inputs <= 4, following


@pytest.mark.anyio
async def test_a_tenant_cancelled_while_queued_gets_its_fair_share_when_it_returns() -> None:
    async def cancelled(batcher: MicroBatcher) -> None:
        leaving = asyncio.create_task(_call(batcher, "x", ["x-left-1", "x-left-2"]))
        await _until(lambda: batcher.queue_tokens == 63 + 6)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving

    following = await _returning_tenant_share(cancelled)
    x_inputs = sum(batch.count("x") for batch in following)
    assert x_inputs <= 4, following


@pytest.mark.anyio
async def test_dropped_inputs_are_not_counted_as_served() -> None:
    encoder = _FreeEncoder(stepped=True)
    batcher = await _started(encoder, max_batch_size=2)
    try:
        blocker = await _hold(batcher, encoder)
        bulk = asyncio.create_task(_call(batcher, "b", [f"b{i}" for i in range(20)]))
        await _until(lambda: batcher.queue_tokens == 63)
        leaving = asyncio.create_task(_call(batcher, "x", [f"x-left-{i}" for i in range(10)]))
        staying = asyncio.create_task(_call(batcher, "x", ["x-stays-1", "x-stays-2", "x-stays-3", "x-stays-4"]))
        await _until(lambda: batcher.queue_tokens == 63 + 30 + 12)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert encoder.permits is not None
        encoder.permits.release(100)
        await asyncio.wait_for(asyncio.gather(bulk, staying, blocker), 10)
        assert _seen(batcher).events[BatcherEvent.DROPPED] == 10
        first_four = encoder.owners(slice(1, 5))
        # x's 30 dropped tokens were never computed: x and b take turns from the start.
        assert sum(batch.count("x") for batch in first_four) == 4, first_four
    finally:
        await batcher.stop()


class _CheckCountingFuture(asyncio.Future[Any]):
    """Counts ``done()`` calls: how often the batcher looks at a queued input's state."""

    checks = 0

    def done(self) -> bool:
        type(self).checks += 1
        return super().done()


async def _checks_per_batch(callers: int, monkeypatch: pytest.MonkeyPatch) -> float:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_future", lambda: _CheckCountingFuture(loop=loop))
    encoder = _FreeEncoder(stepped=True)
    batcher = await _started(encoder, max_batch_size=16)
    try:
        blocker = await _hold(batcher, encoder)
        calls = [asyncio.create_task(_call(batcher, "b", [f"text {i}"])) for i in range(callers)]
        await _until(lambda: batcher.queue_tokens == 3 * (callers + 1))
        _CheckCountingFuture.checks = 0
        assert encoder.permits is not None
        encoder.permits.release(callers + 1)
        await asyncio.wait_for(asyncio.gather(blocker, *calls), 60)
        return _CheckCountingFuture.checks / (_seen(batcher).batches - 1)
    finally:
        await batcher.stop()
        monkeypatch.undo()


@pytest.mark.anyio
async def test_work_per_batch_does_not_grow_with_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    # A probe that needs no knowledge of the planner: the futures the batcher creates are asked
    # "done?" a few times in each caller's life. A batcher that scans its whole queue for every
    # batch (as the one that re-planned everything did) asks every queued input's future once per
    # batch, so its count per batch grows with the queue: 121 vs 1,641 here. Planning's own work
    # count is checked directly in test_batcher_planning.py.
    small = await _checks_per_batch(160, monkeypatch)
    large = await _checks_per_batch(3200, monkeypatch)
    assert large <= 1.5 * small, (small, large)


class _FailsOnce(Recorder):
    """An observer whose first ``batch_done`` raises: the worker crashes after a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def batch_done(self, report: BatchReport) -> None:
        super().batch_done(report)
        if self.armed:
            self.armed = False
            raise RuntimeError("injected failure after a batch")


@pytest.mark.anyio
async def test_a_crash_fails_everything_queued_not_only_the_batch_it_held() -> None:
    encoder = _FreeEncoder(stepped=True)
    batcher = MicroBatcher(encoder, max_batch_size=1, observer=_FailsOnce())  # type: ignore[arg-type]
    await batcher.start()
    try:
        blocker = await _hold(batcher, encoder)
        queued = [asyncio.create_task(_call(batcher, tenant, [f"queued {tenant}"])) for tenant in "bxz"]
        await _until(lambda: batcher.queue_tokens == 4 * 3)
        assert encoder.permits is not None
        encoder.permits.release(100)
        outcomes = await asyncio.wait_for(asyncio.gather(blocker, *queued, return_exceptions=True), 10)
        # Whatever the crashed worker left queued may hit the same fault: none of it is kept.
        assert all(isinstance(outcome, WorkerCrashedError) for outcome in outcomes), outcomes
        assert batcher.queue_tokens == 0
        assert batcher.in_flight == 0
        served = await asyncio.wait_for(_call(batcher, "b", ["served by the next worker"]), 10)
        assert served[0].dense is not None
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_planner_that_keeps_failing_backs_off_fails_the_queue_and_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = _FreeEncoder()
    batcher = await _started(encoder)
    real = batcher._next_batch
    failing = True
    raised = 0

    def broken(*args: Any) -> Any:
        nonlocal raised
        # The cap only lets a supervisor that restarts without yielding leave its loop at all.
        if failing and raised < 500:
            raised += 1
            raise RuntimeError("injected planning failure")
        return real(*args)

    monkeypatch.setattr(batcher, "_next_batch", broken)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(_call(batcher, "b", ["queued while the planner fails"]), 5)
        assert not batcher.running, "not ready while backing off"
        await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
        restarts = _seen(batcher).events[BatcherEvent.WORKER_RESTARTED]
        assert 1 <= restarts <= 5, restarts
        assert not batcher.running
        failing = False
        served = await asyncio.wait_for(_call(batcher, "b", ["served once the fault is gone"]), 10)
        assert served[0].dense is not None
        assert batcher.running
        assert batcher.queue_tokens == 0
        assert batcher.in_flight == 0
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_shared_input_moves_to_a_waiting_caller_when_its_own_caller_leaves() -> None:
    encoder = _FreeEncoder(stepped=True)
    batcher = await _started(encoder, max_batch_size=2)
    try:
        blocker = await _hold(batcher, encoder)
        owner = asyncio.create_task(_call(batcher, "x", ["shared"]))
        await _until(lambda: batcher.queue_tokens == 3 + 3)
        bulk = asyncio.create_task(_call(batcher, "b", [*(f"b{i}" for i in range(20)), "shared"]))
        await _until(lambda: _seen(batcher).events[BatcherEvent.DEDUPLICATED] == 1)
        shared = batcher._in_flight[(DENSE_ONLY, "shared")]
        assert shared.flow is not None
        assert shared.flow.tenant == "x"  # x is served sooner: it stays x's
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        assert shared.queued
        assert shared.flow.tenant == "b"  # x left: neither charged for it nor setting its pace
        assert _seen(batcher).events[BatcherEvent.DROPPED] == 0
        assert encoder.permits is not None
        encoder.permits.release(100)
        answers = await asyncio.wait_for(bulk, 10)
        await asyncio.wait_for(blocker, 10)
        assert len(answers) == 21
        assert sum(len(batch) for batch in encoder.batches) == 1 + 21  # each input computed once
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_query_equal_to_a_bulk_requests_last_text_is_served_at_the_querys_pace() -> None:
    encoder = _FreeEncoder(stepped=True)
    batcher = await _started(encoder, max_batch_size=2)
    try:
        blocker = await _hold(batcher, encoder)
        bulk = asyncio.create_task(_call(batcher, "b", [*(f"b{i}" for i in range(40)), "common"]))
        await _until(lambda: batcher.queue_tokens == 3 + 41 * 3)
        query = asyncio.create_task(_call(batcher, "x", ["common"]))
        await _until(lambda: _seen(batcher).events[BatcherEvent.DEDUPLICATED] == 1)
        assert encoder.permits is not None
        encoder.permits.release(4)  # the blocker and three passes
        await asyncio.wait_for(query, 3)  # done within them, not after twenty of b's
        encoder.permits.release(100)
        await asyncio.wait_for(asyncio.gather(bulk, blocker), 10)
    finally:
        await batcher.stop()
