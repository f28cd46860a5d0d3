"""One worker's socket to the engine process: hello, answers, reconnection and counters.

:class:`EngineConnection` owns the connection and everything that happens on it without a caller
asking: the hello that tells the worker which model the engine serves, the reader task that hands
each answer to the call waiting for it, the reconnection after the engine died (the supervisor
restarts it), and the counters the worker writes to the ledger and pushes to the engine. When the
engine is unreachable, a call fails at once with :class:`EngineUnavailableError`, a
:class:`~encoder.batcher.QueueFullError`, so clients get 503 with Retry-After, never a hang.

A restarted engine may serve another model (its folder changed in place): the connection then
adopts it before it takes a single answer from it (:meth:`EngineConnection._adopt`), so
:class:`~gateway.engine.remote_encoder.RemoteEncoder` and with it the service's cache namespace
always describe the model that computes the misses.

What callers use, the stand-in for the micro-batcher, is :class:`~gateway.engine.client.EngineLink`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path

from encoder.batcher import InputFailedError, QueueFullError
from gateway.core.telemetry import Telemetry, TelemetryState
from gateway.engine import protocol
from gateway.engine.ledger import Ledger
from gateway.engine.protocol import (
    Cancel,
    Collect,
    EngineInfo,
    Frame,
    Hello,
    Push,
    QueueState,
    Unreadable,
    read_frame,
    write_frame,
)
from gateway.engine.remote_encoder import RemoteEncoder, load_tokenizer_only

__all__ = ["RECONNECT_INTERVAL_S", "EngineConnection", "EngineUnavailableError"]

logger = logging.getLogger("gateway.worker")

RECONNECT_INTERVAL_S = 0.05


class EngineUnavailableError(QueueFullError):
    """The engine process cannot be reached now (it is being restarted): retry in a second."""

    def __init__(self, reason: str) -> None:
        self.queued, self.limit, self.retry_after = 0, 0, 1.0
        RuntimeError.__init__(self, f"the encoder is restarting ({reason}); retry shortly")


class EngineConnection:
    """The socket to one engine and its reader, reconnection and counters; the calls made over it
    are :class:`~gateway.engine.client.EngineLink`'s, which also documents the arguments."""

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
