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

from tests.batch_helpers import batch_client as _client
from tests.batch_helpers import embedding_line as _embedding_line
from tests.batch_helpers import jsonl as _lines
from tests.batch_helpers import parse_jsonl as _jsonl
from tests.batch_helpers import wait_final as _wait

pytestmark = pytest.mark.usefixtures("_offline")


@pytest.fixture
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


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


def _create(client: openai.OpenAI, requests: list[dict[str, Any]]) -> Any:
    uploaded = client.files.create(file=("in.jsonl", _lines(requests)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


def test_cancel_stops_the_rest_and_keeps_what_ran(gateway_factory: Any, minilm_encoder: Any, tmp_path: Path) -> None:
    from tests.gates import GatedEncoder

    gated = GatedEncoder(minilm_encoder)
    gateway = gateway_factory(
        encoder=gated, batch_dir=str(tmp_path / "b"), batch_chunk_inputs=5, batch_chunks_in_flight=1
    )
    client = _client(gateway.url)
    gated.gate.clear()  # the first chunk's pass waits until the cancel is in
    batch = _create(client, [_embedding_line(f"r{i}", f"text {i}") for i in range(40)])
    assert gated.entered.wait(10)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    gated.gate.set()
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts.total == 40 and counts.completed == 5 and counts.failed == 0  # the chunk in flight, no more
    out = _jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == [f"r{i}" for i in range(5)]
    again = client.batches.cancel(batch.id)  # cancelling a cancelled batch: the same batch back
    assert again.status == "cancelled"


def test_a_finished_batch_cannot_be_cancelled(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"))
    client = _client(gateway.url)
    done = _wait(client, _create(client, [_embedding_line("only", "one text")]).id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)


def test_jobs_in_redis_run_the_same(gateway_factory: Any, fresh_redis: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), redis_url=fresh_redis.url, batch_chunk_inputs=3)
    client = _client(gateway.url)
    requests = [_embedding_line(f"r{i}", f"redis text {i}") for i in range(10)]
    done = _wait(client, _create(client, requests).id)
    assert done.status == "completed" and done.request_counts.completed == 10
    out = _jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == [one["custom_id"] for one in requests]
    import redis

    store = redis.Redis.from_url(fresh_redis.url)
    tag = "{" + gateway.server.config.app.state.runtime.settings.cache_prefix + ":batch}"
    assert store.xpending(f"{tag}:work", "runners")["pending"] == 0
    assert store.hlen(f"{tag}:done:{done.id}") == 4  # 10 one-text lines by 3: four chunks, each once
    page = client.batches.list(limit=1)
    assert [one.id for one in page.data] == [done.id] and not page.has_more


def test_files_and_batches_belong_to_their_key(gateway_factory: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "alice"\nkey = "sk-alice"\n\n[[keys]]\nname = "bob"\nkey = "sk-bob"\n')
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), api_keys_file=str(keys))
    alice = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-alice", max_retries=0)
    bob = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-bob", max_retries=0)
    batch = _create(alice, [_embedding_line("a", "alice's text")])
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
    assert bob.files.list().data == [] and bob.batches.list().data == []
    assert _wait(alice, batch.id).status == "completed"
    assert [one.id for one in alice.files.list(purpose="batch").data] == [batch.input_file_id]


def test_limits_and_bad_requests_are_clear_400s(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), batch_max_lines=3, batch_max_file_bytes=2000)
    client = _client(gateway.url)
    with pytest.raises(openai.BadRequestError, match="larger than"):
        client.files.create(file=("big.jsonl", b"x" * 2001), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    four = client.files.create(
        file=("four.jsonl", _lines([_embedding_line(f"r{i}", "t") for i in range(4)])), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError, match="more than 3"):
        client.batches.create(input_file_id=four.id, endpoint="/v1/embeddings", completion_window="24h")
    empty = client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="no request lines"):
        client.batches.create(input_file_id=empty.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=four.id, endpoint="/v1/chat/completions", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=four.id, endpoint="/v1/embeddings", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../etc")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-../x")
    deleted = client.files.delete(four.id)
    assert deleted.deleted and deleted.id == four.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(four.id)


def test_without_a_folder_the_api_says_it_is_off(gateway_factory: Any) -> None:
    client = _client(gateway_factory().url)
    with pytest.raises(openai.NotFoundError, match="not enabled"):
        client.batches.list()


def test_stats_and_metrics_show_active_batches(gateway_factory: Any, minilm_encoder: Any, tmp_path: Path) -> None:
    from tests.gates import GatedEncoder

    gated = GatedEncoder(minilm_encoder)
    gateway = gateway_factory(
        encoder=gated, batch_dir=str(tmp_path / "b"), batch_chunk_inputs=2, batch_chunks_in_flight=1
    )
    client = _client(gateway.url)
    gated.gate.clear()
    batch = _create(client, [_embedding_line(f"r{i}", f"stat text {i}") for i in range(6)])
    assert gated.entered.wait(10)
    stats = httpx.get(f"{gateway.url}/stats").json()["batches"]
    assert stats == {"active": 1, "requests_total": 6, "requests_completed": 0, "requests_failed": 0}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "embedding_batches_active 1.0" in metrics and 'embedding_batch_requests{state="total"} 6.0' in metrics
    gated.gate.set()
    assert _wait(client, batch.id).status == "completed"
    assert httpx.get(f"{gateway.url}/stats").json()["batches"]["active"] == 0


def test_a_batch_past_its_window_expires_with_its_unrun_lines_in_the_error_file(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory(batch_dir=str(tmp_path / "b"), batch_chunk_inputs=2, batch_chunks_in_flight=1)
    runner = gateway.server.config.app.state.runtime.batch_runner
    runner.clock = lambda: time.time() + 25 * 3600  # a day and an hour later: past the 24h window
    client = _client(gateway.url)
    done = _wait(client, _create(client, [_embedding_line(f"r{i}", f"t{i}") for i in range(3)]).id)
    assert done.status == "expired" and done.expired_at
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 3)
    errors = _jsonl(client.files.content(done.error_file_id).content)
    assert [(line["custom_id"], line["error"]["code"]) for line in errors] == [
        ("r0", "batch_expired"),
        ("r1", "batch_expired"),
        ("r2", "batch_expired"),
    ]


def test_running_a_batch_leaves_other_apps_body_limit_alone(gateway_factory: Any, tmp_path: Path) -> None:
    """Batch lines run through the app's own copy of the route handler: resolving the module's
    original (shared by every app) cached its body limit as none for every app built after."""
    first = gateway_factory(batch_dir=str(tmp_path / "b"))
    client = _client(first.url)
    assert _wait(client, _create(client, [_embedding_line("a", "one text")]).id).status == "completed"
    second = gateway_factory(max_body_bytes=2000)
    answer = httpx.post(f"{second.url}/v1/embeddings", json={"input": "x" * 5000})
    assert answer.status_code == 413, answer.text
