"""The engine process: the model, the one micro-batcher, and a Unix socket the HTTP workers share.

Every worker's misses join the same queue, so they share forward passes and in-flight dedupe
exactly as one process's requests do. The engine also answers for the whole server's counters: its
own (batches, queue events) plus every other process's, live or dead, from the supervisor's ledger
(:mod:`gateway.engine.ledger`), for /stats and /metrics. It writes its own there every second and
before each answer, so neither its death nor a worker's takes back a count a scrape has seen.

It stops only when the supervisor says so, by closing the engine's stdin (its death closes it too),
never on SIGINT or SIGTERM: a Ctrl-C reaches the whole process group and systemd signals every
process of the unit, and the workers still need the engine while they drain what they accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from encoder import Encoder
from encoder.batcher import InputFailedError, MicroBatcher, QueueFullError, WorkerCrashedError
from encoder.kinds import OutputKind
from gateway.core.telemetry import ModelTelemetry, Telemetry, TelemetryState, gpu_stats
from gateway.engine import protocol
from gateway.engine.ledger import Ledger, Restarts, read_restarts
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
    encode_outputs,
    read_frame,
    write_frame,
)
from gateway.loading import load_model as load_configured_model
from gateway.settings import Settings

__all__ = ["EngineServer", "Restarts", "StopPipe", "run_engine"]

logger = logging.getLogger("gateway.engine")

COLLECT_TIMEOUT_S = 0.25  # a worker too busy to send its counters by then is reported as last pushed
KEEP_INTERVAL_S = 1.0  # how often the engine writes its counters to the ledger (and before each answer)


class EngineServer:
    """``max_frame_bytes`` bounds one frame either way (default :data:`~gateway.engine.protocol.MAX_FRAME_BYTES`).

    ``ledger``: where every process keeps its counts; by default the supervisor's, next to
    ``socket_path`` (:meth:`Ledger.beside`), and none without a supervisor: then /stats sums this
    engine's counters and the last ones each worker sent it.
    """

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder,
        socket_path: Path,
        restarts_path: Path | None,
        *,
        max_frame_bytes: int | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.max_frame_bytes = max_frame_bytes or protocol.MAX_FRAME_BYTES
        self.encoder = encoder
        self.socket_path = socket_path
        self.restarts_path = restarts_path
        self.telemetry = Telemetry()
        self.batcher = MicroBatcher(
            encoder,
            max_batch_tokens=settings.max_batch_tokens or None,
            max_batch_size=settings.max_batch_size,
            max_queue_tokens=settings.max_queue_tokens,
            pipeline_depth=settings.pipeline_depth,
            # counted under the model's id too: /stats' ``models`` when a models file serves several
            observer=ModelTelemetry(self.telemetry, settings.served_model),
        )
        self.worker_states: dict[int, TelemetryState] = {}  # worker pid -> its latest counters
        self.ledger = ledger if ledger is not None else Ledger.beside(socket_path)
        self.ledger_name = Ledger.name("engine")
        self._keeper: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._fresh: dict[asyncio.StreamWriter, asyncio.Event] = {}  # set when that worker pushed

    def info(self) -> EngineInfo:
        encoder = self.encoder
        return EngineInfo(
            pid=os.getpid(),
            fingerprint=encoder.fingerprint,
            numerics=encoder.numerics,
            dim=encoder.dim,
            max_tokens=encoder.max_tokens,
            widths={str(kind): encoder.output_width(kind) for kind in encoder.outputs},
            device=encoder.device,
            dtype=encoder.dtype,
            threads=encoder.threads,
            path=str(encoder.path),
            max_queue_tokens=self.batcher.max_queue_tokens,
            queue_tokens=self.batcher.queue_tokens,
            tokens_per_second=self.batcher.tokens_per_second,
            ready=self.batcher.running,
        )

    def _write(self, writer: asyncio.StreamWriter, frame: Frame) -> None:
        write_frame(writer, frame, self.max_frame_bytes)

    async def start(self) -> None:
        await self.batcher.start()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # Bind under a temporary name, then rename: a worker never connects to a half-started engine.
        staging = self.socket_path.with_name(self.socket_path.name + f".{os.getpid()}")
        self._server = await asyncio.start_unix_server(self._serve_connection, path=str(staging))
        staging.chmod(0o600)
        staging.rename(self.socket_path)
        if self.ledger is not None:
            self._keeper = asyncio.create_task(self._keep_loop(), name="engine-ledger")

    def _keep(self) -> TelemetryState:
        """This engine's counters now, written to the ledger first: nothing is reported unkept."""
        state = self.telemetry.state()
        if self.ledger is not None:
            self.ledger.write(self.ledger_name, state)
        return state

    async def _keep_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEP_INTERVAL_S)
            self._keep()

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._server is not None:
            self._server.close()
        # Closed, not cancelled: each connection's task then ends as when its worker leaves (asyncio
        # logs a cancelled connection task as an error).
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.batcher.stop()
        self._keep()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._connections[current] = writer
        calls: dict[int, asyncio.Task[None]] = {}
        fresh = self._fresh[writer] = asyncio.Event()
        try:
            while True:
                try:
                    frame = await read_frame(reader, self.max_frame_bytes)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(frame, Unreadable):
                    # Only that request fails; the worker's other requests go on.
                    logger.error("a worker's message could not be read: %s", frame.reason)
                    if frame.id:
                        failed = EmbedFailed(frame.id, "error", f"the engine could not read it: {frame.reason}")
                        self._write(writer, failed)
                elif isinstance(frame, EmbedCall):
                    task = asyncio.create_task(self._embed(frame, writer))
                    calls[frame.id] = task
                    task.add_done_callback(partial(_forget, calls, frame.id))
                elif isinstance(frame, Cancel):
                    found = calls.get(frame.id)
                    if found is not None:
                        found.cancel()  # the worker's client left: withdraw its inputs
                elif isinstance(frame, Push):
                    self.worker_states[frame.pid] = frame.state
                    fresh.set()
                    # The queue now, so the worker's queue figures never outlive the burst they saw.
                    self._write(
                        writer,
                        QueueState(self.batcher.queue_tokens, self.batcher.tokens_per_second, self.batcher.running),
                    )
                elif isinstance(frame, StatsAsk):
                    self.worker_states[frame.pid] = frame.state
                    task = asyncio.create_task(self._answer_stats(frame.id, writer))
                    calls[-frame.id] = task
                    task.add_done_callback(partial(_forget, calls, -frame.id))
                elif isinstance(frame, Hello):
                    self._write(writer, self.info())
        finally:
            for task in calls.values():
                task.cancel()
            writer.close()
            self._fresh.pop(writer, None)
            if current is not None:
                self._connections.pop(current, None)

    async def _embed(self, call: EmbedCall, writer: asyncio.StreamWriter) -> None:
        answer: EmbedResult | EmbedFailed
        try:
            kinds = frozenset(OutputKind(kind) for kind in call.kinds)
            outputs = await self.batcher.embed(call.texts, call.token_ids, kinds=kinds, tenant=call.tenant)
            answer = EmbedResult(
                id=call.id,
                outputs=[encode_outputs(item) for item in outputs],
                queue_tokens=self.batcher.queue_tokens,
                tokens_per_second=self.batcher.tokens_per_second,
            )
            if writer.is_closing():
                return
            self._write(writer, answer)
        except QueueFullError as exc:
            answer = EmbedFailed(call.id, "queue_full", str(exc), exc.retry_after, exc.queued, exc.limit)
        except WorkerCrashedError as exc:
            answer = EmbedFailed(call.id, "crashed", str(exc))
        except InputFailedError as exc:
            answer = EmbedFailed(call.id, "input_failed", str(exc))
        except Exception as exc:  # whatever fails, the worker gets an answer: never a request that hangs
            logger.exception("embedding for a worker failed")
            answer = EmbedFailed(call.id, "error", f"the engine failed: {type(exc).__name__}")
        if isinstance(answer, EmbedFailed) and not writer.is_closing():
            self._write(writer, answer)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _answer_stats(self, ask_id: int, asker: asyncio.StreamWriter) -> None:
        """Collect every other worker's counters now (briefly), so /stats is the whole server's."""
        waiting = []
        for writer, fresh in self._fresh.items():
            if writer is not asker and not writer.is_closing():
                fresh.clear()
                self._write(writer, Collect())
                waiting.append(fresh.wait())
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COLLECT_TIMEOUT_S):
                    await asyncio.gather(*waiting)
        answer: StatsAnswer | EmbedFailed
        try:
            answer = self._stats(ask_id)
        except Exception as exc:  # the asker gets an answer (its /stats a 503), never a question that hangs
            logger.exception("the whole server's counters could not be summed")
            answer = EmbedFailed(ask_id, "error", f"the engine could not sum the counters: {type(exc).__name__}")
        if not asker.is_closing():
            self._write(asker, answer)

    def _stats(self, ask_id: int) -> StatsAnswer:
        gpu = gpu_stats(self.encoder.torch_device)
        restarts = read_restarts(self.restarts_path)
        engine = self._keep()
        if self.ledger is None:
            names = [Ledger.name("worker", pid) for pid in self.worker_states]
            others = list(self.worker_states.values())
        else:
            # Every worker wrote what it sent (the asker's, the collected ones') before sending it;
            # dead workers' and engines' counts are there too.
            kept = self.ledger.read()
            kept.pop(self.ledger_name, None)  # this engine's: ``engine``, as just written
            names, others = list(kept), list(kept.values())
        return StatsAnswer(
            id=ask_id,
            engine=engine,
            workers=others,
            queue_tokens=self.batcher.queue_tokens,
            in_flight=self.batcher.in_flight,
            tokens_per_second=self.batcher.tokens_per_second,
            gpu=gpu,
            worker_count=restarts.workers,
            engine_restarts=restarts.engine,
            worker_restarts=restarts.worker_restarts,
            engine_name=self.ledger_name,
            names=names,
        )


