"""OpenAI's Batch API objects (``file``, ``batch``, their lists) and the lines of its files.

The answers are OpenAI's shapes, field for field, so the ``openai`` client's ``files`` and
``batches`` parse them. :class:`BatchRecord` is what the job store keeps of a batch: the answer's
fields plus the owner (the API key's name) and how the input was cut into chunks.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "TERMINAL",
    "BatchErrorEntry",
    "BatchErrors",
    "BatchList",
    "BatchObject",
    "BatchRecord",
    "BatchStatus",
    "CreateBatch",
    "FileDeleted",
    "FileList",
    "FileObject",
    "FileRecord",
    "RequestCounts",
    "RequestLine",
]

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
# A batch in one of these never changes again.
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})


class FileObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileRecord(msgspec.Struct, kw_only=True):
    """What the file store keeps beside a file's bytes: the answer, and whose it is."""

    file: FileObject
    owner: str  # the API key's name ("" without named keys): only its owner sees a file


class FileList(msgspec.Struct, kw_only=True, omit_defaults=False):
    data: list[FileObject]
    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrorEntry(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    data: list[BatchErrorEntry]
    object: Literal["list"] = "list"


class BatchObject(msgspec.Struct, kw_only=True):
    """A batch as ``GET /v1/batches/{id}`` answers it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(msgspec.Struct, kw_only=True):
    data: list[BatchObject]
    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchRecord(msgspec.Struct, kw_only=True):
    """What the job store keeps of one batch. Status and its times change; the rest is set at create."""

    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None
    total: int  # request lines
    chunks: int  # units of work the lines were cut into
    status: BatchStatus = "in_progress"
    times: dict[str, int] = msgspec.field(default_factory=dict)  # "in_progress_at": ..., set as reached
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchErrorEntry] = msgspec.field(default_factory=list)  # of the batch as a whole (failed)

    def answer(self, counts: RequestCounts) -> BatchObject:
        times = self.times
        return BatchObject(
            id=self.id,
            endpoint=self.endpoint,
            errors=BatchErrors(data=list(self.errors)) if self.errors else None,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            created_at=self.created_at,
            in_progress_at=times.get("in_progress_at"),
            expires_at=self.expires_at,
            finalizing_at=times.get("finalizing_at"),
            completed_at=times.get("completed_at"),
            failed_at=times.get("failed_at"),
            expired_at=times.get("expired_at"),
            cancelling_at=times.get("cancelling_at"),
            cancelled_at=times.get("cancelled_at"),
            request_counts=counts,
            metadata=self.metadata,
        )


class CreateBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/batches``'s body."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, object] | None = None  # accepted, not honoured: outputs stay until deleted


class RequestLine(msgspec.Struct, kw_only=True):
    """One line of a batch input file."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw
