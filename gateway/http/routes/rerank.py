"""Rerank: Jina's and Cohere v1's ``POST /v1/rerank``, Cohere's ``/v2/rerank`` and TEI's ``/rerank``.

Three thin adapters over one core (:func:`rank`): the body names a query, documents and a model (a
cross-encoder, :mod:`encoder.cross_encoder`); every (query, document) pair becomes one input of the
model's micro-batcher (token budget, length sort, fairness between keys, in-flight dedupe and
backpressure, as any embedding input) and its score is cached per (model, query, document), so the
same pair asked again costs no pass (``x-cache-hits`` says so). The cache holds the model's raw
logits: the answer applies the model's activation (sigmoid for one label, as ``CrossEncoder.predict``
does), or not for TEI's ``raw_scores``. Results come best first; ``top_n`` keeps the first n.

bge-m3 (an embedding model with sparse and ColBERT heads) ranks too, with its own three outputs of
the query and of each document (:func:`_own_scores`): documents already embedded cost no pass.

A document over the model's limit is cut (``EMBED_TRUNCATE``: the document only, never the query)
or refused with a 400 naming it; an empty query or document, no documents or more than
``EMBED_MAX_INPUTS``, are 400s before any work (TEI's route: its 413 and 422).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Request, Response, post

from encoder import InputTooLongError
from encoder.cross_encoder import CrossEncoderModel, activate
from encoder.pairs import join_pair
from gateway.core.errors import InvalidInputError, OutputNotSupportedError
from gateway.core.outputs import COLBERT, DENSE, SCORE, SPARSE
from gateway.core.schemas import decode_with
from gateway.http.errors import TEI_ERRORS
from gateway.http.routes.common import ERRORS
from gateway.http.routes.embeddings import EMBEDDING_OPT, accept_body, compute, compute_outputs, documented_body
from gateway.http.runtime import Runtime, ServedModel

__all__ = ["RERANK_ROUTES", "TEI_RERANK", "body_schemas", "rank"]


class RerankRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/rerank`` (Jina's and Cohere v1's) and ``/v2/rerank`` (Cohere v2's).

    A document is a string or an object of string fields; an object is ranked by its ``text``, or
    by the fields ``rank_fields`` names (Cohere v1): one field's value as it is, several as
    ``field: value`` lines in that order."""

    query: str
    # An object's fields stay raw JSON: only the ranked ones are read (an odd number in a field
    # nobody ranks by, say 1e999, must not fail the request), and v1 returns the object as sent.
    documents: list[str | dict[str, msgspec.Raw]]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    rank_fields: list[str] | None = None


class TeiRerank(msgspec.Struct, kw_only=True):
    """TEI's ``POST /rerank`` (``model`` is ours: which served reranker)."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    model: str | None = None


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None  # as sent (raw JSON values): {"text": ...} for a string


class RerankUsage(msgspec.Struct):
    total_tokens: int


class ApiVersion(msgspec.Struct):
    version: str


class BilledUnits(msgspec.Struct):
    search_units: int


class RerankMeta(msgspec.Struct):
    api_version: ApiVersion
    billed_units: BilledUnits


class RerankResponse(msgspec.Struct):
    """Jina's fields (``model``, ``usage``) and Cohere's (``id``, ``meta``) in one answer."""

    id: str
    results: list[RerankResult]
    model: str
    usage: RerankUsage
    meta: RerankMeta


class TeiRank(msgspec.Struct, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


class Ranking(msgspec.Struct):
    """What the core gives each adapter: pairs' indices best first (cut to ``top_n``), every
    document's raw logit and activated score, and the request's tokens."""

    order: list[int]
    logits: list[float]
    scores: list[float]
    tokens: int


def _reranker(model: ServedModel) -> CrossEncoderModel | None:
    """The model's cross-encoder; None for a model that ranks with its own outputs (bge-m3)."""
    encoder = model.encoder
    if not isinstance(encoder, CrossEncoderModel):
        if model.ranks_with_own_outputs:
            return None
        raise OutputNotSupportedError(
            f"model {model.settings.served_model!r} is an embedding model, not a reranker (a cross-encoder), "
            "and has no sparse and ColBERT outputs to rank with",
            param="model",
        )
    if encoder.num_labels != 1:
        raise OutputNotSupportedError(
            f"model {model.settings.served_model!r} has {encoder.num_labels} labels; reranking needs one score a pair",
            param="model",
        )
    return encoder


