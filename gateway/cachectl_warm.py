"""``embedding-gateway cache warm``: send a corpus through a running gateway so its vectors are cached.

How a run goes
--------------
The corpus is read line by line (``gateway.cachectl_corpus``): JSONL with ``{"text": ...}`` on each
line, or plain text with one text per line (blank lines and a UTF-8 byte order mark are ignored).
Texts are grouped into requests of about ``--max-tokens`` estimated tokens (4 characters a token)
and at most ``--max-inputs`` texts, and sent to the gateway's ``/v1/embeddings`` one request at a
time (``gateway.cachectl_gateway``). The gateway computes the texts it has not seen and caches them;
the ``x-cache-hits`` and ``x-cache-misses`` headers of each answer say how many were already cached
and how many were computed now. A 200 that is not an embeddings answer (``--url`` points at another
service) stops the run: nothing was cached.

A real corpus holds texts the gateway refuses: one past the model's limit (when the server does not
truncate), an empty ``"text"``, a line that is not JSON or not UTF-8. One such text must not end the
run, so:

* a line that cannot be read as a text is skipped before anything is sent;
* a request the gateway refuses with 400 (or 413, 422) loses only the text it names: the answer
  says ``input[N] ...``, text N is skipped and the rest of the request is sent again. A refusal that
  names no text (the whole request is over a per-request limit) splits the request in two and sends
  each half, down to single texts; a single text still refused is skipped;
* a 429 or a 5xx (rate limit, full queue, restarting server) and a dropped connection are retried
  after the wait the ``Retry-After`` header asks for, or 0.5 s doubling up to 30 s, ``--retries``
  times in a row before the run stops;
* a 500 error of the gateway's own that is still there after the retries (the encoder fails on one
  text every time) splits the request like a refusal, and the one text that keeps failing is
  skipped; three such texts in a row stop the run (the server fails on everything).

Every skipped line goes to the side file (``FILE.warm-skipped`` unless ``--skipped-file``): one JSON
object per line with the line number, the reason and the text (or the raw line when it held no
text). Its lines have a ``"text"`` field, so the side file can itself be warmed again once the
reason is fixed (for example after turning truncation on). The side file is checked at the start
(a folder that cannot be written stops the run before anything is sent), and a batch's skipped
lines are written together with the state, so a resumed run never lists a line twice.

Resuming (``gateway.cachectl_state``): ``FILE.warm-state`` holds the byte offset of the next line to
send, written as a whole after each request. A run that stopped (Ctrl-C, server gone) goes on from
there when started again, and adds to the side file; ``--restart`` starts again at line 1 with an
empty side file. A state file that is not one, or does not fit the corpus (a new export in its
place), is refused with a line naming ``--restart``. A second run on the same state while one is
going is refused (the lock ``FILE.warm-state.lock``).

Exit status: 0 when the corpus was gone through (some texts may be skipped), 1 when nothing could be
warmed (every text was skipped) or the run stopped (the gateway could not be reached or refused the
key, the model or the URL; a bad state file; another run on it), 130 when stopped by Ctrl-C (it
prints the summary so far; run it again to resume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO, Any

from gateway.cachectl_corpus import Skipped, first_line_number, read_batches
from gateway.cachectl_gateway import Sender, WarmError, WarmInterrupted, WarmReport
from gateway.cachectl_state import locked, read_state, write_state

__all__ = ["WarmError", "WarmInterrupted", "WarmReport", "add_warm_parser", "run_warm", "warm"]


def _check_writable(side: Path) -> None:
    """OSError now, before anything is sent, when the side file cannot be written; a file that was
    not there is not left behind (a run that skips nothing leaves no side file)."""
    existed = side.exists()
    with side.open("a", encoding="utf-8"):
        pass
    if not existed:
        side.unlink()


class _SideFile:
    """The side file, opened at the first skipped line and written a batch at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None

    def write(self, entries: list[Skipped]) -> None:
        if not entries:
            return
        if self.handle is None:
            self.handle = self.path.open("a", encoding="utf-8")
        self.handle.write("".join(entry.json_line() for entry in sorted(entries, key=lambda e: e.number)))
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def warm(
    path: Path,
    url: str,
    *,
    api_key: str = "",
    model: str | None = None,
    max_tokens: int = 8192,
    max_inputs: int = 256,
    state: Path | None = None,
    skipped_file: Path | None = None,
    restart: bool = False,
    retries: int = 8,
    progress: bool = True,
    timeout_s: float = 300.0,
) -> WarmReport:
    """Send ``path``'s texts through the gateway at ``url``; resume from ``state`` unless ``restart``.

    Raises WarmError when the run must stop (WarmInterrupted on Ctrl-C); the report so far is its
    ``report`` attribute. OSError when the corpus, the state or the side file fails before the start."""
    state = state or path.with_name(path.name + ".warm-state")
    skipped_file = skipped_file or path.with_name(path.name + ".warm-skipped")
    with locked(state):
        start = 0 if restart else read_state(state, path)
        if start == 0:
            skipped_file.unlink(missing_ok=True)  # a fresh run: the last run's list would mislead
        _check_writable(skipped_file)
        return _run(
            path,
            url,
            start,
            state=state,
            skipped_file=skipped_file,
            api_key=api_key,
            model=model,
            max_tokens=max_tokens,
            max_inputs=max_inputs,
            retries=retries,
            progress=progress,
            timeout_s=timeout_s,
        )


