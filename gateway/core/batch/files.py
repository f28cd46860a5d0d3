"""``/v1/files``' storage: each file's bytes and its record in a folder that every replica shares.

``{folder}/files/{id}`` holds the bytes and ``{id}.json`` the record (:class:`FileRecord`). Both are
written to a temporary name, synced and renamed, the bytes first: a file is listed only once it is
whole, and a replica that dies mid-upload leaves a ``.part`` that nothing reads (swept after a day).
Ids are checked against one pattern before they touch a path, so an id is never a path.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from gateway.core.batch.schemas import FileDeleted, FileList, FileObject, FileRecord
from gateway.core.errors import InvalidInputError, NotFoundError

__all__ = ["FILE_ID", "FileStore", "new_id"]

FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")
_COPY_BYTES = 1024 * 1024
_STALE_PART_S = 24 * 3600


def new_id(prefix: str) -> str:
    """A fresh object id: ``file-`` or ``batch_`` and 24 hex digits (96 random bits)."""
    return f"{prefix}{secrets.token_hex(12)}"


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` all or nothing (temporary name, fsync, rename); the byte count."""
    part = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
    written = 0
    try:
        with open(part, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return written


class FileStore:
    """Files of one folder. Every method is blocking file I/O: call them from a thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "files"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not FILE_ID.match(file_id):
            raise NotFoundError(f"No file with id '{file_id}'.", param="file_id")
        return self.folder / file_id

    def create(
        self,
        source: IO[bytes] | Iterable[bytes],
        *,
        filename: str,
        purpose: str,
        owner: str,
        max_bytes: int | None = None,
        file_id: str | None = None,
    ) -> FileObject:
        """Store ``source`` (a readable file or byte chunks) as a new file; past ``max_bytes``, a 400."""
        file_id = file_id or new_id("file-")
        path = self.path(file_id)

        def chunks() -> Iterator[bytes]:
            seen = 0
            read = getattr(source, "read", None)
            pieces = iter(lambda: read(_COPY_BYTES), b"") if read is not None else source
            for piece in pieces:
                seen += len(piece)
                if max_bytes is not None and seen > max_bytes:
                    raise InvalidInputError(
                        f"The file is larger than this server's limit of {max_bytes} bytes.", param="file"
                    )
                yield piece

        size = _write_atomically(path, chunks())
        record = FileRecord(
            file=FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose),
            owner=owner,
        )
        _write_atomically(path.with_name(f"{file_id}.json"), [msgspec.json.encode(record)])
        return record.file

    def record(self, file_id: str, owner: str | None) -> FileRecord:
        """The file's record; a 404 if there is none, or ``owner`` (None: anyone) is not its owner."""
        path = self.path(file_id)
        try:
            record = msgspec.json.decode(path.with_name(f"{file_id}.json").read_bytes(), type=FileRecord)
        except (FileNotFoundError, msgspec.DecodeError):
            raise NotFoundError(f"No file with id '{file_id}'.", param="file_id") from None
        if owner is not None and record.owner != owner:
            raise NotFoundError(f"No file with id '{file_id}'.", param="file_id")
        return record

    def get(self, file_id: str, owner: str | None) -> FileObject:
        return self.record(file_id, owner).file

    def content_path(self, file_id: str, owner: str | None) -> Path:
        self.record(file_id, owner)
        return self.path(file_id)

    def list(
        self,
        owner: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> FileList:
        records = []
        for meta in self.folder.glob("file-*.json"):
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                record = msgspec.json.decode(meta.read_bytes(), type=FileRecord)
                if record.owner == owner and (purpose is None or record.file.purpose == purpose):
                    records.append(record.file)
        records.sort(key=lambda one: (one.created_at, one.id), reverse=order != "asc")
        if after is not None:
            ids = [one.id for one in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        page = records[:limit]
        return FileList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(records) > limit,
        )

    def delete(self, file_id: str, owner: str | None) -> FileDeleted:
        self.record(file_id, owner)
        path = self.path(file_id)
        # The record first: a file without one is never listed, and its bytes go next.
        with contextlib.suppress(FileNotFoundError):
            path.with_name(f"{file_id}.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return FileDeleted(id=file_id)

    def sweep_parts(self) -> None:
        """Remove what died mid-write a day ago (a crashed upload's ``.part``)."""
        cutoff = time.time() - _STALE_PART_S
        for part in self.folder.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
