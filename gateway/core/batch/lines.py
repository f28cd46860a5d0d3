"""The lines of a batch's output and error files, in OpenAI's shape.

Each is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A
request that ran has its ``response`` (any status: a 400 goes to the error file with its OpenAI
error body); a line that could not run has ``response: null`` and an ``error`` that names the line
(``line``: its 1-based number in the input file). Ids derive from the batch and the line, so a
chunk run twice writes the very same bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

__all__ = ["LineError", "OutputLine", "failed_line", "ran_line"]


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
