"""OpenAI's Batch API (/v1/files, /v1/batches) with the official ``openai`` client (issue 23)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.usefixtures("_offline")


@pytest.fixture
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _lines(requests: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(one).encode() + b"\n" for one in requests)


def _embedding_line(custom_id: str, text: str | list[str], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-MiniLM-L6-v2", "input": text, **body},
    }


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.1)


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_upload_create_poll_content_gives_the_routes_vectors(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "batches"), batch_chunk_inputs=4)
    client = _client(gateway.url)
    texts = [f"document number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(11)]
    requests = [_embedding_line(f"req-{i}", text) for i, text in enumerate(texts)]
    requests.append(_embedding_line("req-many", texts[:3], encoding_format="base64", dimensions=16))
    uploaded = client.files.create(file=("in.jsonl", _lines(requests)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_lines(requests))
    assert client.files.content(uploaded.id).content == _lines(requests)

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 12
    done = _wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 12 and done.request_counts.failed == 0
    assert done.error_file_id is None and done.completed_at and done.finalizing_at

    out = _jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == [one["custom_id"] for one in requests]  # each once, in order
    for line, request in zip(out, requests, strict=True):
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = {"encoding_format": "float", **request["body"]}
        direct = httpx.post(f"{gateway.url}/v1/embeddings", json=body).json()
        assert line["response"]["body"] == direct  # the route's very answer: vectors bit for bit, usage
    assert np.frombuffer(
        __import__("base64").b64decode(out[-1]["response"]["body"]["data"][0]["embedding"]), dtype="<f4"
    ).shape == (16,)


def test_bad_lines_go_to_the_error_file_with_their_line_and_the_rest_run(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "batches"))
    client = _client(gateway.url)
    content = b"\n".join(
        [
            json.dumps(_embedding_line("ok-1", "a fine text")).encode(),
            b"{not json",
            json.dumps(_embedding_line("ok-1", "the same custom_id again")).encode(),
            json.dumps({**_embedding_line("wrong-url", "x"), "url": "/v1/chat/completions"}).encode(),
            json.dumps(_embedding_line("bad-dims", "x", dimensions=100000)).encode(),
            json.dumps(_embedding_line("bad-model", "x", model="no-such-model")).encode(),
            b"",
            json.dumps(_embedding_line("ok-2", "another fine text")).encode(),
        ]
    )
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = _wait(
        client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h").id
    )
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 2, 5)
    out = _jsonl(client.files.content(batch.output_file_id).content)
    assert [line["custom_id"] for line in out] == ["ok-1", "ok-2"]
    errors = {line["error"]["line"]: line for line in _jsonl(client.files.content(batch.error_file_id).content)}
    assert set(errors) == {2, 3, 4, 5, 6}
    assert errors[2]["error"]["code"] == "invalid_json_line" and errors[2]["response"] is None
    assert errors[3]["error"]["code"] == "duplicate_custom_id"
    assert errors[4]["error"]["code"] == "mismatched_endpoint"
    assert errors[5]["response"]["status_code"] == 400
    assert errors[5]["response"]["body"]["error"]["param"] == "dimensions"
    assert errors[6]["response"]["status_code"] == 404
