"""Attacks on rerank (issue 22): /v1/rerank, /v2/rerank, TEI's /rerank, cross-encoders and bge-m3.

Each test is a reproduction: "FINDING" tests assert the behaviour the gateway should have (they
fail while the defect is there); "Held attack" tests pin behaviour that resisted the attack.
"""

from __future__ import annotations

import uuid
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


@pytest.fixture
def serve(serve_app: Any, reranker: Any) -> Any:
    def start(encoder: Any = None, **overrides: Any) -> Any:
        return serve_app(encoder or reranker, **{"model_name": "tiny-reranker", **overrides})

    return start


def _post(gateway: ThreadedGateway, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def _scores(answer: httpx.Response) -> dict[int, float]:
    return {row["index"]: row["relevance_score"] for row in answer.json()["results"]}


# --- scores against sentence-transformers -------------------------------------------------------


def test_literal_sep_in_the_query_scores_as_cross_encoder_predict(serve: Any, cross_encoder: Any) -> None:
    """Held attack (a FINDING on 5cf9be2, fixed by 06f8c90; kept as a regression
    test). A query holding the literal text "[SEP]" (WordPiece maps it to the special
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
    """Held attack (a FINDING on 5cf9be2, fixed by 06f8c90; kept as a regression
    test). With EMBED_TRUNCATE a query that alone passes the limit (or leaves the document
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
    """Held attack (a FINDING on 5cf9be2, fixed by 06f8c90; kept as a regression
    test). Same defect on TEI's /rerank: expected 413 {"error","error_type"}; got a 500."""
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
    """Held attack (a FINDING on 5cf9be2, fixed by 06f8c90; kept as a regression
    test). The rerank docstring promises a long text is cut "the document only, never the
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


# --- model detection and activation ----------------------------------------------------------------


def test_a_cross_encoder_saved_by_sentence_transformers_6_is_a_reranker(
    cross_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FINDING (medium). A CrossEncoder saved by the installed sentence-transformers (6.3:
    ``CrossEncoder.save_pretrained`` writes modules.json with a Transformer module of
    ``transformer_task: sequence-classification`` and ``config_sentence_transformers.json`` with
    ``model_type: CrossEncoder`` and its ``activation_fn``) must load as a reranker scoring as
    ``CrossEncoder.predict``. Got: ``is_cross_encoder`` returns False as soon as modules.json exists,
    so ``load_encoder`` serves the classifier as an *embedding* model (DENSE, mean pooling of the
    base model): /v1/rerank answers 400 "is an embedding model" and /v1/embeddings hands out vectors
    of a classifier. Every reranker published or fine-tuned with sentence-transformers >= 6 is
    affected; the activation it saved (config_sentence_transformers.json) is never read either.
    Fix: in encoder/cross_encoder.py is_cross_encoder/_activation, also accept
    config_sentence_transformers.json ``model_type == "CrossEncoder"`` (and read its activation_fn)."""
    import torch
    from sentence_transformers import CrossEncoder

    from encoder import load_encoder
    from encoder.cross_encoder import CrossEncoderModel

    saved = tmp_path / "saved-by-st"
    CrossEncoder(str(cross_dir), device="cpu", activation_fn=torch.nn.Identity()).save_pretrained(str(saved))
    assert (saved / "modules.json").is_file()  # the format under attack
    loaded = load_encoder(str(saved))
    assert isinstance(loaded, CrossEncoderModel), f"served as {type(loaded).__name__} with {set(loaded.outputs)}"
    assert loaded.activation == "Identity"


def test_activation_from_config_matches_predict(cross_dir: Path, tmp_path: Path) -> None:
    """Held attack. Identity and Tanh from config.json (sentence-transformers 4/5's
    ``sentence_transformers.activation_fn`` and the legacy ``sbert_ce_default_activation_function``)
    score as predict does, and a raw-score request cached first does not change the activated one."""
    import json
    import shutil

    from sentence_transformers import CrossEncoder

    from encoder import load_encoder

    for index, (key, value) in enumerate(
        [
            ("sentence_transformers", {"activation_fn": "torch.nn.modules.activation.Tanh"}),
            ("sbert_ce_default_activation_function", "torch.nn.modules.linear.Identity"),
        ]
    ):
        folder = tmp_path / f"act-{index}"
        shutil.copytree(cross_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        encoder = load_encoder(str(folder))
        pairs = [(QUERY, doc) for doc in DOCUMENTS]
        expected = CrossEncoder(str(folder), device="cpu").predict(pairs)
        with ThreadedGateway(create_app(Settings(model=str(folder), model_name="act"), encoder=encoder)) as gateway:
            raw = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True})
            assert raw.status_code == 200, raw.text
            answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
            assert answer.headers["x-cache-hits"] == str(len(DOCUMENTS))
            got = _scores(answer)
            assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(DOCUMENTS))), (key, got, expected)


