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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from encoder import Encoder
from encoder.batcher import DENSE_ONLY, InputFailedError, QueueFullError, WorkerCrashedError
from encoder.kinds import OutputKind, Outputs
from encoder.model_files import read_model_spec
from gateway.core.telemetry import Telemetry, TelemetryState
from gateway.engine import protocol
from gateway.engine.ledger import RESTARTS_FILE, Ledger, read_restarts
from gateway.engine.protocol import (
    Cancel,
    Collect,
    EmbedCall,
    EmbedFailed,
    EmbedResult,
    EngineInfo,
    Frame,
    Hello,
    Push,
    QueueState,
    StatsAnswer,
    StatsAsk,
    Unreadable,
    decode_outputs,
    read_frame,
    write_frame,
)

__all__ = ["EngineLink", "EngineUnavailableError", "RemoteEncoder"]

logger = logging.getLogger("gateway.worker")

_INLINE_TOKENIZE_CHARS = 2048
RECONNECT_INTERVAL_S = 0.05
PUSH_INTERVAL_S = 1.0  # also how stale the queue figures may get: the engine answers each push with them
# An engine that has answered nothing (not even a push) for this long is hung (SIGSTOP, a wedged
# driver, a deadlock): its link is dropped as if it had died, its calls fail over or get 503, and
# it is reconnected once it answers a hello again. Its event loop answers pushes while passes run
# on their own thread, so a busy engine stays far below this.
SILENCE_S = 5.0


class EngineUnavailableError(QueueFullError):
    """The engine process cannot be reached now (it is being restarted): retry in a second."""

    def __init__(self, reason: str) -> None:
        self.queued, self.limit, self.retry_after = 0, 0, 1.0
        RuntimeError.__init__(self, f"the encoder is restarting ({reason}); retry shortly")


def load_tokenizer_only(info: EngineInfo, truncate: bool) -> Encoder:
    """An :class:`~encoder.Encoder` with the engine's tokenizer and limits and no weights: only its
    :meth:`~encoder.Encoder.tokenize` and :meth:`~encoder.Encoder.token_names` are used."""
    from transformers import AutoTokenizer

    spec = read_model_spec(Path(info.path))
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    return Encoder(
        model=torch.nn.Module(),
        tokenizer=tokenizer,
        spec=spec,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_tokens=info.max_tokens,
        truncate=truncate,
        threads=1,
        fingerprint=info.fingerprint,
    )


class RemoteEncoder:
    """The engine's encoder as the service and routes see it (see :class:`gateway.core.backend.EncoderInfo`)."""

    def __init__(self, info: EngineInfo, tokenizer: Encoder) -> None:
        self.torch_device = torch.device("cpu")  # no GPU memory here: the engine reports its own
        self.adopt(info, tokenizer)

    def adopt(self, info: EngineInfo, tokenizer: Encoder) -> None:
        """Describe the model ``info`` names from now on: the service, routes and /stats hold this
        object, so they all follow at once."""
        self.info = info
        self.tokenizer = tokenizer
        self.fingerprint = info.fingerprint
        self.numerics = info.numerics
        self.dim = info.dim
        self.max_tokens = info.max_tokens
        self.device = info.device
        self.dtype = info.dtype
        self.threads = info.threads
        self.path = Path(info.path)
        self.outputs = frozenset(OutputKind(kind) for kind in info.widths)

    def output_width(self, kind: OutputKind) -> int:
        return self.info.widths.get(str(kind), 0)

    def token_names(self, ids: list[int]) -> list[str]:
        return self.tokenizer.token_names(ids)

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer.hf_tokenizer


class _FirstRow(list[int]):
    """The first row of ids :meth:`EngineLink.tokenize` returns, marked with the model whose
    tokenizer made it (its ``fingerprint``): the service may cut and join the answers of several
    calls, but keeps the rows, so :meth:`EngineLink.embed` (on this link or another engine's) can
    tell ids made for a model the engine no longer serves."""

    __slots__ = ("fingerprint",)

    def __init__(self, ids: list[int], fingerprint: str) -> None:
        super().__init__(ids)
        self.fingerprint = fingerprint


