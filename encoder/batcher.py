"""Cross-request dynamic batching: many small requests, few well-packed forward passes.

Every input from every concurrent request joins one queue. A single worker task takes *everything*
that queued while the previous window ran, sorts it by token length, packs micro-batches under a
token budget (each padded only to its own longest input) and runs them one at a time on one
forward thread. No fixed sleep: under light load a lone request runs at once; under heavy load the
windows grow and pack better. Windows are served in arrival order, so nobody starves.

Also here, because they are properties of the queue rather than of HTTP:

* identical texts in flight are computed once (later callers wait on the first one's future);
* an input whose every waiter was cancelled (its client left) is dropped before compute;
* past ``max_queue_tokens`` queued tokens new work is refused with :class:`QueueFullError`;
* a batch that runs out of memory is split in halves and retried; only an input that fails
  alone gets :class:`InputFailedError`, its batch-mates are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from encoder.model import DENSE, Encoder
from encoder.packing import default_max_batch_tokens, plan_batches

__all__ = [
    "BatchReport",
    "Embedding",
    "InputFailedError",
    "MicroBatcher",
    "QueueFullError",
]

logger = logging.getLogger(__name__)

_INLINE_TOKENIZE_CHARS = 2048
DENSE_ONLY = frozenset({DENSE})


class QueueFullError(RuntimeError):
    """The queue holds more than ``max_queue_tokens``: try again shortly."""

    def __init__(self, queued: int, limit: int, retry_after: float) -> None:
        self.queued, self.limit, self.retry_after = queued, limit, retry_after
        super().__init__(f"the encoder queue is full ({queued} of {limit} tokens queued); retry shortly")


class InputFailedError(RuntimeError):
    """One input could not be encoded even alone (for example: out of memory)."""


@dataclass(frozen=True, slots=True)
class Embedding:
    """One input's result: its dense vector (float32), how many tokens the model read, and the
    sparse weights / ColBERT vectors when they were asked for."""

    vector: np.ndarray
    tokens: int
    sparse: tuple[np.ndarray, np.ndarray] | None = None
    colbert: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one forward pass did, for stats, metrics and logs."""

    size: int
    tokens: int  # real tokens
    padded_tokens: int  # size * longest: the work actually done
    seconds: float


@dataclass(slots=True)
class _Item:
    text: str
    token_ids: list[int]
    future: asyncio.Future[Embedding]
    kinds: frozenset[str] = DENSE_ONLY
    waiters: int = 1

    @property
    def key(self) -> tuple[frozenset[str], str]:
        return (self.kinds, self.text)


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    deduplicated: int = 0
    dropped: int = 0
    rejected: int = 0
    failed: int = 0
    oom_splits: int = 0
    queue_tokens: int = 0


