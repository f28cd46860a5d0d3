"""``embedding-gateway cache warm``: send a corpus through a running gateway so its vectors are cached.

How a run goes
--------------
The corpus is read line by line: JSONL with ``{"text": ...}`` on each line, or plain text with one
text per line (blank lines are ignored). Texts are grouped into requests of about ``--max-tokens``
estimated tokens (4 characters a token) and at most ``--max-inputs`` texts, and sent to the
gateway's ``/v1/embeddings`` one request at a time. The gateway computes the texts it has not seen
and caches them; the ``x-cache-hits`` and ``x-cache-misses`` headers of each answer say how many
were already cached and how many were computed now.

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
  times in a row before the run stops.

Every skipped line goes to the side file (``FILE.warm-skipped`` unless ``--skipped-file``): one JSON
object per line with the line number, the reason and the text (or the raw line when it held no
text). Its lines have a ``"text"`` field, so the side file can itself be warmed again once the
reason is fixed (for example after turning truncation on).

Resuming: ``FILE.warm-state`` holds the byte offset of the next line to send, written after each
request. A run that stopped (Ctrl-C, server gone) goes on from there when started again, and adds
to the side file; ``--restart`` starts again at line 1 with an empty side file.

Exit status: 0 when the corpus was gone through (some texts may be skipped), 1 when nothing could be
warmed (every text was skipped) or the run stopped (the gateway could not be reached or refused the
key, the model or the URL).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gateway.cachectl_corpus import Line, Skipped, first_line_number, read_batches

if TYPE_CHECKING:
    import httpx

__all__ = ["WarmError", "WarmReport", "add_warm_parser", "run_warm", "warm"]

_NAMED_INPUT = re.compile(r"^input\[(\d+)\]")  # how the gateway names the text a 400 is about
_REFUSED = frozenset({400, 413, 422})  # the request's content is refused: skip or split, never retry as is
_RETRIED = frozenset({429, 500, 502, 503, 504})  # a limit or a passing server trouble: wait and send again
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0


class WarmError(Exception):
    """The run cannot go on (the gateway cannot be reached, or refuses the key, the model or the URL).

    ``report`` holds what the run did before it stopped (set by :func:`warm`)."""

    report: WarmReport | None = None


@dataclass(slots=True)
class WarmReport:
    """What a run did; ``summary()`` is the line ``cache warm`` prints."""

    texts: int = 0  # warmed: answered by the gateway (already cached or computed now)
    hits: int = 0  # of those, already cached
    misses: int = 0  # of those, computed and cached now
    skipped: int = 0
    requests: int = 0  # answered 200
    retries: int = 0
    seconds: float = 0.0
    resumed_at: int = 0  # byte offset the run started from
    skipped_file: Path | None = None
    stopped: str = ""  # why the run ended early, or ""

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        where = f" (listed in {self.skipped_file})" if self.skipped and self.skipped_file else ""
        return (
            f"warmed {self.texts} texts ({self.misses} newly cached, {self.hits} already cached), "
            f"skipped {self.skipped}{where}; {self.requests} requests in {self.seconds:.1f} s, "
            f"{self.texts_per_second:.1f} texts/s"
        )


# --- reading the corpus ------------------------------------------------------------------------

# --- talking to the gateway --------------------------------------------------------------------


def _error_message(response: httpx.Response) -> str:
    """The gateway's error message (OpenAI's envelope), or the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:300].strip() or f"HTTP {response.status_code}"


