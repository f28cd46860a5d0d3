"""A tiny queue: excess requests get 503 + Retry-After at once, the openai client's retries get
through, and the server recovers."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.gates import GatedEncoder

pytestmark = pytest.mark.slow


def test_overload_answers_503_fast_and_openai_retries_succeed(gateway_factory, minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    from openai import OpenAI

    gated = GatedEncoder(minilm_encoder)
    live = gateway_factory(encoder=gated, max_queue_tokens=40)
    gated.gate.clear()  # hold the model so the queue fills

    results: list[Any] = []
    holders = [
        threading.Thread(
            target=lambda i=i: results.append(
                httpx.post(f"{live.url}/v1/embeddings", json={"input": f"holding request number {i} " * 3}, timeout=60)
            )
        )
        for i in range(2)
    ]
    for thread in holders:
        thread.start()
    assert gated.entered.wait(10)
    time.sleep(0.2)

    refused = []
    for i in range(10):
        started = time.monotonic()
        response = httpx.post(f"{live.url}/v1/embeddings", json={"input": f"excess request {i} " * 4})
        refused.append((response, time.monotonic() - started))
    assert all(response.status_code == 503 for response, _ in refused)
    assert all(elapsed < 0.5 for _, elapsed in refused), "refusals must be immediate"
    assert all(int(response.headers["retry-after"]) >= 1 for response, _ in refused)
    assert all(response.json()["error"]["code"] == "overloaded" for response, _ in refused)

    # The official client retries 503s, honouring Retry-After; release the model meanwhile.
    threading.Timer(0.5, gated.gate.set).start()
    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=4)
    answer = client.embeddings.create(model="all-MiniLM-L6-v2", input="retried until it fits " * 4)
    assert len(answer.data[0].embedding) == 384
    for thread in holders:
        thread.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert httpx.post(f"{live.url}/v1/embeddings", json={"input": "recovered"}).status_code == 200
    assert httpx.get(f"{live.url}/stats").json()["encoder"]["rejected"] >= 10
