"""Where ``EMBED_WORKERS > 1`` keeps its counts: one file per process, in a folder the supervisor owns.

Every process (the engine, each HTTP worker) writes its cumulative
:class:`~gateway.core.telemetry.TelemetryState` (counters and histogram buckets) to
``<role>-<pid>.state`` in the supervisor's ``telemetry/`` folder, always *before* it reports that
state to anyone: about once a second, with every counters message to the engine and when it stops.
The engine answers /stats and /metrics from every file of the folder, so:

* a killed worker's counts stay (its file outlives it), and so do a killed engine's: no restart
  can lose what a scrape already saw, the counters only grow (only a supervisor restart, which
  starts a new folder, resets them);
* what a process counted in its last second before a SIGKILL, never reported, is lost; nothing
  that was reported is.

The supervisor, which reaps every child, folds a dead child's file into one ``retired.<n>.state``
before it starts another process (whose pid may be the dead one's): the folder holds one file per
live process plus one. A reader sees each fold whole or not at all: a retired file names the two
files it replaces (``supersedes``) and is in place before they go; a reader ignores superseded
files, and reads again when a file it listed has gone meanwhile.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from gateway.core.telemetry import Telemetry, TelemetryState

__all__ = ["FOLDER", "RESTARTS_FILE", "Ledger", "Restarts", "read_restarts"]

logger = logging.getLogger("gateway.engine")

FOLDER = "telemetry"  # next to the engine's socket, in the supervisor's private temporary folder
_SUFFIX = ".state"
RESTARTS_FILE = "restarts.json"  # the supervisor's restart counts, next to the engine's socket
_READ_ATTEMPTS = 100  # a fold between listing and reading costs one more attempt; folds are rare


class Restarts(msgspec.Struct):
    """Written by the supervisor next to the socket (:data:`RESTARTS_FILE`); read for /stats."""

    workers: int = 0
    engine: int = 0
    worker_restarts: int = 0


def read_restarts(path: Path | None) -> Restarts:
    """The supervisor's restart counts at ``path``; zeros where there is none (an engine on its own)."""
    if path is None:
        return Restarts()
    try:
        return msgspec.json.decode(path.read_bytes(), type=Restarts)
    except (OSError, msgspec.DecodeError):
        return Restarts()


class _Entry(msgspec.Struct, array_like=True):
    state: TelemetryState
    supersedes: list[str] = msgspec.field(default_factory=list)  # file names whose counts this one holds


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Entry)


class Ledger:
    """The folder of per-process count files (see the module's docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._retired: TelemetryState | None = None  # the supervisor's: what every dead child counted
        self._generation = 0
        self._write_failed = False

    @classmethod
    def beside(cls, socket_path: Path) -> Ledger | None:
        """The supervisor's ledger next to the engine's socket; ``None`` where there is none (an
        engine or link a test runs on its own)."""
        folder = socket_path.parent / FOLDER
        return cls(folder) if folder.is_dir() else None

    @staticmethod
    def name(role: str, pid: int | None = None) -> str:
        """The file (without suffix) of the process ``pid`` (this one by default) in ``role``."""
        return f"{role}-{os.getpid() if pid is None else pid}"

    def write(self, name: str, state: TelemetryState) -> None:
        """Replace ``name``'s counts with ``state`` (atomically: a reader sees the old or the new)."""
        self._write(name, _Entry(state))

    def _write(self, name: str, entry: _Entry) -> None:
        staging = self.folder / f"{name}.tmp"
        try:
            staging.write_bytes(_encoder.encode(entry))
            staging.replace(self.folder / f"{name}{_SUFFIX}")
        except OSError as exc:
            if not self._write_failed:  # once: it is called every second
                logger.error("cannot keep this process's counts in %s: %s", self.folder, exc)
            self._write_failed = True
        else:
            self._write_failed = False

    def read(self) -> dict[str, TelemetryState]:
        """Every process's latest counts (live and dead, the retired sum included), by file name."""
        for _ in range(_READ_ATTEMPTS):
            entries: dict[str, _Entry] = {}
            try:
                for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
                    try:
                        entries[path.name.removesuffix(_SUFFIX)] = _decoder.decode(path.read_bytes())
                    except msgspec.DecodeError as exc:
                        logger.error("unreadable counts in %s, left out: %s", path, exc)
            except FileNotFoundError:
                continue  # folded meanwhile: its retired file holds it now; list again
            superseded = {name for entry in entries.values() for name in entry.supersedes}
            return {name: entry.state for name, entry in entries.items() if name not in superseded}
        raise RuntimeError(f"the counts in {self.folder} kept changing while being read")

    def retire(self, pid: int) -> None:
        """The supervisor, once it has reaped child ``pid`` and before it starts another: fold that
        child's counts into the retired sum. Its latencies go (they describe no recent request)."""
        for path in self.folder.glob(f"*-{pid}{_SUFFIX}"):
            try:
                state = _decoder.decode(path.read_bytes()).state
            except (OSError, msgspec.DecodeError) as exc:
                logger.error("the counts of process %d in %s are lost: %s", pid, path, exc)
                continue
            retired = Telemetry.combined([state] if self._retired is None else [self._retired, state]).state()
            retired.latencies = []
            previous, name = _retired_name(self._generation), _retired_name(self._generation + 1)
            self._write(name, _Entry(retired, [previous, path.name.removesuffix(_SUFFIX)]))
            if not (self.folder / f"{name}{_SUFFIX}").exists():
                return  # it could not be written: the dead child's file stays, and still counts
            self._retired, self._generation = retired, self._generation + 1
            (self.folder / f"{previous}{_SUFFIX}").unlink(missing_ok=True)
            path.unlink()
        for staging in self.folder.glob(f"*-{pid}.tmp"):  # one it was writing when it died
            staging.unlink(missing_ok=True)


def _retired_name(generation: int) -> str:
    return f"retired.{generation}"  # never ``<role>-<pid>``: no pid's glob finds it