def _forget(calls: dict[int, asyncio.Task[None]], call_id: int, _: asyncio.Task[None]) -> None:
    calls.pop(call_id, None)


class StopPipe:
    """The engine's stop signal: the supervisor closes the pipe it holds to the engine's stdin once
    the workers have drained; if the supervisor dies, the kernel closes it as well."""

    def __init__(self, pipe: BinaryIO) -> None:
        self.closed = threading.Event()
        threading.Thread(target=self._wait, args=(pipe,), name="stop-pipe", daemon=True).start()

    def _wait(self, pipe: BinaryIO) -> None:
        with contextlib.suppress(OSError, ValueError):
            while pipe.read(4096):
                pass  # the supervisor writes nothing more after the settings: only the end counts
        self.closed.set()


async def _watch(parent: int, stop_pipe: StopPipe | None, stop: asyncio.Event) -> None:
    """Stop when the supervisor closes the stop pipe, or is gone (an orphan never holds the model)."""
    while not stop.is_set():
        if stop_pipe is not None and stop_pipe.closed.is_set():
            logger.info("the supervisor stops the engine")
            stop.set()
        elif os.getppid() != parent:
            logger.warning("the supervisor is gone; the engine stops")
            stop.set()
        else:
            await asyncio.sleep(0.1)


async def _main(server: EngineServer, stop_pipe: StopPipe | None) -> None:
    stop = asyncio.Event()
    await server.start()
    # The model, tokenizer and torch's objects live as long as the process: out of the collector's
    # reach, so its full passes scan only what requests leave behind (half the planning time of a
    # 20,000-caller queue was the collector walking torch's objects; bench/planning.py --freeze).
    gc.collect()
    gc.freeze()
    watcher = asyncio.create_task(_watch(os.getppid(), stop_pipe, stop))
    logger.info("engine ready on %s (pid %d)", server.socket_path, os.getpid())
    await stop.wait()
    watcher.cancel()
    await server.stop()
    logger.info("engine stopped")


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM do not stop the engine (see the module's docstring): the supervisor does."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def run_engine(
    settings: Settings,
    socket_path: Path,
    load_model: Callable[[Settings], Encoder] = load_configured_model,
    restarts_path: Path | None = None,
    stop_pipe: BinaryIO | None = None,
) -> int:
    """Load the model with ``load_model`` (by default :func:`gateway.loading.load_model`, the loader
    the single-process server uses too; the engine never imports :mod:`gateway.http`), then serve
    workers on ``socket_path`` until ``stop_pipe`` closes (or the supervisor is gone)."""
    ignore_stop_signals()
    stopper = StopPipe(stop_pipe) if stop_pipe is not None else None
    started = time.perf_counter()
    encoder = load_model(settings)
    logger.info("engine loaded the model in %.1f s", time.perf_counter() - started)
    asyncio.run(_main(EngineServer(settings, encoder, socket_path, restarts_path), stopper))
    return 0