class MicroBatcher:
    """Queue, pack and run encoder work for many concurrent callers. Use inside a running loop::

    batcher = MicroBatcher(encoder)  # max_batch_tokens: by device
    await batcher.start()
    results = await batcher.embed(texts, encoder.tokenize(texts))
    await batcher.stop()
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 128,
        max_queue_tokens: int = 2_000_000,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(encoder.torch_device.type)
        self.max_batch_size = max_batch_size
        self.max_queue_tokens = max_queue_tokens
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._pending: list[_Item] = []
        self._in_flight: dict[tuple[frozenset[str], str], _Item] = {}
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # One forward thread: parallel passes would only fight over the same cores or GPU.
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")
        self._tokens_per_second = 3000.0  # refined from measurements; sizes Retry-After
        self.summary_interval_s = 60.0
        self._last_summary: tuple[float, int, int, int, int] = (time.monotonic(), 0, 0, 0, 0)

    @property
    def in_flight(self) -> int:
        """Distinct inputs accepted and not yet answered."""
        return len(self._in_flight)

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish nothing new: cancel the worker, fail what is queued, release the thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(InputFailedError("the encoder is shutting down"))
        self._pending.clear()
        self._in_flight.clear()
        self.stats.queue_tokens = 0
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
        self, texts: Sequence[str], token_ids: Sequence[list[int]], *, kinds: frozenset[str] = DENSE_ONLY
    ) -> list[Embedding]:
        """Results for ``texts`` (already tokenised by :meth:`tokenize`), in order.

        ``kinds`` adds ``sparse`` and/or ``colbert`` outputs (bge-m3's heads) to the dense vector;
        all come from the same forward pass.

        Raises :class:`QueueFullError` at once, before queueing anything, when the queue is full.
        Cancelling the caller withdraws its inputs unless another caller waits for the same text.
        """
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        new_tokens = sum(
            len(ids) for text, ids in zip(texts, token_ids, strict=True) if (kinds, text) not in self._in_flight
        )
        if self.stats.queue_tokens and self.stats.queue_tokens + new_tokens > self.max_queue_tokens:
            self.stats.rejected += 1
            retry_after = max(1.0, (self.stats.queue_tokens + new_tokens) / self._tokens_per_second)
            raise QueueFullError(self.stats.queue_tokens, self.max_queue_tokens, retry_after)
        loop = asyncio.get_running_loop()
        items: list[_Item] = []
        for text, ids in zip(texts, token_ids, strict=True):
            item = self._in_flight.get((kinds, text))
            if item is not None and not item.future.done():
                item.waiters += 1
                self.stats.deduplicated += 1
            else:
                item = _Item(text, list(ids), loop.create_future(), kinds)
                self._in_flight[item.key] = item
                self._pending.append(item)
                self.stats.queue_tokens += len(ids)
            items.append(item)
        self._wakeup.set()
        results: list[Embedding] = []
        try:
            for item in items:
                results.append(await asyncio.shield(item.future))
        except BaseException:  # cancelled (client left) or one input failed: withdraw the rest
            for item in items[len(results) :]:
                self._withdraw(item)
            raise
        return results

    def _withdraw(self, item: _Item) -> None:
        item.waiters -= 1
        if item.waiters <= 0 and not item.future.done():
            item.future.cancel()  # the worker skips cancelled items before compute

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            window, self._pending = self._pending, []
            live = []
            for item in window:
                if item.future.done():
                    self.stats.dropped += 1
                    self._done_with(item)
                else:
                    live.append(item)
            lengths = [len(item.token_ids) for item in live]
            for batch in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size):
                members = [live[i] for i in batch if not live[i].future.done()]
                self.stats.dropped += len(batch) - len(members)
                if members:
                    await self._run_batch(loop, members)
                for i in batch:
                    self._done_with(live[i])

    def _done_with(self, item: _Item) -> None:
        # Queued tokens count until computed (or dropped), so the limit bounds all accepted work.
        self.stats.queue_tokens -= len(item.token_ids)
        if self._in_flight.get(item.key) is item:
            del self._in_flight[item.key]

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        token_ids = [item.token_ids for item in items]
        kinds = DENSE_ONLY.union(*(item.kinds for item in items))
        started = time.perf_counter()
        try:
            if kinds == DENSE_ONLY:
                vectors = await loop.run_in_executor(self._forward, self.encoder.encode, token_ids)
                results = [Embedding(vector, len(ids)) for vector, ids in zip(vectors, token_ids, strict=True)]
            else:
                outputs = await loop.run_in_executor(self._forward, self.encoder.encode_outputs, token_ids, kinds)
                results = [
                    Embedding(out.dense, len(ids), out.sparse, out.colbert)  # type: ignore[arg-type]
                    for out, ids in zip(outputs, token_ids, strict=True)
                ]
        except (torch.OutOfMemoryError, MemoryError) as exc:
            if self.encoder.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                self.stats.failed += 1
                logger.error("input of %d tokens failed alone: %s", len(token_ids[0]), exc)
                self._fail(items[0], InputFailedError(f"out of memory on an input of {len(token_ids[0])} tokens"))
                return
            self.stats.oom_splits += 1
            logger.warning("out of memory on a batch of %d; splitting it", len(items))
            half = len(items) // 2
            await self._run_batch(loop, items[:half])
            await self._run_batch(loop, items[half:])
            return
        except Exception as exc:  # a bug or a broken model: fail these inputs, keep serving others
            logger.exception("encoder failed on a batch of %d", len(items))
            for item in items:
                self._fail(item, InputFailedError(f"the encoder failed: {exc}"))
            return
        seconds = time.perf_counter() - started
        report = BatchReport(
            size=len(items),
            tokens=sum(len(ids) for ids in token_ids),
            padded_tokens=len(items) * max(len(ids) for ids in token_ids),
            seconds=seconds,
        )
        self._record(report)
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _maybe_summarise(self) -> None:
        """One INFO line per ``summary_interval_s`` while batches run: the logs' view of batching."""
        now = time.monotonic()
        if now - self._last_summary[0] < self.summary_interval_s:
            return
        stats, (_, batches, inputs, padded, real) = self.stats, self._last_summary
        count = stats.batches - batches
        if count:
            logger.info(
                "encoder: %d batches, avg %.1f inputs and %.0f padded tokens each, padding %.1f%%, queue %d tokens",
                count,
                (stats.inputs - inputs) / count,
                (stats.padded_tokens - padded) / count,
                100 * (1 - (stats.tokens - real) / max(1, stats.padded_tokens - padded)),
                stats.queue_tokens,
            )
        self._last_summary = (now, stats.batches, stats.inputs, stats.padded_tokens, stats.tokens)

    def _fail(self, item: _Item, error: Exception) -> None:
        if not item.future.done():
            item.future.set_exception(error)

    def _record(self, report: BatchReport) -> None:
        stats = self.stats
        stats.batches += 1
        stats.inputs += report.size
        stats.tokens += report.tokens
        stats.padded_tokens += report.padded_tokens
        stats.seconds += report.seconds
        if report.seconds > 0:
            # A smoothed rate, to tell refused callers how long the queue takes to drain.
            self._tokens_per_second = 0.8 * self._tokens_per_second + 0.2 * (report.padded_tokens / report.seconds)
        logger.debug(
            "batch size=%d tokens=%d padded=%d ms=%.1f",
            report.size,
            report.tokens,
            report.padded_tokens,
            report.seconds * 1e3,
        )
        self._maybe_summarise()
        if self.on_batch is not None:
            self.on_batch(report)
