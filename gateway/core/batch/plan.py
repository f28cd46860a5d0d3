"""A batch input file, read once at create: its request lines checked and cut into chunks.

A chunk is a run of whole lines (a byte range of the file) holding about ``chunk_inputs`` inputs:
the unit of work a replica takes, and redoes whole if its holder died. Lines that cannot run (not
JSON, not a request line, another method or endpoint, a ``custom_id`` seen before) are noted with
their line number: they go to the error file, and the rest run. The plan is written beside the
batch's outputs, so any replica can run any chunk of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec

from gateway.core.batch.schemas import RequestLine
from gateway.core.errors import InvalidInputError

__all__ = [
    "BOM",
    "BadLine",
    "Chunk",
    "LineChecker",
    "Plan",
    "check_line",
    "input_count",
    "lines_of",
    "readable_id",
    "scan",
]

BOM = b"\xef\xbb\xbf"
_MAX_CHUNK_LINES = 1024  # one-text lines: a chunk's bookkeeping stays small beside its work


class BadLine(msgspec.Struct, frozen=True):
    code: str
    message: str
    custom_id: str | None = None


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    start: int  # byte offset of its first line
    end: int  # byte offset past its last line
    first_line: int  # 1-based number of its first line


class Plan(msgspec.Struct, kw_only=True):
    total: int  # request lines (blank lines are not requests)
    chunks: list[Chunk]
    bad: dict[int, BadLine]  # line number -> why it cannot run


class _Inputs(msgspec.Struct):
    input: object = None


_decode_line = msgspec.json.Decoder(RequestLine).decode
_decode_inputs = msgspec.json.Decoder(_Inputs).decode


def input_count(body: bytes) -> int:
    """How many inputs a request body holds, for sizing chunks (1 where it cannot tell)."""
    try:
        value = _decode_inputs(body).input
    except msgspec.DecodeError:
        return 1
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def lines_of(data: bytes, first_line: int) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` for each non-blank line of ``data``, numbered from ``first_line``."""
    if first_line == 1:
        data = data.removeprefix(BOM)  # as some Windows tools save UTF-8
    for number, line in enumerate(data.split(b"\n"), start=first_line):
        if line.strip():
            yield number, line.rstrip(b"\r")


class _Named(msgspec.Struct):
    custom_id: str | None = None


def readable_id(line: bytes) -> str | None:
    """The line's ``custom_id`` where it is a string, however wrong the rest is."""
    try:
        return msgspec.json.decode(line, type=_Named).custom_id
    except msgspec.DecodeError:
        return None


def check_line(line: bytes, endpoint: str) -> RequestLine | BadLine:
    """The request of one input line, or why it cannot run (no uniqueness check: :func:`scan`'s)."""
    try:
        request = _decode_line(line)
    except msgspec.ValidationError as exc:
        return BadLine("invalid_request_line", f"Not a batch request line: {exc}.", readable_id(line))
    except msgspec.DecodeError as exc:
        return BadLine("invalid_json_line", f"The line is not valid JSON: {exc}.")
    if request.method.upper() != "POST":
        return BadLine("invalid_method", f"The method must be POST, not {request.method!r}.", request.custom_id)
    if request.url != endpoint:
        return BadLine(
            "mismatched_endpoint",
            f"The line's url {request.url!r} is not the batch's endpoint {endpoint!r}.",
            request.custom_id,
        )
    return request


class LineChecker:
    """:func:`check_line` over a file's lines in order, plus uniqueness: a ``custom_id`` seen on an
    earlier line (a bad one too) makes a later line a ``duplicate_custom_id``."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.seen: set[str] = set()

    def __call__(self, line: bytes) -> RequestLine | BadLine:
        checked = check_line(line, self.endpoint)
        if isinstance(checked, BadLine):
            if checked.custom_id is not None:
                self.seen.add(checked.custom_id)
            return checked
        if checked.custom_id in self.seen:
            message = f"The custom_id {checked.custom_id!r} is used by an earlier line."
            return BadLine("duplicate_custom_id", message, checked.custom_id)
        self.seen.add(checked.custom_id)
        return checked


def scan(path: Path, *, endpoint: str, max_lines: int, chunk_inputs: int) -> Plan:
    """Check every line of the file at ``path`` and cut it into chunks (blocking: run it in a thread).

    A file with no request line, or more than ``max_lines``, is refused whole (400): that is the
    caller's file, not one bad line."""
    data = path.read_bytes()
    chunks: list[Chunk] = []
    bad: dict[int, BadLine] = {}
    check = LineChecker(endpoint)
    total = 0
    start, start_line, inputs, lines = 0, 1, 0, 0
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        end = offset + len(raw) + 1
        if raw.strip():
            total += 1
            if total > max_lines:
                raise InvalidInputError(
                    f"The file has more than {max_lines} request lines, this server's limit for one batch.",
                    param="input_file_id",
                )
            checked = check(raw.rstrip(b"\r").removeprefix(BOM if number == 1 else b""))
            if isinstance(checked, BadLine):
                bad[number] = checked
                inputs += 1
            else:
                inputs += input_count(checked.body)
            lines += 1
            if inputs >= chunk_inputs or lines >= _MAX_CHUNK_LINES:
                chunks.append(Chunk(start, min(end, len(data)), start_line))
                start, start_line, inputs, lines = min(end, len(data)), number + 1, 0, 0
        offset = end
    if lines:
        chunks.append(Chunk(start, len(data), start_line))
    if not total:
        raise InvalidInputError("The file has no request lines.", param="input_file_id")
    return Plan(total=total, chunks=chunks, bad=bad)
