"""Attacks on the rerank fixes after the second review (eaf91b3, 71030a6, 8ed17e9).

sentence-transformers 6 CrossEncoders, ``EmbeddingService.embed_outputs`` (several outputs in one
lookup and one pass, now under every embedding route), bge-m3 ranking in one pass, the query check,
Cohere v1 ``rank_fields``, the rerank default model and TEI's ``/info`` of a reranker.

"FINDING" tests assert the behaviour the gateway should have (they fail while the defect is
there); "Held attack" tests pin behaviour that resisted the attack.
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
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60, **kwargs)


def _scores(answer: httpx.Response) -> dict[int, float]:
    return {row["index"]: row["relevance_score"] for row in answer.json()["results"]}


def _token_counts(encoder: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in encoder.tokenize(texts)]


def _service(encoder: Any, cache: Any, **overrides: Any) -> tuple[Any, Any, Any]:
    from encoder.batcher import MicroBatcher
    from gateway.core.service import EmbeddingService
    from gateway.core.telemetry import Telemetry

    telemetry = Telemetry()
    batcher = MicroBatcher(encoder, observer=telemetry)
    fields: dict[str, Any] = {"cache_prefix": f"unit3-{uuid.uuid4().hex[:8]}", "max_request_tokens": 100_000}
    fields.update(overrides)
    service = EmbeddingService(
        encoder=encoder, batcher=batcher, cache=cache, telemetry=telemetry, truncate=False, **fields
    )
    return service, batcher, telemetry


# --- embed_outputs: partial hits -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_partial_hit_is_not_counted_twice_against_the_request_limit(bge_m3: Any) -> None:
    """FINDING (medium). embed_outputs with dense cached but sparse/ColBERT not: the text is a miss
    and is tokenised again, but its cached dense token count is also passed as ``known`` to
    ``_tokenize_within_limit`` (``per_text`` is built from ``found[0]`` for every text whose first
    output hit, misses included), so the request's tokens are counted twice against
    ``max_request_tokens``. Expected: a request of T <= limit tokens is served; got: 400 "the request
    holds ... tokens" once T + (the partially cached texts' tokens) passes the limit. Fault:
    gateway/core/service.py embed_outputs, ``per_text`` must hold only texts that hit in every kind
    (build it from the rows not in ``missing``)."""
    from gateway.core.cache import MemoryBlobCache
    from gateway.core.errors import InvalidInputError
    from gateway.core.outputs import COLBERT, DENSE, SPARSE

    texts = [QUERY, *DOCUMENTS]
    total = sum(_token_counts(bge_m3, texts))
    cache = MemoryBlobCache(max_bytes=1 << 24, ttl_seconds=60)
    service, batcher, _ = _service(bge_m3, cache, max_request_tokens=total + 1)
    await batcher.start()
    try:
        await service.embed(DOCUMENTS, DENSE)  # dense of the documents cached, as /v1/embeddings leaves it
        await service.drain(5)
        try:
            dense, _, _ = await service.embed_outputs(texts, [DENSE, SPARSE, COLBERT])
        except InvalidInputError as exc:
            pytest.fail(f"a request of {total} tokens (limit {total + 1}) was refused: {exc.message}")
        assert sum(dense.tokens) == total and (dense.hits, dense.misses) == (0, len(texts))
    finally:
        await batcher.stop()


def test_a_keys_token_limit_does_not_count_a_partially_cached_rerank_twice(
    serve: Any, bge_m3: Any, tmp_path: Path
) -> None:
    """FINDING (medium). The same double count over HTTP, on a key's tokens_per_minute: a key whose
    limit covers a bge-m3 rerank (query + 3 documents) gets 400 request_too_large once another key
    has embedded the documents on /v1/embeddings (their dense vectors cached, sparse/ColBERT not).
    Expected 200 (the rerank is T tokens, under the key's limit); got a 400 naming the key's limit
    (gateway/core/service.py embed_outputs passes partial hits' counts as ``known`` to
    _tokenize_within_limit while also tokenising them as misses)."""
    total = sum(_token_counts(bge_m3, [QUERY, *DOCUMENTS]))
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "bulk"\nkey = "bulk-key-12345"\n\n'
        f'[[keys]]\nname = "ranker"\nkey = "ranker-key-12345"\ntokens_per_minute = {total + 1}\n'
    )
    gateway = serve(encoder=bge_m3, model_name="tiny-m3", api_keys_file=str(keys))
    ingest = _post(gateway, "/v1/embeddings", {"input": DOCUMENTS}, headers={"Authorization": "Bearer bulk-key-12345"})
    assert ingest.status_code == 200, ingest.text
    answer = _post(
        gateway,
        "/v1/rerank",
        {"query": QUERY, "documents": DOCUMENTS},
        headers={"Authorization": "Bearer ranker-key-12345"},
    )
    assert answer.status_code == 200, (total, answer.status_code, answer.text)
    assert answer.json()["usage"]["total_tokens"] == total


def test_a_partially_cached_bge_m3_rerank_scores_as_a_cold_one(serve: Any, bge_m3: Any) -> None:
    """Held attack. bge-m3 on two servers: one ranks cold, the other after /v1/embeddings cached
    the documents' dense vectors and /v1/embeddings/sparse the query's sparse weights (each text
    missing some kind). Same scores, usage and order; the x-cache headers count texts (4 misses,
    then 4 hits); afterwards every kind of every text is a hit on its own route, and /stats counts
    each distinct text once (one pass for its three kinds) and the billed tokens once."""
    cold = serve(encoder=bge_m3, model_name="tiny-m3")
    warm = serve(encoder=bge_m3, model_name="tiny-m3")
    body = {"query": QUERY, "documents": [*DOCUMENTS, DOCUMENTS[0]]}
    expected = _post(cold, "/v1/rerank", body)
    assert expected.status_code == 200, expected.text
    assert _post(warm, "/v1/embeddings", {"input": DOCUMENTS}).status_code == 200
    assert _post(warm, "/v1/embeddings/sparse", {"input": QUERY}).status_code == 200
    before = httpx.get(f"{warm.url}/stats", timeout=10).json()
    got = _post(warm, "/v1/rerank", body)
    assert got.status_code == 200, got.text
    assert (got.headers["x-cache-hits"], got.headers["x-cache-misses"]) == ("0", "4"), dict(got.headers)
    exp, res = _scores(expected), _scores(got)
    assert all(abs(exp[i] - res[i]) < 1e-6 for i in exp), (exp, res)
    assert got.json()["usage"] == expected.json()["usage"]
    after = httpx.get(f"{warm.url}/stats", timeout=10).json()
    distinct = len(set(body["documents"])) + 1  # the encoder computes each distinct text once
    assert after["encoder"]["inputs"] - before["encoder"]["inputs"] == distinct, after["encoder"]
    assert after["tokens"] - before["tokens"] == got.json()["usage"]["total_tokens"]
    again = _post(warm, "/v1/rerank", body)
    assert (again.headers["x-cache-hits"], again.headers["x-cache-misses"]) == ("4", "0")
    assert all(abs(_scores(again)[i] - res[i]) < 1e-6 for i in res)  # exact equality: the FINDING below
    for path in ("/v1/embeddings", "/v1/embeddings/sparse", "/v1/embeddings/multivector"):
        hit = _post(warm, path, {"input": [QUERY, *DOCUMENTS]})
        assert hit.status_code == 200 and hit.headers["x-cache-hits"] == "4", (path, dict(hit.headers))


def test_a_bge_m3_rerank_hit_scores_exactly_as_its_miss(serve: Any, bge_m3: Any) -> None:
    """FINDING (low; older than these commits, still there after the one-pass rewrite). The same
    bge-m3 rerank asked twice (a miss, then every kind of every text a hit) gives a different
    relevance_score for a document: 2.4e-08 apart on DOCUMENTS[2] (0.4 x one float32 ulp of its
    ColBERT part). The vectors are bit-identical (the service's hit equals its miss); the ColBERT
    ``query @ doc.T`` in float32 runs through BLAS kernels that depend on where the arrays lie in
    memory (a row of the batch's output vs a fresh array from the cache), so the same request's
    answer depends on the cache. Expected identical scores (clients diff answers, ties order by
    score); fault: gateway/http/routes/rerank.py _own_scores (compute the three parts in float64,
    e.g. ``query_colbert.astype(np.float64) @ doc_colbert.T.astype(np.float64)``, and the dots
    likewise)."""
    gateway = serve(encoder=bge_m3, model_name="tiny-m3")
    documents = [*DOCUMENTS, *(f"{doc} ({n} {'more words ' * n})" for n in range(1, 9) for doc in DOCUMENTS)]
    differing = {}
    for query in (QUERY, "what is the weather in Lisbon", "redis cache lookups round trip"):
        body = {"query": query, "documents": documents}
        miss = _post(gateway, "/v1/rerank", body)
        hit = _post(gateway, "/v1/rerank", body)
        assert miss.status_code == hit.status_code == 200, miss.text
        assert hit.headers["x-cache-misses"] == "0", dict(hit.headers)
        differing.update({(query, i): _scores(hit)[i] - v for i, v in _scores(miss).items() if _scores(hit)[i] != v})
    assert not differing, differing


@pytest.mark.anyio
async def test_cache_failing_mid_request_and_model_changing_mid_request(bge_m3: Any) -> None:
    """Held attack. embed_outputs with a cache that answers the lookup with half the kinds and then
    fails every write: every value equals the encoder's own, nothing is half-written. Then the
    model's fingerprint changes while the pass runs (an engine restarted with another model): 503
    retry (OverloadedError) and nothing written under either namespace."""
    from encoder.kinds import OutputKind
    from gateway.core.cache import CacheUnavailableError, MemoryBlobCache
    from gateway.core.errors import OverloadedError
    from gateway.core.outputs import COLBERT, DENSE, SPARSE

    class Flaky(MemoryBlobCache):
        failing = False

        async def put_blobs(self, items: Any) -> None:
            if self.failing:
                raise CacheUnavailableError("down")
            await super().put_blobs(items)

    class Swapping:
        """The encoder with a fingerprint a test can change."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.fingerprint = inner, inner.fingerprint

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    cache = Flaky(max_bytes=1 << 24, ttl_seconds=60)
    swapping = Swapping(bge_m3)
    service, batcher, telemetry = _service(bge_m3, cache)
    service.encoder = swapping
    await batcher.start()
    try:
        texts = [QUERY, *DOCUMENTS]
        kinds = frozenset({OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT})
        expected = bge_m3.encode_outputs(bge_m3.tokenize(texts), kinds)
        await service.embed(texts[:2], SPARSE)
        await service.drain(5)
        cache.failing = True
        dense, sparse, colbert = await service.embed_outputs(texts, [DENSE, SPARSE, COLBERT])
        await service.drain(5)
        for row, want in enumerate(expected):
            np.testing.assert_allclose(dense.values[row], want.dense, atol=1e-5)
            np.testing.assert_array_equal(sparse.values[row].indices, want.sparse.indices)
            np.testing.assert_allclose(colbert.values[row], want.colbert, atol=1e-5)
        assert service.writes_failing and len(cache) == 2
        cache.failing = False
        writes = telemetry.counters.cache_writes

        async def swap_during(pending: Any) -> Any:
            result = await pending
            swapping.fingerprint = "another-model"
            return result

        with pytest.raises(OverloadedError):
            await service.embed_outputs(["brand new text"], [DENSE, SPARSE], guard=swap_during)
        await service.drain(5)
        assert telemetry.counters.cache_writes == writes and len(cache) == 2
    finally:
        await batcher.stop()


def test_cache_off_bge_m3_rerank_and_embeddings(serve: Any, bge_m3: Any) -> None:
    """Held attack. EMBED_CACHE=false: bge-m3 ranks (every text a miss, each time, same scores) and
    /v1/embeddings with duplicates answers each input, misses counting distinct texts."""
    gateway = serve(encoder=bge_m3, model_name="tiny-m3", cache=False)
    body = {"query": QUERY, "documents": DOCUMENTS}
    first, second = _post(gateway, "/v1/rerank", body), _post(gateway, "/v1/rerank", body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-cache-misses"] == second.headers["x-cache-misses"] == "4"
    assert _scores(first) == _scores(second)
    embedded = _post(gateway, "/v1/embeddings", {"input": ["a", "b", "a"]})
    assert embedded.status_code == 200 and len(embedded.json()["data"]) == 3
    assert embedded.headers["x-cache-misses"] == "2" and embedded.headers["x-cache-hits"] == "0"


def test_plain_embeddings_through_embed_outputs_match_sentence_transformers(
    gateway_factory: Any, minilm_dir: Path
) -> None:
    """Held attack. /v1/embeddings (now embed() -> embed_outputs) with duplicates, an empty-ish
    text and a partial repeat: vectors equal SentenceTransformer.encode's, usage counts every input,
    x-cache-* count distinct texts, the second request's hits equal its misses."""
    from sentence_transformers import SentenceTransformer

    gateway = gateway_factory()
    texts = ["alpha beta", "gamma", "alpha beta", " ", "gamma delta " * 20]
    first = _post(gateway, "/v1/embeddings", {"input": texts})
    assert first.status_code == 200, first.text
    assert (first.headers["x-cache-hits"], first.headers["x-cache-misses"]) == ("0", "4")
    second = _post(gateway, "/v1/embeddings", {"input": [*texts, "new one"]})
    assert (second.headers["x-cache-hits"], second.headers["x-cache-misses"]) == ("4", "1")
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode([*texts, "new one"])
    for row, want in enumerate(expected):
        np.testing.assert_allclose(second.json()["data"][row]["embedding"], want, atol=1e-4)
        if row < len(texts):
            assert first.json()["data"][row]["embedding"] == second.json()["data"][row]["embedding"]
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]


# --- sentence-transformers 6 CrossEncoders -------------------------------------------------------


def test_a_sentence_transformers_6_cross_encoder_default_prompt_is_applied(
    serve: Any, cross_dir: Path, tmp_path: Path
) -> None:
    """FINDING (medium). sentence-transformers 6 CrossEncoders have prompts: one saved with
    ``prompts={"query": ...}, default_prompt_name="query"`` writes them to
    config_sentence_transformers.json, and ``CrossEncoder.predict`` prepends the default prompt to
    each pair's first text (modality.prepend_prompt_to_texts). The gateway now recognises such a
    folder as a reranker (eaf91b3) but reads only ``model_type`` and ``activation_fn`` from that
    file, so it scores the bare query: expected predict's scores (0.29/0.75 on this model), got the
    prompt-less ones (0.26/0.20), silently. Fault: encoder/cross_encoder.py load_cross_encoder
    ignores ``default_prompt_name``/``prompts``; prepend the default prompt to the query in the
    pair (and put it in the fingerprint), or refuse the folder."""
    from sentence_transformers import CrossEncoder

    from encoder import load_encoder

    saved = tmp_path / "prompted"
    prompt = "Represent this query for searching relevant passages: "
    CrossEncoder(str(cross_dir), device="cpu", prompts={"query": prompt}, default_prompt_name="query").save_pretrained(
        str(saved)
    )
    assert json.loads((saved / "config_sentence_transformers.json").read_text())["default_prompt_name"] == "query"
    encoder = load_encoder(str(saved))
    gateway = serve(encoder=encoder, model_name="prompted")
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    expected = CrossEncoder(str(saved), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS])
    got = _scores(answer)
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(DOCUMENTS))), (got, expected)


