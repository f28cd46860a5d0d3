"""A worker's side of the engine link: :class:`EngineLink` stands in for the micro-batcher and
:class:`RemoteEncoder` for the encoder, so :class:`~gateway.core.service.EmbeddingService` runs
unchanged in every HTTP worker.

Tokenising happens here, with the model's tokenizer read from its folder (no weights): only token
ids cross the socket. When the engine is unreachable (it died, the supervisor is restarting it),
:meth:`EngineLink.embed` fails at once with :class:`EngineUnavailableError`, a
:class:`~encoder.batcher.QueueFullError`, so clients get 503 with Retry-After, never a hang; the
link reconnects in the background.

A restarted engine may serve another model (its folder changed in place): the link then adopts it
before it takes a single answer from it, so :class:`RemoteEncoder` (fingerprint, tokenizer, widths)
and with it the service's cache namespace always describe the model that computes the misses.

This module is what callers use: :class:`EngineLink`'s batcher face (``start``, ``tokenize``,
``embed``, the queue figures the router reads) and the whole server's counters (``whole_server``).
The socket under it, with the reconnection and the model's adoption, is
:mod:`gateway.engine.connection`; the model's description and tokenizer are
:mod:`gateway.engine.remote_encoder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from functools import partial

from encoder.batcher import DENSE_ONLY, InputFailedError, QueueFullError, WorkerCrashedError
from encoder.kinds import OutputKind, Outputs
from gateway.engine.connection import RECONNECT_INTERVAL_S, EngineConnection, EngineUnavailableError
from gateway.engine.ledger import RESTARTS_FILE, read_restarts
from gateway.engine.protocol import (
    EmbedCall,
    EmbedFailed,
    EmbedResult,
    StatsAnswer,
    StatsAsk,
    decode_outputs,
)
from gateway.engine.remote_encoder import FirstRow, RemoteEncoder

__all__ = ["EngineLink", "EngineUnavailableError", "RemoteEncoder"]

logger = logging.getLogger("gateway.worker")

_INLINE_TOKENIZE_CHARS = 2048
PUSH_INTERVAL_S = 1.0  # also how stale the queue figures may get: the engine answers each push with them
# An engine that has answered nothing (not even a push) for this long is hung (SIGSTOP, a wedged
# driver, a deadlock): its link is dropped as if it had died, its calls fail over or get 503, and
# it is reconnected once it answers a hello again. Its event loop answers pushes while passes run
# on their own thread, so a busy engine stays far below this.
SILENCE_S = 5.0


class EngineLink(EngineConnection):
    """One connection to the engine, shared by every request of this worker (many in flight).

    ``max_frame_bytes`` bounds one frame either way (default :data:`~gateway.engine.protocol.MAX_FRAME_BYTES`):
    longer messages go out in several frames, and a frame over it fails only its own request.
    ``ledger``: where this worker keeps its counts, written before every time it sends them; by
    default the supervisor's next to ``socket_path`` (:meth:`Ledger.beside`), if there is one.
    """

    # --- the batcher's face ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Connected to an engine whose batch worker runs (as of its last word, at most
        :data:`PUSH_INTERVAL_S` old): /readyz follows the engine's back-off after a crash."""
        return self._writer is not None and self._engine_ready

    @property
    def queue_tokens(self) -> int:
        """The engine's queued tokens as last heard: from an answer, or the reply to the push sent
        every :data:`PUSH_INTERVAL_S`; 0 while the engine is away (a restarted one starts empty)."""
        return self._queue_tokens

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    @property
    def tokens_per_second(self) -> float:
        return self._tokens_per_second

    @property
    def max_queue_tokens(self) -> int:
        return self._max_queue_tokens

    async def start(self, timeout_s: float = 60.0) -> None:
        """Connect (waiting up to ``timeout_s`` for the engine), learn the model, load its tokenizer."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    await self._connect()
                    break
                except OSError:
                    await asyncio.sleep(RECONNECT_INTERVAL_S)
        self._push_task = asyncio.create_task(self._push_loop(), name="engine-push")

    async def stop(self) -> None:
        self._stopped = True
        for task in (self._push_task, self._reconnect_task, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._drop("the worker is stopping")
        self._keep()

    async def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        assert self.encoder is not None, "EngineLink.start() was not called"
        while True:
            generation, tokenizer = self._generation, self.encoder.tokenizer
            ids: list[list[int]]
            if not texts:
                ids = []
            elif sum(len(text) for text in texts) <= _INLINE_TOKENIZE_CHARS:
                ids = tokenizer.tokenize(texts, truncate=truncate)
            else:
                ids = await asyncio.to_thread(partial(tokenizer.tokenize, texts, truncate=truncate))
            if generation == self._generation:  # else the model changed meanwhile: again, with the new tokenizer
                if ids:
                    ids[0] = FirstRow(ids[0], self.encoder.fingerprint)
                return ids

    async def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[list[int]],
        *,
        kinds: frozenset[OutputKind] = DENSE_ONLY,
        tenant: str = "",
    ) -> list[Outputs]:
        assert self.encoder is not None
        serving = self.encoder.fingerprint
        if any(isinstance(row, FirstRow) and row.fingerprint != serving for row in token_ids):
            # Tokenised for the model the engine served before it restarted: retry under the new one.
            raise EngineUnavailableError("it now serves another model")
        call_id = next(self._ids)
        tokens = sum(len(ids) for ids in token_ids)
        call = EmbedCall(call_id, list(texts), [list(ids) for ids in token_ids], [str(kind) for kind in kinds], tenant)
        self.sent_tokens += tokens  # the router's fresh half of this engine's load
        try:
            answer = await self._ask(call_id, call)
        finally:
            self.sent_tokens -= tokens
        if isinstance(answer, EmbedFailed):
            if answer.kind == "queue_full":
                self._queue_tokens = answer.queued
                raise QueueFullError(answer.queued, answer.limit, answer.retry_after)
            if answer.kind == "crashed":
                self._engine_ready = False  # it backs off now; its next queue state says when it is back
                raise WorkerCrashedError(answer.message)
            raise InputFailedError(answer.message)
        assert isinstance(answer, EmbedResult)
        self._queue_tokens, self._tokens_per_second = answer.queue_tokens, answer.tokens_per_second
        assert self.encoder is not None
        width = self.encoder.output_width(OutputKind.COLBERT)
        return [decode_outputs(item, width) for item in answer.outputs]

    async def whole_server(self) -> StatsAnswer:
        """The engine's counters and every worker's, this worker's sent fresh with the question.

        While the engine is away (restarting: minutes of a model load) the answer comes from the
        ledger alone, with the queue empty as a restarted engine's is: a scrape must not fail
        exactly while the replica is in trouble (Prometheus would lose its series then).
        """
        ask_id = next(self._ids)
        try:
            answer = await self._ask(ask_id, StatsAsk(ask_id, os.getpid(), self._keep()))
        except QueueFullError:
            if self.ledger is None:
                raise
            return self.from_ledger(ask_id)
        if not isinstance(answer, StatsAnswer):
            raise EngineUnavailableError(f"its counters did not come back ({type(answer).__name__})")
        self._queue_tokens = answer.queue_tokens
        return answer

    def from_ledger(self, ask_id: int = 0) -> StatsAnswer:
        """The whole server's counters from the ledger alone (no engine asked): queues empty."""
        if self.ledger is None:
            raise EngineUnavailableError("no engine answered, and there is no ledger to answer from")
        own = self._keep()
        kept = self.ledger.read()
        kept.pop(self.ledger_name, None)
        restarts = read_restarts(self.socket_path.parent / RESTARTS_FILE)
        self._queue_tokens = 0
        return StatsAnswer(
            id=ask_id,
            engine=own,
            workers=list(kept.values()),
            queue_tokens=0,
            in_flight=0,
            tokens_per_second=0.0,
            gpu=None,
            worker_count=restarts.workers,
            engine_restarts=restarts.engine,
            worker_restarts=restarts.worker_restarts,
            from_engine=False,
            engine_name=self.ledger_name,
            names=list(kept),
        )

    async def _push_loop(self) -> None:
        """Every second, this worker's counters to the ledger and the engine (so /stats in any
        worker sees them); the engine answers with its queue, which keeps this worker's queue
        figures fresh."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            writer = self._writer
            if writer is not None and asyncio.get_running_loop().time() - self._heard_at > SILENCE_S:
                logger.error(
                    "the engine at %s has answered nothing for %.0f s: treating it as gone (its calls fail over)",
                    self.socket_path.name,
                    SILENCE_S,
                )
                writer.transport.abort()  # the reader sees the connection lost: drop, then reconnect
                continue
            self._push()
