"""The micro-batcher's worker: the loop that keeps the forward thread fed, and its supervisor.

:class:`~encoder.batcher.MicroBatcher` is split in two along one line: what callers do (queue,
wait, withdraw: :mod:`encoder.batcher`) and what the single worker task does, here, as the base
class ``_BatchWorker``:

* ``_supervise`` runs the worker; if it dies of anything but cancellation it fails everything held
  (:class:`~encoder.batch_errors.WorkerCrashedError`), waits out a back-off, and starts it again;
* ``_run``, ``_next_beside`` and ``_linger`` take batches from the queue and hand them to the
  forward thread, pipelined: batch N+1 is taken and queued behind pass N just before it ends;
* ``_finish`` and ``_failed_pass`` wait for a pass and answer its callers, splitting a batch that
  ran out of memory in halves until only an input that fails alone fails;
* ``_answer``, ``_fail``, ``_done_with`` and ``_fail_all`` settle items and release their tokens.

The state it works on is created by :meth:`MicroBatcher.__init__` and declared below, so the two
halves read as one class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import cast

import numpy as np
import torch

from encoder.batch_errors import InputFailedError, WorkerCrashedError
from encoder.batch_queue import BatchQueue
from encoder.batch_reports import BatcherEvent, BatchObserver, BatchReport, _Summary
from encoder.forward_passes import _Pass, _PassTimes, _retrieved
from encoder.inflight_inputs import _Item
from encoder.kinds import OutputKind, Outputs
from encoder.model import Encoder

__all__ = ["DENSE_ONLY"]

logger = logging.getLogger("encoder.batcher")  # the batcher's logger: the worker's lines are the batcher's

DENSE_ONLY = frozenset({OutputKind.DENSE})
# Back-off between worker restarts: a fault that recurs at once (a planning bug) must neither spin
# the event loop nor flood the log, and a one-off crash should cost its callers little.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 5.0


class _BatchWorker:
    """The worker half of :class:`~encoder.batcher.MicroBatcher` (its only subclass)."""

    encoder: Encoder
    pipeline_depth: int
    max_batch_tokens: int
    max_batch_size: int
    observer: BatchObserver
    summary_interval_s: float
    _queue_tokens: int
    _queue: BatchQueue[_Item]
    _passes: list[_Pass]
    _in_flight: dict[tuple[frozenset[OutputKind], str], _Item]
    _wakeup: asyncio.Event
    _backing_off: bool
    _backoff_s: float
    _forward: Executor
    _tokens_per_second: float
    _pass_times: _PassTimes
    _summary: _Summary

    async def _supervise(self) -> None:
        """Run the worker; if it dies of anything but cancellation, fail everything it had, wait
        out a back-off (not ready meanwhile) and start a new one."""
        while True:
            started = time.monotonic()
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                held = len(self._in_flight)
                logger.exception(
                    "the batcher's worker crashed with %d inputs in flight; they fail, a new worker starts in %.2f s",
                    held,
                    self._backoff_s,
                )
                self._fail_all(WorkerCrashedError("the encoder's batch worker crashed; the input was not computed"))
                try:
                    self.observer.batcher_event(BatcherEvent.WORKER_RESTARTED)
                except Exception:  # the observer may be what fails: the supervisor must outlive it
                    logger.exception("the batch observer failed")
                if time.monotonic() - started >= _BACKOFF_MAX_S:  # it had been healthy for a while
                    self._backoff_s = _BACKOFF_FIRST_S
                self._backing_off = True
                try:
                    await asyncio.sleep(self._backoff_s)
                finally:
                    self._backing_off = False
                self._backoff_s = min(_BACKOFF_MAX_S, 2 * self._backoff_s)

    async def _run(self) -> None:
        """Keep the forward thread fed: while pass N runs, batch N+1 forms, is taken and is queued
        behind it (``pipeline_depth`` 2), so the device goes from one pass to the next without
        waiting for the event loop to answer pass N's callers and plan again. Only while a pass is
        in flight may the next batch linger for more inputs, and only until that pass is about to
        end; an idle device takes whatever is queued when the worker wakes (at the next turn of the
        event loop: a burst of callers re-queueing at once, as a pass's answers make, shares one
        pass rather than one caller starting a pass alone while the rest queue behind it)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()  # nothing can queue between the take above and this wait
                await self._wakeup.wait()
                continue
            running: _Pass | None = self._submit(loop, batch)
            while running is not None:
                following = await self._next_beside(loop, running) if self.pipeline_depth > 1 else None
                await self._finish(loop, running)
                running = following
                self._backoff_s = _BACKOFF_FIRST_S  # a batch went through: a later crash is a new story

    async def _next_beside(self, loop: asyncio.AbstractEventLoop, running: _Pass) -> _Pass | None:
        """The next pass, handed to the forward thread while ``running`` is in flight; None when
        ``running`` ended with nothing queued."""
        while True:
            await self._linger(running)
            batch = self._next_batch()
            if batch:
                return self._submit(loop, batch)
            if running.future.done():
                return None
            self._wakeup.clear()  # nothing queued: wait for work, or for the pass to end
            waiter = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait((waiter, running.future), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def _linger(self, running: _Pass) -> None:
        """Wait, while ``running`` is in flight, until it is about to end (its smoothed duration for
        its size, less a margin for taking and handing over the next batch). Even with a full batch
        queued: the device is busy meanwhile, and a batch taken later serves a caller who came
        meanwhile in its turn (a query behind a bulk ingest), not one pass after it."""
        expected = self._pass_times.expect(running.padded)
        if not expected or running.future.done():
            return
        # Not started yet (a hair after the pass before it ended): it has all of its time ahead.
        began = running.started if running.started is not None else time.perf_counter()
        left = began + expected - (0.0005 + 0.3 * expected) - time.perf_counter()
        if left > 0:
            await asyncio.wait((running.future,), timeout=left)

    def _next_batch(self) -> list[_Item]:
        """Take the next batch from the queue (see :meth:`BatchQueue.take`); [] when it is empty.

        Everything taken is out of the queue and charged to its callers, so a pipelined worker
        could take batch N+1 here while batch N runs.
        """
        return self._queue.take()

    def _done_with(self, item: _Item) -> None:
        # Queued tokens count until computed (or dropped), so the limit bounds all accepted work.
        self._queue_tokens -= item.queued_tokens
        item.queued_tokens = 0  # counted once, even if a crash fails it again
        if self._in_flight.get(item.key) is item:
            del self._in_flight[item.key]

    def _fail_all(self, error: Exception) -> None:
        """Fail every input queued or held, and start from an empty queue.

        After a crash the queue's own structure is not trusted (the fault may be in it), so what
        to fail comes from ``_in_flight`` (every input accepted and not yet finished) and the
        passes handed to the forward thread, and the old queue is dropped, not emptied item by item.
        """
        for part in self._passes:
            for item in part.items:
                self._fail(item, error)
        for item in self._in_flight.values():
            self._fail(item, error)
        self._passes = []
        self._in_flight.clear()
        fresh: BatchQueue[_Item] = BatchQueue(self.max_batch_tokens, self.max_batch_size)
        fresh.examined = self._queue.examined
        self._queue = fresh
        self._queue_tokens = 0

    def _submit(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> _Pass:
        """Hand ``items`` to the forward thread (queued behind a pass in flight, if any)."""
        part = _Pass(items)
        part.future = loop.run_in_executor(self._forward, part.run, self._work)
        part.future.add_done_callback(_retrieved)
        self._passes.append(part)
        return part

    async def _finish(self, loop: asyncio.AbstractEventLoop, part: _Pass) -> None:
        """Wait for ``part``, answer its callers (or split it on out-of-memory), release its items.

        Cancelled (the batcher stops) or crashed on the way, the part stays in ``_passes``, so
        :meth:`_fail_all` fails its items."""
        try:
            outcome = await asyncio.shield(part.future)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._failed_pass(loop, part.items if part.computed is None else part.computed, exc)
        else:
            self._computed(part, outcome)
        self._passes.remove(part)
        for item in part.items:
            self._done_with(item)

    async def _failed_pass(self, loop: asyncio.AbstractEventLoop, items: list[_Item], exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError | MemoryError):
            if self.encoder.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                self.observer.batcher_event(BatcherEvent.FAILED)
                logger.error("input of %d tokens failed alone: %s", len(items[0].token_ids), exc)
                self._fail(items[0], InputFailedError(f"out of memory on an input of {len(items[0].token_ids)} tokens"))
                return
            self.observer.batcher_event(BatcherEvent.OOM_SPLIT)
            logger.warning("out of memory on a batch of %d; splitting it", len(items))
            half = len(items) // 2
            for part in (items[:half], items[half:]):  # one at a time: nothing else fits beside them
                retry = _Pass(part)
                retry.future = loop.run_in_executor(self._forward, retry.run, self._work)
                retry.future.add_done_callback(_retrieved)
                try:
                    outcome = await retry.future
                except Exception as again:
                    await self._failed_pass(loop, part if retry.computed is None else retry.computed, again)
                else:
                    self._computed(retry, outcome)
            return
        if not isinstance(exc, Exception):
            raise exc
        # A bug or a broken model: fail these inputs, keep serving others.
        logger.error("encoder failed on a batch of %d", len(items), exc_info=exc)
        self.observer.batcher_event(BatcherEvent.FAILED, len(items))
        for item in items:
            self._fail(item, InputFailedError(f"the encoder failed: {type(exc).__name__}"))

    def _work(self, items: list[_Item]) -> tuple[Callable[..., object], tuple[object, ...]]:
        """The encoder call for ``items``: dense only, or one pass whose heads run only over the rows
        that asked for them."""
        token_ids = [item.token_ids for item in items]
        if all(item.kinds == DENSE_ONLY for item in items):
            return self.encoder.encode, (token_ids,)
        return self.encoder.encode_outputs, (token_ids, [item.kinds for item in items])

    def _computed(self, part: _Pass, outcome: object) -> None:
        computed = part.computed or []
        if len(computed) < len(part.items):
            self.observer.batcher_event(BatcherEvent.DROPPED, len(part.items) - len(computed))
        if computed:
            self._answer(computed, outcome, part.seconds)

    def _answer(self, items: list[_Item], outcome: object, seconds: float) -> None:
        token_ids = [item.token_ids for item in items]
        if isinstance(outcome, np.ndarray):
            results = [Outputs(len(ids), dense=vector) for vector, ids in zip(outcome, token_ids, strict=True)]
        else:
            results = cast("list[Outputs]", outcome)
        report = BatchReport(
            size=len(items),
            tokens=sum(len(ids) for ids in token_ids),
            padded_tokens=len(items) * max(len(ids) for ids in token_ids),
            seconds=seconds,
        )
        if report.seconds > 0:
            # A smoothed rate, to tell refused callers how long the queue takes to drain.
            self._tokens_per_second = 0.8 * self._tokens_per_second + 0.2 * (report.padded_tokens / report.seconds)
            self._pass_times.add(report.padded_tokens, report.seconds)
        self._summary.add(report, self._queue_tokens, self.summary_interval_s)
        self.observer.batch_done(report)
        for item, result in zip(items, results, strict=True):
            if not item.done:
                item.outputs = result
                for call in item.waiters():
                    call.answered()

    def _fail(self, item: _Item, error: Exception) -> None:
        if not item.done:
            item.error = error
            for call in item.waiters():
                call.fail(error)
