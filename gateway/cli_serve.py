"""The serving side of the command line: ``serve``, and the ``engine`` and ``worker`` processes.

``serve`` checks the settings (``gateway.cli_preflight``), loads each model and warms it up, and
only then opens the port, so the port answers only once the model can. With ``EMBED_WORKERS`` above
1 or several ``EMBED_DEVICES`` it starts a supervisor instead, which runs one engine process per
device (the model and its batcher behind a Unix socket) and the HTTP worker processes in front of
them; those processes are this same program, started as ``engine`` and ``worker``, and read their
settings as one JSON line on stdin (never on the command line, where any local user could read the
API keys and the Redis password).

Logging is set up here too: plain lines, or one JSON object per line (``EMBED_LOG_FORMAT=json``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli_preflight import preflight
from gateway.settings import Settings

logger = logging.getLogger("gateway")

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "pin_model_revision",
    "run_engine_process",
    "run_worker",
    "serve",
    "settings_from_stdin",
]


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"), default=str)


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``EMBED_LOG_LEVEL``: plain lines, or JSON ones with ``EMBED_LOG_FORMAT=json``."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def serve(settings: Settings) -> int:
    """``serve``: check the settings, load every model, then serve until SIGTERM/SIGINT (exit 0 after a
    clean drain); exit 2 with one line when a setting, the int8 gate or the memory refuses the start."""
    import uvicorn

    from gateway.http.app import create_app, load_model
    from gateway.http.server import uvicorn_config

    configure_logging(settings)
    problem = preflight(settings)
    if problem is not None:
        print(f"embedding-gateway: invalid setting: {problem}", file=sys.stderr)
        return 2
    if settings.supervised:  # EMBED_WORKERS > 1 or several EMBED_DEVICES
        # Every engine (re)start loads the commit resolved now, never whatever the hub's branch
        # points at by then: a restart must not change the model the workers' cache keys name.
        from gateway.core.models_file import model_settings
        from gateway.engine.supervisor import Supervisor

        models = [pin_model_revision(model) for model in model_settings(settings)]
        return Supervisor(settings, models).run()
    # Load and warm up before the socket opens: the port answers only once the model can.
    import torch

    from encoder.onnx_int8 import Int8CacheError, QualityGateError
    from gateway.core.models_file import model_settings
    from gateway.core.storage_gate import StorageGateError

    encoders = []
    for model in model_settings(settings):  # EMBED_MODEL alone, or each of EMBED_MODELS_FILE's in turn
        try:
            encoders.append(load_model(model))
        except (QualityGateError, Int8CacheError, StorageGateError) as exc:
            print(f"embedding-gateway: refusing to start: {exc}", file=sys.stderr)
            return 2
        except (torch.OutOfMemoryError, MemoryError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(
                f"embedding-gateway: refusing to start: model {model.served_model!r} does not fit in memory "
                f"(device {model.device}) beside the {len(encoders)} loaded before it: {first}",
                file=sys.stderr,
            )
            return 2
    config = uvicorn_config(create_app(settings, encoders=encoders), settings)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler it found at
    # start; with the default handler the process would die by the signal after a clean drain.
    # A graceful stop is a success: exit 0.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    server.run()
    return 0 if server.started else 1  # uvicorn leaves started False when start-up failed


def pin_model_revision(settings: Settings) -> Settings:
    """``settings`` with a hub model's revision resolved to the commit it names now (a local folder,
    or a model that cannot be resolved, as they are: preflight has said why)."""
    import msgspec

    from encoder.model_files import ModelNotFoundError, pinned_revision

    try:
        commit = pinned_revision(settings.model, settings.revision or None)
    except (ModelNotFoundError, ValueError, OSError):
        return settings
    if commit is None or commit == settings.revision:
        return settings
    logging.getLogger("gateway").info(
        "model %s: revision %s pinned to commit %s", settings.model, settings.revision or "(default)", commit
    )
    return msgspec.structs.replace(settings, revision=commit)


def settings_from_stdin() -> Settings:
    """The supervisor's settings: the first line on stdin (the rest of stdin is the engine's stop pipe)."""
    import msgspec

    return msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)


def run_engine_process(settings: Settings, socket_path: Path, restarts_file: Path | None) -> int:
    from encoder.onnx_int8 import Int8CacheError, QualityGateError
    from gateway.core.storage_gate import StorageGateError
    from gateway.engine.server import run_engine
    from gateway.loading import load_model  # the engine process serves no HTTP: it never imports gateway.http

    configure_logging(settings)
    try:
        return run_engine(settings, socket_path, load_model, restarts_file, stop_pipe=sys.stdin.buffer)
    except (QualityGateError, Int8CacheError, StorageGateError) as exc:  # one line; the supervisor exits 2
        print(f"embedding-gateway: refusing to start: {exc}", file=sys.stderr, flush=True)
        # At once: the stop-pipe thread is blocked reading stdin, and a normal interpreter exit
        # aborts on that lock (a core dump and signal 6 instead of the exit status).
        os._exit(2)


def _watch_parent(parent: int, server: Any) -> None:
    """A worker whose supervisor (``parent``) was killed drains and stops instead of serving on alone.

    A started worker drains by uvicorn's own stop flag (``server.should_exit``). One still starting
    has nothing to drain and may never finish starting (its start-up waits for an engine that died
    with the supervisor), so it exits at once.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        logger.warning("the supervisor (pid %d) is gone: this worker stops", parent)
        server.should_exit = True
        if not server.started:
            os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(settings: Settings, socket_paths: list[Path], supervisor_pid: int) -> int:
    import uvicorn

    from gateway.engine.supervisor import reuseport_socket
    from gateway.http.app import create_app
    from gateway.http.server import uvicorn_config

    configure_logging(settings)
    listener = reuseport_socket(settings.host, settings.port)
    listener.listen(2048)
    config = uvicorn_config(create_app(settings, engine_sockets=socket_paths), settings)
    server = uvicorn.Server(config)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)  # as in serve: a drained stop exits 0
    _watch_parent(supervisor_pid, server)
    server.run(sockets=[listener])
    return 0 if server.started else 1
