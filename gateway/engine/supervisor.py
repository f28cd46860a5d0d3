"""``EMBED_WORKERS > 1`` or several ``EMBED_DEVICES``: ``serve`` becomes a supervisor of the engines and N workers.

* each engine (``python -m gateway engine``, one per ``EMBED_DEVICES`` entry, else one; with
  ``EMBED_MODELS_FILE`` that many for each model) loads its model on its device and listens on its
  Unix socket in a private temporary folder; workers start once every engine answers, and each
  worker links to every engine
  (:class:`~gateway.engine.router.EngineRouter`);
* each worker (``python -m gateway worker``) binds the HTTP port with ``SO_REUSEPORT``, so the
  kernel spreads new connections over the workers (no accept lock, no shared socket to hand over);
* each child reads its settings as one JSON line on its stdin, never from its command line (which
  any local user can read: the settings hold the API keys and the Redis password);
* an engine that dies is restarted (its work goes to the other engines meanwhile, else workers
  answer 503 + Retry-After; they reconnect);
  a worker that dies is restarted; both are logged and counted for /stats;
* every child keeps its counters in the ledger, ``telemetry/`` in the supervisor's folder
  (:mod:`gateway.engine.ledger`); the supervisor folds a dead child's into the retired sum before
  starting its successor, so /metrics' counters survive any child's death and only grow;
* SIGTERM or SIGINT, to the supervisor alone or to the whole process group (Ctrl-C in a terminal,
  systemd): workers drain first (uvicorn's graceful shutdown, finishing requests that still need
  the engine), then the supervisor closes the engine's stdin, its one stop signal (the engine
  ignores SIGINT and SIGTERM, so a signal to the group cannot stop it under the draining
  workers); exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from gateway.engine.ledger import FOLDER, RESTARTS_FILE, Ledger, Restarts
from gateway.settings import Settings

__all__ = ["Supervisor", "reuseport_socket"]

logger = logging.getLogger("gateway.supervisor")

POLL_S = 0.05
RESTART_INTERVAL_S = 1.0  # at most one restart of an engine a second


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with ``SO_REUSEPORT`` (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Runs one engine per entry of ``EMBED_DEVICES`` (or one on ``EMBED_DEVICE``) for each model
    (``models``: the models file's, else ``settings``' own) and ``EMBED_WORKERS`` HTTP workers, each
    worker linked to every engine."""

    def __init__(self, settings: Settings, models: Sequence[Settings] = ()) -> None:
        self.settings = settings
        self.folder = Path(tempfile.mkdtemp(prefix="embedding-gateway-"))
        # One engine per model and device (EMBED_MODELS_FILE: each model's settings), model after
        # model: workers split the sockets into one group per model in this order.
        self.models = list(models) or [settings]
        self.plan = [(model, device) for model in self.models for device in model.engine_devices]
        self.devices = [device for _, device in self.plan]
        # engine 0 keeps the one-engine name: scripts and tests find the folder by it
        self.socket_paths = [
            self.folder / ("engine.sock" if i == 0 else f"engine-{i}.sock") for i in range(len(self.devices))
        ]
        self.restarts_path = self.folder / RESTARTS_FILE
        self.restarts = Restarts(workers=settings.workers)
        (self.folder / FOLDER).mkdir(mode=0o700)
        self.ledger = Ledger(self.folder / FOLDER)
        self.engines: list[subprocess.Popen[bytes] | None] = [None] * len(self.devices)
        self.engines_ready = [False] * len(self.devices)  # each engine has opened its socket
        # engines being restarted: index -> (spawned at, deadline); the watch loop checks them each poll
        self.restarting: dict[int, tuple[float, float]] = {}
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * settings.workers
        self.stopping = threading.Event()
        self.start_refused = False  # an engine exited 2 while starting (a quality gate, a setting)
        self._worker_line = b""
        self._engine_lines: list[bytes] = []

    @property
    def socket_path(self) -> Path:
        """Engine 0's socket (the one engine's, where there is one)."""
        return self.socket_paths[0]

    def _command(self, role: str, index: int = 0) -> list[str]:
        args = [sys.executable, "-m", "gateway", role]
        if role == "engine":
            args += ["--socket", str(self.socket_paths[index]), "--restarts-file", str(self.restarts_path)]
        else:
            for path in self.socket_paths:
                args += ["--socket", str(path)]
            # The worker compares its parent with this pid from its first line on: read later, a
            # supervisor killed while the worker imports would already look like its parent (init).
            args += ["--supervisor-pid", str(os.getpid())]
        return args

    def _spawn(self, role: str, index: int = 0) -> subprocess.Popen[bytes]:
        """Start ``role`` and hand it the settings on its stdin. A worker's stdin is closed then; the
        engine's stays open as its stop pipe (closed by :meth:`_stop_engine`, or by our death)."""
        process = subprocess.Popen(self._command(role, index), stdin=subprocess.PIPE)
        assert process.stdin is not None
        try:
            process.stdin.write(self._engine_lines[index] if role == "engine" else self._worker_line)
            process.stdin.flush()
        except OSError:
            pass  # it died at once: the caller sees it exit
        if role != "engine":
            _close_stdin(process)
        return process

    def _settings_lines(self, settings: Settings) -> None:
        """The workers' settings, and each engine's: its own device, and on the CPU its share of
        the cores when ``EMBED_CPU_THREADS`` is 0 (``cpu,cpu`` on 16 cores: 8 threads each)."""
        # msgspec's JSON has no raw newline: the settings are exactly one line.
        self._worker_line = msgspec.json.encode(settings) + b"\n"
        # The cores are shared by device entry: several models' engines on one entry each get all of
        # its share (one used alone runs at full speed; used together they take turns on the cores).
        for model, device in self.plan:
            entries = len(model.engine_devices)
            share = max(1, _usable_cores() // entries)
            threads = model.cpu_threads or (share if device == "cpu" and entries > 1 else 0)
            engine = msgspec.structs.replace(
                model, device=device, devices=(), cpu_threads=threads, port=settings.port, models_file=""
            )
            self._engine_lines.append(msgspec.json.encode(engine) + b"\n")

    def _write_restarts(self) -> None:
        staging = self.restarts_path.with_suffix(".tmp")
        staging.write_bytes(msgspec.json.encode(self.restarts))
        staging.replace(self.restarts_path)

    def _spawn_engine(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_paths[index].unlink()
        old = self.engines[index]
        if old is not None:
            _close_stdin(old)  # the last engine's stop pipe (it has exited)
        self.engines_ready[index] = False
        self.engines[index] = self._spawn("engine", index)

    def _start_engines(self, indices: list[int]) -> bool:
        """Start the engines ``indices`` together (their models load side by side) and wait for
        their sockets; False when one died or never answered. Only the first start waits here:
        a restart is watched by :meth:`_watch`, beside everything else it supervises."""
        for index in indices:
            self._spawn_engine(index)
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        waiting = list(indices)
        while waiting and time.monotonic() < deadline and not self.stopping.is_set():
            for index in list(waiting):
                engine = self.engines[index]
                assert engine is not None
                if engine.poll() is not None:
                    logger.error("engine %d exited with %s while starting", index, engine.returncode)
                    self.start_refused = engine.returncode == 2  # a gate or a setting: one line said why
                    return False
                if self.socket_paths[index].exists():
                    self.engines_ready[index] = True
                    waiting.remove(index)
            time.sleep(POLL_S)
        return not waiting

    def _start_worker(self, index: int) -> None:
        self.workers[index] = self._spawn("worker")

    def run(self) -> int:
        settings = self.settings
        # Reserve the port (and learn it when 0 was asked): workers join this SO_REUSEPORT group.
        try:
            holder = reuseport_socket(settings.host, settings.port)
        except OSError as exc:
            print(f"embedding-gateway: cannot bind {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
            return 1
        port = holder.getsockname()[1]
        self._settings_lines(msgspec.structs.replace(settings, port=port))
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda *_: self.stopping.set())
        try:
            self._write_restarts()
            if not self._start_engines(list(range(len(self.devices)))):
                return 2 if self.start_refused else 1
            logger.info(
                "%d engine(s) ready (%s; pids %s); starting %d workers on port %d",
                len(self.devices),
                ",".join(self.devices),
                ",".join(str(pid) for pid in self._pids()),
                settings.workers,
                port,
            )
            for index in range(settings.workers):
                self._start_worker(index)
            self._watch()
            return self._drain()
        finally:
            self._kill_all()
            holder.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _pids(self) -> list[int]:
        return [engine.pid if engine is not None else 0 for engine in self.engines]

    def _watch(self) -> None:
        while not self.stopping.wait(POLL_S):
            for index, engine in enumerate(self.engines):
                if engine is None or self.stopping.is_set():
                    continue
                if engine.poll() is not None:
                    self._restart_engine(index, engine)
                elif index in self.restarting:
                    self._check_restart(index, engine)
            for index, worker in enumerate(self.workers):
                if worker is not None and worker.poll() is not None and not self.stopping.is_set():
                    self.restarts.worker_restarts += 1
                    self._write_restarts()
                    logger.error("worker %d (pid %d) exited with %s; restarting", index, worker.pid, worker.returncode)
                    self._retire(worker.pid)
                    self._start_worker(index)

    def _restart_engine(self, index: int, engine: subprocess.Popen[bytes]) -> None:
        """Engine ``index`` has exited: count it, fold its counts, and spawn another (at most one a
        second: one that dies at once is not restarted in a tight loop). Its start is watched by
        :meth:`_check_restart`; nothing waits for it here, so a model that loads for minutes (or
        hangs) never stops the other engines and the workers being supervised."""
        spawned, _ = self.restarting.get(index, (0.0, 0.0))
        if time.monotonic() - spawned < RESTART_INTERVAL_S:
            return  # the next poll restarts it
        self.restarts.engine += 1
        self._write_restarts()
        self._retire(engine.pid)
        others = len(self.devices) - 1
        logger.error(
            "engine %d (%s, pid %d) exited with %s; restarting it (restart %d); %s meanwhile",
            index,
            self.devices[index],
            engine.pid,
            engine.returncode,
            self.restarts.engine,
            f"the other {others} engine(s) take its work" if others else "workers answer 503",
        )
        self._spawn_engine(index)
        now = time.monotonic()
        self.restarting[index] = (now, now + self.settings.engine_start_timeout_s)

    def _check_restart(self, index: int, engine: subprocess.Popen[bytes]) -> None:
        spawned, deadline = self.restarting[index]
        if self.socket_paths[index].exists():
            self.engines_ready[index] = True
            del self.restarting[index]
            logger.info("engine %d back after %.1f s (pid %d)", index, time.monotonic() - spawned, engine.pid)
        elif time.monotonic() > deadline:
            logger.error(
                "engine %d (pid %d) did not open its socket within %.0f s (EMBED_ENGINE_START_TIMEOUT_S); killing it",
                index,
                engine.pid,
                self.settings.engine_start_timeout_s,
            )
            engine.kill()  # the next poll sees it exit and starts another

    def _retire(self, pid: int) -> None:
        """Fold reaped child ``pid``'s counts into the retired sum, before its pid can be reused."""
        try:
            self.ledger.retire(pid)
        except Exception:  # lost counts are bad; a supervisor that stops restarting children is worse
            logger.exception("could not fold the counters of process %d", pid)

    def _drain(self) -> int:
        """Workers first (they finish requests that still need the engines), then the engines."""
        logger.info("stopping: draining %d workers, then the engines", len(self.workers))
        live = [worker for worker in self.workers if worker is not None and worker.poll() is None]
        for worker in live:
            worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 10
        clean = True
        for worker in live:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                clean = False
        stopped = [self._stop_engine(index) for index in range(len(self.engines))]
        return 0 if all(stopped) and clean else 1

    def _stop_engine(self, index: int) -> bool:
        """Close engine ``index``'s stop pipe and wait for it; False when it had to be killed."""
        engine = self.engines[index]
        if engine is None or engine.poll() is not None:
            return True
        if not self.engines_ready[index]:
            engine.kill()  # still loading the model: nothing in it to finish
            engine.wait(timeout=10)
            return True
        _close_stdin(engine)
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            return False
        return True

    def _kill_all(self) -> None:
        for process in [*self.workers, *self.engines]:
            if process is not None:
                _close_stdin(process)
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)


def _usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share), as one engine counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _close_stdin(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
