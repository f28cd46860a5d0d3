"""Operations: /metrics agrees with /stats, API keys, the request log line."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def _metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_move_with_traffic_and_agree_with_stats(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    before = _metrics(live.url)
    texts = ["metrics one", "metrics two", "metrics three"]
    for _ in range(2):
        assert httpx.post(f"{live.url}/v1/embeddings", json={"input": texts}).status_code == 200
    assert httpx.post(f"{live.url}/v1/embeddings", json={"input": ""}).status_code == 400
    after = _metrics(live.url)
    stats = httpx.get(f"{live.url}/stats").json()

    ok = "embedding_requests_total{endpoint=/v1/embeddings,status=200}"
    bad = "embedding_requests_total{endpoint=/v1/embeddings,status=400}"
    assert after[ok] - before.get(ok, 0) == 2
    assert after[bad] - before.get(bad, 0) == 1
    assert after["embedding_cache_hits_total"] == stats["cache"]["hits"] == 3
    assert after["embedding_cache_misses_total"] == stats["cache"]["misses"] == 3
    assert after["embedding_inputs_total"] == stats["inputs"] == 6
    assert after["embedding_tokens_total"] == stats["tokens"]
    assert after["embedding_cache_errors_total"] == stats["cache"]["errors"]
    assert after["embedding_batch_size_count"] == stats["encoder"]["batches"] >= 1
    assert after["embedding_batch_size_sum"] == stats["encoder"]["inputs"] == 3
    assert after["embedding_batch_tokens_count"] == stats["encoder"]["batches"]
    assert after["embedding_encoder_seconds_count"] == stats["encoder"]["batches"]
    assert after["embedding_queue_tokens"] == 0
    duration = "embedding_request_duration_seconds_count{endpoint=/v1/embeddings}"
    assert after[duration] - before.get(duration, 0) == 3
    assert stats["requests"]["total"] == 3
    assert stats["requests"]["errors"] == 1


@pytest.fixture
def secured(gateway_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.txt"
    keys.write_text("first-key\nsecond-key\n")
    return gateway_factory(api_keys=f"@{keys}")


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/models", "/stats", "/metrics"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic Zmlyc3Qta2V5", "Bearer"])
def test_missing_or_wrong_key_is_401(secured, path: str, header: str | None) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": header} if header else {}
    method = httpx.post if path == "/v1/embeddings" else httpx.get
    kwargs = {"json": {"input": "x"}} if path == "/v1/embeddings" else {}
    response = method(f"{secured.url}{path}", headers=headers, **kwargs)  # type: ignore[operator]
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert "wrong-key" not in error["message"]


def test_the_dashboard_page_opens_without_a_key_and_its_data_does_not(secured) -> None:  # type: ignore[no-untyped-def]
    """The page holds no data: a browser opens it as /dashboard#key=<key> (the key stays in the
    fragment) and the page sends the key with its own /stats and /stats/history requests."""
    page = httpx.get(f"{secured.url}/dashboard")
    assert page.status_code == 200 and "location.hash" in page.text
    assert httpx.get(f"{secured.url}/stats/history").status_code == 401
    headers = {"authorization": "Bearer first-key"}
    assert httpx.get(f"{secured.url}/stats/history", headers=headers).status_code == 200


def test_right_keys_pass_and_health_stays_open(secured) -> None:  # type: ignore[no-untyped-def]
    for key in ("first-key", "second-key"):
        headers = {"authorization": f"Bearer {key}"}
        assert httpx.post(f"{secured.url}/v1/embeddings", json={"input": "x"}, headers=headers).status_code == 200
        assert httpx.get(f"{secured.url}/stats", headers=headers).status_code == 200
    assert httpx.get(f"{secured.url}/health").status_code == 200


def test_openai_client_sends_its_key(secured) -> None:  # type: ignore[no-untyped-def]
    from openai import AuthenticationError, OpenAI

    good = OpenAI(base_url=f"{secured.url}/v1", api_key="second-key", max_retries=0)
    assert len(good.embeddings.create(model="all-MiniLM-L6-v2", input="x").data) == 1
    bad = OpenAI(base_url=f"{secured.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.embeddings.create(model="all-MiniLM-L6-v2", input="x")


def test_public_metrics_opens_only_the_operations_pages(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys="k", public_metrics=True)
    for path in ("/stats", "/metrics", "/dashboard"):
        assert httpx.get(f"{live.url}{path}").status_code == 200
    assert httpx.post(f"{live.url}/v1/embeddings", json={"input": "x"}).status_code == 401


def test_access_log_has_one_line_per_request_and_no_text(gateway_factory, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys="secret-key-123")
    secret_text = "the patient's private note 4711"
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = httpx.post(
            f"{live.url}/v1/embeddings",
            json={"input": [secret_text, secret_text + " again"]},
            headers={"authorization": "Bearer secret-key-123", "x-request-id": "req-abc"},
        )
        assert response.status_code == 200
        # The server thread writes the line after the answer is sent: wait for it briefly.
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if r.name == "gateway.access"] and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.access"]
    assert len(lines) == 1
    assert "request_id=req-abc" in lines[0]
    assert "status=200" in lines[0]
    assert "inputs=2" in lines[0]
    assert "misses=2" in lines[0]
    everything = caplog.text
    assert "4711" not in everything
    assert "secret-key-123" not in everything


def test_dashboard_is_self_contained(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    page = httpx.get(f"{live.url}/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'getJson("/stats")' in html
    assert 'getJson("/stats/history")' in html
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in html, f"the dashboard must not load {external}"


def test_every_route_needs_a_key_unless_marked_public(secured) -> None:  # type: ignore[no-untyped-def]
    """Deny by default: walk every route the app has (its OpenAPI pages included)."""
    app = secured.server.config.app
    public = {"/health", "/livez", "/readyz", "/dashboard"}  # the dashboard page holds no data
    checked = 0
    for route in app.routes:
        path = route.path.replace("{model_id:str}", "some-model").replace("{file_name:str}", "x.html")
        if "{" in path:
            continue
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            response = httpx.request(method, f"{secured.url}{path}", json={"input": "x"} if method == "POST" else None)
            expected = 200 if path in public else 401
            assert response.status_code == expected, (method, path, response.status_code)
            checked += 1
    assert checked >= 12


def test_the_startup_heap_is_frozen_out_of_the_garbage_collector(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """A full collection over the whole heap stalled the event loop for 0.49 s in this suite's process,
    past the 250 ms deadline of every Redis lookup in flight: what exists at start is frozen."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gateway_factory()
    assert gc.get_freeze_count() > 10_000, "the model, tokenizer and app are out of the collector's reach"


def test_health_names_the_in_process_cache_even_while_it_is_empty(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()  # no Redis: the in-process cache, empty at start
    health = httpx.get(f"{live.url}/health").json()
    assert health["cache"] == {"backend": "memory", "status": "ok"}
