"""The batch runner: every server process takes chunks of batches and runs them, below requests.

Its loop claims a chunk from the :class:`JobStore` (a dead replica's first), runs each of its lines
through ``execute`` (the same path as the route the batch names, as the batch's background tenant:
the encoder's fair queue gives it the smallest share, so interactive requests keep their pace and
the device is never idle), writes the chunk's output and error lines to two files named by the
chunk (written whole, so a chunk run twice leaves one copy), and records the chunk's outcome.
``batch_chunks_in_flight`` chunks run at once, so the next is queued while one computes.

A batch whose every chunk has an outcome is finalised by whichever runner takes its lock: its
parts are joined in line order into the output and error files, and its status becomes final.
Lines answered 429 or 503 (the server is busy) are retried, never written as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from gateway.core.batch.files import FileStore, _write_atomically
from gateway.core.batch.lines import Execute, run_line
from gateway.core.batch.plan import Plan, lines_of
from gateway.core.batch.schemas import TERMINAL, BatchErrorEntry, BatchRecord
from gateway.core.batch.store import ChunkDone, Claim, JobStore

__all__ = ["BatchRunner", "output_file_ids", "plan_path"]

logger = logging.getLogger(__name__)

_LINES_IN_FLIGHT = 256


def plan_path(folder: Path, batch_id: str) -> Path:
    return folder / "batches" / batch_id / "plan.json"


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """The output and error files' ids: fixed by the batch, so a finalisation run twice writes one each."""
    suffix = batch_id.removeprefix("batch_")
    return f"file-{suffix}-output", f"file-{suffix}-errors"