def test_a_two_label_classifier_is_refused_as_4xx_on_every_route(
    cross_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    """Held attack. A sequence classifier with two labels (an NLI head, not a reranker) is refused
    (400 output_not_supported; TEI's route 422 in TEI's shape), never a 500 or a silently picked label."""
    from encoder import load_encoder
    from support.factories import build_cross_encoder

    folder = build_cross_encoder(tmp_path / "two", tokenizer_from=minilm_dir, num_labels=2)
    encoder = load_encoder(str(folder))
    with ThreadedGateway(create_app(Settings(model=str(folder), model_name="nli"), encoder=encoder)) as gateway:
        for path in ("/v1/rerank", "/v2/rerank"):
            answer = _post(gateway, path, {"query": QUERY, "documents": DOCUMENTS})
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "output_not_supported", answer.text
        tei = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
        assert 400 <= tei.status_code < 500 and set(tei.json()) == {"error", "error_type"}, tei.text


# --- other routes with a reranker ------------------------------------------------------------------


def test_tei_info_of_a_reranker_says_reranker(serve: Any) -> None:
    """FINDING (low). TEI's /info for a reranker answers ``model_type: {"reranker": {"id2label",
    "label2id"}}`` (TEI's openapi: ModelType is one of classifier / embedding / reranker); clients
    read it to tell what the server does. Got: ``{"embedding": {"pooling": "mean"}}`` for the
    cross-encoder (gateway/http/routes/tei.py tei_info builds ModelType(embedding=...) always, from
    read_model_spec's default pooling, which the reranker does not even use). Fix: ModelType gains
    ``reranker`` (id2label/label2id from the model's config) when ``served.reranker``."""
    gateway = serve()
    info = httpx.get(f"{gateway.url}/info", timeout=10)
    assert info.status_code == 200, info.text
    assert "reranker" in info.json()["model_type"], info.json()["model_type"]


def test_embedding_routes_refuse_a_reranker_in_their_own_shape(serve: Any) -> None:
    """Held attack. A reranker on /v1/embeddings (and /sparse), TEI's /embed, /embed_sparse, /embed_all:
    400 output_not_supported / TEI 422, never a 500; join_pair-looking text ("3:abcdef") on /tokenize is
    tokenised as plain text (no split_pair on that route)."""
    gateway = serve()
    for path in ("/v1/embeddings", "/v1/embeddings/sparse", "/v1/embeddings/multivector"):
        answer = _post(gateway, path, {"input": "3:abcdef", "model": "tiny-reranker"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "output_not_supported", answer.text
    for path in ("/embed", "/embed_sparse", "/embed_all"):
        answer = _post(gateway, path, {"inputs": "3:abcdef"})
        assert answer.status_code == 422 and set(answer.json()) == {"error", "error_type"}, (path, answer.text)
    tokens = _post(gateway, "/tokenize", {"inputs": "3:abcdef"})
    assert tokens.status_code == 200 and [t["text"] for t in tokens.json()[0]][1:3] == ["3", ":"], tokens.text


def test_the_rerank_default_is_bge_m3_when_no_cross_encoder_is_served(
    minilm_encoder: Any, bge_m3: Any, minilm_dir: Path, tiny_bge_m3_dir: Path, tmp_path: Path
) -> None:
    """FINDING (low). A models file of [minilm, bge-m3]: the README says bge-m3 "answers the same
    routes" and the rerank routes "default to the first reranker", so a rerank naming no model
    should rank with bge-m3, the only model able to. Got: 400 "model 'minilm' is an embedding
    model, not a reranker" (gateway/http/runtime.py model_for(reranker=True) only looks for SCORE
    outputs, then falls back to models[0]). Fix: for reranker=True prefer a cross-encoder, then a
    model with dense+sparse+ColBERT outputs."""
    import json

    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm_dir))}\ntruncate = true\n\n'
        f'[[models]]\nname = "m3"\npath = {json.dumps(str(tiny_bge_m3_dir))}\n'
    )
    settings = Settings(models_file=str(models), cache_prefix=f"attack-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoders=[minilm_encoder, bge_m3])) as gateway:
        assert _post(gateway, "/v1/embeddings", {"input": "x"}).json()["model"] == "minilm"
        answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "m3"


def test_info_and_tokenize_default_follow_the_embedding_default(
    reranker: Any, minilm_encoder: Any, cross_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    """Held attack. Reranker first in the models file: /embed, /info and /tokenize all default to the
    embedder (the model /embed serves is the one /info describes); rerank to the reranker."""
    import json

    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "ranker"\npath = {json.dumps(str(cross_dir))}\ntruncate = true\n\n'
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm_dir))}\ntruncate = true\n'
    )
    settings = Settings(models_file=str(models), cache_prefix=f"attack-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoders=[reranker, minilm_encoder])) as gateway:
        assert httpx.get(f"{gateway.url}/info", timeout=10).json()["model_id"] == "minilm"
        assert _post(gateway, "/embed", {"inputs": "x"}).status_code == 200
        assert _post(gateway, "/v1/embeddings", {"input": "x"}).json()["model"] == "minilm"
        assert _post(gateway, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()["model"] == "ranker"
        assert _post(gateway, "/tokenize", {"inputs": "x"}).status_code == 200


# --- cache over a real Redis -----------------------------------------------------------------------


def test_two_rerankers_and_an_embedder_on_one_redis_never_read_each_other(
    reranker: Any, minilm_encoder: Any, minilm_dir: Path, tmp_path: Path, redis_server: Any, cross_encoder: Any
) -> None:
    """Held attack. One Redis, one cache prefix: a second reranker (other weights, same tokenizer and
    config) asked the same pairs computes its own scores (all misses, scores of its own predict), and
    an embedding model asked the pair's joined text ("len:query+doc") misses too: no key collides."""
    from sentence_transformers import CrossEncoder

    from encoder import load_encoder
    from encoder.pairs import join_pair
    from support.factories import build_cross_encoder

    other_dir = build_cross_encoder(tmp_path / "other", tokenizer_from=minilm_dir, seed=1)
    other = load_encoder(str(other_dir), truncate=True)
    prefix = f"attack-{uuid.uuid4().hex[:8]}"
    shared = {"redis_url": redis_server.url, "cache_prefix": prefix}
    first = ThreadedGateway(create_app(Settings(model=str(reranker.path), model_name="a", **shared), encoder=reranker))
    second = ThreadedGateway(create_app(Settings(model=str(other_dir), model_name="b", **shared), encoder=other))
    embedder = ThreadedGateway(
        create_app(Settings(model=str(minilm_dir), model_name="m", **shared), encoder=minilm_encoder)
    )
    with first, second, embedder:
        body = {"query": QUERY, "documents": DOCUMENTS}
        assert _post(first, "/v1/rerank", body).headers["x-cache-misses"] == str(len(DOCUMENTS))
        again = _post(first, "/v1/rerank", body)
        assert again.headers["x-cache-hits"] == str(len(DOCUMENTS))
        expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
        assert all(abs(_scores(again)[i] - float(expected[i])) < 1e-4 for i in range(len(DOCUMENTS)))
        theirs = _post(second, "/v1/rerank", body)
        assert theirs.headers["x-cache-misses"] == str(len(DOCUMENTS)), "served another reranker's scores"
        expected_other = CrossEncoder(str(other_dir), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS])
        assert all(abs(_scores(theirs)[i] - float(expected_other[i])) < 1e-4 for i in range(len(DOCUMENTS)))
        joined = [join_pair(QUERY, doc) for doc in DOCUMENTS]
        embedded = _post(embedder, "/v1/embeddings", {"input": joined})
        assert embedded.status_code == 200 and embedded.headers["x-cache-misses"] == str(len(DOCUMENTS))


# --- limits ------------------------------------------------------------------------------------------


def test_in_flight_cap_covers_rerank(cross_dir: Path) -> None:
    """Held attack. With EMBED_MAX_CONNECTIONS=1 and one rerank held in the forward pass, a second
    rerank (any of the three routes) is refused at the cap (503; TEI's route 429 "Overloaded" as TEI
    answers it), not queued past it."""
    import threading

    from encoder import load_encoder

    encoder = load_encoder(str(cross_dir))
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()
    scores = encoder.scores

    def held(token_ids: Any) -> Any:
        if armed.is_set():
            entered.set()
            release.wait(10)
        return scores(token_ids)

    encoder.scores = held  # type: ignore[method-assign]
    settings = Settings(model=str(cross_dir), model_name="capped", max_connections=1)
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        armed.set()
        outcome: dict[str, httpx.Response] = {}
        first = threading.Thread(
            target=lambda: outcome.setdefault(
                "first", _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
            )
        )
        first.start()
        try:
            assert entered.wait(10), "the first rerank never reached the forward pass"
            for path, body in (
                ("/v1/rerank", {"query": "other", "documents": DOCUMENTS}),
                ("/v2/rerank", {"query": "other", "documents": DOCUMENTS}),
                ("/rerank", {"query": "other", "texts": DOCUMENTS}),
            ):
                refused = _post(gateway, path, body)
                if path == "/rerank":  # TEI answers its Overloaded as a 429, in its own shape
                    assert refused.status_code == 429 and set(refused.json()) == {"error", "error_type"}, refused.text
                else:
                    assert refused.status_code == 503, (path, refused.status_code, refused.text)
        finally:
            release.set()
            first.join(15)
        assert outcome["first"].status_code == 200


def test_requests_per_minute_covers_every_rerank_route(serve: Any, tmp_path: Path) -> None:
    """Held attack. A key of requests_per_minute = 1: the second rerank, on any route, is a 429
    (TEI's shape on /rerank)."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "one"\nkey = "one-key-12345"\nrequests_per_minute = 1\n')
    gateway = serve(api_keys_file=str(keys))
    headers = {"Authorization": "Bearer one-key-12345"}
    assert _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}, headers=headers).status_code == 200
    assert _post(gateway, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}, headers=headers).status_code == 429
    tei = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS}, headers=headers)
    assert tei.status_code == 429 and set(tei.json()) == {"error", "error_type"}, tei.text


def test_preflight_refuses_a_models_file_reranker_under_workers(
    cross_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    """Held attack. The one-process rule holds for a reranker in a models file too (EMBED_WORKERS=2)."""
    import json

    from gateway.cli import preflight

    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm_dir))}\n\n'
        f'[[models]]\nname = "ranker"\npath = {json.dumps(str(cross_dir))}\n'
    )
    problem = preflight(Settings(models_file=str(models), workers=2, redis_url="redis://127.0.0.1:1"))
    assert problem is not None and "one process" in problem and "'ranker'" in problem, problem


# --- errors, usage and clients ---------------------------------------------------------------------


def test_a_long_query_is_refused_naming_the_query(serve: Any) -> None:
    """FINDING (low). A query over the limit (EMBED_TRUNCATE on) is refused, as it should be, but the
    error names a document: 400 {"param": "documents", "message": "the query with documents[0] has
    602 tokens..."}; the client shortens the wrong field (the documents are one word each).
    Expected param "query" and a message about the query alone (rank() in
    gateway/http/routes/rerank.py rewrites every context_length_exceeded as the document's; the
    cross-encoder's tokenize already knows it was the query: let it say so)."""
    gateway = serve(truncate=True)
    answer = _post(gateway, "/v1/rerank", {"query": "word " * 600, "documents": ["a", "b"]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded", error
    assert error["param"] == "query" and "documents[" not in error["message"], error


def test_cohere_v1_sdk_rerank_and_rank_fields(serve: Any, cross_encoder: Any) -> None:
    """FINDING (low). cohere.Client (v1) works against /v1/rerank (results, documents, meta parse),
    but its ``rank_fields`` is silently ignored: asked to rank documents {"text", "title"} by
    ``title``, the gateway ranks the ``text``. Expected the titles' scores (or a 400 naming
    rank_fields, as an unsupported option); got the texts' scores. RerankRequest in
    gateway/http/routes/rerank.py drops unknown fields; read rank_fields or refuse it."""
    import cohere

    gateway = serve()
    client = cohere.Client(api_key="unused", base_url=gateway.url)
    plain = client.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert all(abs(row.relevance_score - float(expected[row.index])) < 1e-4 for row in plain.results)
    assert all(row.document is not None and row.document.text == DOCUMENTS[row.index] for row in plain.results)
    titles = ["weather report", "vector cache internals", "lisbon"]
    documents = [{"text": text, "title": title} for text, title in zip(DOCUMENTS, titles, strict=True)]
    body = {"query": QUERY, "documents": documents, "rank_fields": ["title"]}
    answer = _post(gateway, "/v1/rerank", body)
    if answer.status_code == 400:
        assert answer.json()["error"]["param"] == "rank_fields", answer.text
        return
    by_title = cross_encoder.predict([(QUERY, title) for title in titles])
    got = _scores(answer)
    assert all(abs(got[i] - float(by_title[i])) < 1e-4 for i in range(len(titles))), (got, by_title, expected)


# --- bge-m3 passes and stats -------------------------------------------------------------------------


def test_bge_m3_rerank_is_one_pass_per_text_and_counted_once(serve: Any, bge_m3: Any) -> None:
    """FINDING (medium). bge-m3 reranking a cold query and 3 documents computes dense, sparse and
    ColBERT of 4 texts; one forward pass gives all three (FlagEmbedding's compute_score makes one
    pass, and the micro-batcher takes several kinds per input). Got: 3 batches of 12 inputs
    (_own_scores calls compute(DENSE), then service.embed(SPARSE), then service.embed(COLBERT): each
    a separate batcher item keyed (kinds, text)), i.e. 3x the encoder time, and /stats (so /metrics
    and the key stats) counts 12 inputs and 3x the tokens that ``usage.total_tokens`` bills; the
    SPARSE/COLBERT calls also run without the disconnect guard. Fix: one batcher call for the three
    kinds on the misses, each output written to its own cache key; telemetry counted once."""
    gateway = serve(encoder=bge_m3, model_name="tiny-m3")
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    texts = 1 + len(DOCUMENTS)
    assert stats["encoder"]["inputs"] == texts, stats["encoder"]
    assert stats["tokens"] == answer.json()["usage"]["total_tokens"], (stats["tokens"], answer.json()["usage"])


def test_bge_m3_weights_extremes_match_flagembedding(serve: Any, bge_m3: Any) -> None:
    """Held attack. EMBED_RERANK_WEIGHTS at its extremes (sparse only, ColBERT only) ranks as
    FlagEmbedding's compute_score written out over the model's own outputs (1e-3)."""
    import numpy as np

    from encoder.kinds import OutputKind

    kinds = frozenset({OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT})
    outputs = bge_m3.encode_outputs(bge_m3.tokenize([QUERY, *DOCUMENTS]), kinds)
    query = outputs[0]
    lexical = dict(zip(query.sparse.indices.tolist(), query.sparse.values.tolist(), strict=True))
    for weights, part in (((0.0, 1.0, 0.0), "sparse"), ((0.0, 0.0, 1.0), "colbert")):
        gateway = serve(encoder=bge_m3, model_name="tiny-m3", rerank_weights=weights)
        answer = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
        assert answer.status_code == 200, answer.text
        for row in answer.json():
            doc = outputs[1 + row["index"]]
            if part == "sparse":
                weights_of = dict(zip(doc.sparse.indices.tolist(), doc.sparse.values.tolist(), strict=True))
                expected = sum(w * weights_of[t] for t, w in lexical.items() if t in weights_of)
            else:
                expected = float(np.einsum("in,jn->ij", query.colbert, doc.colbert).max(-1).sum() / len(query.colbert))
            assert abs(row["score"] - expected) < 1e-3, (part, row, expected)
