"""OpenAI's ``/v1/files`` and ``/v1/batches``: thin adapters over :class:`~gateway.core.batch.service.BatchService`.

Each handler decodes, names the owner (the API key's name; "" without named keys) and calls the
service; answers are OpenAI's objects. The routes are built per app (:func:`batch_routes`) because
the upload's body limit is a setting. Off (no ``EMBED_BATCH_DIR``), each answers a 404 that says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from litestar import Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.response import File

from gateway.core.batch.schemas import BatchList, BatchObject, CreateBatch, FileDeleted, FileList, FileObject
from gateway.core.batch.service import BatchService
from gateway.core.errors import InvalidInputError, NotFoundError
from gateway.core.schemas import decode_with
from gateway.http.auth import client_name
from gateway.http.routes.common import ERRORS, runtime_of
from gateway.settings import Settings

__all__ = ["batch_routes"]

P = ParamSpec("P")
T = TypeVar("T")

_decode_create = decode_with(CreateBatch)
_UPLOAD_SLACK = 1024 * 1024  # the multipart envelope around the file
_TAGS = ["batches"]


def _service(request: Request[Any, Any, Any]) -> BatchService:
    service = runtime_of(request).batches
    if service is None:
        raise NotFoundError("The Batch API is not enabled on this server.")
    return service


def _owner(request: Request[Any, Any, Any]) -> str:
    return client_name(request.scope) or ""


async def upload_file(request: Request[Any, Any, Any]) -> FileObject:
    service = _service(request)
    try:
        form = await request.form()
    except HTTPException as exc:
        if exc.status_code != 413:
            raise
        limit = service.limits.max_file_bytes
        raise InvalidInputError(
            f"The file is larger than this server's limit of {limit} bytes.", param="file"
        ) from None
    purpose = form.get("purpose")
    upload = form.get("file")
    if not isinstance(purpose, str):
        raise InvalidInputError("The form needs a 'purpose' field ('batch').", param="purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidInputError("The form needs a 'file' part with the JSONL file.", param="file")
    try:
        return await service.upload(
            upload.file, filename=upload.filename or "upload.jsonl", purpose=purpose, owner=_owner(request)
        )
    finally:
        await upload.close()


@get("/v1/files", summary="List files", tags=_TAGS, responses=ERRORS)
async def list_files(
    request: Request[Any, Any, Any],
    purpose: str | None = None,
    limit: int = 10000,
    order: str = "desc",
    after: str | None = None,
) -> FileList:
    service = _service(request)
    if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
        raise InvalidInputError("'limit' must be 1 to 10000 and 'order' 'asc' or 'desc'.", param="limit")
    return await _in_thread(service.files.list, _owner(request), purpose=purpose, after=after, limit=limit, order=order)


@get("/v1/files/{file_id:str}", summary="Retrieve a file", tags=_TAGS, responses=ERRORS)
async def retrieve_file(request: Request[Any, Any, Any], file_id: str) -> FileObject:
    return await _in_thread(_service(request).files.get, file_id, _owner(request))


@get("/v1/files/{file_id:str}/content", summary="A file's content", tags=_TAGS, responses=ERRORS)
async def file_content(request: Request[Any, Any, Any], file_id: str) -> File:
    path = await _in_thread(_service(request).files.content_path, file_id, _owner(request))
    return File(path=path, media_type="application/octet-stream", content_disposition_type="inline")


@delete("/v1/files/{file_id:str}", summary="Delete a file", tags=_TAGS, responses=ERRORS, status_code=200)
async def delete_file(request: Request[Any, Any, Any], file_id: str) -> FileDeleted:
    return await _in_thread(_service(request).files.delete, file_id, _owner(request))


@post("/v1/batches", summary="Create a batch", tags=_TAGS, responses=ERRORS, status_code=200)
async def create_batch(request: Request[Any, Any, Any]) -> BatchObject:
    service = _service(request)
    body = _decode_create(await request.body())
    return await service.create(body, _owner(request))


@get("/v1/batches", summary="List batches", tags=_TAGS, responses=ERRORS)
async def list_batches(request: Request[Any, Any, Any], after: str | None = None, limit: int = 20) -> BatchList:
    return await _service(request).page(_owner(request), after=after, limit=limit)


@get("/v1/batches/{batch_id:str}", summary="Retrieve a batch", tags=_TAGS, responses=ERRORS)
async def retrieve_batch(request: Request[Any, Any, Any], batch_id: str) -> BatchObject:
    return await _service(request).get(batch_id, _owner(request))


@post("/v1/batches/{batch_id:str}/cancel", summary="Cancel a batch", tags=_TAGS, responses=ERRORS, status_code=200)
async def cancel_batch(request: Request[Any, Any, Any], batch_id: str) -> BatchObject:
    return await _service(request).cancel(batch_id, _owner(request))


async def _in_thread(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.to_thread(call, *args, **kwargs)  # the file store's calls block on the disk


def batch_routes(settings: Settings) -> list[HTTPRouteHandler]:
    """The Batch API's routes; the upload's body limit is the file limit (and its form's envelope)."""
    upload = post(
        "/v1/files",
        summary="Upload a file (purpose 'batch': JSONL request lines)",
        tags=_TAGS,
        responses=ERRORS,
        status_code=200,
        request_max_body_size=settings.batch_max_file_bytes + _UPLOAD_SLACK,
    )(upload_file)
    return [
        upload,
        list_files,
        retrieve_file,
        file_content,
        delete_file,
        create_batch,
        list_batches,
        retrieve_batch,
        cancel_batch,
    ]
