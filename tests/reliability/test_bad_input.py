"""Hostile and odd input: every answer is a 200 with the right vectors or an OpenAI-style 4xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from encoder import Encoder

# (case, raw body, content type, expected status, expected error param)
RAW_CASES: list[tuple[str, bytes, str, int]] = [
    ("invalid json", b'{"input": ["a",', "application/json", 400),
    ("json null body", b"null", "application/json", 400),
    ("null input", b'{"input": null}', "application/json", 400),
    ("form body", b"input=hello", "application/x-www-form-urlencoded", 400),
    ("json sent as text/plain", b'{"input": "hello"}', "text/plain", 200),
    ("lone surrogate", b'{"input": "abc \\ud800 def"}', "application/json", 400),
    ("nul byte", b'{"input": "a\\u0000b"}', "application/json", 200),
    ("nested wrong types", b'{"input": [["a", "b"]]}', "application/json", 400),
    ("deep nesting", b'{"input": [[[1]]]}', "application/json", 400),
    ("bool dimensions", b'{"input": "x", "dimensions": true}', "application/json", 400),
    ("float dimensions", b'{"input": "x", "dimensions": 1.5}', "application/json", 400),
    ("huge dimensions", b'{"input": "x", "dimensions": 100000000000000000000}', "application/json", 400),
    ("zero dimensions", b'{"input": "x", "dimensions": 0}', "application/json", 400),
    ("negative dimensions", b'{"input": "x", "dimensions": -1}', "application/json", 400),
    # msgspec follows nesting even inside an ignored field: depth 1000+ raised RecursionError, a 500.
    (
        "arrays 5000 deep, unknown field",
        b'{"input": "x", "z": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "application/json",
        400,
    ),
    (
        "objects 5000 deep, unknown field",
        b'{"input": "x", "z": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
        "application/json",
        400,
    ),
    ("arrays 5000 deep as input", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),
]


@pytest.fixture
def live(gateway_factory):  # type: ignore[no-untyped-def]
    return gateway_factory(max_body_bytes=2 * 1024 * 1024)


def _check(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    body: dict[str, Any] = response.json()
    if status >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(("case", "body", "content_type", "status"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_bodies(live, case: str, body: bytes, content_type: str, status: int) -> None:  # type: ignore[no-untyped-def]
    response = httpx.post(f"{live.url}/v1/embeddings", content=body, headers={"content-type": content_type})
    _check(response, status)


def test_hundred_thousand_characters(live, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    text = "lorem ipsum dolor sit amet " * 3704  # 100,008 characters
    strict = httpx.post(f"{live.url}/v1/embeddings", json={"input": text}, timeout=60)
    assert _check(strict, 400)["error"]["code"] == "context_length_exceeded"
    lenient = gateway_factory(truncate=True, max_body_bytes=2 * 1024 * 1024)
    body = _check(httpx.post(f"{lenient.url}/v1/embeddings", json={"input": text}, timeout=60), 200)
    assert body["usage"]["prompt_tokens"] == 256


def test_body_over_the_limit(live) -> None:  # type: ignore[no-untyped-def]
    _check(httpx.post(f"{live.url}/v1/embeddings", json={"input": "x" * (3 * 1024 * 1024)}), 413)


def test_one_more_than_max_inputs(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()  # the default EMBED_MAX_INPUTS, 2048
    response = httpx.post(f"{live.url}/v1/embeddings", json={"input": ["x"] * 2049})
    assert "2048" in _check(response, 400)["error"]["message"]


@pytest.mark.parametrize("ids", [[[100_277]], [[-1]], [[10**12]]], ids=["past the vocabulary", "negative", "huge"])
def test_token_ids_out_of_range(live, tiktoken_cache: Path, ids: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    _check(httpx.post(f"{live.url}/v1/embeddings", json={"input": ids}), 400)


def test_odd_but_valid_text_gets_the_encoders_vectors(live, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    texts = [
        "مرحبا بالعالم، هذا نص من اليمين إلى اليسار",
        "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇩🇪",
        "   ",
        "\t\n",
        "a\u0000b",
        "Ω≈ç√∫",
    ]
    response = httpx.post(f"{live.url}/v1/embeddings", json={"input": texts, "encoding_format": "float"})
    got = np.array([item["embedding"] for item in _check(response, 200)["data"]])
    np.testing.assert_allclose(got, minilm_encoder.embed(texts), atol=1e-5)


def test_lone_surrogate_is_a_clear_400(live) -> None:  # type: ignore[no-untyped-def]
    # A lone surrogate is not Unicode text: msgspec refuses it while decoding, before any work.
    response = httpx.post(f"{live.url}/v1/embeddings", content=b'{"input": ["ok", "abc \\udc00"]}')
    assert "surrogate" in _check(response, 400)["error"]["message"]
