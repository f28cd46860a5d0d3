"""The corpus of ``cache warm``, read line by line into texts and the lines that hold none.

A corpus is JSONL (``{"text": ...}`` on each line; other fields are ignored) or plain text, one text
per line; a ``.jsonl`` or ``.ndjson`` name, or a first non-blank line starting with ``{``, means
JSONL. Blank lines are ignored, and so is a UTF-8 byte order mark at the start of the file (an
encoding mark some editors write, not text: kept, it would change the first text's cache key). A
line that cannot be a text (not UTF-8, not JSON, no string ``"text"``, an empty text, a lone
surrogate escape such as ``"\\ud800"`` that no UTF-8 request can carry) becomes a :class:`Skipped`
entry, never an exception: one bad line must not end a run over millions of good ones.

:func:`read_batches` groups the texts into requests by a token estimate (4 characters a token, 2
more per text) and hands each group over with the byte offset after it, which is what the warm
state file records so a stopped run can resume at the next line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Line", "Skipped", "first_line_number", "read_batches"]


@dataclass(slots=True)
class Line:
    """One text of the corpus and its line number (from 1), to name it in the side file."""

    number: int
    text: str


@dataclass(slots=True)
class Skipped:
    """A line that will not be warmed, as the side file records it."""

    number: int
    reason: str
    text: str | None = None  # None: the line held no text (not JSON, not UTF-8, no "text" field)
    raw: str = ""

    def json_line(self) -> str:
        entry: dict[str, Any] = {"line": self.number, "reason": self.reason}
        if self.text is None:
            entry["raw"] = self.raw
        else:
            entry["text"] = self.text
        line = json.dumps(entry, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON's \\u escapes carry it
            line = json.dumps(entry)
        return line + "\n"


_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark: Excel, PowerShell and Notepad start a file with it


def _is_jsonl(path: Path) -> bool:
    if path.suffix in (".jsonl", ".ndjson"):
        return True
    with path.open("rb") as handle:
        for number, raw in enumerate(handle):
            line = raw.removeprefix(_BOM) if number == 0 else raw
            if line.strip():
                return line.lstrip().startswith(b"{")
    return False


def _read_line(raw: bytes, number: int, jsonl: bool) -> Line | Skipped | None:
    """The text of one line, a Skipped saying why it has none, or None for a blank line."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        shown = raw.decode("utf-8", "replace").rstrip("\r\n")
        return Skipped(number, f"not UTF-8 text (byte {exc.start})", raw=shown)
    if not line.strip():
        return None
    text = line
    if jsonl:
        try:
            value = json.loads(line)
        except ValueError as exc:
            return Skipped(number, f"not a JSON line: {exc}", raw=line)
        field_ = value.get("text") if isinstance(value, dict) else None
        if not isinstance(field_, str):
            return Skipped(number, 'no string "text" field', raw=line)
        if not field_:
            return Skipped(number, "empty text", text="")
        text = field_
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Skipped(number, "holds a lone surrogate (\\ud800-\\udfff escape), which is not text", text=text)
    return Line(number, text)


def read_batches(
    path: Path, start: int, first_line: int, max_tokens: int, max_inputs: int
) -> Iterator[tuple[list[Line], list[Skipped], int]]:
    """(texts, unreadable lines, byte offset after both): one request's worth of texts each, by a
    4-characters-per-token estimate, with the unreadable lines met on the way. ``first_line`` is the
    number of the line at byte ``start``."""
    jsonl = _is_jsonl(path)
    texts: list[Line] = []
    bad: list[Skipped] = []
    budget = 0
    with path.open("rb") as handle:
        handle.seek(start)
        offset, number = start, first_line
        for raw in handle:
            # a BOM at byte 0 marks the encoding; it is no part of the first text
            read = _read_line(raw.removeprefix(_BOM) if offset == 0 else raw, number, jsonl)
            number += 1
            offset += len(raw)
            if isinstance(read, Skipped):
                bad.append(read)
            elif read is not None:
                estimate = len(read.text) // 4 + 2
                if texts and (budget + estimate > max_tokens or len(texts) >= max_inputs):
                    yield texts, bad, offset - len(raw)
                    texts, bad, budget = [], [], 0
                texts.append(read)
                budget += estimate
        if texts or bad:
            yield texts, bad, offset


def first_line_number(path: Path, offset: int) -> int:
    """The number (from 1) of the line that starts at byte ``offset``."""
    count, left = 1, offset
    with path.open("rb") as handle:
        while left > 0:
            chunk = handle.read(min(left, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count
