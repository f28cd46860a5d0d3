"""TEI's routes (issue 21, part 4): its shapes, errors and clients, over the same core and cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.servers import ThreadedGateway

TEXTS = ["Text embeddings inference", "a gateway in front of Redis", "the third text"]


@pytest.fixture
def serve(serve_app: Any, minilm_encoder: Any) -> Any:
    def start(encoder: Any = None, **overrides: Any) -> Any:
        return serve_app(encoder or minilm_encoder, **{"model_name": "all-MiniLM-L6-v2", **overrides})

    return start


def _post(gateway: ThreadedGateway, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=30)


def test_embed_answers_a_list_of_vectors_equal_to_the_openai_route_and_shares_its_cache(serve: Any) -> None:
    gateway = serve()
    openai = _post(gateway, "/v1/embeddings", {"input": TEXTS})
    tei = _post(gateway, "/embed", {"inputs": TEXTS})
    assert tei.status_code == 200
    assert tei.headers["x-cache-hits"] == str(len(TEXTS)), "the TEI route reads the vectors the OpenAI one cached"
    expected = np.array([row["embedding"] for row in openai.json()["data"]])
    np.testing.assert_array_equal(np.array(tei.json()), expected)
    single = _post(gateway, "/embed", {"inputs": TEXTS[0]}).json()
    assert len(single) == 1 and single[0] == tei.json()[0], "one string is a list of one vector, as TEI answers"
    assert _post(gateway, "/", {"inputs": TEXTS}).json() == tei.json(), "POST / dispatches to /embed"


def test_dimensions_and_normalize(serve: Any) -> None:
    gateway = serve()
    short = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "dimensions": 64}).json())
    assert short.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    bad = _post(gateway, "/embed", {"inputs": TEXTS, "dimensions": 9999})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"


def test_errors_take_teis_shape_and_statuses(serve: Any) -> None:
    gateway = serve()
    ids = _post(gateway, "/embed", {"inputs": [[101, 2023, 102]]})
    assert ids.status_code == 422 and set(ids.json()) == {"error", "error_type"}
    assert "token-id" in ids.json()["error"]
    too_long = _post(gateway, "/embed", {"inputs": "word " * 600})  # over 256 tokens, no truncation
    assert too_long.status_code == 413 and too_long.json()["error_type"] == "Validation"
    unknown = _post(gateway, "/embed", {"inputs": "x", "model": "not-served"})
    assert unknown.status_code == 404
    prompt = _post(gateway, "/embed", {"inputs": "x", "prompt_name": "query"})
    assert prompt.status_code == 422 and "prompt_name" not in prompt.json()  # TEI's two fields only
    left = _post(gateway, "/embed", {"inputs": "x", "truncation_direction": "Left"})
    assert left.status_code == 422
    sparse = _post(gateway, "/embed_sparse", {"inputs": "x"})  # MiniLM has no sparse head
    assert sparse.status_code == 422 and "sparse" in sparse.json()["error"]
    broken = httpx.post(f"{gateway.url}/embed", content=b"{not json", timeout=10)
    assert broken.status_code == 422 and broken.json()["error_type"] == "Validation"


def test_the_api_key_guards_the_tei_routes_too(serve: Any) -> None:
    gateway = serve(api_keys="sk-tei")
    assert _post(gateway, "/embed", {"inputs": "x"}).status_code == 401
    assert _post(gateway, "/embed", {"inputs": "x"}, authorization="Bearer sk-tei").status_code == 200


def test_tokenize_and_decode_round_trip(serve: Any, minilm_encoder: Any) -> None:
    gateway = serve()
    tokens = _post(gateway, "/tokenize", {"inputs": ["hello world"]}).json()[0]
    assert [t["text"] for t in tokens] == ["[CLS]", "hello", "world", "[SEP]"]
    assert [t["special"] for t in tokens] == [True, False, False, True]
    assert (tokens[1]["start"], tokens[1]["stop"], tokens[2]["start"], tokens[2]["stop"]) == (0, 5, 6, 11)
    ids = [t["id"] for t in tokens]
    assert ids == minilm_encoder.hf_tokenizer("hello world")["input_ids"]
    assert _post(gateway, "/decode", {"ids": ids}).json() == ["hello world"]
    assert _post(gateway, "/decode", {"ids": [ids, ids[1:3]]}).json() == ["hello world", "hello world"]
    bare = _post(gateway, "/tokenize", {"inputs": "hello", "add_special_tokens": False}).json()
    assert [t["text"] for t in bare[0]] == ["hello"]
    assert _post(gateway, "/decode", {"ids": [10**9]}).status_code == 422


def test_info_describes_the_served_model(serve: Any) -> None:
    info = httpx.get(f"{serve().url}/info", timeout=10).json()
    assert info["model_id"] == "all-MiniLM-L6-v2"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 2048
    assert info["max_batch_tokens"] == 512  # the CPU's default pass budget


def test_sparse_and_token_vectors_on_a_bge_m3_shaped_model(serve: Any, tiny_bge_m3_dir: Path) -> None:
    from encoder import load_encoder

    encoder = load_encoder(str(tiny_bge_m3_dir), truncate=True)
    gateway = serve(encoder=encoder, model_name="tiny-bge-m3")
    openai = _post(gateway, "/v1/embeddings/sparse", {"input": TEXTS}).json()["data"]
    tei = _post(gateway, "/embed_sparse", {"inputs": TEXTS}).json()
    for ours, theirs in zip(openai, tei, strict=True):
        assert [v["index"] for v in theirs] == ours["embedding"]["indices"]
        np.testing.assert_allclose([v["value"] for v in theirs], ours["embedding"]["values"], rtol=1e-6)
    rows = _post(gateway, "/embed_all", {"inputs": TEXTS}).json()
    multivector = _post(gateway, "/v1/embeddings/multivector", {"input": TEXTS}).json()["data"]
    for matrix, ours in zip(rows, multivector, strict=True):
        np.testing.assert_allclose(np.array(matrix), np.array(ours["embedding"]), rtol=1e-6)


def test_huggingface_hubs_inference_client_gets_the_vectors(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # the tests' HF_HUB_OFFLINE=1: 127.0.0.1 only
    gateway = serve()
    expected = np.array(_post(gateway, "/embed", {"inputs": TEXTS[:1]}).json())
    got = InferenceClient(model=gateway.url).feature_extraction(TEXTS[0])
    np.testing.assert_allclose(np.asarray(got).reshape(expected.shape), expected, rtol=1e-6)


def test_llama_indexs_tei_embedding_class_gets_the_vectors(serve: Any) -> None:
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    gateway = serve()
    expected = np.array(_post(gateway, "/embed", {"inputs": TEXTS}).json())
    client = TextEmbeddingsInference(model_name="all-MiniLM-L6-v2", base_url=gateway.url, embed_batch_size=2)
    np.testing.assert_allclose(np.array(client.get_text_embedding_batch(TEXTS)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.array(client.get_query_embedding(TEXTS[0])), expected[0], rtol=1e-6)


def test_the_openapi_document_holds_the_tei_routes() -> None:
    document = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
    for path in ("/embed", "/embed_sparse", "/embed_all", "/tokenize", "/decode", "/info"):
        assert path in document["paths"], path
