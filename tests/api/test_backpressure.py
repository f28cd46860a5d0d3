"""Queue limits and client disconnects, over HTTP against a live server."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.gates import GatedEncoder


def _gated_gateway(gateway_factory: Any, minilm_encoder: Any, **settings: Any) -> tuple[Any, GatedEncoder]:
    gated = GatedEncoder(minilm_encoder)
    return gateway_factory(encoder=gated, **settings), gated


def _post_in_thread(url: str, texts: list[str], results: list[Any], timeout: float = 30) -> threading.Thread:
    def run() -> None:
        try:
            results.append(httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=timeout))
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_is_503_with_retry_after_then_recovers(gateway_factory, minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    live, gated = _gated_gateway(gateway_factory, minilm_encoder, max_queue_tokens=20)
    gated.gate.clear()
    results: list[Any] = []
    blocker = _post_in_thread(live.url, ["hold the forward thread"], results)
    assert gated.entered.wait(10)
    queued = _post_in_thread(live.url, ["a b c d e f g h i j k l"], results)
    time.sleep(0.2)
    refused = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["one two three four five six seven eight nine"]})
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    gated.gate.set()
    blocker.join(10)
    queued.join(10)
    assert [r.status_code for r in results] == [200, 200]
    again = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["one two three four five six seven eight nine"]})
    assert again.status_code == 200


def test_a_client_that_leaves_is_dropped_before_compute(gateway_factory, minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    live, gated = _gated_gateway(gateway_factory, minilm_encoder)
    gated.gate.clear()
    results: list[Any] = []
    blocker = _post_in_thread(live.url, ["hold the forward thread"], results)
    assert gated.entered.wait(10)
    leaver = _post_in_thread(live.url, ["I will not wait", "neither will I"], results, timeout=0.3)
    leaver.join(5)
    deadline = time.monotonic() + 5
    # The server notices the disconnect when the 499 reaches its request counters.
    while not any(key.endswith('status="499"} 1.0') for key in _metric_lines(live.url)):
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.02)
    gated.gate.set()
    blocker.join(10)
    time.sleep(0.2)
    assert isinstance(results[0], httpx.TimeoutException)
    assert results[1].status_code == 200
    assert len(gated.calls) == 1, "the departed client's inputs must never reach the model"
    assert httpx.get(f"{live.url}/stats").json()["encoder"]["dropped"] == 2


def _metric_lines(url: str) -> list[str]:
    return httpx.get(f"{url}/metrics").text.splitlines()
