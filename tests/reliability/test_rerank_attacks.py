"""Attacks on rerank (issue 22): /v1/rerank, /v2/rerank, TEI's /rerank, cross-encoders and bge-m3.

Each test is a reproduction: "FINDING" tests assert the behaviour the gateway should have (they
fail while the defect is there); "Held attack" tests pin behaviour that resisted the attack.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Settings, create_app
from tests.servers import ThreadedGateway

QUERY = "how does a vector cache work"
DOCUMENTS = [
    "Redis keeps each vector for a week under a key made of the model and the text.",
    "The weather in Lisbon is mild in winter.",
    "A cache lookup costs one round trip; a miss goes to the encoder and is written back.",
]


@pytest.fixture(scope="module")
def cross_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.factories import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("reranker") / "model", tokenizer_from=minilm_dir)


@pytest.fixture(scope="module")
def reranker(cross_dir: Path) -> Any:
    from encoder import load_encoder

    return load_encoder(str(cross_dir), truncate=True)


@pytest.fixture(scope="module")
def cross_encoder(cross_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_dir), device="cpu")


@pytest.fixture
def serve(reranker: Any) -> Iterator[Any]:
    gateways: list[ThreadedGateway] = []

    def start(encoder: Any = None, **overrides: Any) -> ThreadedGateway:
        encoder = encoder or reranker
        fields = {"model_name": "tiny-reranker", "cache_prefix": f"attack-{uuid.uuid4().hex[:8]}", **overrides}
        gateway = ThreadedGateway(create_app(Settings(model=str(encoder.path), **fields), encoder=encoder))
        gateways.append(gateway.__enter__())
        return gateway

    yield start
    for gateway in gateways:
        gateway.__exit__(None, None, None)


def _post(gateway: ThreadedGateway, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def _scores(answer: httpx.Response) -> dict[int, float]:
    return {row["index"]: row["relevance_score"] for row in answer.json()["results"]}


# --- scores against sentence-transformers -------------------------------------------------------


def test_literal_sep_in_the_query_scores_as_cross_encoder_predict(serve: Any, cross_encoder: Any) -> None:
    """FINDING (medium). A query holding the literal text "[SEP]" (WordPiece maps it to the special
    token) must score as CrossEncoder.predict does (token type 0 for the whole query). Got: the
    gateway gives token type 1 from the query's "[SEP]" on (CrossEncoderModel.scores marks types
    from the first sep id), so the score differs by far more than 1e-4 and the order can flip.
    Any user text with "[SEP]" (or "</s>" for others) does it; the types belong to the tokenizer's
    own token_type_ids (return them from tokenize, or count the query's tokens per pair)."""
    gateway = serve()
    query = "what is [SEP] a cache"
    documents = ["a cache keeps vectors", "x"]
    answer = _post(gateway, "/v1/rerank", {"query": query, "documents": documents})
    assert answer.status_code == 200, answer.text
    expected = cross_encoder.predict([(query, doc) for doc in documents])
    got = _scores(answer)
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(documents))), (got, expected)


def test_literal_sep_in_a_document_scores_as_predict(serve: Any, cross_encoder: Any) -> None:
    """Held attack. "[SEP]" inside a document: everything after the first separator is type 1 anyway."""
    gateway = serve()
    documents = ["a [SEP] cache [SEP] keeps vectors", "[SEP]", "[CLS] [PAD] [UNK] [MASK]"]
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents})
    assert answer.status_code == 200, answer.text
    expected = cross_encoder.predict([(QUERY, doc) for doc in documents])
    got = _scores(answer)
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(documents))), (got, expected)