def test_a_sentence_transformers_6_cross_encoder_scores_as_predict(serve: Any, cross_dir: Path, tmp_path: Path) -> None:
    """Held attack. A CrossEncoder saved by sentence-transformers 6 with ``max_length=64`` (its
    tokenizer_config says 64) and an Identity activation: served as a reranker whose scores (long
    documents cut at 64 tokens) equal predict's; raw scores equal the activated ones; /info says
    reranker with the model's labels and 64 as its limit; /v1/embeddings refuses it."""
    import torch
    from sentence_transformers import CrossEncoder

    from encoder import load_encoder

    saved = tmp_path / "st6"
    CrossEncoder(str(cross_dir), device="cpu", max_length=64, activation_fn=torch.nn.Identity()).save_pretrained(
        str(saved)
    )
    encoder = load_encoder(str(saved), truncate=True)
    gateway = serve(encoder=encoder, model_name="st6", truncate=True)
    documents = [*DOCUMENTS, "caches keep vectors " * 60]
    answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents})
    assert answer.status_code == 200, answer.text
    expected = CrossEncoder(str(saved), device="cpu").predict([(QUERY, doc) for doc in documents])
    got = _scores(answer)
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(documents))), (got, expected)
    raw = _post(gateway, "/rerank", {"query": QUERY, "texts": documents, "raw_scores": True})
    assert all(abs(row["score"] - got[row["index"]]) < 1e-6 for row in raw.json())
    info = httpx.get(f"{gateway.url}/info", timeout=10).json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}, info
    assert info["max_input_length"] == 64, info
    refused = _post(gateway, "/v1/embeddings", {"input": "x"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "output_not_supported"


# --- rank_fields and document objects ------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        {"text": "a", "title": 7},
        {"text": "a", "title": None},
        {"text": "a", "title": ["x"]},
        {"text": "a", "title": {"nested": "x"}},
        {"text": "a", "title": True},
        {"text": "a"},
        "a plain string document",
    ],
)
def test_rank_fields_with_non_string_or_missing_values_are_400s(serve: Any, document: Any) -> None:
    """Held attack. rank_fields naming a field whose value is a number, null, list, object, bool, or
    missing (or a string document, which has only ``text``): 400 naming rank_fields, never a 500
    or a silently stringified value."""
    gateway = serve()
    body = {"query": QUERY, "documents": [{"text": "ok", "title": "ok"}, document], "rank_fields": ["text", "title"]}
    answer = _post(gateway, "/v1/rerank", body)
    assert answer.status_code == 400, (answer.status_code, answer.text)
    error = answer.json()["error"]
    assert error["param"] == "rank_fields" and "documents[1]" in error["message"], error


