"""Batches without Redis: state in the batch folder, run by one process.

``{folder}/jobs/{id}.json`` holds each :class:`BatchRecord` and ``{folder}/batches/{id}/done-{n}``
each chunk's outcome. Every change is made under an exclusive lock on ``{folder}/jobs/.lock`` and
written atomically, so the HTTP workers of one server (``EMBED_WORKERS``) can all create, read and
cancel. Only the process holding ``{folder}/runner.lock`` runs chunks: "one process", whichever it
is, and another takes over when it exits (the lock is the kernel's, released with the process).
A chunk is never held across a restart: after one, every chunk not done is run again, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, cast

import msgspec

from gateway.core.batch.files import _write_atomically
from gateway.core.batch.schemas import TERMINAL, BatchRecord, BatchStatus
from gateway.core.batch.store import ChunkDone, Claim

__all__ = ["LocalJobs"]


class LocalJobs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.jobs = folder / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self._runner: IO[bytes] | None = None
        self._held: set[tuple[str, int]] = set()  # chunks this process runs now

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.jobs / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _path(self, batch_id: str) -> Path:
        return self.jobs / f"{batch_id}.json"

    def _read(self, batch_id: str) -> BatchRecord | None:
        try:
            return msgspec.json.decode(self._path(batch_id).read_bytes(), type=BatchRecord)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.close()  # releases the runner lock
            self._runner = None

    async def create(self, record: BatchRecord) -> None:
        await asyncio.to_thread(self._create, record)

    def _create(self, record: BatchRecord) -> None:
        (self.folder / "batches" / record.id).mkdir(parents=True, exist_ok=True)
        with self._locked():
            _write_atomically(self._path(record.id), [msgspec.json.encode(record)])

    async def get(self, batch_id: str) -> BatchRecord | None:
        return await asyncio.to_thread(self._read, batch_id)

    async def page(self, owner: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        records = await asyncio.to_thread(self._all)
        mine = sorted(
            (one for one in records if one.owner == owner), key=lambda one: (one.created_at, one.id), reverse=True
        )
        if after is not None:
            ids = [one.id for one in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        return mine[:limit], len(mine) > limit

    def _all(self) -> list[BatchRecord]:
        found = []
        for path in self.jobs.glob("batch_*.json"):
            record = self._read(path.stem)
            if record is not None:
                found.append(record)
        return found

    async def transition(self, batch_id: str, to: str, *, allowed: Collection[str], **fields: object) -> bool:
        return await asyncio.to_thread(self._transition, batch_id, to, allowed, fields)

    def _transition(self, batch_id: str, to: str, allowed: Collection[str], fields: dict[str, object]) -> bool:
        with self._locked():
            record = self._read(batch_id)
            if record is None or record.status not in allowed:
                return False
            at = fields.pop("at")
            assert isinstance(at, int), "a transition's time is whole seconds"
            record.status = cast(BatchStatus, to)
            record.times[f"{to}_at"] = at
            for name, value in fields.items():
                setattr(record, name, value)
            _write_atomically(self._path(batch_id), [msgspec.json.encode(record)])
            return True

    def _is_runner(self) -> bool:
        if self._runner is None:
            handle = open(self.folder / "runner.lock", "a+b")  # noqa: SIM115 - held for the process's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._runner = handle
        return True

    async def claim(self, consumer: str, *, idle_s: float, wait_s: float) -> Claim | None:
        found = await asyncio.to_thread(self._next_chunk)
        if found is None:
            await asyncio.sleep(min(wait_s, 0.2))
        return found

    def _next_chunk(self) -> Claim | None:
        if not self._is_runner():
            return None
        for record in sorted(self._all(), key=lambda one: (one.created_at, one.id)):
            if record.status in TERMINAL:  # (a failing batch's chunks left are taken, to be skipped)
                continue
            done = self._outcomes(record.id)
            for chunk in range(record.chunks):
                if chunk not in done and (record.id, chunk) not in self._held:
                    self._held.add((record.id, chunk))
                    return Claim(record.id, chunk, f"{record.id}/{chunk}")
        return None

    async def keep(self, claim: Claim, consumer: str) -> None:
        pass  # the runner lock is the claim: held while the process lives

    async def finish(self, claim: Claim, done: ChunkDone) -> None:
        path = self.folder / "batches" / claim.batch_id / f"done-{claim.chunk}"
        if not path.exists():  # the first outcome stays (see RedisJobs.finish)
            await asyncio.to_thread(_write_atomically, path, [msgspec.json.encode(done)])
        self._held.discard((claim.batch_id, claim.chunk))

    async def release(self, claim: Claim, consumer: str) -> None:
        self._held.discard((claim.batch_id, claim.chunk))

    async def outcomes(self, batch_id: str) -> dict[int, ChunkDone]:
        return await asyncio.to_thread(self._outcomes, batch_id)

    def _outcomes(self, batch_id: str) -> dict[int, ChunkDone]:
        found = {}
        for path in (self.folder / "batches" / batch_id).glob("done-*"):
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError, ValueError):
                found[int(path.name.removeprefix("done-"))] = msgspec.json.decode(path.read_bytes(), type=ChunkDone)
        return found

    async def active(self) -> list[str]:
        records = await asyncio.to_thread(self._all)
        return sorted(one.id for one in records if one.status not in TERMINAL)

    async def lock(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return self._is_runner()

    async def unlock(self, batch_id: str, holder: str) -> None:
        pass  # the runner lock is the finalisation's (and a process finalises a batch once at a time)
