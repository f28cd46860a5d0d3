"""Issue 26: a key's tokens per minute is reserved before the work, not charged after the answer.

Concurrent requests of one key are admitted only while its bucket covers them (on one replica, and
on two sharing Redis); a client that hangs up after its tokens were reserved keeps paying for them;
a request larger than the key's whole limit gets a clear error instead of a 429 it could never pass.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gates import GatedEncoder

KEYS = """
[[keys]]
name = "small"
key = "sk-small"
tokens_per_minute = 200

[[keys]]
name = "medium"
key = "sk-medium"
tokens_per_minute = 1000

[[keys]]
name = "free"
key = "sk-free"
"""
LIMIT = 200
CONCURRENT = 30


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _post(url: str, texts: list[str], key: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"input": texts}, headers=_auth(key), timeout=timeout)


def _fire(urls: list[str], bodies: list[list[str]], key: str) -> tuple[list[Any], list[threading.Thread]]:
    """One thread per request, spread over ``urls``; each leaves its answer (or error) in its slot.

    The clients are made first: making one (its TLS context) costs the GIL tens of milliseconds,
    and thirty at once would starve the servers' event loops in this same process."""
    answers: list[Any] = [None] * len(bodies)
    clients = [httpx.Client(timeout=60, headers=_auth(key)) for _ in bodies]

    def run(index: int) -> None:
        try:
            with clients[index] as http:
                answers[index] = http.post(f"{urls[index % len(urls)]}/v1/embeddings", json={"input": bodies[index]})
        except httpx.HTTPError as exc:
            answers[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    return answers, threads


def _served_tokens(answers: list[Any]) -> tuple[int, int, list[int]]:
    """Tokens of the 200 answers, how many 429s, and the statuses (anything else fails the test)."""
    statuses = [getattr(answer, "status_code", repr(answer)) for answer in answers]
    assert set(statuses) <= {200, 429}, statuses
    served = sum(answer.json()["usage"]["total_tokens"] for answer in answers if answer.status_code == 200)
    refused = [answer for answer in answers if answer.status_code == 429]
    for answer in refused:
        assert answer.json()["error"]["type"] == "tokens", answer.text
        assert int(answer.headers["retry-after"]) >= 1
    return served, len(refused), statuses


def _texts(count: int, tag: str) -> list[list[str]]:
    return [[f"{tag} request number {index} asks for one vector"] for index in range(count)]


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas-sharing-redis"])
def test_concurrent_misses_stay_within_the_tokens_limit(
    gateway_factory,  # type: ignore[no-untyped-def]
    minilm_encoder,  # type: ignore[no-untyped-def]
    fresh_redis,  # type: ignore[no-untyped-def]
    keys_file: Path,
    replicas: int,
) -> None:
    # A generous Redis deadline: on a busy test machine a late reply would make the replicas fall back
    # to their own buckets (failing open, on purpose), which is not what this test is about.
    shared = {"redis_url": fresh_redis.url, "cache_prefix": "reserve-misses", "cache_timeout_ms": 2000}
    shared = shared if replicas > 1 else {}
    gates = [GatedEncoder(minilm_encoder) for _ in range(replicas)]
    lives = [gateway_factory(encoder=gate, api_keys_file=str(keys_file), **shared) for gate in gates]
    bodies = _texts(CONCURRENT, f"misses-{replicas}")
    largest = max(len(ids) for ids in minilm_encoder.tokenize([body[0] for body in bodies]))
    assert CONCURRENT * largest > 1.5 * LIMIT, "the burst must be well past the limit, else it proves nothing"
    for gate in gates:
        gate.gate.clear()  # every admitted request waits in the encoder: none is answered (or charged) yet
    started = time.monotonic()
    answers, threads = _fire([live.url for live in lives], bodies, "sk-small")
    time.sleep(1.5)  # all of them reached the server and were admitted or refused
    for gate in gates:
        gate.gate.set()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    served, refused, statuses = _served_tokens(answers)
    refill = elapsed * LIMIT / 60
    assert refused > 0 and 200 in statuses, statuses
    assert served <= LIMIT + replicas * largest + refill, (served, statuses)


def test_concurrent_hits_stay_within_the_tokens_limit(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file))
    bodies = _texts(CONCURRENT, "hits")
    for body in bodies:  # cached by a key without limits: the limited key's requests are all hits
        assert _post(live.url, body, "sk-free").status_code == 200
    largest = max(_post(live.url, body, "sk-free").json()["usage"]["total_tokens"] for body in bodies)
    started = time.monotonic()
    answers, threads = _fire([live.url], bodies, "sk-small")
    for thread in threads:
        thread.join(60)
    served, _, statuses = _served_tokens(answers)
    assert all(answer.headers["x-cache-hits"] == "1" for answer in answers if answer.status_code == 200)
    assert served <= LIMIT + largest + (time.monotonic() - started) * LIMIT / 60, (served, statuses)


def _metric_lines(url: str) -> list[str]:
    return httpx.get(f"{url}/metrics", headers=_auth("sk-free")).text.splitlines()