def test_unicode_pairs_score_as_predict_and_never_collide(serve: Any, cross_encoder: Any) -> None:
    """Held attack. Astral and combining characters, digits and colons where join_pair writes its
    length prefix: every split of the same characters is its own pair, scored as predict scores it."""
    gateway = serve()
    cases = [("ab", "c"), ("a", "bc"), ("1:a", "b"), ("1", ":ab"), ("😀é\u0301", "Ü:3:"), ("😀", "é\u0301Ü:3:")]
    for query, document in cases:
        answer = _post(gateway, "/rerank", {"query": query, "texts": [document], "raw_scores": True})
        assert answer.status_code == 200, answer.text
        expected = cross_encoder.predict([(query, document)], activation_fn=lambda x: x)
        assert abs(answer.json()[0]["score"] - float(expected[0])) < 1e-4, (query, document)
        assert answer.headers["x-cache-misses"] == "1", f"{(query, document)} was served as another pair"


# --- truncation ---------------------------------------------------------------------------------


def test_a_query_that_fills_the_limit_is_a_400_not_a_500(serve: Any) -> None:
    """FINDING (high). With EMBED_TRUNCATE a query that alone passes the limit (or leaves the document
    fewer tokens than it must lose) must be a 400 context_length_exceeded, as the module docstring
    promises ("a query that alone fills the limit is refused"). Got: the fast tokenizer raises
    "Truncation error: Sequence to truncate too short..." (a bare Exception) from
    CrossEncoderModel.tokenize, which escapes as a 500. Fix: count the query's tokens first (or
    catch the tokenizer's error) and raise InputTooLongError for that pair."""
    gateway = serve(truncate=True)
    for query in ("word " * 600, "word " * 509):
        answer = _post(gateway, "/v1/rerank", {"query": query, "documents": ["doc doc", "short"]})
        assert answer.status_code == 400, (len(query), answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"] == "context_length_exceeded", answer.text


def test_tei_long_query_is_a_tei_413_not_a_500(serve: Any) -> None:
    """FINDING (high). Same defect on TEI's /rerank: expected 413 {"error","error_type"}; got a 500."""
    gateway = serve(truncate=True)
    answer = _post(gateway, "/rerank", {"query": "word " * 600, "texts": ["doc"]})
    assert answer.status_code == 413, (answer.status_code, answer.text[:300])
    assert set(answer.json()) == {"error", "error_type"}, answer.text


def test_a_long_query_that_leaves_room_keeps_the_query_whole(serve: Any, cross_dir: Path) -> None:
    """Held attack. A 500-token query and a long document: the document is cut, never the query
    (CrossEncoder with truncation "only_second" semantics at 512 tokens gives the same score)."""
    from transformers import AutoTokenizer

    gateway = serve(truncate=True)
    query, document = "word " * 500, "caches keep vectors " * 100
    answer = _post(gateway, "/rerank", {"query": query, "texts": [document], "raw_scores": True})
    assert answer.status_code == 200, answer.text
    tokenizer = AutoTokenizer.from_pretrained(str(cross_dir))
    encoded = tokenizer([query], [document], truncation="only_second", max_length=512, return_tensors="pt")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(cross_dir)).eval()
    import torch

    with torch.inference_mode():
        expected = float(model(**encoded).logits[0, 0])
    assert abs(answer.json()[0]["score"] - expected) < 1e-4


def test_a_truncated_cached_score_is_not_served_to_truncate_false(serve: Any) -> None:
    """Held attack. A pair scored cut (EMBED_TRUNCATE) and cached, then asked on TEI with
    truncate false: refused (413), never the cached prefix's score."""
    gateway = serve(truncate=True)
    long_doc = "caches keep vectors " * 200
    assert _post(gateway, "/rerank", {"query": QUERY, "texts": [long_doc]}).status_code == 200
    strict = _post(gateway, "/rerank", {"query": QUERY, "texts": [long_doc], "truncate": False})
    assert strict.status_code == 413 and set(strict.json()) == {"error", "error_type"}, strict.text


# --- odd bodies ----------------------------------------------------------------------------------


