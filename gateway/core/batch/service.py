"""What the ``/v1/files`` and ``/v1/batches`` routes do, without HTTP: :class:`BatchService`.

Create reads the input file once (:func:`~gateway.core.batch.plan.scan`): a file that cannot be a
batch is a 400 there and then; lines that cannot run are noted for the error file. The plan is
written beside the batch's outputs, then the record and its chunks go to the job store, and the
batch is ``in_progress`` from its first answer. Objects belong to the API key that made them:
another key gets a 404, as if they did not exist.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec

from gateway.core.batch.files import FileStore, _write_atomically, new_id
from gateway.core.batch.plan import scan
from gateway.core.batch.runner import plan_path
from gateway.core.batch.schemas import (
    TERMINAL,
    BatchList,
    BatchObject,
    BatchRecord,
    CreateBatch,
    FileObject,
)
from gateway.core.batch.store import JobStore, add_counts
from gateway.core.errors import ConflictError, InvalidInputError, NotFoundError
from gateway.core.telemetry import BatchStats

__all__ = ["BATCH_ENDPOINTS", "BatchLimits", "BatchService"]

# What a batch may run: OpenAI's embeddings route (and rerank where the server ranks).
BATCH_ENDPOINTS = ("/v1/embeddings", "/v1/rerank")
_WINDOWS = {"24h": 24 * 3600}
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}$")  # checked before it names a key or a path
_METADATA_KEYS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_file_bytes: int
    max_lines: int
    chunk_inputs: int


class BatchService:
    def __init__(self, folder: Path, jobs: JobStore, limits: BatchLimits, *, endpoints: tuple[str, ...]) -> None:
        self.folder = folder
        self.files = FileStore(folder)
        self.jobs = jobs
        self.limits = limits
        self.endpoints = endpoints

    async def upload(self, source: IO[bytes], *, filename: str, purpose: str, owner: str) -> FileObject:
        if purpose != "batch":
            raise InvalidInputError(
                f"This server stores files for batches only: 'purpose' must be 'batch', not {purpose!r}.",
                param="purpose",
            )
        return await asyncio.to_thread(
            self.files.create,
            source,
            filename=filename,
            purpose=purpose,
            owner=owner,
            max_bytes=self.limits.max_file_bytes,
        )

    async def create(self, body: CreateBatch, owner: str) -> BatchObject:
        if body.endpoint not in self.endpoints:
            raise InvalidInputError(
                f"'endpoint' must be one of {', '.join(self.endpoints)}, not {body.endpoint!r}.", param="endpoint"
            )
        window = _WINDOWS.get(body.completion_window)
        if window is None:
            raise InvalidInputError("'completion_window' must be '24h'.", param="completion_window")
        _check_metadata(body.metadata)
        source = await asyncio.to_thread(self.files.record, body.input_file_id, owner)
        if source.file.purpose != "batch":
            raise InvalidInputError("The input file's purpose must be 'batch'.", param="input_file_id")
        plan = await asyncio.to_thread(
            scan,
            self.files.path(body.input_file_id),
            endpoint=body.endpoint,
            max_lines=self.limits.max_lines,
            chunk_inputs=self.limits.chunk_inputs,
        )
        now = int(time.time())
        record = BatchRecord(
            id=new_id("batch_"),
            owner=owner,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            created_at=now,
            expires_at=now + window,
            metadata=body.metadata,
            total=plan.total,
            chunks=len(plan.chunks),
            times={"in_progress_at": now},
        )
        path = plan_path(self.folder, record.id)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_write_atomically, path, [msgspec.json.encode(plan)])
        await self.jobs.create(record)
        return record.answer(add_counts(record.total, ()))

    async def record(self, batch_id: str, owner: str) -> BatchRecord:
        record = await self.jobs.get(batch_id) if _BATCH_ID.match(batch_id) else None
        if record is None or record.owner != owner:
            raise NotFoundError(f"No batch with id '{batch_id}'.", param="batch_id")
        return record

    async def answer(self, record: BatchRecord) -> BatchObject:
        return record.answer(add_counts(record.total, (await self.jobs.outcomes(record.id)).values()))

    async def get(self, batch_id: str, owner: str) -> BatchObject:
        return await self.answer(await self.record(batch_id, owner))

    async def page(self, owner: str, *, after: str | None, limit: int) -> BatchList:
        if not 1 <= limit <= 100:
            raise InvalidInputError("'limit' must be between 1 and 100.", param="limit")
        records, more = await self.jobs.page(owner, after=after, limit=limit)
        data = [await self.answer(record) for record in records]
        return BatchList(
            data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=more
        )

    async def cancel(self, batch_id: str, owner: str) -> BatchObject:
        record = await self.record(batch_id, owner)
        if record.status in ("cancelling", "cancelled"):
            return await self.answer(record)
        changed = await self.jobs.transition(
            batch_id, "cancelling", allowed=("validating", "in_progress"), at=int(time.time())
        )
        record = await self.record(batch_id, owner)
        if not changed and record.status not in ("cancelling", "cancelled"):
            raise ConflictError(f"The batch is {record.status}; it can no longer be cancelled.", param="batch_id")
        return await self.answer(record)

    async def progress(self) -> BatchStats:
        """Every replica's batches not yet final, and their lines so far."""
        total = completed = failed = 0
        active = 0
        for batch_id in await self.jobs.active():
            record = await self.jobs.get(batch_id)
            if record is None or record.status in TERMINAL:
                continue
            active += 1
            counts = add_counts(record.total, (await self.jobs.outcomes(batch_id)).values())
            total, completed, failed = total + counts.total, completed + counts.completed, failed + counts.failed
        return BatchStats(active=active, requests_total=total, requests_completed=completed, requests_failed=failed)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > _METADATA_KEYS:
        raise InvalidInputError(f"'metadata' holds at most {_METADATA_KEYS} pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > _METADATA_KEY_CHARS or len(value) > _METADATA_VALUE_CHARS:
            raise InvalidInputError(
                f"'metadata' keys hold at most {_METADATA_KEY_CHARS} characters and values {_METADATA_VALUE_CHARS}.",
                param="metadata",
            )
