"""Attacks on issue 25's work: the documentation (README.md, docs/, CLI help) and ``cache warm``.

Docstrings start with "FINDING (severity)." where the attack exposes a defect (expected vs got and
where the fault is), "Fixed finding (severity)." where it exposed one that has since been fixed, or
"Held attack." where the code stood up to it (both kept as regression tests).
Warm attacks run against a fake gateway on 127.0.0.1 (a ThreadingHTTPServer whose answers each test
scripts) or against the real app (``gateway_factory``).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cachectl_warm import WarmError, warm
from gateway.cli import main, parser

ROOT = Path(__file__).resolve().parents[2]

# --- a scripted fake gateway ----------------------------------------------------------------------

# answer(texts, request number from 1) -> (status, headers, body), or None to drop the connection
# after sending half an answer.
Answer = Callable[[list[str], int], "tuple[int, dict[str, str], bytes] | None"]


def ok(texts: list[str], _: int = 0) -> tuple[int, dict[str, str], bytes]:
    """What the gateway answers: 200, every text a miss."""
    data = [{"object": "embedding", "index": i, "embedding": "AAAAAA=="} for i in range(len(texts))]
    body = json.dumps({"object": "list", "data": data, "model": "m", "usage": {}}).encode()
    headers = {"content-type": "application/json", "x-cache-hits": "0", "x-cache-misses": str(len(texts))}
    return 200, headers, body


class FakeGateway:
    """Records every request's texts; answers as ``answer`` says."""

    def __init__(self, answer: Answer = ok, delay_s: float = 0.0) -> None:
        self.answer, self.delay_s = answer, delay_s
        self.requests: list[list[str]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    fake.requests.append(list(body["input"]))
                    number = len(fake.requests)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                reply = fake.answer(list(body["input"]), number)
                if reply is None:  # a server that dies mid-answer
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"object": "li')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, payload = reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def sent(self) -> list[str]:
        return [text for request in self.requests for text in request]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeGateway]]:
    started: list[FakeGateway] = []

    def start(answer: Answer = ok, delay_s: float = 0.0) -> FakeGateway:
        server = FakeGateway(answer, delay_s)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def refuse_if(marker: str) -> Answer:
    """A gateway that refuses (400, naming the input as the real one does) every text holding ``marker``."""

    def answer(texts: list[str], _: int) -> tuple[int, dict[str, str], bytes]:
        for i, text in enumerate(texts):
            if marker in text:
                error = {"message": f"input[{i}] is refused", "type": "invalid_request_error", "param": "input"}
                return 400, {"content-type": "application/json"}, json.dumps({"error": error}).encode()
        return ok(texts)

    return answer


def side_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def warm_cli(path: Path, url: str, *extra: str) -> int:
    return main(["cache", "warm", str(path), "--url", url, *extra])


# --- cache warm: the corpus -----------------------------------------------------------------------


