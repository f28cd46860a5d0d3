"""The batch job stores' rules that keep "nothing lost, nothing doubled" (gateway/core/batch/store.py),
on a real Redis and on the folder: a chunk redone after its batch is final changes no count, and a
runner that gives back a chunk another runner took over does not queue it again."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.core.batch.lines import LineAnswer
from gateway.core.batch.local_store import LocalJobs
from gateway.core.batch.redis_store import RedisJobs
from gateway.core.batch.runner import BatchRunner
from gateway.core.batch.schemas import CreateBatch
from gateway.core.batch.service import BatchLimits, BatchService
from gateway.core.batch.store import ChunkDone, JobStore


async def _answer(endpoint: str, body: bytes, owner: str) -> LineAnswer:
    return LineAnswer(200, b'{"object": "list", "data": []}')


async def _batch(service: BatchService, lines: int) -> str:
    content = b"".join(
        json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": f"t{i}"}}
        ).encode()
        + b"\n"
        for i in range(lines)
    )
    upload = await service.upload(io.BytesIO(content), filename="in.jsonl", purpose="batch", owner="")
    body = CreateBatch(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    return (await service.create(body, "")).id


def _service(folder: Path, jobs: JobStore) -> BatchService:
    return BatchService(folder, jobs, BatchLimits(10**6, 1000, 1000), endpoints=("/v1/embeddings",))


def test_a_chunk_given_back_after_another_runner_took_it_over_changes_nothing(fresh_redis: Any, tmp_path: Path) -> None:
    async def main() -> tuple[Any, Any, Any]:
        jobs = RedisJobs(Redis.from_url(fresh_redis.url), "t")
        await jobs.start()
        service = _service(tmp_path, jobs)
        batch_id = await _batch(service, 3)

        def runner(name: str) -> BatchRunner:
            return BatchRunner(jobs, service.files, tmp_path, _answer, claim_idle_s=0.2, consumer=name)

        stale = await jobs.claim("x", idle_s=0.2, wait_s=0.1)  # X takes the chunk and goes quiet
        await asyncio.sleep(0.3)
        taken = await jobs.claim("y", idle_s=0.2, wait_s=0.1)  # Y takes it over (XAUTOCLAIM), runs it
        assert stale is not None and taken is not None and taken.handle == stale.handle
        await runner("y")._chunk(taken)
        await jobs.release(stale, "x")  # X stops and gives back "its" chunk: it is not queued again
        again = await jobs.claim("z", idle_s=0.2, wait_s=0.1)
        await jobs.finish(taken, ChunkDone())  # a stale copy finishing late: the first outcome stays
        answer = await service.get(batch_id, "")
        await jobs.close()
        return again, answer.status, answer.request_counts

    again, status, counts = asyncio.run(main())
    assert again is None
    assert status == "completed"
    assert (counts.total, counts.completed, counts.failed) == (3, 3, 0)


@pytest.mark.parametrize("store", ["folder"])
def test_the_folder_store_keeps_the_first_outcome_too(tmp_path: Path, store: str) -> None:
    async def main() -> Any:
        jobs = LocalJobs(tmp_path)
        service = _service(tmp_path, jobs)
        batch_id = await _batch(service, 2)
        claim = await jobs.claim("me", idle_s=1, wait_s=0.1)
        assert claim is not None
        await BatchRunner(jobs, service.files, tmp_path, _answer, consumer="me")._chunk(claim)
        await jobs.finish(claim, ChunkDone())
        answer = await service.get(batch_id, "")
        await jobs.close()
        return answer

    answer = asyncio.run(main())
    assert answer.status == "completed"
    assert (answer.request_counts.completed, answer.request_counts.failed) == (2, 0)
