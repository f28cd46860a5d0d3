"""Cross-request dynamic batching: many small requests, few well-packed forward passes.

Every input from every concurrent request joins one queue (:class:`encoder.packing.BatchQueue`).
A single worker task takes one batch at a time: the inputs of the caller owed the most compute,
with inputs of neighbouring token lengths around them under a token budget, padded only to the
batch's own longest input. It runs that batch, then takes the next from whatever queued
meanwhile. No fixed sleep: under light load a lone request runs at once; under heavy load the
queue grows and packs better. Taking a batch costs the same with ten or a hundred thousand inputs
queued.

Fairness: each call to :meth:`MicroBatcher.embed` is a *flow*, optionally of a *tenant* (an API
key's name). The next batch is built around the tenant, then the flow, that has been served the
fewest tokens (start-time fair queueing: a newcomer starts at the least-served active peer's count,
so it neither starves others nor waits behind a bulk request). So a one-text query waits at most
about one micro-batch behind a 100k-token ingest, never for all of it. Only tokens taken for
compute count, and a caller is known only while it has queued inputs: one that returns starts afresh.

Also here, because they are properties of the queue rather than of HTTP:

* identical texts in flight are computed once (later callers wait for the first one's input); a
  queued input moves to a joining caller's flow when it would be served sooner there, and to a
  remaining caller's when its own leaves, so sharing never makes a caller wait past its own turn;
* an input whose every waiter was cancelled (its client left) leaves the queue before compute;
* past ``max_queue_tokens`` queued tokens new work is refused with :class:`QueueFullError`;
* a batch that runs out of memory is split in halves and retried; only an input that fails
  alone gets :class:`InputFailedError`, its batch-mates are answered;
* each input gets only the output kinds its caller asked for (one forward pass, per-row heads);
* the worker is supervised: if it fails outside a forward pass (a bug, an observer that raises),
  every input queued or held fails with :class:`WorkerCrashedError`, the crash is reported, and a
  new worker starts after a back-off (0.05 s, doubling to 5 s, reset by a batch that completes),
  during which :attr:`MicroBatcher.running` is False so readiness turns red.

What happened is reported to a :class:`BatchObserver` (the gateway's telemetry); the batcher keeps
only what it needs itself: the queue, its token count, and a smoothed token rate for Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Protocol, cast

import numpy as np
import torch

from encoder.kinds import OutputKind, Outputs
from encoder.model import Encoder
from encoder.packing import BatchQueue, Flow, QueuedInput, default_max_batch_tokens

__all__ = [
    "BatchObserver",
    "BatchReport",
    "BatcherEvent",
    "InputFailedError",
    "MicroBatcher",
    "QueueFullError",
    "WorkerCrashedError",
]

logger = logging.getLogger(__name__)

_INLINE_TOKENIZE_CHARS = 2048
DENSE_ONLY = frozenset({OutputKind.DENSE})
# Back-off between worker restarts: a fault that recurs at once (a planning bug) must neither spin
# the event loop nor flood the log, and a one-off crash should cost its callers little.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 5.0
# When the caller whose flow holds a shared queued input leaves, the input moves to the flow of
# whichever of (at most) this many remaining waiters would be served soonest: a bounded look, so a
# text thousands of callers wait for costs no more per cancellation.
_REHOME_CANDIDATES = 16


class QueueFullError(RuntimeError):
    """The queue holds more than ``max_queue_tokens``: try again shortly."""

    def __init__(self, queued: int, limit: int, retry_after: float) -> None:
        self.queued, self.limit, self.retry_after = queued, limit, retry_after
        super().__init__(f"the encoder queue is full ({queued} of {limit} tokens queued); retry shortly")


class InputFailedError(RuntimeError):
    """One input could not be encoded even alone (for example: out of memory)."""


class WorkerCrashedError(InputFailedError):
    """The batcher's worker failed outside a forward pass; the inputs it held were not computed."""


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one forward pass did, for stats, metrics and logs."""

    size: int
    tokens: int  # real tokens
    padded_tokens: int  # size * longest: the work actually done
    seconds: float


class BatcherEvent(enum.StrEnum):
    """Things the queue did besides running batches, each counted by the observer."""

    DEDUPLICATED = "deduplicated"  # an input joined an identical one already in flight
    DROPPED = "dropped"  # an input whose callers all left, skipped before compute
    REJECTED = "rejected"  # a call refused because the queue was full
    FAILED = "failed"  # an input that failed even alone
    OOM_SPLIT = "oom_split"  # a batch split in halves after running out of memory
    WORKER_RESTARTED = "worker_restarted"  # the worker crashed and was replaced


class BatchObserver(Protocol):
    """Where the batcher reports what it did. Called on the event loop; must be quick."""

    def batch_done(self, report: BatchReport) -> None: ...

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None: ...


class _Unobserved:
    def batch_done(self, report: BatchReport) -> None:
        pass

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        pass


class _Call:
    """One ``embed`` call waiting for its distinct inputs: a single future for all of them.

    (Not a future per input shielded per waiter: that, with per-input containers in the queue,
    made 37 objects for the garbage collector to walk per queued one-text caller, now 16; serving
    100,000 queued callers went from about 10 s to about 5 s on 2 cores.)
    """

    __slots__ = ("flow", "future", "missing")

    def __init__(self, future: asyncio.Future[None], flow: Flow) -> None:
        self.future = future
        self.flow = flow  # its share of the queue: where an input it waits for may move
        self.missing = 0  # its distinct inputs not yet answered

    def answered(self) -> None:
        self.missing -= 1
        if not self.missing and not self.future.done():
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _Item(QueuedInput):
    """One distinct input in flight: queued, then in the worker's window, then answered.

    Identical inputs of concurrent calls share one item; each call waiting for it is a waiter
    (the first kept inline: almost every item has exactly one).
    """

    __slots__ = ("error", "first", "kinds", "more", "outputs", "queued_tokens", "text", "token_ids")

    def __init__(self, text: str, token_ids: list[int], kinds: frozenset[OutputKind], call: _Call) -> None:
        super().__init__(len(token_ids))
        self.text = text
        self.token_ids = token_ids
        self.kinds = kinds
        self.first: _Call | None = call
        self.more: dict[_Call, None] | None = None
        call.missing += 1
        self.outputs: Outputs | None = None
        self.error: BaseException | None = None
        self.queued_tokens = len(token_ids)  # its share of ``queue_tokens``, until computed or dropped

    @property
    def key(self) -> tuple[frozenset[OutputKind], str]:
        return (self.kinds, self.text)

    @property
    def done(self) -> bool:
        return self.outputs is not None or self.error is not None

    @property
    def wanted(self) -> bool:
        """Someone still waits for it (an item nobody waits for is not joined, and not computed)."""
        return self.first is not None or bool(self.more)

    def join(self, call: _Call) -> None:
        if call is self.first or (self.more is not None and call in self.more):
            return  # the same text twice in one call: one wait
        call.missing += 1
        if self.first is None:
            self.first = call
        else:
            if self.more is None:
                self.more = {}
            self.more[call] = None

    def leave(self, call: _Call) -> None:
        if call is self.first:
            self.first = None
        elif self.more is not None:
            self.more.pop(call, None)

    def waiters(self) -> list[_Call]:
        calls = [] if self.first is None else [self.first]
        return calls + list(self.more) if self.more else calls

    def some_waiters(self, most: int) -> list[_Call]:
        """Up to ``most`` of its waiters, the earliest first (a bounded look, however many wait)."""
        calls = [] if self.first is None else [self.first]
        if self.more:
            calls.extend(islice(self.more, most - len(calls)))
        return calls


class MicroBatcher:
    """Queue, pack and run encoder work for many concurrent callers. Use inside a running loop::

    batcher = MicroBatcher(encoder)  # max_batch_tokens: by device
    await batcher.start()
    results = await batcher.embed(texts, await batcher.tokenize(texts))
    await batcher.stop()
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 128,
        max_queue_tokens: int = 2_000_000,
        observer: BatchObserver | None = None,
        pipeline_depth: int = 2,
        forward: Executor | None = None,
    ) -> None:
        if pipeline_depth not in (1, 2):
            raise ValueError(f"pipeline_depth is 1 or 2, not {pipeline_depth}")
        self.encoder = encoder
        self.pipeline_depth = pipeline_depth
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(encoder.torch_device.type)
        self.max_batch_size = max_batch_size
        self.max_queue_tokens = max_queue_tokens
        self.observer: BatchObserver = observer or _Unobserved()
        self._queue_tokens = 0
        self._queue: BatchQueue[_Item] = BatchQueue(self.max_batch_tokens, self.max_batch_size)
        self._passes: list[_Pass] = []  # handed to the forward thread, not yet finished: failed if it crashes
        self._in_flight: dict[tuple[frozenset[OutputKind], str], _Item] = {}
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._backing_off = False
        self._backoff_s = _BACKOFF_FIRST_S
        # One forward thread: parallel passes would only fight over the same cores or GPU. Several
        # models on one device share one: ``forward`` is this model's lane onto it
        # (:class:`encoder.shared_forward.SharedForward`: their passes take turns).
        self._forward: Executor = forward or ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")
        self._tokens_per_second = 3000.0  # refined from measurements; sizes Retry-After
        self._pass_times = _PassTimes()  # how long a pass of a size takes: how long the next batch may form
        self.summary_interval_s = 60.0
        self._summary = _Summary()

    @property
    def queue_tokens(self) -> int:
        """Tokens accepted and not yet computed (or dropped): what ``max_queue_tokens`` bounds."""
        return self._queue_tokens

    @property
    def running(self) -> bool:
        """True while a worker is serving the queue (readiness).

        False before :meth:`start`, after :meth:`stop`, and while the worker waits out its back-off
        after a crash: calls are still accepted then (and served once it restarts), but a load
        balancer should prefer another replica.
        """
        return self._worker is not None and not self._worker.done() and not self._backing_off

    @property
    def planning_work(self) -> int:
        """Queued inputs, lengths and heap entries the planner has looked at so far (a work count)."""
        return self._queue.examined

    @property
    def passes_in_flight(self) -> int:
        """Passes handed to the forward thread and not yet answered: the one running, and (pipelined)
        the next, waiting behind it."""
        return len(self._passes)

    @property
    def in_flight(self) -> int:
        """Distinct inputs accepted and not yet answered."""
        return len(self._in_flight)

    @property
    def tokens_per_second(self) -> float:
        """The smoothed measured encoder rate (padded tokens per second)."""
        return self._tokens_per_second

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._supervise(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish nothing new: cancel the worker, fail what is queued, release the thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._fail_all(InputFailedError("the encoder is shutting down"))
        # The pass running ends; one handed over behind it is not started (its callers have failed).
        self._forward.shutdown(wait=True, cancel_futures=True)

    async def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        """Tokenise; large inputs off the event loop (the Rust tokenizer releases the GIL).

        A few short texts tokenise in microseconds, far less than a hop to a worker thread and back
        (which also contends for the GIL with the forward thread), so they stay on the loop.
        """
        if not texts:
            return []
        if sum(len(text) for text in texts) <= _INLINE_TOKENIZE_CHARS:
            return self.encoder.tokenize(texts, truncate=truncate)
        return await asyncio.to_thread(partial(self.encoder.tokenize, texts, truncate=truncate))

    async def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[list[int]],
        *,
        kinds: frozenset[OutputKind] = DENSE_ONLY,
        tenant: str = "",
    ) -> list[Outputs]:
        """Outputs for ``texts`` (already tokenised by :meth:`tokenize`), in order.

        ``kinds`` adds ``sparse`` and/or ``colbert`` outputs (bge-m3's heads) to the dense vector;
        all come from the same forward pass. ``tenant`` (an API key's name) groups calls for
        fairness: tenants are served in turn, then the calls within one.

        Raises :class:`QueueFullError` at once, before queueing anything, when the queue is full.
        Cancelling the caller withdraws its inputs unless another caller waits for the same text.
        """
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if not texts:
            return []
        if OutputKind.DENSE not in kinds:
            kinds = DENSE_ONLY | kinds
        # Plain loops, no generator expressions: those would make ``self`` and ``kinds`` closure
        # cells for the whole call (objects the garbage collector walks, per queued caller).
        in_flight = self._in_flight
        new_tokens = 0
        for text, ids in zip(texts, token_ids, strict=True):
            held = in_flight.get((kinds, text))
            if held is None or not held.wanted or held.done:  # queued anew below (the join's own test)
                new_tokens += len(ids)
        if self._queue_tokens and self._queue_tokens + new_tokens > self.max_queue_tokens:
            self.observer.batcher_event(BatcherEvent.REJECTED)
            retry_after = max(1.0, (self._queue_tokens + new_tokens) / self._tokens_per_second)
            raise QueueFullError(self._queue_tokens, self.max_queue_tokens, retry_after)
        loop = asyncio.get_running_loop()
        flow = self._queue.flow(tenant)  # takes part in fairness only if an input of its own queues
        call = _Call(loop.create_future(), flow)
        items: list[_Item] = []
        joined = 0
        for text, ids in zip(texts, token_ids, strict=True):
            item = in_flight.get((kinds, text))
            if item is not None and item.wanted and not item.done:
                item.join(call)
                # Served no later than if this caller had queued it: it moves to this caller's
                # flow when it would start sooner there (a query equal to a bulk ingest's last text).
                self._queue.join(item, flow)
                joined += 1
            else:
                item = _Item(text, ids if isinstance(ids, list) else list(ids), kinds, call)
                self._queue.add(item, flow)
                in_flight[item.key] = item
                self._queue_tokens += item.length
            items.append(item)
        if joined:
            self.observer.batcher_event(BatcherEvent.DEDUPLICATED, joined)
        self._wakeup.set()
        try:
            await call.future
        except BaseException:  # cancelled (client left) or one input failed: withdraw from the rest
            dropped = 0
            for item in items:
                dropped += self._withdraw(item, call)
            if dropped:
                self.observer.batcher_event(BatcherEvent.DROPPED, dropped)
            raise
        # The future completes only once every input of the call is answered.
        return cast("list[Outputs]", [item.outputs for item in items])

    def _withdraw(self, item: _Item, call: _Call) -> bool:
        """``call`` stops waiting for ``item``; if nobody waits any more and it is still queued, it
        leaves the queue at once, never computed (True). One already in a batch is computed and
        its result discarded. One still queued that others wait for, held in ``call``'s flow,
        moves to one of theirs: the leaver's flow is neither charged for it nor sets its pace."""
        item.leave(call)
        if item.done or not item.queued:
            return False
        if item.wanted:
            if item.flow is call.flow:  # its flow's caller left: it moves to a remaining caller's
                self._queue.rehome(item, [waiter.flow for waiter in item.some_waiters(_REHOME_CANDIDATES)])
            return False
        if not self._queue.remove(item):
            return False
        self._done_with(item)
        return True

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


