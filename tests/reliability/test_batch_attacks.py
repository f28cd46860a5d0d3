"""An adversarial review of the Batch API (issue 23): /v1/files, /v1/batches, the runner, the job
stores and ``embedding-gateway batch run``.

Every test here failed on the code it was written against (c87c85f): each is one finding, with its docstring saying what is wrong and what
the right behaviour is; each passes once that finding is fixed. All are bounded in time (a few
seconds each) and use the shared fixtures (``gateway_factory``, ``fresh_redis``, ``minilm_encoder``,
``tests.gates.GatedEncoder``).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.batch_helpers import batch_client as _client
from tests.batch_helpers import embedding_line as _request
from tests.batch_helpers import jsonl as _lines
from tests.batch_helpers import parse_jsonl as _jsonl
from tests.batch_helpers import wait_final

pytestmark = pytest.mark.usefixtures("_offline")


@pytest.fixture
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


_wait = functools.partial(wait_final, timeout_s=20)


def _create(client: openai.OpenAI, content: bytes) -> Any:
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


def _runtime(gateway: Any) -> Any:
    return gateway.server.config.app.state.runtime


# --- F1 (data loss): two finalisers of one batch; the late one overwrites the output with nothing ---


@pytest.mark.parametrize("store", ["folder", "redis"])
def test_a_second_finaliser_never_overwrites_the_output_with_a_truncated_one(
    gateway_factory: Any, fresh_redis: Any, tmp_path: Path, store: str
) -> None:
    """Every runner finalises a batch twice over: once from the task of its last chunk
    (``BatchRunner._chunk`` -> ``finalise``) and once a second from the sweep in ``run()``. Nothing
    keeps the two apart: ``LocalJobs.lock`` is just "am I the runner" and ``RedisJobs.lock`` answers
    True again to the same holder ("a renewal"). When joining the parts takes longer than the sweep's
    one-second cadence (a big batch: parts of many MB, fsync'd), the sweep's finaliser joins, sets
    ``completed`` and deletes the parts (``_clean``) while the first is still in its join; the first
    then reads parts that are gone (``_concatenated`` suppresses FileNotFoundError) and atomically
    replaces the good output file with an empty (or truncated) one. The batch says ``completed``,
    ``request_counts.completed == 6``, and its output file holds nothing.

    Here the join is made slow by delaying the first ``batch_output`` write by two seconds (as a large
    join would be). Right: one finaliser per batch at a time (in-process guard, and a real lock that
    does not hand itself to the same consumer twice), and a join that finds a part missing, or a
    batch already final, writes nothing.
    """
    extra = {"redis_url": fresh_redis.url} if store == "redis" else {}
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), batch_chunk_inputs=2, **extra)
    files = _runtime(gateway).batch_runner.files
    real_create = files.create
    slow_done = threading.Event()
    calls: list[str] = []

    def slow_first_join(source: Any, **kwargs: Any) -> Any:
        if kwargs.get("purpose") != "batch_output":
            return real_create(source, **kwargs)
        calls.append(kwargs["filename"])
        if len(calls) > 1:
            return real_create(source, **kwargs)
        time.sleep(2.0)  # a join of a large batch
        try:
            return real_create(source, **kwargs)
        finally:
            slow_done.set()

    files.create = slow_first_join
    client = _client(gateway.url)
    requests = [_request(f"r{i}", f"finalised text {i}") for i in range(6)]
    done = _wait(client, _create(client, _lines(requests)).id)
    assert done.status == "completed" and done.request_counts.completed == 6
    assert slow_done.wait(10)
    out = _jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == [f"r{i}" for i in range(6)], (
        f"output file lost lines after a second finalisation ({len(calls)} joins ran)"
    )


# --- F2 (data loss): input deleted mid-run: the lines that ran are counted but unreachable ---------


def test_deleting_the_input_mid_run_keeps_the_lines_that_ran(
    gateway_factory: Any, minilm_encoder: Any, tmp_path: Path
) -> None:
    """``DELETE /v1/files/{input}`` while a batch runs: the next chunk's ``_read_span`` raises
    FileNotFoundError and ``_run_chunk`` sets the batch ``failed`` (runner.py, the
    ``except FileNotFoundError`` branch). From then on ``finalise`` returns at once for a terminal
    batch, so the parts of the chunks that did run are never joined: the batch answers
    ``request_counts.completed == 2`` with ``output_file_id: null``, two computed answers that no
    one can download, and their ``out-``/``err-`` parts (and the plan) stay in the folder forever.

    Right (as for a cancel): the batch ends ``failed`` with an output file of the lines that ran
    (and the rest in the error file, e.g. ``input_file_missing``), and its parts cleaned up.
    """
    from tests.gates import GatedEncoder

    gated = GatedEncoder(minilm_encoder)
    folder = tmp_path / "b"
    gateway = gateway_factory(encoder=gated, batch_dir=str(folder), batch_chunk_inputs=2, batch_chunks_in_flight=1)
    client = _client(gateway.url)
    gated.gate.clear()  # chunk 0 is computing when the input goes
    batch = _create(client, _lines([_request(f"r{i}", f"deleted input {i}") for i in range(6)]))
    assert gated.entered.wait(10)
    client.files.delete(batch.input_file_id)
    gated.gate.set()
    done = _wait(client, batch.id)
    assert done.status == "failed"
    assert done.request_counts.completed == 2  # chunk 0 ran
    assert done.output_file_id is not None, "2 lines are counted completed, but there is no output file to read them"
    out = _jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == ["r0", "r1"]
    deadline = time.monotonic() + 3
    while list((folder / "batches" / batch.id).glob("*-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list((folder / "batches" / batch.id).glob("*-*.jsonl")), "the parts of a failed batch are never cleaned"


# --- F3..F5 (wrong answer / data loss): `batch run` resume checks -----------------------------------


def _batch_run(monkeypatch: pytest.MonkeyPatch, minilm_dir: Path, source: Path, out: Path) -> int:
    from gateway.cli import main

    for name, value in {
        "EMBED_MODEL": str(minilm_dir),
        "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
        "EMBED_DEVICE": "cpu",
        "EMBED_CPU_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    return main(["batch", "run", str(source), str(out), "--no-progress"])


def test_batch_run_reruns_a_line_fixed_since_the_last_run(
    monkeypatch: pytest.MonkeyPatch, minilm_dir: Path, tmp_path: Path
) -> None:
    """The natural workflow: run, read the error line ("line 2 is not valid JSON"), fix line 2 in
    IN, run the same command again. ``_resume_point`` (batch_run.py) accepts any OUT line whose
    ``custom_id`` is null in place of any request line (``if found != wanted and found is not None``),
    so the old ``invalid_json_line`` error line is taken as line 2's answer: the fixed request ``b``
    is never run, the command exits 0 and OUT says ``b`` does not exist.

    Right: a null ``custom_id`` in OUT matches only a request line whose own ``custom_id`` is null
    (compare them as equal, None included); otherwise refuse (exit 2, "--restart") or rerun it.
    """
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(json.dumps(_request("a", "one")).encode() + b"\n{broken\n" + _lines([_request("c", "three")]))
    assert _batch_run(monkeypatch, minilm_dir, source, out) == 0
    assert [line["custom_id"] for line in _jsonl(out.read_bytes())] == ["a", None, "c"]
    source.write_bytes(_lines([_request("a", "one"), _request("b", "two"), _request("c", "three")]))
    code = _batch_run(monkeypatch, minilm_dir, source, out)
    lines = _jsonl(out.read_bytes())
    assert code == 2 or [line["custom_id"] for line in lines] == ["a", "b", "c"], (
        f"exit {code}, OUT {[(line['custom_id'], (line['error'] or {}).get('code')) for line in lines]}: "
        "the fixed line 2 was never run"
    )


def test_batch_run_refuses_an_output_longer_than_its_input(
    monkeypatch: pytest.MonkeyPatch, minilm_dir: Path, tmp_path: Path
) -> None:
    """OUT holds more lines than IN has request lines (IN was cut after a run): ``_resume_point``
    compares an extra OUT line against ``"<no such request line>"`` but again lets a null
    ``custom_id`` through, so it returns ``done`` > the request count, runs nothing and exits 0 with
    OUT answering a line that IN no longer has. Right: OUT with more lines than IN is refused
    (exit 2, "--restart"), like any other OUT that does not continue IN.
    """
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(_lines([_request("a", "one")]) + b"{broken\n")
    assert _batch_run(monkeypatch, minilm_dir, source, out) == 0
    source.write_bytes(_lines([_request("a", "one")]))
    code = _batch_run(monkeypatch, minilm_dir, source, out)
    assert code == 2, f"exit {code}: OUT has {len(_jsonl(out.read_bytes()))} lines for 1 request line"


def test_batch_run_never_truncates_its_input(monkeypatch: pytest.MonkeyPatch, minilm_dir: Path, tmp_path: Path) -> None:
    """``batch run in.jsonl in.jsonl`` (a slip of the shell's history): ``_resume_point`` reads IN
    as OUT, takes each request line for an output line (both have ``custom_id``, in the same place),
    and "drops the torn last line" of a file without a final newline by truncating it: the user's
    last request line is deleted from IN, and the command exits 0 having run nothing.

    Right: refuse OUT that is IN (same path or inode), or whose lines are not output lines (no
    ``response``/``error`` keys), and never truncate a file before it is known to be an OUT.
    """
    source = tmp_path / "in.jsonl"
    original = _lines([_request("a", "one")]) + json.dumps(_request("b", "two")).encode()  # no final newline
    source.write_bytes(original)
    code = _batch_run(monkeypatch, minilm_dir, source, source)
    assert source.read_bytes() == original, "the input file lost its last request line"
    assert code == 2


# --- F6 (500): Redis down ----------------------------------------------------------------------------


def test_redis_down_answers_503_not_500(gateway_factory: Any, fresh_redis: Any, tmp_path: Path) -> None:
    """With ``EMBED_REDIS_URL`` and Redis unreachable, create, retrieve, list and cancel answer
    500 ``internal_error`` ("quote request id ... when reporting it"), with a traceback in the log:
    redis' ConnectionError escapes ``RedisJobs`` and ``BatchService`` into the generic handler
    (gateway/http/errors.py ``_unexpected``). The cache, the /stats ``batches`` block and the runner
    all treat the same outage as expected; the batch routes should too.

    Right: a 503 ``server_error`` with ``Retry-After`` (the openai client retries 503s on its own),
    e.g. by mapping redis' ConnectionError/TimeoutError to an ``OverloadedError``-like "the batch
    store is unavailable" in the service. (Create should also not leave an orphan plan folder, and
    ``RedisJobs.create`` should be one MULTI/EXEC: a half-applied pipeline leaves a job with missing
    chunks that never finishes and never expires.)
    """
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), redis_url=fresh_redis.url, cache_timeout_ms=100)
    client = _client(gateway.url)
    batch = _create(client, _lines([_request("a", "before the outage")]))
    _wait(client, batch.id)
    fresh_redis.stop()
    create = {"input_file_id": batch.input_file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    answers = {
        "create": httpx.post(f"{gateway.url}/v1/batches", json=create, timeout=30),
        "retrieve": httpx.get(f"{gateway.url}/v1/batches/{batch.id}", timeout=30),
        "list": httpx.get(f"{gateway.url}/v1/batches", timeout=30),
        "cancel": httpx.post(f"{gateway.url}/v1/batches/{batch.id}/cancel", timeout=30),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == dict.fromkeys(answers, 503), statuses
    assert all("Retry-After" in answer.headers for answer in answers.values())


# --- F7 (contract): the batch tenant fills the encoder queue and interactive requests get 503 --------


def test_a_running_batch_never_makes_an_interactive_request_fail_with_queue_full(
    gateway_factory: Any, minilm_encoder: Any, tmp_path: Path
) -> None:
    """The fair queue orders the batch tenant below interactive traffic, but admission
    (``MicroBatcher.embed``: ``_queue_tokens + new_tokens > max_queue_tokens`` -> QueueFullError) counts
    every tenant's tokens alike. The runner keeps up to ``chunks_in_flight`` x 256 lines queued and
    re-asks each refused line (``lines._answered`` retries 503s), so the batch keeps the queue filled
    to within one line of ``max_queue_tokens``; an interactive request larger than that sliver is
    refused with 503 "the encoder queue is full". With the default 2,000,000 this happens with
    long-context models (two chunks of 1,024 bge-m3 passages of 8k tokens are 16M tokens).

    Right: batch work may use only part of the queue (e.g. background tokens capped at a fraction of
    ``max_queue_tokens``, or the runner bounding its queued tokens), so that an interactive request
    is admitted and answered (here: once the device frees) while a batch runs.
    """
    from tests.gates import GatedEncoder

    gated = GatedEncoder(minilm_encoder)
    gateway = gateway_factory(
        encoder=gated, batch_dir=str(tmp_path / "b"), max_queue_tokens=3000, batch_chunk_inputs=128
    )
    client = _client(gateway.url)
    gated.gate.clear()
    words = " ".join(f"word{j}" for j in range(10))
    batch = _create(client, _lines([_request(f"r{i}", f"{i} {words}") for i in range(300)]))
    assert gated.entered.wait(10)
    batcher = _runtime(gateway).models[0].batcher
    deadline, seen, steady = time.monotonic() + 5, -1, 0
    while batcher.queue_tokens < 2900 and steady < 10 and time.monotonic() < deadline:  # the batch queues all it may
        steady = steady + 1 if batcher.queue_tokens == seen else 0
        seen = batcher.queue_tokens
        time.sleep(0.05)
    answer: dict[str, httpx.Response] = {}

    def query() -> None:
        answer["r"] = httpx.post(
            f"{gateway.url}/v1/embeddings", json={"input": "an interactive question of a few words " * 6}, timeout=30
        )

    thread = threading.Thread(target=query)
    thread.start()
    time.sleep(0.5)
    gated.gate.set()
    thread.join(30)
    client.batches.cancel(batch.id)
    assert answer["r"].status_code == 200, answer["r"].text


# --- F8 (contract): a repeated custom_id runs when its first line was a bad one ----------------------


def test_a_custom_id_repeated_after_a_bad_line_is_a_duplicate(gateway_factory: Any, tmp_path: Path) -> None:
    """docs/api/batches.md: "a repeated custom_id" goes to the error file as
    ``duplicate_custom_id``. ``scan`` (plan.py) adds a custom_id to ``seen`` only for lines that
    pass ``check_line``, so a line with a wrong url (or method) and custom_id ``dup`` followed by a
    good line with ``dup`` gives ``dup`` in the error file (mismatched_endpoint) *and* in the output
    file (200): a client that files results by custom_id cannot tell whether ``dup`` succeeded.
    ``batch run`` has the same rule (batch_run.py: ``seen.add`` only for good lines).

    Right: every custom_id a line names counts as seen (``BadLine.custom_id`` too), so line 2 is
    ``duplicate_custom_id`` and ``dup`` is in no output file.
    """
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"))
    client = _client(gateway.url)
    wrong_url = {**_request("dup", "first"), "url": "/v1/chat/completions"}
    done = _wait(client, _create(client, _lines([wrong_url, _request("dup", "second"), _request("ok", "x")])).id)
    out = _jsonl(client.files.content(done.output_file_id).content) if done.output_file_id else []
    errors = {
        line["error"]["line"]: line["error"]["code"]
        for line in _jsonl(client.files.content(done.error_file_id).content)
    }
    assert [line["custom_id"] for line in out] == ["ok"], "custom_id 'dup' is both in the output and the error file"
    assert errors == {1: "mismatched_endpoint", 2: "duplicate_custom_id"}


# --- F9, F10 (minor): a BOM; an upload past the limit's slack ----------------------------------------


def test_a_utf8_bom_does_not_fail_the_first_line(gateway_factory: Any, tmp_path: Path) -> None:
    """A JSONL file saved by Windows tools (PowerShell 5's ``Out-File -Encoding utf8``, Notepad's
    "UTF-8 with BOM") starts with EF BB BF. ``scan`` hands the first line to msgspec with the BOM, so
    it is ``invalid_json_line`` ("invalid character (byte 0)") while the rest run. Python's
    ``json.loads(bytes)`` accepts a leading BOM. Right: strip a BOM at offset 0 (in ``scan``,
    ``lines_of`` for chunk 0 and ``batch run``'s reader) and run the line.
    """
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"))
    client = _client(gateway.url)
    done = _wait(client, _create(client, b"\xef\xbb\xbf" + _lines([_request("r0", "zero"), _request("r1", "one")])).id)
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 0), done.request_counts


def test_an_upload_far_over_the_limit_is_the_same_clear_400(gateway_factory: Any, tmp_path: Path) -> None:
    """docs/api/batches.md: a file over ``EMBED_BATCH_MAX_FILE_BYTES`` is "refused at once (400)",
    and one just over it is (``FileStore.create``: "larger than this server's limit of N bytes").
    One more than 1 MiB over it hits the route's ``request_max_body_size`` (limit + ``_UPLOAD_SLACK``)
    first and gets Litestar's 413 "The request body is larger than this server accepts.", which
    names no limit; the openai client raises a bare APIStatusError instead of BadRequestError.
    Right: the same 400 (naming the limit) whatever the size, e.g. by mapping the route's 413.
    """
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), batch_max_file_bytes=2000)
    client = _client(gateway.url)
    with pytest.raises(openai.BadRequestError, match="2000 bytes"):
        client.files.create(file=("big.jsonl", b"x" * (2000 + 2 * 1024 * 1024)), purpose="batch")
