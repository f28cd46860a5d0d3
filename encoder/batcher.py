"""Cross-request dynamic batching: many small requests, few well-packed forward passes.

Every input from every concurrent request joins one queue. Before each forward pass a single
worker task plans *everything* queued at that moment: sorted by token length, packed into
micro-batches under a token budget (each padded only to its own longest input). It then runs the
one planned batch that serves the most deserving caller, and plans again with whatever arrived
meanwhile. No fixed sleep: under light load a lone request runs at once; under heavy load the
queue grows and packs better.

Fairness: each call to :meth:`MicroBatcher.embed` is a *flow*, optionally of a *tenant* (an API
key's name). The next batch is the one holding an input of the tenant, then the flow, that has been
served the fewest tokens (start-time fair queueing: a newcomer starts at the least-served active
peer's count, so it neither starves others nor waits behind a bulk request). So a one-text query
waits at most about one micro-batch behind a 100k-token ingest, never for all of it.

Also here, because they are properties of the queue rather than of HTTP:

* identical texts in flight are computed once (later callers wait on the first one's future);
* an input whose every waiter was cancelled (its client left) is dropped before compute;
* past ``max_queue_tokens`` queued tokens new work is refused with :class:`QueueFullError`;
* a batch that runs out of memory is split in halves and retried; only an input that fails
  alone gets :class:`InputFailedError`, its batch-mates are answered;
* the worker is supervised: if it fails outside a batch (a bug, an observer that raises), every
  input it held fails with :class:`WorkerCrashedError`, the crash is reported, and a new worker
  takes the queue, so later callers are served instead of waiting forever.

What happened is reported to a :class:`BatchObserver` (the gateway's telemetry); the batcher keeps
only what it needs itself: the queue, its token count, and a smoothed token rate for Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from encoder.kinds import OutputKind, Outputs
from encoder.model import Encoder
from encoder.packing import default_max_batch_tokens, plan_batches

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


@dataclass(slots=True)
class _Flow:
    """One ``embed`` call's share of the queue, for fair ordering."""

    seq: int  # arrival order: the last tie-breaker
    tenant: str
    served: int = 0  # tokens computed for it (virtual time)
    waiting: int = 0  # its inputs still queued