async def rank(
    request: Request[Any, Any, Any],
    model: ServedModel,
    query: str,
    documents: list[str],
    top_n: int | None,
    *,
    field: str = "documents",
    untruncated: bool = False,
) -> Ranking:
    """Score every (``query``, document) pair with ``model`` and order them (see the module's docstring)."""
    encoder = _reranker(model)
    limit = model.settings.max_inputs
    if not query.strip():
        raise InvalidInputError("'query' is empty", param="query")
    if not documents or len(documents) > limit:
        raise InvalidInputError(
            f"'{field}' holds {len(documents)} documents; send 1 to {limit}", param=field, code="too_many_inputs"
        )
    empty = next((i for i, text in enumerate(documents) if not text.strip()), None)
    if empty is not None:
        raise InvalidInputError(f"{field}[{empty}] is empty", param=field)
    if top_n is not None and top_n < 1:
        raise InvalidInputError("'top_n' must be at least 1", param="top_n")
    await _check_query(model, query, paired=encoder is not None)
    if encoder is None:
        scores, tokens = await _own_scores(request, model, query, documents, field=field, untruncated=untruncated)
        logits = scores
    else:
        pairs = [join_pair(query, text) for text in documents]
        try:
            result = await compute(request, model, pairs, SCORE, untruncated=untruncated)
        except InvalidInputError as exc:
            if exc.code != "context_length_exceeded":
                raise
            # The service names the pair by its place: the document's, with the query in front of it.
            message = exc.message.replace("input[", f"the query with {field}[", 1)
            raise InvalidInputError(message, param=field, code=exc.code) from None
        logits = [float(values[0]) for values in result.values]
        scores = [float(score) for score in activate(encoder.activation, np.array(logits))]
        tokens = sum(result.tokens)
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    return Ranking(order=order[:top_n] if top_n else order, logits=logits, scores=scores, tokens=tokens)


async def _check_query(model: ServedModel, query: str, *, paired: bool) -> None:
    """A query over the model's limit is refused naming the query, truncating or not: truncation
    cuts documents, never the query. On a cross-encoder the query must leave a one-token document
    room beside it, with the pair's special tokens."""
    text = join_pair(query, ".") if paired else query
    try:
        await model.batcher.tokenize([text], truncate=False)
    except InputTooLongError as exc:
        raise InvalidInputError(
            f"the query{' (with the special tokens of a pair)' if paired else ''} {exc.describe()}; shorten it",
            param="query",
            code="context_length_exceeded",
        ) from None


async def _own_scores(
    request: Request[Any, Any, Any],
    model: ServedModel,
    query: str,
    documents: list[str],
    *,
    field: str,
    untruncated: bool,
) -> tuple[list[float], int]:
    """bge-m3 ranks with its own outputs, as FlagEmbedding's ``compute_score`` does: the query's
    and each document's dense, sparse and ColBERT outputs (from the cache where they are: a corpus
    embedded before costs no pass), combined with ``EMBED_RERANK_WEIGHTS`` (0.4, 0.2, 0.4):
    ``(w1 dense + w2 sparse + w3 colbert) / (w1 + w2 + w3)``."""
    texts = [query, *documents]
    try:
        # one pass for the three outputs of a text that misses any: FlagEmbedding's compute_score makes one
        dense, sparse, colbert = await compute_outputs(
            request, model, texts, [DENSE, SPARSE, COLBERT], untruncated=untruncated
        )
    except InvalidInputError as exc:
        if exc.code != "context_length_exceeded":
            raise
        message = exc.message.replace("input[0]", "the query", 1)
        for index in range(len(documents), 0, -1):
            message = message.replace(f"input[{index}]", f"{field}[{index - 1}]", 1)
        raise InvalidInputError(message, param=field, code=exc.code) from None
    weights = model.settings.rerank_weights
    # In float64: a float32 product's last bits depend on where the arrays sit in memory, and a
    # score must not change between the miss and its hit.
    query_dense, query_sparse = dense.values[0].astype(np.float64), sparse.values[0]
    query_colbert = colbert.values[0].astype(np.float64)
    scores = []
    for doc_dense, doc_sparse, doc_colbert in zip(dense.values[1:], sparse.values[1:], colbert.values[1:], strict=True):
        _, in_query, in_doc = np.intersect1d(query_sparse.indices, doc_sparse.indices, return_indices=True)
        lexical = query_sparse.values[in_query].astype(np.float64) @ doc_sparse.values[in_doc].astype(np.float64)
        parts = (
            float(query_dense @ doc_dense.astype(np.float64)),
            float(lexical),
            float((query_colbert @ doc_colbert.astype(np.float64).T).max(axis=1).sum() / max(1, len(query_colbert))),
        )
        scores.append(sum(w * part for w, part in zip(weights, parts, strict=True)) / sum(weights))
    return scores, sum(dense.tokens)


def _field(item: dict[str, msgspec.Raw], name: str) -> str | None:
    raw = item.get(name)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=str)
    except msgspec.ValidationError:
        return None


