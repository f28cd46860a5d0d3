"""/v1/embeddings/sparse and /v1/embeddings/multivector on a tiny bge-m3 folder, cached in Redis."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder, load_encoder
from gateway import Settings, create_app
from tests.servers import RedisServer, ThreadedGateway

TEXTS = ["hybrid search wants all three", "Быстрая коричневая лиса", "短い"]
ALL = frozenset({"dense", "sparse", "colbert"})


@pytest.fixture(scope="module")
def bge(tiny_bge_m3_dir: Path) -> Encoder:
    return load_encoder(str(tiny_bge_m3_dir))


@pytest.fixture
def live(bge: Encoder, redis_server: RedisServer):  # type: ignore[no-untyped-def]
    settings = Settings(
        model=str(bge.path), model_name="bge-m3", redis_url=redis_server.url, cache_prefix=f"m3-{time.time_ns()}"
    )
    with ThreadedGateway(create_app(settings, encoder=bge)) as gateway:
        yield gateway


def _post(url: str, path: str, **body: object) -> dict:  # type: ignore[type-arg]
    response = httpx.post(f"{url}{path}", json={"model": "bge-m3", **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _stats(url: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{url}/stats").json()  # type: ignore[no-any-return]


def _settle(live: ThreadedGateway) -> None:
    service = live.server.config.app.state.runtime.service  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while service.pending_writes and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sparse_endpoint_and_its_cached_repeat(live, bge: Encoder, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    body = _post(live.url, "/v1/embeddings/sparse", input=TEXTS, return_tokens=True)
    assert body["object"] == "list"
    assert body["model"] == "bge-m3"
    expected = bge.encode_outputs(bge.tokenize(TEXTS), ALL)
    for index, (item, want) in enumerate(zip(body["data"], expected, strict=True)):
        assert item["index"] == index
        assert item["object"] == "sparse_embedding"
        vector = item["embedding"]
        assert vector["indices"] == sorted(vector["indices"])
        assert vector["indices"] == want.sparse.indices.tolist()
        np.testing.assert_allclose(vector["values"], want.sparse.values, atol=1e-6)
        assert vector["tokens"] == bge.tokenizer.convert_ids_to_tokens(vector["indices"])
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in bge.tokenize(TEXTS))

    _settle(live)
    before = _stats(live.url)
    again = _post(live.url, "/v1/embeddings/sparse", input=TEXTS)
    after = _stats(live.url)
    assert after["cache"]["hits"] - before["cache"]["hits"] == len(TEXTS)
    assert after["encoder"]["batches"] == before["encoder"]["batches"], "served from Redis, not the model"
    assert [d["embedding"]["indices"] for d in again["data"]] == [d["embedding"]["indices"] for d in body["data"]]
    assert "tokens" not in again["data"][0]["embedding"]
    assert again["usage"] == body["usage"]
    assert any(b":sparse:" in key for key in redis_server.client().scan_iter("m3-*"))


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_multivector_endpoint_and_its_cached_repeat(live, bge: Encoder, fmt: str) -> None:  # type: ignore[no-untyped-def]
    body = _post(live.url, "/v1/embeddings/multivector", input=TEXTS, encoding_format=fmt)
    expected = bge.encode_outputs(bge.tokenize(TEXTS), ALL)
    for item, want in zip(body["data"], expected, strict=True):
        assert item["object"] == "multivector_embedding"
        assert item["shape"] == list(want.colbert.shape)
        if fmt == "base64":
            raw = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").reshape(item["shape"])
        else:
            raw = np.array(item["embedding"], dtype=np.float32)
        np.testing.assert_allclose(raw, want.colbert, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    _settle(live)
    before = _stats(live.url)
    again = _post(live.url, "/v1/embeddings/multivector", input=TEXTS, encoding_format=fmt)
    after = _stats(live.url)
    assert after["cache"]["hits"] - before["cache"]["hits"] == len(TEXTS)
    assert after["encoder"]["batches"] == before["encoder"]["batches"]
    assert again["data"] == body["data"]


def test_dense_sparse_and_multivector_do_not_share_keys(live) -> None:  # type: ignore[no-untyped-def]
    _post(live.url, "/v1/embeddings", input=["one text"])
    _settle(live)
    misses = _stats(live.url)["cache"]["misses"]
    _post(live.url, "/v1/embeddings/sparse", input=["one text"])
    assert _stats(live.url)["cache"]["misses"] == misses + 1


def test_a_model_without_the_heads_says_which_file_is_missing(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    minilm = gateway_factory()
    for path, missing in (
        ("/v1/embeddings/sparse", "sparse_linear.pt"),
        ("/v1/embeddings/multivector", "colbert_linear.pt"),
    ):
        response = httpx.post(f"{minilm.url}{path}", json={"input": "x"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert missing in error["message"]
        assert error["code"] == "output_not_supported"


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/embeddings/sparse", {"dimensions": 8}, "dimensions"),
        ("/v1/embeddings/sparse", {"encoding_format": "base64"}, "encoding_format"),
        ("/v1/embeddings/multivector", {"dimensions": 8}, "dimensions"),
    ],
)
def test_options_an_output_cannot_honour_are_refused_not_ignored(live, path: str, extra: dict, param: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    response = httpx.post(f"{live.url}{path}", json={"model": "bge-m3", "input": TEXTS[:1], **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
