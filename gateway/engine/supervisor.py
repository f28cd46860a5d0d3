"""``EMBED_WORKERS > 1``: the ``serve`` process becomes a supervisor of one engine and N workers.

* the engine (``python -m gateway engine``) loads the model and listens on a Unix socket in a
  private temporary folder; workers start once it answers;
* each worker (``python -m gateway worker``) binds the HTTP port with ``SO_REUSEPORT``, so the
  kernel spreads new connections over the workers (no accept lock, no shared socket to hand over);
* each child reads its settings as one JSON line on its stdin, never from its command line (which
  any local user can read: the settings hold the API keys and the Redis password);
* an engine that dies is restarted (workers answer 503 + Retry-After meanwhile and reconnect);
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
from pathlib import Path

import msgspec

from gateway.engine.ledger import FOLDER, RESTARTS_FILE, Ledger, Restarts
from gateway.settings import Settings

__all__ = ["Supervisor", "reuseport_socket"]

logger = logging.getLogger("gateway.supervisor")

POLL_S = 0.05


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with ``SO_REUSEPORT`` (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folder = Path(tempfile.mkdtemp(prefix="embedding-gateway-"))
        self.socket_path = self.folder / "engine.sock"
        self.restarts_path = self.folder / RESTARTS_FILE
        self.restarts = Restarts(workers=settings.workers)
        (self.folder / FOLDER).mkdir(mode=0o700)
        self.ledger = Ledger(self.folder / FOLDER)
        self.engine: subprocess.Popen[bytes] | None = None
        self.engine_ready = False  # the engine of self.engine has opened its socket
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * settings.workers
        self.stopping = threading.Event()
        self._settings_line = b""

    def _command(self, role: str) -> list[str]:
        args = [sys.executable, "-m", "gateway", role, "--socket", str(self.socket_path)]
        if role == "engine":
            args += ["--restarts-file", str(self.restarts_path)]
        else:
            # The worker compares its parent with this pid from its first line on: read later, a
            # supervisor killed while the worker imports would already look like its parent (init).
            args += ["--supervisor-pid", str(os.getpid())]
        return args

    def _spawn(self, role: str) -> subprocess.Popen[bytes]:
        """Start ``role`` and hand it the settings on its stdin. A worker's stdin is closed then; the
        engine's stays open as its stop pipe (closed by :meth:`_stop_engine`, or by our death)."""
        process = subprocess.Popen(self._command(role), stdin=subprocess.PIPE)
        assert process.stdin is not None
        try:
            process.stdin.write(self._settings_line)
            process.stdin.flush()
        except OSError:
            pass  # it died at once: the caller sees it exit
        if role != "engine":
            _close_stdin(process)
        return process

    def _write_restarts(self) -> None:
        staging = self.restarts_path.with_suffix(".tmp")
        staging.write_bytes(msgspec.json.encode(self.restarts))
        staging.replace(self.restarts_path)

    def _start_engine(self) -> bool:
        """Start the engine and wait for its socket; False when it died or never answered."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self.engine is not None:
            _close_stdin(self.engine)  # the last engine's stop pipe (it has exited)
        self.engine_ready = False
        self.engine = engine = self._spawn("engine")
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            if engine.poll() is not None:
                logger.error("the engine exited with %s while starting", engine.returncode)
                return False
            if self.socket_path.exists():
                self.engine_ready = True
                return True
            time.sleep(POLL_S)
        return False

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
        # msgspec's JSON has no raw newline: the settings are exactly one line.
        self._settings_line = msgspec.json.encode(msgspec.structs.replace(settings, port=port)) + b"\n"
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda *_: self.stopping.set())
        try:
            self._write_restarts()
            if not self._start_engine():
                return 1
            logger.info("engine ready (pid %d); starting %d workers on port %d", self._pid(), settings.workers, port)
            for index in range(settings.workers):
                self._start_worker(index)
            self._watch()
            return self._drain()
        finally:
            self._kill_all()
            holder.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _pid(self) -> int:
        return self.engine.pid if self.engine is not None else 0

    def _watch(self) -> None:
        while not self.stopping.wait(POLL_S):
            engine = self.engine
            if engine is not None and engine.poll() is not None:
                self.restarts.engine += 1
                self._write_restarts()
                self._retire(engine.pid)
                logger.error(
                    "the engine process (pid %d) exited with %s; restarting it (restart %d); workers answer 503 "
                    "meanwhile",
                    engine.pid,
                    engine.returncode,
                    self.restarts.engine,
                )
                started = time.monotonic()
                if self._start_engine():
                    logger.info("engine back after %.1f s (pid %d)", time.monotonic() - started, self._pid())
                elif not self.stopping.is_set():
                    time.sleep(1.0)  # it failed to start: try again, but not in a tight loop
            for index, worker in enumerate(self.workers):
                if worker is not None and worker.poll() is not None and not self.stopping.is_set():
                    self.restarts.worker_restarts += 1
                    self._write_restarts()
                    logger.error("worker %d (pid %d) exited with %s; restarting", index, worker.pid, worker.returncode)
                    self._retire(worker.pid)
                    self._start_worker(index)

    def _retire(self, pid: int) -> None:
        """Fold reaped child ``pid``'s counts into the retired sum, before its pid can be reused."""
        try:
            self.ledger.retire(pid)
        except Exception:  # lost counts are bad; a supervisor that stops restarting children is worse
            logger.exception("could not fold the counters of process %d", pid)

    def _drain(self) -> int:
        """Workers first (they finish requests that still need the engine), then the engine."""
        logger.info("stopping: draining %d workers, then the engine", len(self.workers))
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
        return 0 if self._stop_engine() and clean else 1

    def _stop_engine(self) -> bool:
        """Close the engine's stop pipe and wait for it; False when it had to be killed."""
        engine = self.engine
        if engine is None or engine.poll() is not None:
            return True
        if not self.engine_ready:
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
        for process in [*self.workers, self.engine]:
            if process is not None:
                _close_stdin(process)
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)


def _close_stdin(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
