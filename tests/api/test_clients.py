"""Issue 13: smaller float answers, compression, named keys with shared limits, pacing headers,
per-key counts, any model name, and the history ring behind /stats/history."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

KEYS = """
[[keys]]
name = "ingest"
key = "sk-ingest-secret-1"
requests_per_minute = 3

[[keys]]
name = "search"
key = "sk-search-secret-2"
tokens_per_minute = 12

[[keys]]
name = "free"
key = "sk-free-secret-3"
"""
RESET = re.compile(r"^(0s|\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60, **kwargs)


def _old_float_body(body: dict[str, Any]) -> bytes:
    """The same answer as the server wrote it before issue 13: each float32 as a float64 (17 digits)."""
    vectors = [np.array(item["embedding"], dtype=np.float32) for item in body["data"]]
    data = [{"embedding": v.tolist(), "index": i, "object": "embedding"} for i, v in enumerate(vectors)]
    return msgspec.json.encode({"data": data, "model": body["model"], "usage": body["usage"], "object": "list"})


# --- float output and compression ------------------------------------------------------------


def test_float_answers_are_the_identical_float32_in_fewer_bytes(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    texts = [f"float bits {i}: the shortest text that reads back to the same float32" for i in range(40)]
    packed = _post(live.url, {"input": texts, "encoding_format": "base64"})
    expected = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed.json()["data"]])
    answer = _post(live.url, {"input": texts}, headers={"accept-encoding": "identity"})
    assert answer.headers.get("content-encoding") is None
    body = answer.json()  # Python's json reads float64; cast to float32 as every client does
    parsed = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    assert parsed.shape == expected.shape == (40, 384)
    assert np.array_equal(parsed.view(np.uint32), expected.view(np.uint32)), "float32 bits differ"
    assert len(answer.content) <= 0.65 * len(_old_float_body(body))
    # numbers are written with float32's digits, not float64's 17
    first = re.search(rb'"embedding":\[([^,\]]+)', answer.content)
    assert first is not None and len(first.group(1).lstrip(b"-")) <= 15


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_large_answers_are_compressed_for_clients_that_accept_it(gateway_factory, encoding: str) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    texts = [f"compressed answer number {i} about topic {i % 7}" for i in range(150)]
    answer = _post(live.url, {"input": texts}, headers={"accept-encoding": encoding})
    assert answer.headers["content-encoding"] == encoding
    assert "accept-encoding" in answer.headers["vary"].lower()
    wire = answer.num_bytes_downloaded
    assert wire <= 0.5 * len(_old_float_body(answer.json())), (wire, len(answer.content))
    assert len(answer.json()["data"]) == 150


def test_small_answers_and_clients_without_accept_encoding_get_plain_bodies(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    one = _post(live.url, {"input": "one small text", "encoding_format": "base64"}, headers={"accept-encoding": "gzip"})
    assert one.headers.get("content-encoding") is None, "a single-vector answer is below the threshold"
    many = _post(live.url, {"input": [f"t{i}" for i in range(30)]}, headers={"accept-encoding": "identity"})
    assert many.headers.get("content-encoding") is None
    off = gateway_factory(compression=False)
    big = _post(off.url, {"input": [f"t{i}" for i in range(30)]}, headers={"accept-encoding": "gzip"})
    assert big.headers.get("content-encoding") is None


def test_the_other_routes_are_compressed_by_litestars_middleware(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    _post(live.url, {"input": [f"metrics text {i}" for i in range(5)]})
    metrics = httpx.get(f"{live.url}/metrics", headers={"accept-encoding": "gzip"}, timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-encoding"] == "gzip"
    assert b"embedding_requests_total" in metrics.content  # httpx decoded it
    schema = httpx.get(f"{live.url}/docs/openapi.json", headers={"accept-encoding": "gzip"}, timeout=30)
    assert schema.headers["content-encoding"] == "gzip" and "/v1/embeddings" in schema.json()["paths"]
    health = httpx.get(f"{live.url}/health", headers={"accept-encoding": "gzip"}, timeout=30)
    assert health.headers.get("content-encoding") is None, "a small answer goes out as it is"
    off = gateway_factory(compression=False)
    plain = httpx.get(f"{off.url}/metrics", headers={"accept-encoding": "gzip"}, timeout=30)
    assert plain.headers.get("content-encoding") is None


# --- keys, limits, headers -------------------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def test_two_replicas_share_a_keys_requests_bucket(gateway_factory, fresh_redis, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = "shared-limits"
    first = gateway_factory(api_keys_file=str(keys_file), redis_url=fresh_redis.url, cache_prefix=prefix)
    second = gateway_factory(api_keys_file=str(keys_file), redis_url=fresh_redis.url, cache_prefix=prefix)
    headers = _auth("sk-ingest-secret-1")
    answers = [_post(url, {"input": "shared bucket"}, headers=headers) for url in (first.url, second.url, first.url)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    refused = _post(second.url, {"input": "shared bucket"}, headers=headers)  # the 4th, on the other replica
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "sk-ingest" not in error["message"] and "ingest" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 21
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # another key is not affected, and it is counted under its own name on each replica
    assert _post(second.url, {"input": "x"}, headers=_auth("sk-free-secret-3")).status_code == 200
    stats = httpx.get(f"{second.url}/stats", headers=headers).json()
    assert stats["keys"]["ingest"]["requests"] == 2
    assert stats["keys"]["ingest"]["rate_limited"] == 1
    assert stats["keys"]["free"]["requests"] == 1
    # the shared bucket lives in Redis under the key's name, never its secret
    names = [name.decode() for name in fresh_redis.client().scan_iter(match="*ratelimit*")]
    assert names and all("ingest" in name and "secret" not in name for name in names)


def test_tokens_per_minute_refuses_the_first_request_past_the_limit(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file))  # no Redis: this process's buckets
    headers = _auth("sk-search-secret-2")
    # More tokens than the key's whole limit: no wait would let it pass, so a 400 (issue 26).
    too_big = _post(live.url, {"input": ["a few words of text", "and some more words here"]}, headers=headers)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"
    ok = _post(live.url, {"input": "a few words of text"}, headers=headers)
    assert ok.status_code == 200
    used = ok.json()["usage"]["total_tokens"]
    assert 1 < used < 12
    assert ok.headers["x-ratelimit-limit-tokens"] == "12"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 12 - used
    refused = _post(live.url, {"input": "and some more words here"}, headers=headers)  # fits 12, not what is left
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) == 12 - used and refused.headers["x-request-id"]
    wrong = _post(live.url, {"input": "x"}, headers=_auth("sk-nobody"))
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_request_error"
    # refused before the route, yet recorded with their real status (not as a 500)
    text = httpx.get(f"{live.url}/metrics", headers=headers).text
    for status in ("429", "401"):
        assert re.search(rf'embedding_requests_total{{endpoint="/v1/embeddings",status="{status}"}} 1\.0', text), status
    assert 'status="500"' not in text


def test_every_embeddings_answer_has_pacing_and_cache_headers(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file), api_keys="plain-key")
    for key in ("sk-ingest-secret-1", "sk-free-secret-3", "plain-key"):
        answer = _post(live.url, {"input": ["pacing a", "pacing b", "pacing a"]}, headers=_auth(key))
        assert answer.status_code == 200
        for kind in ("requests", "tokens"):
            assert int(answer.headers[f"x-ratelimit-limit-{kind}"]) >= 1
            assert (
                0
                <= int(answer.headers[f"x-ratelimit-remaining-{kind}"])
                <= int(answer.headers[f"x-ratelimit-limit-{kind}"])
            )
            assert RESET.match(answer.headers[f"x-ratelimit-reset-{kind}"]), answer.headers[f"x-ratelimit-reset-{kind}"]
    # a key without a tokens limit is paced by the encoder queue
    assert answer.headers["x-ratelimit-limit-tokens"] == str(2_000_000)
    first = _post(live.url, {"input": ["cache header 1", "cache header 2"]}, headers=_auth("plain-key"))
    again = _post(live.url, {"input": ["cache header 1", "cache header 3"]}, headers=_auth("plain-key"))
    assert (first.headers["x-cache-hits"], first.headers["x-cache-misses"]) == ("0", "2")
    assert (again.headers["x-cache-hits"], again.headers["x-cache-misses"]) == ("1", "1")
    assert "x-ratelimit-limit-requests" not in httpx.get(f"{live.url}/health").headers


def test_metrics_count_by_key_name_and_never_show_a_key(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file), api_keys="plain-key")
    _post(live.url, {"input": ["m1", "m2"]}, headers=_auth("sk-free-secret-3"))
    _post(live.url, {"input": ["m1", "m3"]}, headers=_auth("sk-free-secret-3"))
    _post(live.url, {"input": ["m4"]}, headers=_auth("plain-key"))  # unnamed: not counted by key
    stats = httpx.get(f"{live.url}/stats", headers=_auth("plain-key")).json()
    free = stats["keys"]["free"]
    assert (free["requests"], free["inputs"], free["cache_hits"], free["cache_misses"]) == (2, 4, 1, 3)
    assert free["tokens"] > 0
    assert set(stats["keys"]) == {"free"}
    text = httpx.get(f"{live.url}/metrics", headers=_auth("plain-key")).text
    assert 'embedding_key_requests_total{key="free"} 2.0' in text
    assert 'embedding_key_cache_hits_total{key="free"} 1.0' in text
    assert "secret" not in text and "secret" not in str(stats)


def test_plain_key_list_still_works_beside_the_file(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys_file=str(keys_file), api_keys="plain-key")
    assert _post(live.url, {"input": "x"}, headers=_auth("plain-key")).status_code == 200
    assert _post(live.url, {"input": "x"}, headers=_auth("sk-free-secret-3")).status_code == 200
    assert _post(live.url, {"input": "x"}, headers=_auth("nope")).status_code == 401


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '[[keys]]\nname = "a"\nkey = "k1"\n[[keys]]\nname = "b"\nkey = "k2"\ntokens_per_minute = "lots"\n',
            "[[keys]] #2 ('b'): 'tokens_per_minute' must be a positive integer",
        ),
        ('[[keys]]\nname = "a"\n', "[[keys]] #1 ('a'): 'key' must be a non-empty string"),
        ('[[keys]]\nname = "a"\nkey = "k"\nrpm = 3\n', "[[keys]] #1 ('a'): unknown field 'rpm'"),
        ('[[keys]]\nname = "a"\nkey = "k"\nrequests_per_minute = 0\n', "'requests_per_minute' must be a positive"),
        ("keys = [", "not valid TOML"),
    ],
)
def test_a_bad_keys_file_exits_2_with_one_line(tmp_path: Path, minilm_dir: Path, content: str, expected: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--api-keys-file", str(path), "--model", str(minilm_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "invalid setting" in line]
    assert len(lines) == 1, done.stderr
    assert "EMBED_API_KEYS_FILE" in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr


# --- model names -----------------------------------------------------------------------------


def test_any_model_name_with_a_star_alias(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(model_aliases=("*",))
    for name in ("text-embedding-ada-002", "text-embedding-3-small", "whatever/model"):
        answer = _post(live.url, {"input": "x", "model": name})
        assert answer.status_code == 200
        assert answer.json()["model"] == "all-MiniLM-L6-v2", "the answer names the model that served it"
    assert [card["id"] for card in httpx.get(f"{live.url}/v1/models").json()["data"]] == ["all-MiniLM-L6-v2"]
    strict = gateway_factory()
    assert _post(strict.url, {"input": "x", "model": "text-embedding-ada-002"}).status_code == 404


# --- history ---------------------------------------------------------------------------------


def test_history_ring_holds_the_past_and_adds_up_to_stats(gateway_factory, keys_file: Path) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(history_interval_s=0.1, history_samples=50, api_keys_file=str(keys_file))
    headers = _auth("sk-free-secret-3")
    for i in range(8):
        _post(live.url, {"input": [f"history {i}", "history shared"]}, headers=headers)
        time.sleep(0.1)
    time.sleep(0.35)  # let the last requests land in a sample
    history = httpx.get(f"{live.url}/stats/history", headers=headers).json()
    stats = httpx.get(f"{live.url}/stats", headers=headers).json()
    samples = history["samples"]
    assert history["interval_seconds"] == 0.1
    assert 10 <= len(samples) <= 50
    assert sum(s["requests"] for s in samples) == stats["requests"]["total"] == 8
    assert sum(s["cache_hits"] for s in samples) == stats["cache"]["hits"] == 7
    assert sum(s["tokens"] for s in samples) == stats["tokens"]
    assert sum(s["keys"].get("free", {}).get("requests", 0) for s in samples) == 8
    busy = [s for s in samples if s["requests"]]
    assert all(s["latency_p50_ms"] is not None and s["requests_per_s"] > 0 for s in busy)
    assert [s["time"] for s in samples] == sorted(s["time"] for s in samples)
