"""``cache warm`` talking to the gateway: send one batch, wait out what is passing, skip what is refused.

:class:`Sender` turns one batch of corpus lines into requests to ``/v1/embeddings`` and sorts every
answer into one of four cases:

* **200 with the embeddings**: every text of the request is warmed; the ``x-cache-hits`` and
  ``x-cache-misses`` headers say how many were already cached. A 200 that is not an embeddings
  answer (no ``data`` list of one entry per text: a web page or another service at ``--url``) stops
  the run, like a 404: nothing was cached, and counting it as warmed would lie.
* **a refusal of the content (400, 413, 422)**: the text the answer names (``input[N] ...``) is
  skipped and the rest sent again; a refusal naming no text halves the request, down to single
  texts, and a single text still refused is skipped.
* **passing trouble (429, 5xx, a lost connection)**: waited out (``Retry-After``, else 0.5 s doubling
  up to 30 s) and sent again, ``--retries`` times in a row before the run stops.
* **a 500 that the gateway itself sent (its JSON error) after the retries**: one text of the request
  makes the encoder fail every time (a poison input). The request is halved like a refusal (the
  halves are not waited on again, a single text gets the full retries) and the text that still
  fails alone is skipped, so one bad text does not end a run over millions of good ones. Three such
  texts in a row with no 200 between mean the server fails on everything: the run stops.

Skipped texts are kept in :attr:`Sender.skips` until the caller writes them together with the
state file, so a run stopped inside a batch lists none of that batch's skips, and the resumed run
that sends the batch again lists each of them once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cachectl_corpus import Line, Skipped

if TYPE_CHECKING:
    import httpx

__all__ = ["Sender", "WarmError", "WarmInterrupted", "WarmReport"]

_NAMED_INPUT = re.compile(r"^input\[(\d+)\]")  # how the gateway names the text a 400 is about
_REFUSED = frozenset({400, 413, 422})  # the request's content is refused: skip or split, never retry as is
_RETRIED = frozenset({429, 500, 502, 503, 504})  # a limit or a passing server trouble: wait and send again
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_FAILING_IN_ROW_MAX = 3  # texts skipped for a 500 with no 200 between: the server, not the texts


class WarmError(Exception):
    """The run cannot go on (the gateway cannot be reached, or refuses the key, the model or the URL).

    ``report`` holds what the run did before it stopped (set by ``warm``)."""

    report: WarmReport | None = None


class WarmInterrupted(WarmError):
    """The run was stopped by Ctrl-C (SIGINT); the state file says where to resume."""


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


def _gateway_error(response: httpx.Response) -> str | None:
    """The message of the gateway's own error answer (OpenAI's envelope), or None for any other body."""
    try:
        body = response.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def _error_message(response: httpx.Response) -> str:
    """The gateway's error message, or the start of the body."""
    return _gateway_error(response) or response.text[:300].strip() or f"HTTP {response.status_code}"


def _count(value: str | None) -> int:
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0


def _backoff(failures: int, retry_after: str | None) -> float:
    """Seconds to wait before try ``failures + 1``: what Retry-After asks (seconds), else 0.5 s doubling."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), 300.0)
        except ValueError:
            pass  # an HTTP date: not sent by this gateway; fall back to the doubling wait
    return float(min(_BACKOFF_FIRST_S * 2 ** (failures - 1), _BACKOFF_MAX_S))


class Sender:
    """Sends batches, retries what is passing, skips what is refused or always fails, keeps the count."""

    def __init__(
        self, client: httpx.Client, *, endpoint: str, model: str | None, retries: int, report: WarmReport
    ) -> None:
        self.client, self.endpoint, self.model, self.retries = client, endpoint, model, retries
        self.report = report
        self.skips: list[Skipped] = []  # this batch's skipped texts, not yet written (the caller writes them)
        self.answered = False  # has the gateway answered once? (a refused connection before: a wrong URL)
        self.failing_in_row = 0  # texts skipped for a 500 since the last 200

    def take_skips(self) -> list[Skipped]:
        """The texts skipped since the last call, to write with the state."""
        taken, self.skips = self.skips, []
        return taken

    def send(self, lines: list[Line]) -> None:
        """Warm ``lines``: every text the gateway takes is warmed, every one it refuses skipped."""
        pending: list[tuple[list[Line], bool]] = [(lines, True)]  # (texts, wait out a 500 on them?)
        while pending:
            group, patient = pending.pop()
            response = self._post([line.text for line in group], patient or len(group) == 1)
            if response.status_code == 200:
                self._warmed(group, response)
                continue
            message = _error_message(response)
            if response.status_code == 500:  # the gateway fails on this content, retries spent
                if len(group) == 1:
                    self._failing(group[0], f"HTTP 500: {message}")
                else:  # find the text it fails on: each half on its own, not waited on again
                    half = len(group) // 2
                    pending += [(group[half:], False), (group[:half], False)]
                continue
            named = _NAMED_INPUT.match(message)
            index = int(named.group(1)) if named else -1
            if 0 <= index < len(group):  # the gateway names the text: skip it, send the others again
                self.skips.append(Skipped(group[index].number, message, text=group[index].text))
                rest = group[:index] + group[index + 1 :]
                if rest:
                    pending.append((rest, patient))
            elif len(group) == 1:
                self.skips.append(Skipped(group[0].number, message, text=group[0].text))
            else:  # refused as a whole (over a per-request limit): each half on its own, first half first
                half = len(group) // 2
                pending += [(group[half:], patient), (group[:half], patient)]

    def _warmed(self, group: list[Line], response: httpx.Response) -> None:
        """Count a 200, once it is known to be the embeddings of ``group``."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(group):
            kind = response.headers.get("content-type", "no content type")
            start = " ".join(response.text[:120].split())
            raise WarmError(
                f"{self.endpoint} answered 200 but not with the embeddings of the {len(group)} texts sent "
                f"({kind}: {start!r}); check --url: it must be the gateway's address"
            )
        self.report.requests += 1
        self.report.texts += len(group)
        self.report.hits += _count(response.headers.get("x-cache-hits"))
        self.report.misses += _count(response.headers.get("x-cache-misses"))
        self.failing_in_row = 0

    def _failing(self, line: Line, reason: str) -> None:
        """Skip a text the gateway fails on every time, unless it fails on every text."""
        self.failing_in_row += 1
        if self.failing_in_row >= _FAILING_IN_ROW_MAX:
            raise WarmError(
                f"the gateway at {self.endpoint} failed on {self.failing_in_row} texts in a row, each alone "
                f"and after every retry ({reason}): the server is failing, not the texts"
            )
        self.skips.append(Skipped(line.number, reason, text=line.text))

    def _post(self, texts: list[str], patient: bool) -> httpx.Response:
        """The gateway's answer to one request: 200, a refusal of its content (400, 413, 422), or a
        500 of the gateway's own once the retries are spent (at once when not ``patient``); anything
        else is retried or raises WarmError."""
        import httpx

        body: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
        if self.model:
            body["model"] = self.model
        failures = 0
        while True:
            failing = False  # a 500 the gateway sent about this content (not a proxy's page, not a lost line)
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
                failing = response.status_code == 500 and _gateway_error(response) is not None
                if failing and not patient:
                    return response
                problem, wait = (
                    f"HTTP {response.status_code}: {_error_message(response)}",
                    response.headers.get("retry-after"),
                )
            failures += 1
            if failures > self.retries:
                if failing:
                    return response
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