def _run(
    path: Path,
    url: str,
    start: int,
    *,
    state: Path,
    skipped_file: Path,
    api_key: str,
    model: str | None,
    max_tokens: int,
    max_inputs: int,
    retries: int,
    progress: bool,
    timeout_s: float,
) -> WarmReport:
    """The run itself, from byte ``start``, the lock held."""
    import httpx
    from tqdm import tqdm

    report = WarmReport(resumed_at=start, skipped_file=skipped_file)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + ("/embeddings" if url.rstrip("/").endswith("/v1") else "/v1/embeddings")
    began = time.perf_counter()
    size = path.stat().st_size
    batches = read_batches(path, start, first_line_number(path, start), max_tokens, max_inputs)
    side = _SideFile(skipped_file)
    try:
        with (
            httpx.Client(timeout=timeout_s, headers=headers) as client,
            tqdm(
                total=size, initial=start, unit="B", unit_scale=True, desc="warm", disable=not progress, file=sys.stderr
            ) as bar,
        ):
            sender = Sender(client, endpoint=endpoint, model=model, retries=retries, report=report)
            done = start
            for texts, bad, offset in batches:
                if texts:
                    sender.send(texts)
                skipped = bad + sender.take_skips()  # written with the state: none listed twice on resume
                side.write(skipped)
                report.skipped += len(skipped)
                write_state(state, path, offset, size)
                bar.update(offset - done)
                done = offset
        write_state(state, path, size, size, finished=True)
    except WarmError as exc:
        exc.report = report
        raise
    except OSError as exc:  # the corpus, the state or the side file failed mid-run
        raise _stopped(WarmError(f"{exc}"), report) from exc
    except KeyboardInterrupt:
        raise _stopped(WarmInterrupted("interrupted; run it again to resume"), report) from None
    finally:
        side.close()
        report.seconds = time.perf_counter() - began
    return report


def _stopped(error: WarmError, report: WarmReport) -> WarmError:
    error.report = report
    return error


# --- the command -------------------------------------------------------------------------------

