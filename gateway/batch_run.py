"""``embedding-gateway batch run IN.jsonl OUT.jsonl``: a Batch API file run without a server.

The same file format as ``/v1/batches`` (``{custom_id, method, url, body}`` lines), the same
model, cache and answers: the app is built in this process, as ``serve`` would build it, and each
line is answered by its route's handler (:class:`~gateway.http.batch_lines.LineExecutor`), so a
vector equals the server's bit for bit. With ``EMBED_REDIS_URL`` the cache works both ways: hits
are free, and misses are written back for the servers that share it.

``OUT`` gets one line per request line, in input order: OpenAI's output line, or its error line
(``error`` set, or a non-200 ``response``) where the line failed. Lines are run a window at a time
(about ``EMBED_BATCH_CHUNK_INPUTS`` inputs) and each window is appended and synced whole, so an
interrupted run (Ctrl-C, a kill, a reboot) resumes with the same command: the whole lines already in
``OUT`` are checked against ``IN`` (the same ``custom_id`` in the same place) and skipped, and a
line cut short by the interruption is dropped and run again. ``--restart`` starts ``OUT`` afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import xxhash

from gateway.core.batch.plan import BOM, readable_id

__all__ = ["add_parsers", "run"]

_DESCRIPTION = """Run IN.jsonl's request lines ({custom_id, method, url, body}, the Batch API's format) with
the configured model, as the server would answer them, and write one line per request to OUT.jsonl,
in input order: OpenAI's output line, or an error line where the request failed. With
EMBED_REDIS_URL the cache is used both ways (hits are free, misses are written back).

Interrupted (Ctrl-C, a kill), the same command resumes: the whole lines already in OUT are checked
against IN and skipped; --restart starts OUT afresh."""

_EPILOG = """exit status: 0 when every line has its output line (failed requests included, as error
lines); 2 for a bad setting, a missing IN or an OUT that belongs to another file; 130 after Ctrl-C
(run the same command again to resume)"""


def add_parsers(commands: Any, settings_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    batch = commands.add_parser(
        "batch",
        help="run a Batch API file (JSONL request lines) here, without a server",
        description="OpenAI Batch API files, run in this process.",
    )
    batch_commands = batch.add_subparsers(dest="batch_command", required=True, metavar="{run}")
    run_ = batch_commands.add_parser(
        "run",
        help="run IN.jsonl's request lines into OUT.jsonl (resumes after an interruption)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_.add_argument("input", type=Path, metavar="IN.jsonl", help="request lines: {custom_id, method, url, body}")
    run_.add_argument("output", type=Path, metavar="OUT.jsonl", help="output lines, one per request line, in order")
    run_.add_argument(
        "--endpoint", default="/v1/embeddings", help="the route every line must name (default: %(default)s)"
    )
    run_.add_argument("--restart", action="store_true", help="start OUT afresh instead of resuming it")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    settings_flags(run_)


class _Output(msgspec.Struct):
    """What every line of OUT has (an output or error line), whatever else it holds."""

    id: str
    custom_id: str | None
    response: object
    error: object


def _requests(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of each non-blank line of ``path``, read as it goes."""
    with open(path, "rb") as source:
        for number, line in enumerate(source, start=1):
            if number == 1:
                line = line.removeprefix(BOM)  # noqa: PLW2901 - as some Windows tools save UTF-8
            if line.strip():
                yield number, line.rstrip(b"\r\n")


def _resume_point(output: Path, expected: Iterator[str | None]) -> int:
    """How many whole lines ``output`` holds; each is checked, before anything is changed, to be an
    output line answering the request line in its place (ValueError if not). A torn last line (the
    window being written when the run stopped) is then cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    done = 0
    for line in whole.splitlines():
        try:
            found = msgspec.json.decode(line, type=_Output).custom_id
        except msgspec.DecodeError as exc:
            raise ValueError(f"line {done + 1} is not an output line ({exc})") from None
        wanted = next(expected, "<no such request line>")
        if found != wanted:
            raise ValueError(f"line {done + 1} answers {found!r}, but request line {done + 1} is {wanted!r}")
        done += 1
    if len(whole) != len(data):
        with open(output, "r+b") as out:
            out.truncate(len(whole))
    return done


def run(args: argparse.Namespace, settings: Any) -> int:
    """``batch run``: see the module. ``settings`` are the command's (``EMBED_*`` and flags)."""
    if not args.input.is_file():
        print(f"embedding-gateway: batch run: no such file: {args.input}", file=sys.stderr)
        return 2
    if args.output.exists() and args.output.samefile(args.input):
        print("embedding-gateway: batch run: OUT is IN; name another file for the output", file=sys.stderr)
        return 2
    if args.restart:
        args.output.unlink(missing_ok=True)
    try:
        done = _resume_point(args.output, (readable_id(line) for _, line in _requests(args.input)))
    except ValueError as exc:
        print(
            f"embedding-gateway: batch run: {args.output} does not continue {args.input}: {exc}; "
            "remove it or pass --restart",
            file=sys.stderr,
        )
        return 2
    try:
        with open(args.output, "ab") as out:
            return asyncio.run(_run(args, settings, done, out))
    except KeyboardInterrupt:
        print(
            f"embedding-gateway: batch run: interrupted; {args.output} holds whole lines only: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130


async def _run(args: argparse.Namespace, settings: Any, done: int, out: BinaryIO) -> int:
    from tqdm import tqdm

    from gateway.core.batch.lines import run_line
    from gateway.core.batch.plan import BadLine, LineChecker, input_count
    from gateway.core.batch.schemas import BatchRecord
    from gateway.http.app import create_app
    from gateway.http.batch_lines import LineExecutor

    app = create_app(msgspec.structs.replace(settings, batch_dir=""))  # no runner: this process runs IN
    total = sum(1 for _ in _requests(args.input))
    batch_id = f"batch_{xxhash.xxh3_128_hexdigest(str(args.input.resolve()).encode())[:24]}"
    record = BatchRecord(
        id=batch_id,
        owner="",
        endpoint=args.endpoint,
        input_file_id="",
        completion_window="24h",
        created_at=0,
        expires_at=0,
        metadata=None,
        total=total,
        chunks=0,
    )
    counts = {"completed": 0, "failed": 0}
    check = LineChecker(args.endpoint)  # every line, the answered ones too: their ids count as seen
    async with app.lifespan():
        execute = LineExecutor(app)
        with tqdm(total=total, initial=done, unit="line", disable=args.no_progress, file=sys.stderr) as bar:
            window: list[tuple[int, bytes, BadLine | None]] = []
            inputs = 0

            async def flush() -> None:
                results = await asyncio.gather(
                    *(run_line(execute, record, number, raw, bad, expired=False) for number, raw, bad in window)
                )
                out.write(b"".join(line for _, line in results))
                out.flush()
                os.fsync(out.fileno())
                for ok, _ in results:
                    counts["completed" if ok else "failed"] += 1
                bar.update(len(window))
                window.clear()

            for position, (number, raw) in enumerate(_requests(args.input)):
                checked = check(raw)
                bad = checked if isinstance(checked, BadLine) else None
                if position < done:
                    continue  # answered by the interrupted run
                window.append((number, raw, bad))
                inputs += 1 if isinstance(checked, BadLine) else input_count(checked.body)
                if inputs >= settings.batch_chunk_inputs:
                    await flush()
                    inputs = 0
            if window:
                await flush()
    print(
        f"embedding-gateway: batch run: {total} request lines; this run {counts['completed']} completed, "
        f"{counts['failed']} failed (error lines); {args.output}",
        file=sys.stderr,
    )
    return 0
