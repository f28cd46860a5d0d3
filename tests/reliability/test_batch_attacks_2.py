"""A second adversarial review of the Batch API, against the fixes of 5119722 / cda5cd6.

Each test fails on the code it was written against (f4904b4) for the reason its docstring gives;
each drives the runner and the job stores directly (no model: the executor is a stub), so each
takes well under a second or two.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.batch.lines import LineAnswer
from gateway.core.batch.local_store import LocalJobs
from gateway.core.batch.runner import BatchRunner
from gateway.core.batch.schemas import TERMINAL, CreateBatch
from gateway.core.batch.service import BATCH_ENDPOINTS, BatchLimits, BatchService


def _request(custom_id: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": text},
    }


def _content(n: int) -> bytes:
    return b"".join(json.dumps(_request(f"r{i}", f"text {i}")).encode() + b"\n" for i in range(n))


async def _ok(endpoint: str, body: bytes, owner: str) -> LineAnswer:
    return LineAnswer(200, b'{"object":"list","data":[]}')


async def _setup(folder: Path, jobs: Any, n: int, *, chunk_inputs: int = 2, execute: Any = _ok) -> tuple[Any, Any]:
    service = BatchService(
        folder,
        jobs,
        BatchLimits(max_file_bytes=10**7, max_lines=1000, chunk_inputs=chunk_inputs),
        endpoints=BATCH_ENDPOINTS,
    )
    uploaded = service.files.create(io.BytesIO(_content(n)), filename="in.jsonl", purpose="batch", owner="")
    batch = await service.create(
        CreateBatch(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"), ""
    )
    runner = BatchRunner(jobs, service.files, folder, execute=execute)
    return service, (runner, batch)


# --- G1 (a batch that never ends): outcomes recorded before the upgrade name no attempt -------------


def test_a_batch_in_flight_across_the_upgrade_still_finishes(tmp_path: Path) -> None:
    """A batch running when a server is upgraded to 5119722: its chunks done before the upgrade were
    recorded as ``ChunkDone`` arrays of three (``[completed, failed, expired]``) and wrote parts named
    ``out-000000.jsonl`` / ``err-000000.jsonl``. After the upgrade ``ChunkDone.attempt`` decodes as
    ``""`` and ``_join`` (runner.py) looks for ``out-000000-.jsonl``: it raises FileNotFoundError on
    every sweep, forever. ``_finalise`` has already moved the batch to ``finalizing``, from which
    ``cancel`` answers 409: the batch can neither finish nor be cancelled, and its lines are lost.

    Right: an outcome with no attempt joins the unnamed parts (``out-{chunk:06d}.jsonl``), or a join
    that can never succeed ends the batch ``failed`` (with an error) rather than leaving it.
    """

    async def scenario() -> tuple[str, list[str]]:
        folder = tmp_path / "b"
        jobs = LocalJobs(folder)
        _, (runner, batch) = await _setup(folder, jobs, 2)
        parts = folder / "batches" / batch.id
        # What the pre-upgrade runner left: its outcome format and its part names.
        (parts / "done-0").write_bytes(b"[2,0,false]")
        (parts / "out-000000.jsonl").write_bytes(b'{"custom_id":"r0"}\n{"custom_id":"r1"}\n')
        (parts / "err-000000.jsonl").write_bytes(b"")
        seen = []
        for _ in range(3):  # three sweeps
            await runner.finalise(batch.id)
            record = await jobs.get(batch.id)
            seen.append(record.status)
        return record.status, seen

    status, seen = asyncio.run(scenario())
    assert status in TERMINAL, f"the batch never ends: statuses over three sweeps {seen}"


# --- G2 (leak): a stale attempt that finishes after the batch's final status leaves its parts -------


def test_a_stale_attempt_finishing_after_finalisation_leaves_no_parts(tmp_path: Path) -> None:
    """A chunk run twice (its first holder was thought dead; or a claim the local store hands out again
    after a restart): the first attempt records its outcome, the batch is finalised and ``_clean``
    removes ``*-*.jsonl``. The second attempt, which checked the status at its start (still
    ``in_progress``), then writes ``out-000000-<attempt>.jsonl`` / ``err-...`` into the folder of a
    batch already final. ``finish`` keeps the first outcome (right) and ``finalise`` returns at once
    for a terminal batch, so nothing ever removes them: every takeover of a chunk leaks a copy of its
    output on disk ("a stale copy ... writes files nobody reads", runner.py ``_run_chunk``).

    Right: ``_run_chunk`` checks the batch again before writing (skip the write for a final batch),
    or removes its own parts when its outcome was not the one recorded.
    """

    async def scenario() -> list[str]:
        folder = tmp_path / "b"
        jobs = LocalJobs(folder)
        gate = asyncio.Event()
        slow = {"on": False}

        async def execute(endpoint: str, body: bytes, owner: str) -> LineAnswer:
            if slow["on"]:
                await gate.wait()
            return await _ok(endpoint, body, owner)

        _, (runner, batch) = await _setup(folder, jobs, 2, execute=execute)
        claim = await jobs.claim(runner.consumer, idle_s=60, wait_s=0)
        assert claim is not None
        slow["on"] = True
        stale = asyncio.create_task(runner._run_chunk(claim))  # the copy thought dead
        await asyncio.sleep(0.05)
        slow["on"] = False
        await runner._chunk(claim)  # the takeover: runs, records, finalises
        assert (await jobs.get(batch.id)).status == "completed"
        gate.set()
        await stale  # the stale copy ends and writes its parts
        return sorted(path.name for path in (folder / "batches" / batch.id).glob("*-*.jsonl"))

    left = asyncio.run(scenario())
    assert not left, f"parts left in the folder of a final batch: {left}"


# --- G3 (wrong status): cancel, then the input deleted: the batch ends failed, not cancelled -------


def test_a_cancelled_batch_whose_input_is_deleted_ends_cancelled(tmp_path: Path) -> None:
    """``POST /v1/batches/{id}/cancel`` is answered ``cancelling``; a chunk that had already started
    then finds the input deleted and ``_run_chunk`` moves the batch ``cancelling -> finalizing`` (it
    names ``cancelling`` among the allowed states) with ``input_file_missing``; ``_finalise`` then
    sees ``finalizing`` with errors and sets ``failed``. The client asked for a cancel and got it
    acknowledged; OpenAI's lifecycle ends a cancelling batch ``cancelled``.

    Right: the input-missing transition is from ``in_progress`` only (a cancelling batch skips the
    rest anyway), so the cancel decides the final status.
    """

    async def scenario() -> str:
        folder = tmp_path / "b"
        jobs = LocalJobs(folder)
        service, (runner, batch) = await _setup(folder, jobs, 4)
        first = await jobs.claim(runner.consumer, idle_s=60, wait_s=0)
        await runner._chunk(first)  # chunk 0 ran
        await service.cancel(batch.id, "")
        second = await jobs.claim(runner.consumer, idle_s=60, wait_s=0)
        # The chunk passed its status check before the cancel landed, then reads the input: gone.
        real_get = jobs.get

        async def before_cancel(batch_id: str) -> Any:
            record = await real_get(batch_id)
            record.status = "in_progress"
            return record

        jobs.get = before_cancel  # type: ignore[method-assign]
        service.files.delete(batch.input_file_id, "")
        done = await runner._run_chunk(second)
        jobs.get = real_get  # type: ignore[method-assign]
        await jobs.finish(second, done)
        await runner.finalise(batch.id)
        return (await jobs.get(batch.id)).status

    assert asyncio.run(scenario()) == "cancelled"


# --- G4 (delay): a failed finalisation keeps the Redis lock for 60 s; "tried again in a second" ----


def test_a_failed_finalisation_is_retried_by_the_next_sweep_with_redis(tmp_path: Path, fresh_redis: Any) -> None:
    """``finalise`` says a failed finalisation is "tried again by the next sweep (a second)". With
    Redis, ``_finalise`` takes ``{tag}:final:{id}`` with SET NX for ``max(claim_idle_s, 5)`` = 60 s
    and never releases it, not after a failure either (a join that hit a transient OSError, a
    transition that hit a Redis blip). The lock "refuses its holder too", so every sweep of every
    replica is refused for the next 60 s: the batch sits in ``finalizing`` for a minute for a
    one-off error. (Also after a success: harmless, the batch is final.)

    Right: release the lock (DEL if still ours, a compare-and-delete script) in a ``finally`` of
    ``_finalise`` once it was taken; the TTL only covers a finaliser that died.
    """
    from redis.asyncio import Redis

    from gateway.core.batch.redis_store import RedisJobs

    async def scenario() -> str:
        folder = tmp_path / "b"
        client = Redis.from_url(fresh_redis.url)
        jobs = RedisJobs(client, "attack2")
        await jobs.start()
        _, (runner, batch) = await _setup(folder, jobs, 2)
        claim = await jobs.claim(runner.consumer, idle_s=60, wait_s=0.1)
        real_create = runner.files.create
        fails = {"left": 1}

        def flaky_create(source: Any, **kwargs: Any) -> Any:
            if fails["left"]:
                fails["left"] -= 1
                raise OSError(28, "No space left on device")  # once
            return real_create(source, **kwargs)

        runner.files.create = flaky_create  # type: ignore[method-assign]
        await runner._chunk(claim)  # runs, records, finalise fails once
        assert (await jobs.get(batch.id)).status == "finalizing"
        await asyncio.sleep(1.1)
        await runner.finalise(batch.id)  # the next sweep
        status = (await jobs.get(batch.id)).status
        await client.aclose()
        return status

    assert asyncio.run(scenario()) == "completed", "a one-off failure holds the batch for the lock's 60 s"


# --- G5 (resume refused): `batch run` cannot resume past a line with a custom_id but no url/body -----


def test_batch_run_resumes_past_an_invalid_request_line_that_has_a_custom_id(tmp_path: Path) -> None:
    """IN line 1 is ``{"custom_id": "a", "method": "POST"}`` (valid JSON, no ``url``/``body``):
    ``check_line`` fails its decode (``ValidationError``) and returns ``BadLine(...)`` with
    ``custom_id=None``, so OUT's line 1 is an ``invalid_request_line`` error line with
    ``"custom_id": null``. On resume, ``_resume_point`` is fed the lenient ``custom_id`` of each raw
    line (``plan.readable_id``), which reads ``"a"`` from the same line: ``None != "a"``, and
    ``batch run`` refuses its own OUT ("does not continue IN ... remove it or pass --restart"): an interrupted
    run of a file with one such line can never be resumed, only restarted.

    Right: compare against the very custom_id the output line would carry (``check_line``'s
    BadLine/RequestLine ``custom_id``), or have ``check_line`` keep a readable ``custom_id`` in its
    ``invalid_request_line`` BadLine (then the error line names it, too).
    """
    from gateway.batch_run import _requests, _resume_point
    from gateway.core.batch.lines import run_line
    from gateway.core.batch.plan import BadLine, check_line, readable_id
    from gateway.core.batch.schemas import BatchRecord

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b'{"custom_id": "a", "method": "POST"}\n' + json.dumps(_request("b", "two")).encode() + b"\n")
    record = BatchRecord(
        id="batch_" + "0" * 24,
        owner="",
        endpoint="/v1/embeddings",
        input_file_id="",
        completion_window="24h",
        created_at=0,
        expires_at=0,
        metadata=None,
        total=2,
        chunks=0,
    )
    # What the interrupted run wrote for line 1 (batch_run._run: check_line, then run_line).
    raw = next(_requests(source))[1]
    bad = check_line(raw, "/v1/embeddings")
    assert isinstance(bad, BadLine)
    _, line = asyncio.run(run_line(_ok, record, 1, raw, bad, expired=False))
    out.write_bytes(line)
    try:
        done = _resume_point(out, (readable_id(one) for _, one in _requests(source)))
    except ValueError as exc:
        pytest.fail(f"batch run refuses to resume its own OUT: {exc}")
    assert done == 1