def _retrieved(future: asyncio.Future[object]) -> None:
    """Read a pass's outcome, so one nobody awaits any more (the batcher stopped, or crashed and
    failed its callers) never logs "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class _Pass:
    """One batch handed to the forward thread: its items, the pending result and when it ran."""

    __slots__ = ("computed", "future", "items", "padded", "seconds", "started", "tokens")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.computed: list[_Item] | None = None  # those still wanted when the pass began
        self.tokens = sum(item.queued_tokens for item in items)
        self.padded = len(items) * max(item.length for item in items)
        self.future: asyncio.Future[object] = cast("asyncio.Future[object]", None)
        self.started: float | None = None  # set by the forward thread when the pass begins
        self.seconds = 0.0

    def run(self, plan: Callable[[list[_Item]], tuple[Callable[..., object], tuple[object, ...]]]) -> object:
        """In the forward thread: compute the items someone still waits for (``plan`` says how),
        noting when the pass began and how long it took. An item whose callers all left while the
        pass waited behind another is not computed: a pipelined batch is handed over early, but
        what nobody wants never reaches the model."""
        self.started = time.perf_counter()
        try:
            self.computed = [item for item in self.items if item.wanted]
            if not self.computed:
                return None
            work, args = plan(self.computed)
            return work(*args)
        finally:
            self.seconds = time.perf_counter() - self.started


class _PassTimes:
    """Smoothed seconds per pass, by size (padded tokens, in powers of two): a pass of one short
    text and one of a full budget differ many-fold on a GPU, and the linger must end before the
    pass it waits beside."""

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def add(self, padded: int, seconds: float) -> None:
        size = padded.bit_length()
        known = self._seconds.get(size)
        self._seconds[size] = seconds if known is None else 0.8 * known + 0.2 * seconds

    def expect(self, padded: int) -> float:
        """The expected seconds of a pass of ``padded`` tokens: its size's, else the nearest size
        measured, else 0 (nothing measured: no linger)."""
        if not self._seconds:
            return 0.0
        size = padded.bit_length()
        nearest = min(self._seconds, key=lambda known: (abs(known - size), known))
        return self._seconds[nearest]


@dataclass(slots=True)
class _Summary:
    """One INFO line per interval while batches run: the logs' view of batching."""

    started: float = 0.0
    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    padded: int = 0

    def add(self, report: BatchReport, queue_tokens: int, interval_s: float) -> None:
        logger.debug(
            "batch size=%d tokens=%d padded=%d ms=%.1f",
            report.size,
            report.tokens,
            report.padded_tokens,
            report.seconds * 1e3,
        )
        now = time.monotonic()
        if not self.started:
            self.started = now
        self.batches += 1
        self.inputs += report.size
        self.tokens += report.tokens
        self.padded += report.padded_tokens
        if now - self.started < interval_s:
            return
        logger.info(
            "encoder: %d batches, avg %.1f inputs and %.0f padded tokens each, padding %.1f%%, queue %d tokens",
            self.batches,
            self.inputs / self.batches,
            self.padded / self.batches,
            100 * (1 - self.tokens / max(1, self.padded)),
            queue_tokens,
        )
        self.started, self.batches, self.inputs, self.tokens, self.padded = now, 0, 0, 0, 0
