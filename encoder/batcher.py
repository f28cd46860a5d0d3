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

This module is what callers use: :class:`MicroBatcher` (queueing, waiting and withdrawing inputs)
and the names they catch or observe, re-exported from where they live: the errors
(:mod:`encoder.batch_errors`), the reports (:mod:`encoder.batch_reports`), the worker that runs
the batches (:mod:`encoder.batch_worker`), the queue (:mod:`encoder.batch_queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import cast

from encoder.batch_errors import InputFailedError, QueueFullError, WorkerCrashedError
from encoder.batch_queue import BatchQueue
from encoder.batch_reports import BatcherEvent, BatchObserver, BatchReport, _Summary, _Unobserved
from encoder.batch_worker import _BACKOFF_FIRST_S, DENSE_ONLY, _BatchWorker
from encoder.forward_passes import _Pass, _PassTimes
from encoder.inflight_inputs import _Call, _Item
from encoder.kinds import OutputKind, Outputs
from encoder.model import Encoder
from encoder.packing import default_max_batch_tokens

__all__ = [
    "DENSE_ONLY",
    "BatchObserver",
    "BatchReport",
    "BatcherEvent",
    "InputFailedError",
    "MicroBatcher",
    "QueueFullError",
    "WorkerCrashedError",
]


_INLINE_TOKENIZE_CHARS = 2048
# When the caller whose flow holds a shared queued input leaves, the input moves to the flow of
# whichever of (at most) this many remaining waiters would be served soonest: a bounded look, so a
# text thousands of callers wait for costs no more per cancellation.
_REHOME_CANDIDATES = 16


class MicroBatcher(_BatchWorker):
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
