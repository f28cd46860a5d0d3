"""Rerank: Jina's and Cohere v1's ``POST /v1/rerank``, Cohere's ``/v2/rerank`` and TEI's ``/rerank``.

Three thin adapters over one core (:func:`rank`): the body names a query, documents and a model (a
cross-encoder, :mod:`encoder.cross_encoder`); every (query, document) pair becomes one input of the
model's micro-batcher (token budget, length sort, fairness between keys, in-flight dedupe and
backpressure, as any embedding input) and its score is cached per (model, query, document), so the
same pair asked again costs no pass (``x-cache-hits`` says so). The cache holds the model's raw
logits: the answer applies the model's activation (sigmoid for one label, as ``CrossEncoder.predict``
does), or not for TEI's ``raw_scores``. Results come best first; ``top_n`` keeps the first n.

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

from encoder.cross_encoder import CrossEncoderModel, activate
from encoder.pairs import join_pair
from gateway.core.errors import InvalidInputError, OutputNotSupportedError
from gateway.core.outputs import SCORE
from gateway.core.schemas import decode_with
from gateway.http.errors import TEI_ERRORS
from gateway.http.routes.common import ERRORS
from gateway.http.routes.embeddings import EMBEDDING_OPT, accept_body, compute, documented_body
from gateway.http.runtime import Runtime, ServedModel

__all__ = ["RERANK_ROUTES", "TEI_RERANK", "body_schemas", "rank"]


class Document(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/rerank`` (Jina's and Cohere v1's) and ``/v2/rerank`` (Cohere v2's)."""

    query: str
    documents: list[str | Document]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False


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
    document: Document | None = None


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


def _reranker(model: ServedModel) -> CrossEncoderModel:
    encoder = model.encoder
    if not isinstance(encoder, CrossEncoderModel):
        raise OutputNotSupportedError(
            f"model {model.settings.served_model!r} is an embedding model, not a reranker (a cross-encoder)",
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
    order = sorted(range(len(documents)), key=lambda i: -logits[i])
    return Ranking(order=order[:top_n] if top_n else order, logits=logits, scores=scores, tokens=sum(result.tokens))


def _texts(documents: list[str | Document]) -> list[str]:
    return [item if isinstance(item, str) else item.text for item in documents]


def _answer(runtime: Runtime, request: Request[Any, Any, Any], content: Any) -> Response[Any]:
    return runtime.answers.prepare(request.scope, content)


async def _rerank(request: Request[Any, Any, Any], version: str) -> Response[Any]:
    runtime, model, data = await accept_body(request, decode_with(RerankRequest), reranker=True)
    texts = _texts(data.documents)
    ranking = await rank(request, model, data.query, texts, data.top_n)
    results = [
        RerankResult(index, ranking.scores[index], Document(texts[index]) if data.return_documents else None)
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


_DESCRIPTION = (
    "Scores each document against the query with a cross-encoder; results best first. "
    "Scores are cached per (model, query, document)."
)


@post(
    "/v1/rerank",
    status_code=200,
    summary="Rerank (Jina, Cohere v1)",
    description=_DESCRIPTION,
    responses=ERRORS,
    tags=["rerank"],
    operation_class=documented_body("RerankRequest"),
    opt=EMBEDDING_OPT,
)
async def rerank_v1(request: Request[Any, Any, Any]) -> Response[RerankResponse]:
    return await _rerank(request, "1")


@post(
    "/v2/rerank",
    status_code=200,
    summary="Rerank (Cohere v2)",
    description=_DESCRIPTION,
    responses=ERRORS,
    tags=["rerank"],
    operation_class=documented_body("RerankRequest"),
    opt=EMBEDDING_OPT,
)
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