def test_duplicates_huge_top_n_and_extra_fields(serve: Any, cross_encoder: Any) -> None:
    """Held attack. Duplicate documents keep one result each (equal scores), a top_n far over the
    documents answers them all, documents objects with extra fields and null optionals are read."""
    gateway = serve()
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[0], "title": "t", "id": 7}, DOCUMENTS[1], DOCUMENTS[0]]
    body = {"query": QUERY, "documents": documents, "top_n": 10**9, "model": None, "return_documents": True}
    answer = _post(gateway, "/v2/rerank", body)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert sorted(row["index"] for row in results) == [0, 1, 2, 3]
    scores = _scores(answer)
    assert scores[0] == scores[1] == scores[3]
    expected = cross_encoder.predict([(QUERY, DOCUMENTS[0]), (QUERY, DOCUMENTS[1])])
    assert abs(scores[2] - float(expected[1])) < 1e-4
    assert next(row for row in results if row["index"] == 1)["document"] == {"text": DOCUMENTS[0]}
    assert _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": None}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"query": QUERY, "documents": DOCUMENTS, "top_n": 2**70},
        {"query": QUERY, "documents": DOCUMENTS, "top_n": -1},
        {"query": QUERY, "documents": DOCUMENTS, "top_n": 1.5},
        {"query": QUERY, "documents": DOCUMENTS, "top_n": "2"},
        {"query": None, "documents": DOCUMENTS},
        {"query": QUERY, "documents": None},
        {"query": QUERY, "documents": [None]},
        {"query": QUERY, "documents": [{"text": None}]},
        {"query": QUERY, "documents": [{"title": "no text"}]},
        {"query": QUERY, "documents": "one string"},
        {"query": ["a"], "documents": DOCUMENTS},
        {"query": QUERY, "documents": DOCUMENTS, "return_documents": "yes"},
        {"query": "\u200b\u200b", "documents": DOCUMENTS},
        b'{"query": "q", "documents": ["\\ud800"]}',
        b'{"query": "\\udfff\\ud800", "documents": ["d"]}',
        [QUERY, DOCUMENTS],
        "not an object",
    ],
)
def test_odd_bodies_are_4xx_never_5xx(serve: Any, reranker: Any, body: Any) -> None:
    """Held attack. Odd bodies (huge, negative, fractional top_n, nulls, wrong types, a lone surrogate,
    zero-width-only query) are answered below 500 in OpenAI's error shape or (zero-width) scored."""
    gateway = serve()
    if isinstance(body, bytes):
        answer = httpx.post(f"{gateway.url}/v1/rerank", content=body, timeout=30)
    else:
        answer = _post(gateway, "/v1/rerank", body)
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    if answer.status_code != 200:
        assert set(answer.json()) == {"error"}, answer.text


def test_duplicate_documents_usage_and_cache_headers(serve: Any) -> None:
    """Held attack. Duplicates are computed once: x-cache-misses counts the distinct pairs, and the
    same body again is all hits with the same usage."""
    gateway = serve()
    body = {"query": QUERY, "documents": [DOCUMENTS[0]] * 3 + [DOCUMENTS[1]]}
    first = _post(gateway, "/v1/rerank", body)
    assert first.status_code == 200, first.text
    again = _post(gateway, "/v1/rerank", body)
    assert int(first.headers["x-cache-misses"]) <= 4 and int(again.headers["x-cache-misses"]) == 0
    assert first.json()["usage"] == again.json()["usage"] and first.json()["usage"]["total_tokens"] > 0


# --- TEI's /rerank errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"query": QUERY, "texts": []}, 413),  # TEI's Validation status
        ({"query": QUERY, "texts": DOCUMENTS * 3}, 413),
        ({"query": QUERY, "texts": DOCUMENTS, "truncation_direction": "left"}, 422),
        ({"query": QUERY, "texts": DOCUMENTS, "truncation_direction": "up"}, 422),
        ({"query": QUERY, "texts": [None]}, 422),
        ({"query": "", "texts": DOCUMENTS}, 422),
        ({"texts": DOCUMENTS}, 422),
        ({"query": QUERY, "texts": DOCUMENTS, "model": "nope"}, 404),
        ("garbage", 422),
    ],
)
def test_tei_rerank_errors_in_tei_shape(serve: Any, body: Any, status: int) -> None:
    """Held attack. TEI's /rerank refuses in TEI's shape: {"error", "error_type"}, 413 for too much, 422 else."""
    gateway = serve(max_inputs=8)
    answer = _post(gateway, "/rerank", body)
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert set(answer.json()) == {"error", "error_type"}, answer.text