@dataclass(slots=True)
class _Item:
    text: str
    token_ids: list[int]
    future: asyncio.Future[Outputs]
    flow: _Flow
    kinds: frozenset[OutputKind] = DENSE_ONLY
    waiters: int = 1

    @property
    def key(self) -> tuple[frozenset[OutputKind], str]:
        return (self.kinds, self.text)


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
    ) -> None:
        self.encoder = encoder
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(encoder.torch_device.type)
        self.max_batch_size = max_batch_size
        self.max_queue_tokens = max_queue_tokens
        self.observer: BatchObserver = observer or _Unobserved()
        self._queue_tokens = 0
        self._pending: list[_Item] = []
        self._window: list[_Item] = []  # the batch the worker holds now: failed together if it crashes
        self._flows = 0
        self._tenants: dict[str, int] = {}  # tenant -> tokens served while it had queued work
        self._in_flight: dict[tuple[frozenset[OutputKind], str], _Item] = {}
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # One forward thread: parallel passes would only fight over the same cores or GPU.
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")
        self._tokens_per_second = 3000.0  # refined from measurements; sizes Retry-After
        self.summary_interval_s = 60.0
        self._summary = _Summary()

    @property
    def queue_tokens(self) -> int:
        """Tokens accepted and not yet computed (or dropped): what ``max_queue_tokens`` bounds."""
        return self._queue_tokens

    @property
    def running(self) -> bool:
        """True while a worker is serving the queue (readiness)."""
        return self._worker is not None and not self._worker.done()

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
        self._forward.shutdown(wait=True)

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
        kinds = DENSE_ONLY | kinds
        new_tokens = sum(
            len(ids) for text, ids in zip(texts, token_ids, strict=True) if (kinds, text) not in self._in_flight
        )
        if self._queue_tokens and self._queue_tokens + new_tokens > self.max_queue_tokens:
            self.observer.batcher_event(BatcherEvent.REJECTED)
            retry_after = max(1.0, (self._queue_tokens + new_tokens) / self._tokens_per_second)
            raise QueueFullError(self._queue_tokens, self.max_queue_tokens, retry_after)
        loop = asyncio.get_running_loop()
        flow = self._new_flow(tenant)
        items: list[_Item] = []
        joined = 0
        for text, ids in zip(texts, token_ids, strict=True):
            item = self._in_flight.get((kinds, text))
            if item is not None and not item.future.done():
                item.waiters += 1
                joined += 1
            else:
                flow.waiting += 1
                item = _Item(text, list(ids), loop.create_future(), flow, kinds)
                self._in_flight[item.key] = item
                self._pending.append(item)
                self._queue_tokens += len(ids)
            items.append(item)
        if joined:
            self.observer.batcher_event(BatcherEvent.DEDUPLICATED, joined)
        self._wakeup.set()
        results: list[Outputs] = []
        try:
            for item in items:
                results.append(await asyncio.shield(item.future))
        except BaseException:  # cancelled (client left) or one input failed: withdraw the rest
            for item in items[len(results) :]:
                self._withdraw(item)
            raise
        return results

    def _new_flow(self, tenant: str) -> _Flow:
        """A flow starts at the least-served waiting flow's count (its tenant likewise): it neither
        jumps ahead of peers that waited nor queues behind everything they were already given."""
        waiting = [item.flow for item in self._pending if item.flow.waiting]
        start = min((flow.served for flow in waiting), default=0)
        if tenant not in self._tenants:
            self._tenants[tenant] = min((self._tenants.get(flow.tenant, 0) for flow in waiting), default=0)
        self._flows += 1
        return _Flow(seq=self._flows, tenant=tenant, served=start)

    def _withdraw(self, item: _Item) -> None:
        item.waiters -= 1
        if item.waiters <= 0 and not item.future.done():
            item.future.cancel()  # the worker skips cancelled items before compute

    async def _supervise(self) -> None:
        """Run the worker; if it dies of anything but cancellation, fail what it held and go on."""
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                held = len(self._window)
                logger.exception("the batcher's worker crashed holding %d inputs; they fail, a new worker starts", held)
                self._fail_window(WorkerCrashedError("the encoder's batch worker crashed; the input was not computed"))
                self.observer.batcher_event(BatcherEvent.WORKER_RESTARTED)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                await self._wakeup.wait()
            self._wakeup.clear()
            live = []
            dropped = 0
            for item in self._pending:
                if item.future.done():  # every caller left (or it failed): never computed
                    dropped += 1
                    self._done_with(item)
                else:
                    live.append(item)
            if dropped:
                self.observer.batcher_event(BatcherEvent.DROPPED, dropped)
            if not live:
                self._pending = []
                continue
            batch = self._next_batch(live)
            chosen = {id(item) for item in batch}
            self._pending = [item for item in live if id(item) not in chosen]
            self._window = batch
            await self._run_batch(loop, batch)
            for item in batch:
                self._done_with(item)
            self._window = []

    def _next_batch(self, live: list[_Item]) -> list[_Item]:
        """Plan every queued input into length-sorted micro-batches; take the one that holds an
        input of the least-served tenant, then flow (oldest first on ties)."""
        plan = plan_batches([len(item.token_ids) for item in live], self.max_batch_tokens, self.max_batch_size)
        tenants = self._tenants
        neediest = min(
            (item.flow for item in live), key=lambda flow: (tenants.get(flow.tenant, 0), flow.served, flow.seq)
        )
        for batch in plan:
            if any(live[i].flow is neediest for i in batch):
                return [live[i] for i in batch]
        raise AssertionError("the neediest flow has an input in some batch")

    def _done_with(self, item: _Item) -> None:
        # Queued tokens count until computed (or dropped), so the limit bounds all accepted work.
        if item.token_ids:
            tokens = len(item.token_ids)
            self._queue_tokens -= tokens
            item.token_ids = []  # counted once, even if a crash fails it again
            flow = item.flow
            flow.served += tokens
            flow.waiting -= 1
            if flow.tenant in self._tenants:
                self._tenants[flow.tenant] += tokens
            if flow.waiting == 0 and not any(other.flow.tenant == flow.tenant for other in self._pending):
                self._tenants.pop(flow.tenant, None)  # idle tenants start afresh when they return
        if self._in_flight.get(item.key) is item:
            del self._in_flight[item.key]

    def _fail_window(self, error: Exception) -> None:
        for item in self._window:
            self._fail(item, error)
            self._done_with(item)
        self._window = []

    def _fail_all(self, error: Exception) -> None:
        self._fail_window(error)
        for item in self._pending:
            self._fail(item, error)
            self._done_with(item)
        self._pending.clear()
        self._in_flight.clear()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        token_ids = [item.token_ids for item in items]
        kinds = DENSE_ONLY.union(*(item.kinds for item in items))
        started = time.perf_counter()
        try:
            if kinds == DENSE_ONLY:
                vectors = await loop.run_in_executor(self._forward, self.encoder.encode, token_ids)
                results = [Outputs(len(ids), dense=vector) for vector, ids in zip(vectors, token_ids, strict=True)]
            else:
                results = await loop.run_in_executor(self._forward, self.encoder.encode_outputs, token_ids, kinds)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            if self.encoder.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                self.observer.batcher_event(BatcherEvent.FAILED)
                logger.error("input of %d tokens failed alone: %s", len(token_ids[0]), exc)
                self._fail(items[0], InputFailedError(f"out of memory on an input of {len(token_ids[0])} tokens"))
                return
            self.observer.batcher_event(BatcherEvent.OOM_SPLIT)
            logger.warning("out of memory on a batch of %d; splitting it", len(items))
            half = len(items) // 2
            await self._run_batch(loop, items[:half])
            await self._run_batch(loop, items[half:])
            return
        except Exception as exc:  # a bug or a broken model: fail these inputs, keep serving others
            logger.exception("encoder failed on a batch of %d", len(items))
            self.observer.batcher_event(BatcherEvent.FAILED, len(items))
            for item in items:
                self._fail(item, InputFailedError(f"the encoder failed: {type(exc).__name__}"))
            return
        report = BatchReport(
            size=len(items),
            tokens=sum(len(ids) for ids in token_ids),
            padded_tokens=len(items) * max(len(ids) for ids in token_ids),
            seconds=time.perf_counter() - started,
        )
        if report.seconds > 0:
            # A smoothed rate, to tell refused callers how long the queue takes to drain.
            self._tokens_per_second = 0.8 * self._tokens_per_second + 0.2 * (report.padded_tokens / report.seconds)
        self._summary.add(report, self._queue_tokens, self.summary_interval_s)
        self.observer.batch_done(report)
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _fail(self, item: _Item, error: Exception) -> None:
        if not item.future.done():
            item.future.set_exception(error)


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