def _texts(documents: list[str | dict[str, msgspec.Raw]], rank_fields: list[str] | None) -> list[str]:
    """The text each document is ranked by (see :class:`RerankRequest`)."""
    if rank_fields is not None and (not rank_fields or len(set(rank_fields)) != len(rank_fields)):
        raise InvalidInputError("'rank_fields' must name one or more distinct fields", param="rank_fields")
    fields = rank_fields or ["text"]
    texts = []
    for index, document in enumerate(documents):
        if isinstance(document, str):  # a string document has only its text
            values = [document if name == "text" else None for name in fields]
        else:
            values = [_field(document, name) for name in fields]
        missing = next((name for name, value in zip(fields, values, strict=True) if value is None), None)
        if missing is not None:
            raise InvalidInputError(
                f"documents[{index}] has no string field {missing!r} to rank by",
                param="rank_fields" if rank_fields else "documents",
            )
        strings = [value for value in values if value is not None]
        if not any(value.strip() for value in strings):
            raise InvalidInputError(
                f"documents[{index}] is empty: every field it is ranked by is blank", param="documents"
            )
        joined = "\n".join(f"{name}: {value}" for name, value in zip(fields, strings, strict=True))
        texts.append(strings[0] if len(fields) == 1 else joined)
    return texts


def _answer(runtime: Runtime, request: Request[Any, Any, Any], content: Any) -> Response[Any]:
    return runtime.answers.prepare(request.scope, content)


async def _rerank(request: Request[Any, Any, Any], version: str) -> Response[Any]:
    runtime, model, data = await accept_body(request, decode_with(RerankRequest), reranker=True)
    texts = _texts(data.documents, data.rank_fields)
    ranking = await rank(request, model, data.query, texts, data.top_n)
    results = [
        RerankResult(index, ranking.scores[index], _returned(data, index, texts[index], version))
        for index in ranking.order
    ]
    answer = RerankResponse(
        id=str(uuid.uuid4()),
        results=results,
        model=model.settings.served_model,
        usage=RerankUsage(ranking.tokens),
        meta=RerankMeta(ApiVersion(version), BilledUnits(1)),
    )
    return _answer(runtime, request, answer)


def _returned(data: RerankRequest, index: int, text: str, version: str) -> dict[str, Any] | None:
    """The document in a result: Cohere v1 gives an object back as it was sent, v2 (and a string
    document) ``{"text": ...}`` with the text it was ranked by."""
    if not data.return_documents:
        return None
    item = data.documents[index]
    return item if isinstance(item, dict) and version == "1" else {"text": text}


_DESCRIPTION = (
    "Scores each document against the query with a cross-encoder; results best first. "
    "Scores are cached per (model, query, document)."
)


def _rerank_post(path: str, summary: str) -> post:
    """The decorator /v1/rerank and /v2/rerank share (one body, one answer, OpenAI's errors)."""
    return post(
        path,
        status_code=200,
        summary=summary,
        description=_DESCRIPTION,
        responses=ERRORS,
        tags=["rerank"],
        operation_class=documented_body("RerankRequest"),
        opt=EMBEDDING_OPT,
    )


@_rerank_post("/v1/rerank", "Rerank (Jina, Cohere v1)")
async def rerank_v1(request: Request[Any, Any, Any]) -> Response[RerankResponse]:
    return await _rerank(request, "1")


@_rerank_post("/v2/rerank", "Rerank (Cohere v2)")
async def rerank_v2(request: Request[Any, Any, Any]) -> Response[RerankResponse]:
    return await _rerank(request, "2")


@post(
    "/rerank",
    status_code=200,
    summary="TEI: rerank",
    tags=["tei"],
    operation_class=documented_body("TeiRerank"),
    opt={**EMBEDDING_OPT, TEI_ERRORS: True},
)
async def tei_rerank(request: Request[Any, Any, Any]) -> Response[list[TeiRank]]:
    runtime, model, data = await accept_body(request, decode_with(TeiRerank), reranker=True)
    if data.truncation_direction.lower() != "right":
        raise InvalidInputError("only truncation_direction 'right' is served here", param="truncation_direction")
    ranking = await rank(
        request, model, data.query, data.texts, None, field="texts", untruncated=data.truncate is False
    )
    values = ranking.logits if data.raw_scores else ranking.scores
    answer = [TeiRank(i, values[i], data.texts[i] if data.return_text else None) for i in ranking.order]
    return _answer(runtime, request, answer)


def body_schemas() -> dict[str, Any]:
    """JSON Schemas of the rerank bodies (decoded by our own strict decoders), for the OpenAPI components."""
    (_, components) = msgspec.json.schema_components(
        [RerankRequest, TeiRerank], ref_template="#/components/schemas/{name}"
    )
    return components


RERANK_ROUTES = [rerank_v1, rerank_v2]
TEI_RERANK = tei_rerank
