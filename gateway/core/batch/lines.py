"""The lines of a batch's output and error files, in OpenAI's shape.

Each is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A
request that ran has its ``response`` (any status: a 400 goes to the error file with its OpenAI
error body); a line that could not run has ``response: null`` and an ``error`` that names the line
(``line``: its 1-based number in the input file). Ids derive from the batch and the line, so a
chunk run twice writes the very same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import xxhash

from gateway.core.batch.schemas import RequestLine

if TYPE_CHECKING:
    from gateway.core.batch.plan import BadLine
    from gateway.core.batch.schemas import BatchRecord


@dataclass(frozen=True, slots=True)
class LineAnswer:
    status: int
    body: bytes  # JSON: the route's answer, or its error envelope
    error_code: str | None = None  # the error's ``code`` (for the error file's ``error``)
    error_message: str = ""


# (endpoint, request body, owner) -> the answer the route would have given
Execute = Callable[[str, bytes, str], Awaitable[LineAnswer]]

_RETRY = frozenset({429, 503})  # the server is busy: asked again, never written as a failure
_SERVER_FAILURE_TRIES = 3

__all__ = ["Execute", "LineAnswer", "LineError", "OutputLine", "failed_line", "ran_line", "run_line"]


class LineError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    line: int | None = None


class LineResponse(msgspec.Struct, kw_only=True):
    status_code: int
    request_id: str
    body: msgspec.Raw


class OutputLine(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str
    custom_id: str | None
    response: LineResponse | None
    error: LineError | None


_encode = msgspec.json.Encoder().encode


def _ids(batch_id: str, line: int) -> tuple[str, str]:
    digest = xxhash.xxh3_128_hexdigest(f"{batch_id}:{line}".encode())
    return f"batch_req_{digest[:24]}", f"req_{digest[8:32]}"


def ran_line(batch_id: str, line: int, custom_id: str, status: int, body: bytes, *, error: Any = None) -> bytes:
    """The output (or, for a non-200 ``status``, error) file line of a request that ran."""
    line_id, request_id = _ids(batch_id, line)
    response = LineResponse(status_code=status, request_id=request_id, body=msgspec.Raw(body))
    return _encode(OutputLine(id=line_id, custom_id=custom_id, response=response, error=error)) + b"\n"


def failed_line(batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> bytes:
    """The error file line of an input line that did not run (bad line, expired, model gone)."""
    line_id, _ = _ids(batch_id, line)
    error = LineError(code=code, message=message, line=line)
    return _encode(OutputLine(id=line_id, custom_id=custom_id, response=None, error=error)) + b"\n"


async def run_line(
    execute: Execute, record: BatchRecord, number: int, raw: bytes, bad: BadLine | None, *, expired: bool
) -> tuple[bool, bytes]:
    """Line ``number`` of ``record``'s input run: ``(True, output line)``, or ``(False, error line)``."""
    if bad is not None:
        return False, failed_line(record.id, number, bad.custom_id, bad.code, bad.message)
    request = msgspec.json.decode(raw, type=RequestLine)  # checked when the batch was created
    if expired:
        message = "The batch expired before this request ran."
        return False, failed_line(record.id, number, request.custom_id, "batch_expired", message)
    answer = await _answered(execute, record.endpoint, bytes(request.body), record.owner)
    if answer.status == 200:
        return True, ran_line(record.id, number, request.custom_id, 200, answer.body)
    error = LineError(code=answer.error_code or "request_failed", message=answer.error_message, line=number)
    return False, ran_line(record.id, number, request.custom_id, answer.status, answer.body, error=error)


async def _answered(execute: Execute, endpoint: str, body: bytes, owner: str) -> LineAnswer:
    """The route's answer, asked again while the server is busy (and twice more after a 500)."""
    delay, failures = 0.25, 0
    while True:
        answer = await execute(endpoint, body, owner)
        if answer.status >= 500 and answer.status not in _RETRY:
            failures += 1
            if failures >= _SERVER_FAILURE_TRIES:
                return answer
        elif answer.status not in _RETRY:
            return answer
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