WARM_DESCRIPTION = """\
Send a corpus through a running gateway so that its vectors are in the cache before real traffic
asks for them. FILE is JSONL with {"text": ...} on each line, or plain text with one text per line;
blank lines are ignored.

A text the gateway refuses (longer than the model's limit while the server does not truncate, an
empty text, a line that is not valid JSON or UTF-8) is skipped, counted, and written to the side
file, FILE.warm-skipped (or --skipped-file): one JSON line each with the line number, the reason
and the text. The other texts of the same request are sent again. Rate limits (429) and a busy or
restarting server (5xx) are waited out and retried.

The run can be resumed: FILE.warm-state records how far it got, and the same command goes on from
there (use --restart to begin again at line 1). A state file that does not fit FILE (a new export
in its place) is refused, naming --restart. A second run on the same state while one is going is
refused (it holds FILE.warm-state.lock).

It ends with one line: texts warmed (newly cached, already cached), texts skipped and the side
file, requests, seconds and texts per second."""

WARM_EPILOG = """\
exit status:
  0  the corpus was gone through (some texts may have been skipped)
  1  nothing could be warmed (every text was skipped), or the run stopped: the gateway could not
     be reached, or refused the API key, the model or the URL (run it again to resume); the state
     file does not fit FILE (pass --restart); another run holds the lock
  130  stopped by Ctrl-C, after printing the summary so far (run it again to resume)

example:
  embedding-gateway cache warm corpus.jsonl --url http://127.0.0.1:8001 --api-key "$KEY\""""


def add_warm_parser(actions: Any) -> None:
    """``cache warm``'s arguments (``actions``: the ``cache`` command's subparsers)."""
    warm_ = actions.add_parser(
        "warm",
        help="send a corpus through a running gateway so its vectors are cached",
        description=WARM_DESCRIPTION,
        epilog=WARM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    warm_.add_argument(
        "file", type=Path, metavar="FILE", help='the corpus: JSONL with {"text": ...} per line, or one text per line'
    )
    warm_.add_argument("--url", required=True, help="address of the running gateway, e.g. http://127.0.0.1:8001")
    warm_.add_argument("--api-key", default="", help="the gateway's API key, when it asks for one")
    warm_.add_argument("--model", default=None, help="the served model to warm (default: the gateway's default)")
    warm_.add_argument("--max-tokens", type=int, default=8192, help="estimated tokens per request (default: 8192)")
    warm_.add_argument("--max-inputs", type=int, default=256, help="at most this many texts per request (default: 256)")
    warm_.add_argument(
        "--state", type=Path, default=None, help="where progress is recorded, to resume (default: FILE.warm-state)"
    )
    warm_.add_argument(
        "--skipped-file",
        type=Path,
        default=None,
        help="where skipped lines are written, one JSON line each (default: FILE.warm-skipped)",
    )
    warm_.add_argument(
        "--retries",
        type=int,
        default=8,
        help="tries in a row after a 429, a 5xx or a lost connection before the run stops (default: 8)",
    )
    warm_.add_argument("--restart", action="store_true", help="ignore the recorded progress and start at line 1")


def run_warm(args: argparse.Namespace) -> int:
    """``cache warm``: the summary line on stdout; why the run stopped, if it did, on stderr."""
    try:
        report = warm(
            args.file,
            args.url,
            api_key=args.api_key,
            model=args.model,
            max_tokens=args.max_tokens,
            max_inputs=args.max_inputs,
            state=args.state,
            skipped_file=getattr(args, "skipped_file", None),
            restart=args.restart,
            retries=getattr(args, "retries", 8),
        )
    except WarmError as exc:
        stopped: WarmReport | None = getattr(exc, "report", None)
        if stopped is not None:
            print(stopped.summary())
        if isinstance(exc, WarmInterrupted):
            print(f"embedding-gateway cache warm: {exc}", file=sys.stderr)
            return 130
        print(f"embedding-gateway cache warm: stopped: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the corpus, the state or the side file cannot be read or written at the start
        print(f"embedding-gateway cache warm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run began: nothing was sent
        print("embedding-gateway cache warm: interrupted; run it again to resume", file=sys.stderr)
        return 130
    print(report.summary())
    if report.skipped and not report.texts:
        print("embedding-gateway cache warm: nothing could be warmed: every text was skipped", file=sys.stderr)
        return 1
    return 0