def test_jsonl_corpus_with_a_utf8_bom_warms_its_first_record(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (medium). A .jsonl corpus saved with a UTF-8 byte order mark (Excel, PowerShell's
    Out-File, Notepad do this) loses its first record. Expected: all 3 records warmed (the BOM is an
    encoding mark, not text). Got: line 1 skipped as 'not a JSON line: Unexpected UTF-8 BOM'.
    Fault: gateway/cachectl_corpus.py _read_line decodes with "utf-8", not "utf-8-sig" for the
    file's first line. Fix: strip a leading b"\\xef\\xbb\\xbf" at offset 0 (in read_batches and in
    _is_jsonl's sniffing)."""
    server = fake()
    path = tmp_path / "corpus.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "alpha"}\n{"text": "beta"}\n{"text": "gamma"}\n')
    assert warm_cli(path, server.url) == 0
    out = capsys.readouterr().out
    side = path.with_name(path.name + ".warm-skipped")
    skipped = side_entries(side) if side.exists() else []
    assert sorted(server.sent) == ["alpha", "beta", "gamma"], (out, skipped)


def test_plain_text_corpus_with_a_utf8_bom_warms_the_text_without_it(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (medium). A plain-text corpus with a UTF-8 BOM sends its first text as "\\ufeffalpha",
    so the vector cached is that of another string (another cache key): the real "alpha" is a miss
    later. And a JSONL corpus with a BOM in a file not named .jsonl is not even read as JSONL
    (_is_jsonl sees b"\\xef\\xbb\\xbf{", not b"{"), so every raw JSON line is warmed as text.
    Expected: "alpha" sent; the BOM'd JSON lines read as JSONL. Got: "\\ufeffalpha"; raw JSON lines.
    Fault: gateway/cachectl_corpus.py _is_jsonl and _read_line. Fix: drop the BOM at offset 0."""
    server = fake()
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffalpha\nbeta\n".encode())
    warm(path, server.url, progress=False)
    jsonl = tmp_path / "export.txt"
    jsonl.write_bytes("\ufeff".encode() + b'{"text": "one"}\n{"text": "two"}\n')
    warm(jsonl, server.url, progress=False)
    assert server.sent == ["alpha", "beta", "one", "two"]


def test_crlf_corpora_are_warmed_without_carriage_returns(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Held attack. Windows line ends (CRLF) in plain text and in JSONL, a CRLF-only line and a
    final line without an end: each text is sent without "\\r", blank lines are ignored."""
    server = fake()
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"first line\r\nsecond line\r\n\r\nlast line")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_bytes(b'{"text": "j1"}\r\n\r\n{"text": "j2 with \\r\\n inside"}\r\n')
    assert warm(text, server.url, progress=False).texts == 3
    assert warm(jsonl, server.url, progress=False).texts == 2
    assert server.sent == ["first line", "second line", "last line", "j1", "j2 with \r\n inside"]


def test_jsonl_extra_fields_and_json_that_is_not_an_object(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Held attack. Extra fields are ignored; lines that are valid JSON but not an object (a list, a
    string, a number, null, true) or an object whose "text" is not a string are skipped, each with
    its line number and raw line in the side file; the rest are warmed; exit 0."""
    server = fake()
    path = tmp_path / "corpus.jsonl"
    lines = [
        '{"id": 7, "text": "kept one", "meta": {"lang": "en"}, "vector": [1, 2]}',
        "[1, 2, 3]",
        '"a bare string"',
        "42",
        "null",
        "true",
        '{"text": ["a", "list"]}',
        '{"text": null}',
        '{"TEXT": "wrong case"}',
        '{"text": "kept two", "text2": "ignored"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = warm(path, server.url, progress=False)
    assert server.sent == ["kept one", "kept two"]
    assert (report.texts, report.skipped) == (2, 8)
    entries = side_entries(path.with_name(path.name + ".warm-skipped"))
    assert [entry["line"] for entry in entries] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert all("raw" in entry and "text" not in entry for entry in entries), entries


# --- cache warm: hostile servers ------------------------------------------------------------------


def test_500_with_an_html_body_is_retried_then_stops_with_a_clear_line(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Held attack. A proxy in front answers 500 with an HTML page: retried --retries times, then the
    run stops with exit 1, the summary so far and one line quoting the start of the page, no traceback."""
    html = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1></body></html>"
    server = fake(lambda texts, n: (500, {"content-type": "text/html", "retry-after": "0"}, html))
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n")
    assert warm_cli(path, server.url, "--retries", "2") == 1
    captured = capsys.readouterr()
    assert len(server.requests) == 3
    assert "warmed 0 texts" in captured.out
    assert "gave up after 3 tries" in captured.err and "HTTP 500: <html>" in captured.err
    assert "Traceback" not in captured.err


def test_one_text_that_always_gets_500_does_not_end_the_run(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (medium). A text that makes the server fail every time (a poison input: the encoder
    crashes on it, 500 encoder_error) stops the whole run after --retries tries, and every resume
    stops on it again: the other 999 texts of the corpus are never warmed. The issue asks for exit
    non-zero only when nothing could be warmed or the server cannot be reached; this server is
    reachable and warms every other text. Expected: after the retries are spent on a request the
    server answered (not a lost connection), split it like a refusal and skip the one text that keeps
    failing (side file, reason "HTTP 500 ..."), exit 0. Got: exit 1, "gave up after 2 tries", the rest
    unwarmed. Fault: gateway/cachectl_warm.py _Warmer._post raises WarmError for a persistent 5xx.
    Fixed in gateway/cachectl_gateway.py (Sender): only a 500 carrying the gateway's own JSON error is
    split (a proxy's HTML 500 and a 503 still stop the run, see the held attacks), and three texts in a
    row failing alone stop it (a server that fails on everything)."""

    def answer(texts: list[str], _: int) -> tuple[int, dict[str, str], bytes] | None:
        if "poison" in texts:
            error = {"message": "the encoder failed (request id abc)", "type": "server_error", "code": "encoder_error"}
            return 500, {"content-type": "application/json", "retry-after": "0"}, json.dumps({"error": error}).encode()
        return ok(texts)

    server = fake(answer)
    path = tmp_path / "corpus.txt"
    texts = [f"text {i}" for i in range(20)]
    texts.insert(3, "poison")
    path.write_text("\n".join(texts) + "\n")
    code = warm_cli(path, server.url, "--retries", "1", "--max-inputs", "4")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert set(server.sent) >= {f"text {i}" for i in range(20)}


def test_a_connection_dropped_mid_answer_is_retried(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Held attack. The server sends headers and half a body, then closes the connection, twice: the
    request is sent again and the run ends with exit 0, every text warmed once in the report."""

    def answer(texts: list[str], number: int) -> tuple[int, dict[str, str], bytes] | None:
        return None if number <= 2 else ok(texts)

    server = fake(answer)
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\nthree\n")
    assert warm_cli(path, server.url, "--retries", "3") == 0
    out = capsys.readouterr().out
    assert "warmed 3 texts (3 newly cached, 0 already cached), skipped 0" in out
    assert len(server.requests) == 3


def test_every_text_refused_exits_1_and_lists_them_all(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Held attack. A corpus every text of which the server refuses: each is skipped and listed with
    its line number and text, exit 1 with 'nothing could be warmed'."""
    server = fake(refuse_if(""))
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"refused {i}\n" for i in range(7)))
    assert warm_cli(path, server.url) == 1
    captured = capsys.readouterr()
    assert "warmed 0 texts" in captured.out and "skipped 7" in captured.out
    assert "nothing could be warmed" in captured.err
    entries = side_entries(path.with_name(path.name + ".warm-skipped"))
    assert [(entry["line"], entry["text"]) for entry in entries] == [(i + 1, f"refused {i}") for i in range(7)]


def test_a_200_that_is_not_an_embeddings_answer_is_not_counted_as_warmed(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (low). --url pointing at the wrong service (a catch-all web app or proxy page that
    answers 200 text/html to every POST) reports every text warmed and exits 0: nothing was cached.
    Expected: an answer without the embeddings list (or without x-cache-* headers) stops the run like
    a 404. Got: "warmed 3 texts (0 newly cached, 0 already cached)", exit 0. Fault:
    gateway/cachectl_warm.py _Warmer.send trusts status 200 alone. Fixed in
    gateway/cachectl_gateway.py: a 200 must hold a "data" list of one entry per text sent (the
    x-cache-* headers are not required: a proxy in front may drop them)."""
    page = b"<html><body>Welcome to nginx!</body></html>"
    server = fake(lambda texts, n: (200, {"content-type": "text/html"}, page))
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\nthree\n")
    code = warm_cli(path, server.url)
    out = capsys.readouterr().out
    assert code == 1, out


# --- cache warm: resuming -------------------------------------------------------------------------


def test_resume_sends_each_unsent_line_once_and_none_again(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Held attack. The server goes away (503 for good) after 3 requests; the run stops; a second run
    against a healthy server resumes at the first unwarmed line: every text is answered 200 exactly
    once across both runs, in order."""
    texts = [f"resumable line {i:03d}" for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    accepted: list[str] = []

    def dying(batch: list[str], number: int) -> tuple[int, dict[str, str], bytes]:
        if number > 3:
            return 503, {"retry-after": "0"}, b"{}"
        accepted.extend(batch)
        return ok(batch)

    server = fake(dying)
    with pytest.raises(WarmError):
        warm(path, server.url, max_inputs=5, retries=1, progress=False)
    assert accepted == texts[:15]
    healthy = fake()
    report = warm(path, healthy.url, max_inputs=5, progress=False)
    assert report.texts == 25 and healthy.sent == texts[15:]


def test_resume_after_a_stop_mid_request_lists_no_skipped_line_twice(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (low). A run that stops inside a request after skipping one of its texts (400 naming
    it, then 503 for good on the rest) has already written the skip to the side file but not moved
    the state past the request; the resumed run sends the request again, skips the same text again
    and lists it twice (and counts it again). Expected: line 5 listed once. Got: twice. Fault:
    gateway/cachectl_warm.py warm(): the side file and the state file are not updated together. Fix:
    keep a batch's skips in memory and write them with the state, or record skipped lines in the
    state and not write them again."""
    path = tmp_path / "corpus.txt"
    path.write_text("good one\ngood two\ngood three\ngood four\nbad five\ngood six\n")

    def then_dies(batch: list[str], number: int) -> tuple[int, dict[str, str], bytes]:
        if number <= 2:  # the first request, then the second request's refusal of "bad five"
            return refuse_if("bad")(batch, number)
        return 503, {"retry-after": "0"}, b"{}"

    with pytest.raises(WarmError):
        warm(path, fake(then_dies).url, max_inputs=3, retries=0, progress=False)
    report = warm(path, fake(refuse_if("bad")).url, max_inputs=3, progress=False)
    entries = side_entries(path.with_name(path.name + ".warm-skipped"))
    assert [entry["line"] for entry in entries] == [5], (entries, report.summary())


def test_an_empty_or_torn_state_file_does_not_crash_the_command(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (medium). The state file is rewritten in place after every request
    (Path.write_text: truncate, then write); a Ctrl-C, a kill or a full disk between the two leaves it
    empty or torn, and every later run dies with a json.JSONDecodeError traceback (run_warm catches
    WarmError and OSError only). Expected: one clear line and exit 1 (or a fresh start), and the file
    written atomically (temp file + os.replace). Got: an uncaught JSONDecodeError. Fault:
    gateway/cachectl_warm.py warm() (json.loads of the state; state.write_text). Fixed in
    gateway/cachectl_state.py: written via a temporary file and os.replace; a bad state is refused
    with one line naming --restart (exit 1)."""
    server = fake()
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n")
    state = path.with_name(path.name + ".warm-state")
    for torn in ("", '{"offset": 4, "fi', '{"offset": "x"}', "[]"):
        state.write_text(torn)
        try:
            code = warm_cli(path, server.url)
        except Exception as exc:
            pytest.fail(f"state {torn!r}: {type(exc).__name__}: {exc} escaped the command")
        assert code in (0, 1), torn
        err = capsys.readouterr().err
        assert code == 0 or ("--restart" in err and len(err.strip().splitlines()) == 1), (torn, err)
    state.write_text('{"offset": 4, "fi')
    assert warm_cli(path, server.url, "--restart") == 0, "--restart ignores a torn state"
    assert json.loads(state.read_text())["finished"] is True


def test_a_state_file_past_the_end_of_a_replaced_corpus_is_not_a_silent_success(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (medium). The state records the corpus' size but never checks it. Warm corpus.txt
    (state: offset = its size, finished), then replace corpus.txt with a new, shorter export and run
    the same command: it seeks past the end, warms nothing, and exits 0 with "warmed 0 texts". A
    longer replacement resumes in the middle of it (even mid-line). Expected: a state that does not
    fit the file (offset past its end, size changed) is refused with a line naming --restart, or the
    run starts over. Got: exit 0, nothing sent. Fault: gateway/cachectl_warm.py warm() ignores the
    recorded "file"/"size"."""
    server = fake()
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"an old exported line number {i}\n" for i in range(50)))
    assert warm_cli(path, server.url) == 0
    before = len(server.sent)
    path.write_text("new line a\nnew line b\n")
    code = warm_cli(path, server.url)
    out = capsys.readouterr().out
    assert server.sent[before:] == ["new line a", "new line b"] or code != 0, (code, out)


# --- cache warm: the side file and two runs -------------------------------------------------------


def test_an_unwritable_skipped_file_fails_before_anything_is_sent(fake, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (low). --skipped-file in a folder that cannot be written is noticed only at the first
    skipped line, after every request before it was sent (on a real corpus: maybe hours in); the run
    then stops with exit 1 and prints no summary of what it did. (A folder of /proc stands in for a
    read-only folder, since the tests run as root.) Expected: the side file checked at start (exit 1
    before any request), or at least the summary printed. Got: 11 requests sent, then "[Errno 2] No
    such file or directory", no summary. Fault: gateway/cachectl_warm.py _Warmer.skip opens the side
    file lazily (warm() only unlinks it, which passes when it does not exist); run_warm's OSError
    branch drops the report. (Held: a side file under a regular file fails at once, in the unlink.)"""
    server = fake(refuse_if("bad"))
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"good {i}\n" for i in range(10)) + "bad\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert warm_cli(path, server.url, "--skipped-file", str(blocker / "side.jsonl")) == 1
    assert server.requests == [], "held: the unlink at start fails"
    capsys.readouterr()
    read_only = Path("/proc/self/warm-skipped.jsonl")
    code = warm_cli(path, server.url, "--max-inputs", "1", "--skipped-file", str(read_only), "--restart")
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert server.requests == [] or "warmed 10 texts" in captured.out, (len(server.requests), captured)


def test_two_runs_on_one_corpus_at_once_are_refused(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (low). Two `cache warm` runs on the same corpus (a cron job overlapping the last one, a
    second terminal) both go through the whole file, sending every text twice, and write one state
    file and side file in turns (a run starting at line 1 unlinks the side file the other is writing).
    Expected: the second run refused (a lock beside the state file) or the texts sent once. Got: both
    run, each text sent twice. Fault: gateway/cachectl_warm.py warm() takes no lock on the state."""
    server = fake(delay_s=0.05)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"shared corpus line {i}\n" for i in range(20)))
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(warm(path, server.url, max_inputs=1, progress=False))
        except WarmError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(server.sent) == 20, f"{len(server.sent)} texts sent for a 20-line corpus"


def test_a_50_mb_line_is_skipped_and_the_rest_warmed(gateway_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Held attack. A 50 MB single line (a whole book pasted into one line) between two short texts,
    against the real app (32 MiB body limit): the giant is refused and skipped, the other two are
    warmed, exit 0, within seconds."""
    live = gateway_factory()
    path = tmp_path / "corpus.txt"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("before the giant\n")
        handle.write("word " * 10_000_000 + "\n")
        handle.write("after the giant\n")
    began = time.monotonic()
    code = warm_cli(path, live.url, "--retries", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "warmed 2 texts (2 newly cached, 0 already cached), skipped 1" in captured.out
    entries = side_entries(path.with_name(path.name + ".warm-skipped"))
    assert [entry["line"] for entry in entries] == [2]
    assert time.monotonic() - began < 20


# --- the documentation ----------------------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def _subparsers(command: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _every_help() -> dict[str, str]:
    root = parser()
    helps = {"embedding-gateway": root.format_help()}
    for name, sub in _subparsers(root).items():
        helps[name] = sub.format_help()
        for inner, leaf in _subparsers(sub).items():
            helps[f"{name} {inner}"] = leaf.format_help()
    return helps


def test_every_help_is_plain_words_without_markup() -> None:
    """Held attack. `embedding-gateway --help` and every subcommand's help (cache stats/purge/warm,
    int8 build, engine, worker included): no reStructuredText or Sphinx markup (double backticks,
    :class:/:func: roles, directives), no "%(default)s" left unexpanded, nothing empty."""
    helps = _every_help()
    assert {"serve", "check", "openapi", "cache warm", "cache stats", "cache purge", "int8 build"} <= set(helps)
    markup = re.compile(r"``|:(class|func|meth|attr|mod|ref|data|exc):|^\s*\.\. \w+::|%\(\w+\)s", re.MULTILINE)
    for name, text in helps.items():
        assert len(text.splitlines()) > 3, name
        assert not markup.search(text), f"{name}: {markup.search(text)}"


def test_settings_help_points_at_a_page_that_explains_the_settings() -> None:
    """Fixed finding (low). The "settings" group of `serve --help` (and of check, cache stats/purge, int8
    build) says "README's settings table says what each one does", but README.md no longer has a
    settings table: the settings moved to docs/configuration.md. A user following the help finds
    nothing. Expected: the help names docs/configuration.md (or the site's Configuration page).
    Got: a pointer to a table that does not exist. Fault: gateway/cli.py line ~107 (the argument
    group's description); also the Settings docstring in gateway/settings.py."""
    serve_help = _every_help()["serve"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names_readme = "README" in serve_help
    readme_has_table = "| `EMBED_MAX_INPUTS`" in readme or "| variable |" in readme
    assert not names_readme or readme_has_table, "serve --help sends the reader to a README table that is gone"
    assert "configuration" in serve_help.lower(), "serve --help does not say where the settings are explained"


def test_serve_help_defaults_match_the_configuration_page() -> None:
    """Fixed finding (low). `serve --help` and docs/configuration.md disagree on two defaults: --model-name
    "(default: empty)" against "folder or repo basename", --onnx-cache-dir "(default: empty)" against
    `~/.cache/embedding-gateway/onnx`. "empty" reads as "unset, nothing happens" while the server
    computes a name and a cache folder. Expected: the help prints what the page says (both come from
    the code). Got: "empty". Fault: gateway/cli.py's settings group renders the raw field default;
    it could take SettingHelp.default from gateway/settings_help.py. (Values spelt differently but
    equal, false/off and 5/5.0, are accepted here.) Fixed in gateway/cli.py _default_text: an empty
    default shows the page's words up to any parenthesis (the image's /onnx stays on the page)."""
    from gateway.settings_help import SETTINGS_HELP

    serve = _subparsers(parser())["serve"]
    shown = {}
    for action in serve._actions:
        found = re.search(r"\(default: (.*)\)", action.help or "")
        if action.dest in SETTINGS_HELP and found:
            shown[action.dest] = found.group(1)
    assert set(shown) == set(SETTINGS_HELP)
    spelt = {"false": "off", "true": "on", "(empty)": "empty"}
    differ = {}
    for name, help_ in SETTINGS_HELP.items():
        page = help_.default.split(" (")[0].strip("`")
        page = spelt.get(page, page)
        try:
            if float(page) == float(shown[name]):
                continue
        except ValueError:
            pass
        if page != shown[name]:
            differ[name] = (help_.default, shown[name])
    assert not differ, differ


def test_every_documented_command_line_parses() -> None:
    """Held attack. Every `embedding-gateway ...` line in README.md's and docs/'s code blocks is a
    command the CLI takes: its subcommand and flags exist (parsed, never run)."""
    lines = []
    for path in DOCS:
        for block in _blocks(path, "bash") + _blocks(path, "sh") + _blocks(path, ""):
            for line in block.replace("\\\n", " ").splitlines():
                found = re.search(r"(?:^|[\s/])embedding-gateway (\S.*)$", line.split("  #")[0])
                if found:
                    lines.append((path.name, found.group(1)))
    assert len(lines) >= 6, lines
    for name, line in lines:
        argv = [re.sub(r"\$\w+", "x", word) for word in shlex.split(line.split("&&")[0].split("|")[0])]
        try:
            parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{name}: `embedding-gateway {line}` does not parse ({exc.code})")


def test_every_documented_route_is_in_the_openapi_document() -> None:
    """Held attack. Every route README.md and docs/ name in backticks (`POST /v2/embed`,
    `/v1/embeddings/sparse`, `/embed_all`, ...) is a path of openapi/openapi.json (or /docs/...,
    the schema's own pages): the feature table names no route the server lacks."""
    paths = set(json.loads((ROOT / "openapi" / "openapi.json").read_text())["paths"])
    route = re.compile(
        r"`(?:(?:GET|POST) )?(/(?:v1|v2|embed|rerank|info|tokenize|decode|stats|metrics|health|livez|readyz|dashboard)[\w/{}.-]*)"
    )
    named = set()
    for path in DOCS:
        for found in route.finditer(path.read_text(encoding="utf-8")):
            named.add((path.name, found.group(1).rstrip(".")))
    assert len(named) > 20
    patterns = [re.compile(re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(path)) + "$") for path in paths]
    missing = sorted((name, route_) for name, route_ in named if not any(p.match(route_) for p in patterns))
    assert not missing, missing


def test_readme_links_resolve() -> None:
    """Held attack. README.md is read on GitHub, outside mkdocs' link check: each relative link
    points at a file of the repository, and each #anchor at a heading of that page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]
    assert len(local) >= 10, local
    for link in local:
        target, _, anchor = link.partition("#")
        file = ROOT / target
        assert file.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, (link, slugs)


def test_the_documented_python_client_snippets_run_against_a_live_server(
    gateway_factory, serve_app, reranker, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Held attack. Every Python snippet of docs/clients.md, README.md and docs/quickstart.md, run as
    written (only the port changed) against the real app on 127.0.0.1: the openai client (with
    dimensions=128), LangChain's OpenAIEmbeddings, huggingface_hub's InferenceClient, LlamaIndex's
    TextEmbeddingsInference, LlamaIndex's TEI reranker and Cohere's ClientV2: the class names and
    parameters exist in the installed packages and each call returns vectors or a ranking."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # HF_HUB_OFFLINE=1: 127.0.0.1 only
    embedder = gateway_factory(model_aliases="*")
    ranker = serve_app(reranker, model_name="bge-reranker")
    snippets = [
        (path.name, body)
        for path in (ROOT / "docs" / "clients.md", ROOT / "README.md", ROOT / "docs" / "quickstart.md")
        for body in _blocks(path, "python")
    ]
    assert len(snippets) >= 8
    ran = 0
    for name, body in snippets:
        rerank = "rerank" in body
        code = body.replace("http://127.0.0.1:8001", (ranker if rerank else embedder).url)
        scope: dict[str, Any] = {}
        try:
            exec(compile(code, f"<{name} snippet>", "exec"), scope)
        except Exception as exc:
            pytest.fail(f"{name} snippet failed: {type(exc).__name__}: {exc}\n{body}")
        results = [scope.get(key) for key in ("vector", "vectors", "kept", "ranked")]
        assert any(result is not None for result in results), body
        vector = scope.get("vector")
        if vector is not None:
            assert len(vector) in (128, 384) or len(vector[0]) == 384, name
        ran += 1
    assert ran == len(snippets)


def test_ctrl_c_stops_with_a_summary_and_a_state_that_resumes(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fixed finding (low). The docs say a run stopped by Ctrl-C goes on from where it stopped; it does
    (the state is right), but Ctrl-C prints a Python traceback (KeyboardInterrupt out of httpx and
    tqdm) and no summary of what was warmed. Expected: the summary line, "interrupted; run it again
    to resume", exit 130, no traceback. Got: a traceback. Fault: gateway/cachectl_warm.py run_warm
    catches WarmError and OSError only (and gateway/cli.py main nothing)."""
    server = fake(delay_s=0.2)
    path = tmp_path / "corpus.txt"
    texts = [f"interrupted line {i}" for i in range(30)]
    path.write_text("\n".join(texts) + "\n")
    state = path.with_name(path.name + ".warm-state")
    argv = [sys.executable, "-m", "gateway", "cache", "warm", str(path), "--url", server.url, "--max-inputs", "1"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ})
    deadline = time.monotonic() + 15
    while len(server.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=15)
    sent_before = len(server.requests)
    offset = json.loads(state.read_text())["offset"]
    assert 0 < offset < path.stat().st_size
    report = warm(path, server.url, max_inputs=1, progress=False)
    assert set(server.sent) == set(texts), "the resume misses no line"
    assert len(server.sent) - sent_before == report.texts
    assert b"Traceback" not in err, err.decode()[-1500:]
    assert b"warmed" in out
    assert process.returncode == 130 and b"interrupted; run it again to resume" in err, (process.returncode, err)
