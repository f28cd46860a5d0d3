"""``cache warm``'s state file (how far a run got) and the lock that keeps two runs off one state.

The state file (``FILE.warm-state`` unless ``--state``) is one JSON object: ``offset``, the byte
offset of the next line to send, and what it was recorded against: the corpus' ``file`` name and
``size``, and ``tail``, a digest of the 4 KiB before ``offset``. It is written after every request
as a whole: a temporary file beside it, flushed to disk, then ``os.replace`` over the old one, so a
Ctrl-C, a kill or a full disk leaves either the old state or the new one, never half of one.

Reading it back checks that it still fits the corpus. A state that is not JSON, or has no
non-negative integer ``offset``, and a state that does not fit (its offset past the end of the file,
or not at the start of a line, or the bytes before it changed: the corpus was replaced by a new
export) are refused with a line naming ``--restart``. Resuming such a state would warm nothing and
report success, or start in the middle of a line. A corpus that only grew (lines appended) fits,
and the run goes on with the new lines.

The lock is ``STATE.lock`` beside the state file, held with ``fcntl.flock`` (exclusive, not
waiting) for the whole run: a second run on the same state (a cron job overlapping the last one)
is refused at once instead of sending every text a second time. The kernel lets go of the lock when
the process ends, however it ends; the empty lock file stays, which is harmless (removing it would
let two runs each lock a different file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.cachectl_gateway import WarmError

__all__ = ["locked", "read_state", "write_state"]

_TAIL_BYTES = 4096


@contextmanager
def locked(state: Path) -> Iterator[None]:
    """Hold ``STATE.lock`` for the run; WarmError at once when another run holds it."""
    lock = state.with_name(state.name + ".lock")
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WarmError(f"another cache warm run is using {state} (it holds {lock}); wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _tail(corpus: Path, offset: int) -> str:
    """A digest of the bytes just before ``offset``: they change when the corpus is replaced."""
    with corpus.open("rb") as handle:
        handle.seek(max(offset - _TAIL_BYTES, 0))
        return hashlib.sha256(handle.read(min(offset, _TAIL_BYTES))).hexdigest()[:32]


def _at_line_start(corpus: Path, offset: int, size: int) -> bool:
    if offset in (0, size):
        return True
    with corpus.open("rb") as handle:
        handle.seek(offset - 1)
        return handle.read(1) == b"\n"


def read_state(state: Path, corpus: Path) -> int:
    """The byte offset to resume ``corpus`` at: 0 without a state file; WarmError for a state that is
    not one or does not fit the corpus."""
    try:
        text = state.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    try:
        recorded = json.loads(text)
    except ValueError as exc:
        raise WarmError(
            f"the state file {state} is not a warm state ({exc}); remove it, or pass --restart to begin at line 1"
        ) from None
    if not isinstance(recorded, dict):
        recorded = {}
    offset = recorded.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise WarmError(
            f"the state file {state} holds no byte offset ({text[:80]!r}); remove it, or pass --restart "
            "to begin at line 1"
        )
    size = corpus.stat().st_size
    tail = recorded.get("tail")
    fits = offset <= size and _at_line_start(corpus, offset, size)
    if fits and isinstance(tail, str):
        fits = _tail(corpus, offset) == tail
    if not fits:
        was = recorded.get("size")
        then = f" of a {was}-byte file" if isinstance(was, int) else ""
        raise WarmError(
            f"the state file {state} does not fit {corpus}: it records byte {offset}{then}, and the corpus "
            f"({size} bytes) was replaced or changed since; pass --restart to warm it from line 1"
        )
    return offset


def write_state(state: Path, corpus: Path, offset: int, size: int, *, finished: bool = False) -> None:
    """Record ``offset`` as a whole (a temporary file, then ``os.replace``)."""
    record: dict[str, object] = {"offset": offset, "file": str(corpus), "size": size, "tail": _tail(corpus, offset)}
    if finished:
        record["finished"] = True
    temporary = state.with_name(f".{state.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(record))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, state)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