def test_rank_fields_documents_whose_ranked_fields_are_all_blank_are_refused(serve: Any) -> None:
    """FINDING (low). A document is refused as empty when the one field it is ranked by is blank
    ("documents[1] is empty"), but with two rank_fields both blank it is scored as the text
    "title: \\ntext: " (the labels _texts writes): expected a 400 naming documents[1] as with one
    field; got a 200 with a score for a document that has no content. Fault:
    gateway/http/routes/rerank.py _texts (check the values' emptiness before joining them)."""
    gateway = serve()
    one = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": [{"text": "ok"}, {"text": "  "}]})
    assert one.status_code == 400 and "documents[1]" in one.json()["error"]["message"], one.text
    documents = [{"text": "ok", "title": "ok"}, {"text": " ", "title": ""}]
    two = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents, "rank_fields": ["title", "text"]})
    assert two.status_code == 400, (two.status_code, two.text)


def test_rank_fields_scores_returned_documents_and_v1_v2_shapes(serve: Any, cross_encoder: Any) -> None:
    """Held attack. Several rank_fields score the "field: value" lines in the order named (as predict
    scores that text); a value holding newlines and unicode stays verbatim; v1 returns each object
    exactly as sent (nested values, big ints, unicode keys, fields not ranked), v2 ``{"text": ...}``
    with the ranked text; top_n cuts; a string document among objects is its ``text``."""
    gateway = serve()
    documents: list[Any] = [
        {"title": "Vector caches", "text": DOCUMENTS[0], "id": 2**70, "meta": {"tags": ["a", {"b": None}]}},
        {"title": "Wéather\nréport 😀", "text": DOCUMENTS[1], "ключ": "значение"},
    ]
    body = {"query": QUERY, "documents": documents, "rank_fields": ["title", "text"], "return_documents": True}
    v1 = _post(gateway, "/v1/rerank", body)
    assert v1.status_code == 200, v1.text
    ranked = [f"title: {doc['title']}\ntext: {doc['text']}" for doc in documents]
    expected = cross_encoder.predict([(QUERY, text) for text in ranked])
    got = _scores(v1)
    assert all(abs(got[i] - float(expected[i])) < 1e-4 for i in range(len(documents))), (got, expected)
    assert {row["index"]: row["document"] for row in v1.json()["results"]} == dict(enumerate(documents))
    v2 = _post(gateway, "/v2/rerank", {**body, "top_n": 1})
    assert v2.status_code == 200 and len(v2.json()["results"]) == 1, v2.text
    best = v2.json()["results"][0]
    assert best["document"] == {"text": ranked[best["index"]]}, best
    mixed = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": ["plain", {"text": "plain"}]})
    assert mixed.status_code == 200 and len(set(_scores(mixed).values())) == 1, mixed.text