@pytest.mark.parametrize("shared", [False, True], ids=["this-process", "redis"])
def test_a_client_that_hangs_up_mid_request_is_still_charged(
    gateway_factory,  # type: ignore[no-untyped-def]
    minilm_encoder,  # type: ignore[no-untyped-def]
    fresh_redis,  # type: ignore[no-untyped-def]
    keys_file: Path,
    shared: bool,
) -> None:
    gated = GatedEncoder(minilm_encoder)
    settings = {"redis_url": fresh_redis.url} if shared else {}
    live = gateway_factory(encoder=gated, api_keys_file=str(keys_file), **settings)
    gated.gate.clear()
    results: list[Any] = []

    def blocker() -> None:  # holds the forward thread with a key that has no limits
        results.append(_post(live.url, ["hold the forward thread"], "sk-free"))

    holding = threading.Thread(target=blocker)
    holding.start()
    assert gated.entered.wait(10)
    long_text = " ".join(f"word{index}" for index in range(100))
    [leaver_ids] = minilm_encoder.tokenize([long_text])
    assert len(leaver_ids) > 200, "the leaver's request must weigh far more than what refills meanwhile"
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        _post(live.url, [long_text], "sk-medium", timeout=0.5)
    deadline = time.monotonic() + 5
    while not any(re.search(r'status="499"} 1\.0$', line) for line in _metric_lines(live.url)):
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.02)
    gated.gate.set()
    holding.join(10)
    assert results[0].status_code == 200
    probe = _post(live.url, ["a short probe"], "sk-medium")
    assert probe.status_code == 200
    probe_tokens = probe.json()["usage"]["total_tokens"]
    refill = (time.monotonic() - started + 0.5) * 1000 / 60
    remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
    assert remaining <= 1000 - len(leaver_ids) - probe_tokens + refill, (remaining, len(leaver_ids))


def test_a_request_larger_than_the_whole_limit_gets_a_clear_error(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file))
    too_big = [" ".join(f"word{index}" for index in range(40)) for _ in range(3)]
    answer = _post(live.url, too_big, "sk-small")
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input"
    assert "tokens per min" in error["message"] and str(LIMIT) in error["message"], error["message"]
    assert "retry-after" not in answer.headers
    # It took nothing from the bucket: a request that fits is still served in full.
    fits = _post(live.url, [" ".join(f"word{index}" for index in range(60))], "sk-small")
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["total_tokens"] > LIMIT / 2
    # One that fits the limit but not what is left now is a 429 that says when it will fit.
    again = _post(live.url, [" ".join(f"again{index}" for index in range(60))], "sk-small")
    assert again.status_code == 429, again.text
    wait = int(again.headers["retry-after"])
    assert 10 <= wait <= 61, wait


def test_a_request_far_over_the_whole_limit_is_refused_after_one_piece_of_tokenising(
    gateway_factory,  # type: ignore[no-untyped-def]
    minilm_encoder,
    keys_file: Path,
) -> None:
    """The service stops tokenising once the running count passes the key's whole limit: a request of
    ~80,000 tokens against a limit of 1,000 costs one 64k-character piece, not all of it."""
    seen: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(minilm_encoder, name)

        def tokenize(self, texts: Any, **kwargs: Any) -> Any:
            seen.append(sum(len(text) for text in texts))
            return minilm_encoder.tokenize(texts, **kwargs)

    live = gateway_factory(encoder=Counting(), api_keys_file=str(keys_file))
    texts = [f"{index} " + " ".join(f"w{index}x{word}" for word in range(40)) for index in range(400)]
    answer = _post(live.url, texts, "sk-medium")
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "input"
    assert re.search(r"holds more than \d+ tokens", error["message"]), error["message"]
    assert "more than key 'medium' may use in a minute (tokens per min (TPM): Limit 1000)" in error["message"]
    assert sum(seen) <= 65536 < sum(len(text) for text in texts), seen
    fits = _post(live.url, ["a short one"], "sk-medium")  # the refusal took nothing from the bucket
    assert fits.status_code == 200 and int(fits.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 10


def test_tokens_go_back_when_the_server_fails_the_request(gateway_factory, minilm_encoder, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    gated = GatedEncoder(minilm_encoder)
    live = gateway_factory(encoder=gated, api_keys_file=str(keys_file), max_queue_tokens=300)
    gated.gate.clear()
    results: list[Any] = []
    long_text = " ".join(f"word{index}" for index in range(100))

    def post(texts: list[str]) -> None:
        results.append(_post(live.url, texts, "sk-free"))

    threads = [threading.Thread(target=post, args=([text],)) for text in ("hold the forward thread", long_text)]
    threads[0].start()
    assert gated.entered.wait(10)
    threads[1].start()  # queued behind it: the encoder queue is now nearly full
    time.sleep(0.3)
    refused = _post(live.url, [long_text.replace("word", "other")], "sk-medium")
    assert refused.status_code == 503, refused.text  # reserved, then refused by the full queue
    gated.gate.set()
    for thread in threads:
        thread.join(10)
    assert [answer.status_code for answer in results] == [200, 200]
    probe = _post(live.url, ["a short probe"], "sk-medium")
    assert probe.status_code == 200
    # The 503's tokens went back: the bucket is as full as if it had never been asked.
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) >= 1000 - probe.json()["usage"]["total_tokens"] - 1