class _Warmer:
    """Sends batches, retries what is passing, skips what is refused, and keeps the count."""

    def __init__(
        self, client: httpx.Client, *, endpoint: str, model: str | None, retries: int, report: WarmReport, side: Path
    ) -> None:
        self.client, self.endpoint, self.model, self.retries = client, endpoint, model, retries
        self.report, self.side_path = report, side
        self.side: IO[str] | None = None  # opened at the first skip: a run that skips nothing leaves no file
        self.answered = False  # has the gateway answered once? (a refused connection before: a wrong URL)

    def skip(self, entry: Skipped) -> None:
        if self.side is None:
            self.side = self.side_path.open("a", encoding="utf-8")
        self.side.write(entry.json_line())
        self.report.skipped += 1

    def flush(self) -> None:
        """The skipped lines on disk: done before the state file moves past them."""
        if self.side is not None:
            self.side.flush()

    def close(self) -> None:
        if self.side is not None:
            self.side.close()

    def send(self, lines: list[Line]) -> None:
        """Warm ``lines``: every text the gateway takes is warmed, every one it refuses skipped."""
        pending = [lines]
        while pending:
            group = pending.pop()
            response = self._post([line.text for line in group])
            if response.status_code == 200:
                self.report.requests += 1
                self.report.texts += len(group)
                self.report.hits += int(response.headers.get("x-cache-hits", 0))
                self.report.misses += int(response.headers.get("x-cache-misses", 0))
                continue
            message = _error_message(response)
            named = _NAMED_INPUT.match(message)
            index = int(named.group(1)) if named else -1
            if 0 <= index < len(group):  # the gateway names the text: skip it, send the others again
                self.skip(Skipped(group[index].number, message, text=group[index].text))
                rest = group[:index] + group[index + 1 :]
                if rest:
                    pending.append(rest)
            elif len(group) == 1:
                self.skip(Skipped(group[0].number, message, text=group[0].text))
            else:  # refused as a whole (over a per-request limit): each half on its own, first half first
                half = len(group) // 2
                pending += [group[half:], group[:half]]

    def _post(self, texts: list[str]) -> httpx.Response:
        """The gateway's answer to one request: 200 or a refusal of its content (400, 413, 422);
        anything else is retried or raises WarmError."""
        import httpx

        body: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
        if self.model:
            body["model"] = self.model
        failures = 0
        while True:
            try:
                response = self.client.post(self.endpoint, json=body)
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError) and not self.answered:
                    raise WarmError(f"cannot reach the gateway at {self.endpoint}: {exc}") from None
                problem, wait = f"{type(exc).__name__}: {exc}", None
            else:
                self.answered = True
                if response.status_code == 200 or response.status_code in _REFUSED:
                    return response
                if response.status_code not in _RETRIED:
                    raise WarmError(self._fatal(response))
                problem, wait = (
                    f"HTTP {response.status_code}: {_error_message(response)}",
                    response.headers.get("retry-after"),
                )
            failures += 1
            if failures > self.retries:
                raise WarmError(f"gave up after {failures} tries at {self.endpoint}: {problem}")
            self.report.retries += 1
            time.sleep(_backoff(failures, wait))

    def _fatal(self, response: httpx.Response) -> str:
        message = _error_message(response)
        status = response.status_code
        if status in (401, 403):
            return f"the gateway refused the key ({status}: {message}); pass the right --api-key"
        if status == 404:
            return f"{self.endpoint} answered 404 ({message}); check --url and --model"
        return f"{self.endpoint} answered {status}: {message}"


def _backoff(failures: int, retry_after: str | None) -> float:
    """Seconds to wait before try ``failures + 1``: what Retry-After asks (seconds), else 0.5 s doubling."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), 300.0)
        except ValueError:
            pass  # an HTTP date: not sent by this gateway; fall back to the doubling wait
    return float(min(_BACKOFF_FIRST_S * 2 ** (failures - 1), _BACKOFF_MAX_S))


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

    Raises WarmError when the run must stop; the report so far is its ``report`` attribute."""
    import httpx
    from tqdm import tqdm

    state = state or path.with_name(path.name + ".warm-state")
    skipped_file = skipped_file or path.with_name(path.name + ".warm-skipped")
    start = 0
    if state.exists() and not restart:
        start = int(json.loads(state.read_text()).get("offset", 0))
    if start == 0:
        skipped_file.unlink(missing_ok=True)  # a fresh run: the last run's list would mislead
    report = WarmReport(resumed_at=start, skipped_file=skipped_file)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + ("/embeddings" if url.rstrip("/").endswith("/v1") else "/v1/embeddings")
    began = time.perf_counter()
    size = path.stat().st_size
    batches = read_batches(path, start, first_line_number(path, start), max_tokens, max_inputs)
    with (
        httpx.Client(timeout=timeout_s, headers=headers) as client,
        tqdm(
            total=size, initial=start, unit="B", unit_scale=True, desc="warm", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        warmer = _Warmer(client, endpoint=endpoint, model=model, retries=retries, report=report, side=skipped_file)
        done = start
        try:
            for texts, bad, offset in batches:
                for entry in bad:
                    warmer.skip(entry)
                if texts:
                    warmer.send(texts)
                warmer.flush()
                state.write_text(json.dumps({"offset": offset, "file": str(path), "size": size}))
                bar.update(offset - done)
                done = offset
        except WarmError as exc:
            report.seconds = time.perf_counter() - began
            exc.report = report
            raise
        finally:
            warmer.close()
    report.seconds = time.perf_counter() - began
    state.write_text(json.dumps({"offset": size, "file": str(path), "size": size, "finished": True}))
    return report


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
there (use --restart to begin again at line 1).

It ends with one line: texts warmed (newly cached, already cached), texts skipped and the side
file, requests, seconds and texts per second."""

WARM_EPILOG = """\
exit status:
  0  the corpus was gone through (some texts may have been skipped)
  1  nothing could be warmed (every text was skipped), or the run stopped: the gateway could not
     be reached, or refused the API key, the model or the URL (run it again to resume)

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
        print(f"embedding-gateway cache warm: stopped: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the corpus, the state or the side file cannot be read or written
        print(f"embedding-gateway cache warm: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.skipped and not report.texts:
        print("embedding-gateway cache warm: nothing could be warmed: every text was skipped", file=sys.stderr)
        return 1
    return 0