class EngineLink:
    """One connection to the engine, shared by every request of this worker (many in flight).

    ``max_frame_bytes`` bounds one frame either way (default :data:`~gateway.engine.protocol.MAX_FRAME_BYTES`):
    longer messages go out in several frames, and a frame over it fails only its own request.
    ``ledger``: where this worker keeps its counts, written before every time it sends them; by
    default the supervisor's next to ``socket_path`` (:meth:`Ledger.beside`), if there is one.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        truncate: bool,
        telemetry: Telemetry,
        max_frame_bytes: int | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.truncate = truncate
        self.telemetry = telemetry
        self.ledger = ledger if ledger is not None else Ledger.beside(socket_path)
        self.ledger_name = Ledger.name("worker")
        self.max_frame_bytes = max_frame_bytes or protocol.MAX_FRAME_BYTES
        self.encoder: RemoteEncoder | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)
        self._queue_tokens = 0
        self._tokens_per_second = 3000.0
        self._max_queue_tokens = 0
        self._engine_ready = True
        self._generation = 0  # counts the models adopted: which tokenizer made some ids
        self._stopped = False
        self.reconnects = 0
        self.sent_tokens = 0  # tokens of this worker's calls the engine has not answered yet
        self._heard_at = 0.0  # loop time of the engine's last frame on this connection

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
                    ids[0] = _FirstRow(ids[0], self.encoder.fingerprint)
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
        if any(isinstance(row, _FirstRow) and row.fingerprint != serving for row in token_ids):
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

    # --- the connection --------------------------------------------------------------------
    async def _ask(self, call_id: int, frame: Frame) -> Frame:
        writer = self._writer
        if writer is None:
            raise EngineUnavailableError("no connection to the engine process")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            write_frame(writer, frame, self.max_frame_bytes)
            return await future
        except asyncio.CancelledError:
            if self._writer is writer and not writer.is_closing():
                # the client left: the engine withdraws the inputs
                write_frame(writer, Cancel(call_id), self.max_frame_bytes)
            raise
        finally:
            self._waiting.pop(call_id, None)

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            write_frame(writer, Hello(os.getpid()), self.max_frame_bytes)
            async with asyncio.timeout(10):
                info = await read_frame(reader, self.max_frame_bytes)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise ConnectionError(f"the engine did not answer hello: {exc!r}") from None
        if not isinstance(info, EngineInfo):
            writer.close()
            raise ConnectionError(f"the engine answered hello with {type(info).__name__}")
        try:
            await self._adopt(info)
        except BaseException:
            writer.close()
            raise
        # Only now may answers arrive: every one of them is read with this engine's model in place.
        self._max_queue_tokens = info.max_queue_tokens
        self._queue_tokens, self._tokens_per_second = info.queue_tokens, info.tokens_per_second
        self._engine_ready = info.ready
        self._writer = writer
        self._heard_at = asyncio.get_running_loop().time()
        self._reader_task = asyncio.create_task(self._read(reader, writer), name="engine-reader")

    async def _adopt(self, info: EngineInfo) -> None:
        """Take the model ``info`` names (the first one, or a restarted engine's new one)."""
        encoder = self.encoder
        if encoder is not None and (info.fingerprint, info.path) == (encoder.fingerprint, str(encoder.path)):
            encoder.adopt(info, encoder.tokenizer)  # the same model; device, threads... as they are now
            return
        tokenizer = await asyncio.to_thread(load_tokenizer_only, info, self.truncate)
        if encoder is None:
            self.encoder = RemoteEncoder(info, tokenizer)
            return
        logger.warning(
            "the restarted engine serves another model (fingerprint %s, was %s; %s): this worker adopts it, "
            "its cache namespace follows",
            info.fingerprint,
            encoder.fingerprint,
            info.path,
        )
        self._generation += 1
        encoder.adopt(info, tokenizer)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await read_frame(reader, self.max_frame_bytes)
                self._heard_at = asyncio.get_running_loop().time()
                if isinstance(frame, Collect):
                    self._push()
                    continue
                if isinstance(frame, QueueState):
                    self._queue_tokens, self._tokens_per_second = frame.queue_tokens, frame.tokens_per_second
                    self._engine_ready = frame.ready
                    continue
                if isinstance(frame, Unreadable):
                    self._unreadable(frame)
                    continue
                call_id = getattr(frame, "id", None)
                future = self._waiting.get(call_id) if isinstance(call_id, int) else None
                if future is not None and not future.done():
                    future.set_result(frame)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not self._stopped:
                logger.warning(
                    "lost the engine process at %s (%s); its work goes to the other engines, if any, else 503, "
                    "until it is back",
                    self.socket_path.name,
                    type(exc).__name__,
                )
        finally:
            writer.close()
            if self._writer is writer:
                self._drop("the engine process went away")
                if not self._stopped:
                    self._reconnect_task = asyncio.create_task(self._reconnect(), name="engine-reconnect")

    def _unreadable(self, frame: Unreadable) -> None:
        """An answer this side could not take fails its own request; the link and the others go on."""
        logger.error("an answer from the engine could not be read: %s", frame.reason)
        future = self._waiting.get(frame.id)
        if future is not None and not future.done():
            future.set_exception(InputFailedError(f"the engine's answer could not be read: {frame.reason}"))

    def _drop(self, reason: str) -> None:
        self._writer = None
        self._queue_tokens = 0  # that engine's queue is gone with it; a new one starts empty
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(EngineUnavailableError(reason))

    async def _reconnect(self) -> None:
        while not self._stopped:
            try:
                await self._connect()
            except OSError:
                await asyncio.sleep(RECONNECT_INTERVAL_S)
                continue
            except Exception:  # e.g. the new model's tokenizer does not load: keep trying, never give up
                logger.exception("could not take the restarted engine's model; trying again")
                await asyncio.sleep(1.0)
                continue
            self.reconnects += 1
            logger.info("connected to the engine process again")
            self._push()
            return

    def _keep(self) -> TelemetryState:
        """This worker's counters now, written to the ledger first: the engine reports them to
        scrapes, and once reported they must outlive this process."""
        state = self.telemetry.state()
        if self.ledger is not None:
            self.ledger.write(self.ledger_name, state)
        return state

    def _push(self) -> None:
        state = self._keep()  # also while the engine is away: a worker killed then keeps its counts
        writer = self._writer
        if writer is not None and not writer.is_closing():
            write_frame(writer, Push(os.getpid(), state), self.max_frame_bytes)

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