def test_cohere_v1_sdk_rank_fields_objects_without_text(serve: Any, cross_encoder: Any) -> None:
    """Held attack. cohere.Client (v1 SDK) with object documents that have no ``text`` at all, ranked
    by rank_fields ["title", "body"] with return_documents: the SDK parses the answer, each result's
    document carries the fields sent, the scores are predict's on the "field: value" lines; the same
    objects without rank_fields are a 400 naming documents (no ``text`` to rank by)."""
    import cohere

    gateway = serve()
    documents = [{"title": f"t{i}", "body": doc} for i, doc in enumerate(DOCUMENTS)]
    client = cohere.Client(api_key="unused", base_url=gateway.url)
    answer = client.rerank(
        model="tiny-reranker",
        query=QUERY,
        documents=documents,
        rank_fields=["title", "body"],
        return_documents=True,
        top_n=3,
    )
    expected = cross_encoder.predict([(QUERY, f"title: {d['title']}\nbody: {d['body']}") for d in documents])
    for row in answer.results:
        assert abs(row.relevance_score - float(expected[row.index])) < 1e-4, (row, expected)
        assert row.document is not None and row.document.dict() == documents[row.index], row.document
    refused = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": documents})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents", refused.text


def test_a_document_object_with_an_out_of_range_number_is_still_ranked(serve: Any) -> None:
    """FINDING (low). Document objects now decode as dict[str, Any] (was a struct of ``text`` that
    skipped other fields), so any field msgspec cannot hold fails the whole body: {"text": "a",
    "score": 1e999} (Python's json, JavaScript's JSON.stringify of a big float input, reads it) was
    ranked before 8ed17e9 and is now a 400 "Number out of range - at `$.documents[0][...]`", for a
    field nobody ranks by. Expected 200 as before (or at least only when rank_fields/return_documents
    need the field). Fault: gateway/http/routes/rerank.py RerankRequest.documents (decode unranked
    fields as msgspec.Raw, or fall back to the text-only struct)."""
    gateway = serve()
    raw = b'{"query": "q", "documents": [{"text": "a cache", "score": 1e999}, "another"]}'
    answer = httpx.post(f"{gateway.url}/v1/rerank", content=raw, timeout=30)
    assert answer.status_code == 200, (answer.status_code, answer.text)


