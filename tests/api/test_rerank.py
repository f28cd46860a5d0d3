"""Rerank (issue 22): cross-encoders on /v1/rerank, /v2/rerank and TEI's /rerank, cached per pair.

A tiny random BERT sequence classifier (MiniLM's WordPiece tokenizer, token types) stands in for a
reranker; sentence-transformers' ``CrossEncoder.predict`` on the same folder is the reference.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from gateway.cli import preflight
from tests.servers import ThreadedGateway

QUERY = "how does a vector cache work"
DOCUMENTS = [
    "Redis keeps each vector for a week under a key made of the model and the text.",
    "The weather in Lisbon is mild in winter.",
    "A cache lookup costs one round trip; a miss goes to the encoder and is written back.",
    "Cross-encoders read the query and the document together.",
]


@pytest.fixture
def serve(serve_app: Any, reranker: Any) -> Any:
    def start(encoder: Any = None, **overrides: Any) -> Any:
        return serve_app(encoder or reranker, **{"model_name": "tiny-reranker", **overrides})

    return start


def _post(gateway: ThreadedGateway, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30)


def test_v1_rerank_scores_equal_cross_encoder_predict_best_first(serve: Any, cross_encoder: Any) -> None:
    gateway = serve()
    body = {"model": "tiny-reranker", "query": QUERY, "documents": DOCUMENTS, "return_documents": True}
    answer = _post(gateway, "/v1/rerank", body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert float(np.ptp(expected)) > 1e-2, "the scores must differ for the comparison to mean something"
    results = data["results"]
    assert [row["index"] for row in results] == list(np.argsort(-expected, kind="stable"))
    for row in results:
        assert abs(row["relevance_score"] - float(expected[row["index"]])) < 1e-4
        assert row["document"] == {"text": DOCUMENTS[row["index"]]}
    assert data["model"] == "tiny-reranker" and data["usage"]["total_tokens"] > 0
    assert data["meta"]["api_version"]["version"] == "1" and data["id"]
    # top_n, documents as {"text": ...}, no documents back by default
    short = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 2})
    assert [row["index"] for row in short.json()["results"]] == [row["index"] for row in results[:2]]
    assert all("document" not in row for row in short.json()["results"])


def test_a_pair_asked_again_costs_no_pass(serve: Any) -> None:
    gateway = serve()
    first = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert first.headers["x-cache-misses"] == str(len(DOCUMENTS))
    batches = httpx.get(f"{gateway.url}/stats", timeout=10).json()["encoder"]["batches"]
    again = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert again.headers["x-cache-hits"] == str(len(DOCUMENTS))
    assert httpx.get(f"{gateway.url}/stats", timeout=10).json()["encoder"]["batches"] == batches
    assert again.json()["results"] == first.json()["results"]
    # another query with the same documents is another pair: computed
    other = _post(gateway, "/v1/rerank", {"query": "weather in Lisbon", "documents": DOCUMENTS})
    assert other.headers["x-cache-misses"] == str(len(DOCUMENTS))


def test_tei_rerank_raw_scores_and_texts(serve: Any, cross_encoder: Any) -> None:
    gateway = serve()
    pairs = [(QUERY, doc) for doc in DOCUMENTS]
    raw = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "return_text": True})
    assert raw.status_code == 200, raw.text
    logits = cross_encoder.predict(pairs, activation_fn=lambda x: x)
    for row in raw.json():
        assert abs(row["score"] - float(logits[row["index"]])) < 1e-4 and row["text"] == DOCUMENTS[row["index"]]
    scored = _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS}).json()
    expected = cross_encoder.predict(pairs)
    assert [row["index"] for row in scored] == list(np.argsort(-expected, kind="stable"))
    assert all(set(row) == {"index", "score"} for row in scored)


def test_cohere_sdk_v2_rerank(serve: Any, cross_encoder: Any) -> None:
    import cohere

    gateway = serve()
    client = cohere.ClientV2(api_key="unused", base_url=gateway.url)
    answer = client.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, top_n=3)
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    assert [row.index for row in answer.results] == list(np.argsort(-expected, kind="stable"))[:3]
    assert all(abs(row.relevance_score - float(expected[row.index])) < 1e-4 for row in answer.results)


def test_llamaindex_tei_reranker(serve: Any, cross_encoder: Any) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    gateway = serve()
    reranker = TextEmbeddingInference(base_url=gateway.url, top_n=2, model_name="tiny-reranker")
    nodes = [NodeWithScore(node=TextNode(text=doc), score=0.0) for doc in DOCUMENTS]
    kept = reranker.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    best = list(np.argsort(-expected, kind="stable"))[:2]
    assert [node.node.get_content() for node in kept] == [DOCUMENTS[i] for i in best]
    assert all(abs(node.score - float(expected[i])) < 1e-4 for node, i in zip(kept, best, strict=True))


def test_long_documents_are_cut_keeping_the_query_or_refused(serve: Any, cross_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    from encoder import load_encoder

    long_doc = "caches keep vectors " * 200
    gateway = serve(truncate=True)
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": [long_doc, DOCUMENTS[0]]})
    assert answer.status_code == 200, answer.text
    reference = CrossEncoder(str(cross_dir), device="cpu", max_length=512)
    expected = reference.predict([(QUERY, long_doc), (QUERY, DOCUMENTS[0])])
    scores = {row["index"]: row["relevance_score"] for row in answer.json()["results"]}
    assert abs(scores[0] - float(expected[0])) < 1e-4
    strict = serve(encoder=load_encoder(str(cross_dir), truncate=False), truncate=False)
    refused = _post(strict, "/v1/rerank", {"query": QUERY, "documents": [DOCUMENTS[0], long_doc]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "documents[1]" in error["message"], error
    tei = _post(gateway, "/rerank", {"query": QUERY, "texts": [long_doc], "truncate": False})
    assert tei.status_code == 413 and set(tei.json()) == {"error", "error_type"}, tei.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": "  ", "documents": DOCUMENTS}, "query"),
        ({"query": QUERY, "documents": ["ok", ""]}, "documents"),
        ({"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n"),
        ({"query": QUERY, "documents": [1, 2]}, "documents"),
        ({"documents": DOCUMENTS}, "query"),
        ({"query": QUERY, "documents": DOCUMENTS * 3}, "documents"),  # over EMBED_MAX_INPUTS (8)
    ],
)
def test_bad_rerank_bodies_are_400s(serve: Any, body: dict[str, Any], param: str) -> None:
    answer = _post(serve(max_inputs=8), "/v1/rerank", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.json()


def test_each_route_refuses_the_other_kind_of_model(serve: Any, minilm_encoder: Any) -> None:
    rerank_server = serve()
    embedded = _post(rerank_server, "/v1/embeddings", {"input": "x"})
    assert embedded.status_code == 400 and "reranker" in embedded.json()["error"]["message"], embedded.text
    embed_server = serve(encoder=minilm_encoder, model_name="minilm")
    ranked = _post(embed_server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert ranked.status_code == 400 and ranked.json()["error"]["code"] == "output_not_supported", ranked.text


def test_a_models_file_serves_an_embedder_and_a_reranker_each_by_default(
    reranker: Any, minilm_encoder: Any, cross_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm_dir))}\ntruncate = true\n\n'
        f'[[models]]\nname = "ranker"\npath = {json.dumps(str(cross_dir))}\nkind = "reranker"\ntruncate = true\n'
    )
    settings = Settings(models_file=str(models), cache_prefix=f"rerank-{uuid.uuid4().hex[:8]}")
    assert preflight(settings) is None
    with ThreadedGateway(create_app(settings, encoders=[minilm_encoder, reranker])) as gateway:
        assert _post(gateway, "/v1/embeddings", {"input": "x"}).json()["model"] == "minilm"
        assert _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()["model"] == "ranker"
        assert _post(gateway, "/rerank", {"query": QUERY, "texts": DOCUMENTS}).status_code == 200


def test_preflight_checks_the_kind_and_keeps_rerankers_in_one_process(cross_dir: Path, minilm_dir: Path) -> None:
    problem = preflight(Settings(model=str(cross_dir), model_kind="embedding"))
    assert problem is not None and "'reranker'" in problem and "\n" not in problem, problem
    problem = preflight(Settings(model=str(minilm_dir), model_kind="reranker"))
    assert problem is not None and "'embedding'" in problem, problem
    problem = preflight(Settings(model=str(cross_dir), workers=2))
    assert problem is not None and "one process" in problem, problem
    assert preflight(Settings(model=str(cross_dir))) is None


def _flagembedding_scores(encoder: Any, query: str, documents: list[str], weights: tuple[float, ...]) -> np.ndarray:
    """FlagEmbedding's BGEM3FlagModel.compute_score, written out: dense dot product, lexical matching
    over shared token ids, ColBERT's mean over query tokens of the best document token; combined
    as (w0 dense + w1 sparse + w2 colbert) / (w0 + w1 + w2)."""
    from encoder.kinds import OutputKind

    kinds = frozenset({OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT})
    outputs = encoder.encode_outputs(encoder.tokenize([query, *documents]), kinds)
    q = outputs[0]
    q_lexical = dict(zip(q.sparse.indices.tolist(), q.sparse.values.tolist(), strict=True))
    scores = []
    for p in outputs[1:]:
        p_lexical = dict(zip(p.sparse.indices.tolist(), p.sparse.values.tolist(), strict=True))
        dense = float(q.dense @ p.dense)
        sparse = sum(weight * p_lexical[token] for token, weight in q_lexical.items() if token in p_lexical)
        colbert = float(np.einsum("in,jn->ij", q.colbert, p.colbert).max(-1).sum() / q.colbert.shape[0])
        scores.append((weights[0] * dense + weights[1] * sparse + weights[2] * colbert) / sum(weights))
    return np.array(scores)


def test_bge_m3_reranks_with_its_own_cached_outputs(serve: Any, tiny_bge_m3_dir: Path) -> None:
    from encoder import load_encoder

    m3 = load_encoder(str(tiny_bge_m3_dir))
    gateway = serve(encoder=m3, model_name="tiny-m3")
    for path in ("/v1/embeddings", "/v1/embeddings/sparse", "/v1/embeddings/multivector"):  # the corpus, embedded
        assert _post(gateway, path, {"input": DOCUMENTS}).status_code == 200
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    # a text is a hit when all three of its outputs are cached, as one pass gives all three of a miss
    assert answer.headers["x-cache-hits"] == str(len(DOCUMENTS)), "the documents' outputs come from the cache"
    assert answer.headers["x-cache-misses"] == "1"  # the query
    expected = _flagembedding_scores(m3, QUERY, DOCUMENTS, (0.4, 0.2, 0.4))
    results = answer.json()["results"]
    assert [row["index"] for row in results] == list(np.argsort(-expected, kind="stable"))
    assert all(abs(row["relevance_score"] - expected[row["index"]]) < 1e-3 for row in results)
    dense_only = serve(encoder=m3, model_name="tiny-m3", rerank_weights=(1.0, 0.0, 0.0))
    tei = _post(dense_only, "/rerank", {"query": QUERY, "texts": DOCUMENTS}).json()
    expected = _flagembedding_scores(m3, QUERY, DOCUMENTS, (1.0, 0.0, 0.0))
    assert all(abs(row["score"] - expected[row["index"]]) < 1e-3 for row in tei)


def test_cohere_rank_fields_rank_objects_by_the_fields_named(serve: Any, cross_encoder: Any) -> None:
    """Cohere v1's ``rank_fields``: one field ranks by its value, several by ``field: value`` lines in
    their order; a document without a named field, or an empty list, is a 400 naming rank_fields; v1
    returns an object document as it was sent."""
    gateway = serve()
    titles = ["vector caches", "lisbon weather", "cache misses"]
    documents = [{"title": t, "text": d, "id": i} for i, (t, d) in enumerate(zip(titles, DOCUMENTS[:3], strict=True))]
    by_title = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents, "rank_fields": ["title"]})
    assert by_title.status_code == 200, by_title.text
    expected = cross_encoder.predict([(QUERY, title) for title in titles])
    got = {row["index"]: row["relevance_score"] for row in by_title.json()["results"]}
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(titles))), (got, expected)
    body = {"query": QUERY, "documents": documents, "rank_fields": ["title", "text"], "return_documents": True}
    both = _post(gateway, "/v1/rerank", body)
    assert both.status_code == 200, both.text
    joined = [f"title: {t}\ntext: {d}" for t, d in zip(titles, DOCUMENTS[:3], strict=True)]
    expected = cross_encoder.predict([(QUERY, text) for text in joined])
    for row in both.json()["results"]:
        assert abs(row["relevance_score"] - float(expected[row["index"]])) < 1e-4
        assert row["document"] == documents[row["index"]]  # v1: the object as sent
    v2 = _post(gateway, "/v2/rerank", {**body, "rank_fields": ["title"]}).json()["results"]
    assert all(row["document"] == {"text": titles[row["index"]]} for row in v2)
    for bad in (["author"], [], ["title", "title"]):
        refused = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents, "rank_fields": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "rank_fields", refused.text
    untitled = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": [{"title": "x"}]})
    assert untitled.status_code == 400 and untitled.json()["error"]["param"] == "documents", untitled.text