# --- auth ------------------------------------------------------------------------------------------


def test_rerank_routes_need_the_api_key(serve: Any) -> None:
    """Held attack. With EMBED_API_KEYS every rerank route is a 401 without the key (TEI's shape on
    /rerank) and a 200 with it."""
    gateway = serve(api_keys="secret-key-1")
    body = {"query": QUERY, "documents": DOCUMENTS}
    for path in ("/v1/rerank", "/v2/rerank", "//v1/rerank", "/v1/rerank/"):
        refused = _post(gateway, path, body)
        assert refused.status_code in (401, 404, 405), (path, refused.status_code)
        refused = _post(gateway, path, body, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code in (401, 404, 405), (path, refused.status_code)
    tei = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert tei.status_code == 401 and set(tei.json()) == {"error", "error_type"}, tei.text
    ok = _post(gateway, "/v1/rerank", body, headers={"Authorization": "Bearer secret-key-1"})
    assert ok.status_code == 200, ok.text


def test_a_keys_token_limit_covers_rerank(serve: Any, tmp_path: Path) -> None:
    """Held attack. A key's tokens_per_minute is charged for every pair (query counted again per
    document): a rerank bigger than the whole limit is refused, not scored for free."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "small"\nkey = "small-key-123"\ntokens_per_minute = 50\n')
    gateway = serve(api_keys_file=str(keys))
    headers = {"Authorization": "Bearer small-key-123"}
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS * 2}, headers=headers)
    assert answer.status_code in (400, 413, 429), (answer.status_code, answer.text)
    tei = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS * 2}, headers=headers)
    assert tei.status_code in (413, 429) and set(tei.json()) == {"error", "error_type"}, tei.text


# --- bge-m3 --------------------------------------------------------------------------------------


def test_bge_m3_at_max_inputs_documents_is_served(serve: Any, tiny_bge_m3_dir: Path) -> None:
    """Held attack. bge-m3 ranks max_inputs documents (the query is one more text to embed) and
    duplicates, a document equal to the query included, without an error."""
    from encoder import load_encoder

    m3 = load_encoder(str(tiny_bge_m3_dir))
    gateway = serve(encoder=m3, model_name="tiny-m3", max_inputs=4)
    documents = [QUERY, DOCUMENTS[0], DOCUMENTS[0], DOCUMENTS[1]]
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents})
    assert answer.status_code == 200, answer.text
    scores = _scores(answer)
    assert scores[1] == scores[2] and answer.json()["results"][0]["index"] == 0


def test_bge_m3_truncation_never_cuts_the_query(serve: Any, tiny_bge_m3_dir: Path) -> None:
    """FINDING (low). The rerank docstring promises a long text is cut "the document only, never the
    query" or refused naming it; bge-m3 served with EMBED_TRUNCATE and a small EMBED_MAX_TOKENS
    embeds the query as any text (_own_scores), so a query over the limit is silently cut and
    scored. Expected: 400 naming the query (context_length_exceeded); got a 200."""
    from encoder import load_encoder

    m3 = load_encoder(str(tiny_bge_m3_dir), truncate=True, max_tokens=32)
    gateway = serve(encoder=m3, model_name="tiny-m3", truncate=True, max_input_tokens=32)
    answer = _post(gateway, "/v1/rerank", {"query": "word " * 100, "documents": DOCUMENTS})
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
    assert answer.json()["error"]["param"] == "query", answer.text
    cut = _post(gateway, "/v1/rerank", {"query": "short", "documents": ["word " * 100]})  # documents are cut
    assert cut.status_code == 200, cut.text
