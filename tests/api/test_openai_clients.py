"""The official openai client and LangChain, unchanged but for base_url, against a live server."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder

TEXTS = [
    "The cache keeps every vector warm.",
    "Embeddings turn text into points in space.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
]


@pytest.fixture
def live(gateway_factory, redis_server):  # type: ignore[no-untyped-def]
    return gateway_factory(redis_url=redis_server.url)


@pytest.fixture
def client(live):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_default_call_is_base64_and_matches_the_encoder(client, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    def capture(request: httpx.Request) -> None:
        seen.append(request.content)

    client._client.event_hooks["request"].append(capture)
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    assert b'"encoding_format":"base64"' in seen[0].replace(b" ", b"")
    expected = minilm_encoder.embed(TEXTS)
    assert [item.index for item in response.data] == [0, 1, 2, 3]
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    counts = [len(ids) for ids in minilm_encoder.tokenize(TEXTS)]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(counts)
    assert response.model == "all-MiniLM-L6-v2"


def test_float_format_str_input_and_order(client, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[2], encoding_format="float")
    assert len(single.data) == 1
    np.testing.assert_allclose(single.data[0].embedding, minilm_encoder.embed([TEXTS[2]])[0], atol=1e-6)

    reversed_texts = TEXTS[::-1]
    batch = client.embeddings.create(model="all-MiniLM-L6-v2", input=reversed_texts, encoding_format="float")
    got = np.array([item.embedding for item in sorted(batch.data, key=lambda d: d.index)])
    np.testing.assert_allclose(got, minilm_encoder.embed(reversed_texts), atol=1e-6)


def test_dimensions_truncate_then_renormalise(client, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, dimensions=64)
    got = np.array([item.embedding for item in response.data])
    assert got.shape == (4, 64)
    full = minilm_encoder.embed(TEXTS)[:, :64]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_duplicates_in_one_request_are_answered_in_place(client, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    texts = [TEXTS[0], TEXTS[1], TEXTS[0]]
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    got = np.array([item.embedding for item in response.data])
    np.testing.assert_allclose(got, minilm_encoder.embed(texts), atol=1e-6)
    assert response.usage.prompt_tokens == sum(len(ids) for ids in minilm_encoder.tokenize(texts))


def test_langchain_with_text_input(live, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="all-MiniLM-L6-v2", base_url=f"{live.url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS), minilm_encoder.embed(TEXTS), atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(TEXTS[1]), minilm_encoder.embed([TEXTS[1]])[0], atol=1e-6)


def test_langchain_default_token_id_arrays(live, minilm_encoder: Encoder, tiktoken_cache: Path) -> None:  # type: ignore[no-untyped-def]
    from langchain_openai import OpenAIEmbeddings

    sent: list[bytes] = []
    http_client = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.content)]})
    embeddings = OpenAIEmbeddings(
        model="all-MiniLM-L6-v2", base_url=f"{live.url}/v1", api_key="unused", http_client=http_client
    )
    vectors = embeddings.embed_documents(TEXTS)
    assert b'"input":[[' in sent[0].replace(b" ", b""), "LangChain should have sent token-id arrays"
    np.testing.assert_allclose(vectors, minilm_encoder.embed(TEXTS), atol=1e-5)


def test_token_ids_without_an_encoding_get_a_clear_400(live) -> None:  # type: ignore[no-untyped-def]
    from gateway.core.inputs import TokenIdDecoder

    live.server.config.app.state.runtime.token_decoder = TokenIdDecoder(encoding="no_such_encoding")
    response = httpx.post(f"{live.url}/v1/embeddings", json={"input": [[9906, 1917]], "model": "all-MiniLM-L6-v2"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "check_embedding_ctx_length=False" in error["message"]