# --- defaults and /info --------------------------------------------------------------------------


def test_rerank_default_skips_a_classifier_that_cannot_rank(
    cross_dir: Path, minilm_dir: Path, tiny_bge_m3_dir: Path, bge_m3: Any, tmp_path: Path
) -> None:
    """FINDING (low). Models file [nli (a two-label sequence classifier), m3 (bge-m3)]: a rerank
    naming no model should go to the model able to rank (bge-m3; 8ed17e9 added that fallback).
    Got: 400 "model 'nli' has 2 labels; reranking needs one score a pair": model_for(None,
    reranker=True) takes the first model with a SCORE output (ServedModel.reranker), ranking or not.
    Fault: gateway/http/runtime.py model_for (prefer a one-label cross-encoder, then a model that
    ranks with its own outputs, before a classifier that will only refuse)."""
    from encoder import load_encoder
    from support.factories import build_cross_encoder

    nli_dir = build_cross_encoder(tmp_path / "nli", tokenizer_from=minilm_dir, num_labels=2)
    nli = load_encoder(str(nli_dir))
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "nli"\npath = {json.dumps(str(nli_dir))}\n\n'
        f'[[models]]\nname = "m3"\npath = {json.dumps(str(tiny_bge_m3_dir))}\n'
    )
    settings = Settings(models_file=str(models), cache_prefix=f"attack3-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoders=[nli, bge_m3])) as gateway:
        named = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "model": "m3"})
        assert named.status_code == 200, named.text
        answer = _post(gateway, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
        assert answer.status_code == 200, (answer.status_code, answer.text)
        assert answer.json()["model"] == "m3"


def test_tei_info_of_each_model_in_tei_shape(
    reranker: Any, cross_dir: Path, tiny_bge_m3_dir: Path, bge_m3: Any, tmp_path: Path
) -> None:
    """Held attack. /info?model= of a reranker says exactly {"reranker": {"id2label", "label2id"}}
    (TEI's ClassifierModel: string labels, integer ids, inverse of each other) and of bge-m3
    {"embedding": {"pooling": "cls"}}; the committed openapi documents ModelType's reranker as
    ClassifierModel."""
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "m3"\npath = {json.dumps(str(tiny_bge_m3_dir))}\n\n'
        f'[[models]]\nname = "ranker"\npath = {json.dumps(str(cross_dir))}\ntruncate = true\n'
    )
    settings = Settings(models_file=str(models), cache_prefix=f"attack3-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoders=[bge_m3, reranker])) as gateway:
        ranker = httpx.get(f"{gateway.url}/info", params={"model": "ranker"}, timeout=10).json()
        assert set(ranker["model_type"]) == {"reranker"}, ranker
        labels = ranker["model_type"]["reranker"]
        assert labels["id2label"] and all(isinstance(v, str) for v in labels["id2label"].values())
        assert {label: int(index) for index, label in labels["id2label"].items()} == labels["label2id"]
        m3 = httpx.get(f"{gateway.url}/info", params={"model": "m3"}, timeout=10).json()
        assert m3["model_type"] == {"embedding": {"pooling": "cls"}}, m3
        assert _post(gateway, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()["model"] == "ranker"
    spec = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
    model_type = spec["components"]["schemas"]["ModelType"]["properties"]
    assert {"$ref": "#/components/schemas/ClassifierModel"} in model_type["reranker"]["oneOf"]