@dataclass
class BatchRunner:
    jobs: JobStore
    files: FileStore
    folder: Path
    execute: Execute
    chunks_in_flight: int = 2
    claim_idle_s: float = 60.0
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    clock: Callable[[], float] = time.time
    _plans: dict[str, Plan] = field(default_factory=dict)
    _holding: set[Claim] = field(default_factory=set)  # claimed, outcome not yet recorded
    _finalising: set[str] = field(default_factory=set)  # batches this process is finalising now

    async def run(self) -> None:
        """Take and run chunks until cancelled."""
        slots = asyncio.Semaphore(self.chunks_in_flight)
        running: set[asyncio.Task[None]] = set()
        next_sweep = 0.0
        started = False
        try:
            while True:
                await slots.acquire()
                try:
                    if not started:  # (again after a failure: a Redis restarted empty lost the group)
                        await self.jobs.start()
                        started = True
                    claim = await self.jobs.claim(self.consumer, idle_s=self.claim_idle_s, wait_s=1.0)
                    if time.monotonic() >= next_sweep:
                        next_sweep = time.monotonic() + 1.0
                        for batch_id in await self.jobs.active():
                            await self.finalise(batch_id)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the store is down: wait, and try again (nothing is lost while it is)
                    logger.warning("batch runner: the job store failed; retrying in 1 s", exc_info=True)
                    started = False
                    slots.release()
                    await asyncio.sleep(1.0)
                    continue
                if claim is None:
                    slots.release()
                    continue
                task = asyncio.create_task(self._chunk(claim), name=f"batch-{claim.batch_id}-{claim.chunk}")
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            # What was cut short goes back now, not after another replica's idle wait (a deploy).
            for claim in list(self._holding):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.jobs.release(claim, self.consumer), timeout=5.0)

    async def _chunk(self, claim: Claim) -> None:
        keeper = asyncio.create_task(self._keep(claim))
        self._holding.add(claim)
        try:
            done = await self._run_chunk(claim)
            await self.jobs.finish(claim, done)
            self._holding.discard(claim)
            recorded = (await self.jobs.outcomes(claim.batch_id)).get(claim.chunk)
            if recorded is not None and recorded.attempt != done.attempt:  # a stale copy: its parts go
                await asyncio.to_thread(self._drop_parts, claim.batch_id, claim.chunk, done.attempt)
        except asyncio.CancelledError:
            raise
        except Exception:  # given back after a pause, to be redone (by any runner)
            logger.exception("batch %s chunk %d failed; it will be redone", claim.batch_id, claim.chunk)
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.jobs.release(claim, self.consumer)
                self._holding.discard(claim)
            return
        finally:
            keeper.cancel()
        await self.finalise(claim.batch_id)

    async def _keep(self, claim: Claim) -> None:
        while True:
            await asyncio.sleep(self.claim_idle_s / 3)
            with contextlib.suppress(Exception):
                await self.jobs.keep(claim, self.consumer)

    def _plan(self, batch_id: str) -> Plan:
        plan = self._plans.get(batch_id)
        if plan is None:
            plan = msgspec.json.decode(plan_path(self.folder, batch_id).read_bytes(), type=Plan)
            self._plans[batch_id] = plan
        return plan

    async def _run_chunk(self, claim: Claim) -> ChunkDone:
        """Run the chunk's lines and write its parts under a name of this attempt's own: the outcome
        recorded first names its attempt, and only that attempt's parts are ever joined (a stale
        copy run again, after a takeover or past a cancel, writes files nobody reads)."""
        attempt = secrets.token_hex(4)
        record = await self.jobs.get(claim.batch_id)
        if record is None or record.status in TERMINAL:
            return ChunkDone(attempt=attempt)  # a stale copy: its batch is final
        if record.status == "cancelling" or (record.status == "finalizing" and record.errors):
            return ChunkDone(attempt=attempt)  # cancelled, or failed: its lines are not run
        try:
            plan = await asyncio.to_thread(self._plan, record.id)
            span = plan.chunks[claim.chunk]
            data = await asyncio.to_thread(_read_span, self.files.path(record.input_file_id), span.start, span.end)
        except FileNotFoundError:  # the input was deleted: what ran is kept, the rest is not run
            await self.jobs.transition(
                record.id,
                "finalizing",
                allowed=("in_progress",),  # a cancelling batch skips its chunks left anyway
                at=int(self.clock()),
                errors=[BatchErrorEntry(code="input_file_missing", message="The input file was deleted.")],
            )
            return ChunkDone(attempt=attempt)
        expired = self.clock() >= record.expires_at
        lines = list(lines_of(data, span.first_line))
        # A few hundred lines at a time: enough queued for full passes; all of a chunk's one-text
        # lines at once would hold the event loop (decoding, tokenising) for a burst that
        # interactive requests wait out.
        room = asyncio.Semaphore(_LINES_IN_FLIGHT)

        async def one(number: int, raw: bytes) -> tuple[bool, bytes]:
            async with room:
                return await run_line(self.execute, record, number, raw, plan.bad.get(number), expired=expired)

        results = await asyncio.gather(*(one(number, raw) for number, raw in lines))
        out = [line for ok, line in results if ok]
        errors = [line for ok, line in results if not ok]
        now = await self.jobs.get(record.id)
        if now is None or now.status in TERMINAL:  # finalised meanwhile (this was a stale copy): nothing to keep
            return ChunkDone(attempt=attempt)
        folder = self.folder / "batches" / record.id
        await asyncio.to_thread(_write_atomically, _part(folder, "out", claim.chunk, attempt), out)
        await asyncio.to_thread(_write_atomically, _part(folder, "err", claim.chunk, attempt), errors)
        return ChunkDone(completed=len(out), failed=len(errors), expired=expired, attempt=attempt)

    async def finalise(self, batch_id: str) -> None:
        """Join a batch's parts and set its final status, if every chunk has an outcome and no other
        finaliser holds the batch. One that died half-way is redone once its lock expires: it
        writes the same files again, from the same parts (removed only after the final status)."""
        if batch_id in self._finalising:
            return
        self._finalising.add(batch_id)
        try:
            await self._finalise(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # tried again by the next sweep (a second); the batch stays as it is
            logger.exception("batch %s: finalising failed; it will be tried again", batch_id)
        finally:
            self._finalising.discard(batch_id)

    async def _finalise(self, batch_id: str) -> None:
        record = await self.jobs.get(batch_id)
        if record is None or record.status in TERMINAL:
            return
        outcomes = await self.jobs.outcomes(batch_id)
        if len(outcomes) < record.chunks:
            return
        if not await self.jobs.lock(batch_id, self.consumer, max(self.claim_idle_s, 5.0)):
            return
        try:  # the lock's time only covers a finaliser that died; one that failed frees it at once
            await self._finalise_locked(batch_id, outcomes)
        finally:
            with contextlib.suppress(Exception):
                await self.jobs.unlock(batch_id, self.consumer)

    async def _finalise_locked(self, batch_id: str, outcomes: dict[int, ChunkDone]) -> None:
        record = await self.jobs.get(batch_id)  # as it is now that the lock is ours
        if record is None or record.status in TERMINAL:
            return
        if record.status == "in_progress":
            await self.jobs.transition(batch_id, "finalizing", allowed=("in_progress",), at=int(self.clock()))
        final = (
            "cancelled"
            if record.status == "cancelling"
            else "failed"
            if record.errors
            else "expired"
            if any(one.expired for one in outcomes.values())
            else "completed"
        )
        output_id, errors_id = output_file_ids(batch_id)
        try:
            kept = await asyncio.to_thread(self._join, record, outcomes, output_id, errors_id)
        except _PartsMissing as exc:  # removed from the folder: never a short file, and never stuck
            logger.error("%s", exc)
            final, kept = "failed", set()
            message = "Some of the batch's results were removed from the server's folder before they were joined."
            await self.jobs.transition(
                batch_id,
                "finalizing",
                allowed=("in_progress", "finalizing", "cancelling"),
                at=int(self.clock()),
                errors=[BatchErrorEntry(code="output_parts_missing", message=message)],
            )
        if await self.jobs.transition(
            batch_id,
            final,
            allowed=("finalizing", "cancelling"),
            at=int(self.clock()),
            output_file_id=output_id if output_id in kept else None,
            error_file_id=errors_id if errors_id in kept else None,
        ):
            await asyncio.to_thread(self._clean, batch_id)
            self._plans.pop(batch_id, None)
            logger.info("batch %s %s", batch_id, final)

    def _join(self, record: BatchRecord, outcomes: dict[int, ChunkDone], output_id: str, errors_id: str) -> set[str]:
        """Write the output and error files from the parts each chunk's recorded attempt wrote."""
        folder = self.folder / "batches" / record.id
        kept = set()
        for file_id, kind, name in ((output_id, "out", "output"), (errors_id, "err", "errors")):
            parts = [
                _part(folder, kind, chunk, outcomes[chunk].attempt)
                for chunk in range(record.chunks)
                if outcomes[chunk].completed or outcomes[chunk].failed  # a skipped chunk wrote none
            ]
            missing = [part.name for part in parts if not part.is_file()]
            if missing:  # never a file short of lines
                raise _PartsMissing(f"batch {record.id}: parts missing from the batch folder: {missing[:3]}")
            if any(part.stat().st_size for part in parts):
                self.files.create(
                    _concatenated(parts),
                    filename=f"{record.id}_{name}.jsonl",
                    purpose="batch_output",
                    owner=record.owner,
                    file_id=file_id,
                )
                kept.add(file_id)
        return kept

    def _drop_parts(self, batch_id: str, chunk: int, attempt: str) -> None:
        folder = self.folder / "batches" / batch_id
        for kind in ("out", "err"):
            with contextlib.suppress(FileNotFoundError):
                _part(folder, kind, chunk, attempt).unlink()

    def _clean(self, batch_id: str) -> None:
        for part in (self.folder / "batches" / batch_id).glob("*-*.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()


class _PartsMissing(Exception):
    """A recorded chunk's parts are gone from the folder (deleted by hand, a folder restored)."""


def _part(folder: Path, kind: str, chunk: int, attempt: str) -> Path:
    if not attempt:  # recorded before parts were named by attempt
        return folder / f"{kind}-{chunk:06d}.jsonl"
    return folder / f"{kind}-{chunk:06d}-{attempt}.jsonl"


def _read_span(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as source:
        source.seek(start)
        return source.read(end - start)


def _concatenated(parts: list[Path]) -> Iterator[bytes]:
    for part in parts:
        with open(part, "rb") as source:  # a part gone now fails the join: never a short file
            while piece := source.read(1024 * 1024):
                yield piece
