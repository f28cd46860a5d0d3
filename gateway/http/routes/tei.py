"""Hugging Face TEI's routes, as a thin adapter over the same core as OpenAI's.

TEI's clients (huggingface_hub's ``InferenceClient.feature_extraction``, LangChain's
``HuggingFaceEndpointEmbeddings``, LlamaIndex's ``TextEmbeddingsInference``, Haystack's HF API
embedders) speak these shapes (TEI's docs/openapi.json): ``POST /embed`` (``/`` dispatches to it,
as TEI does for an embedding model), ``/embed_sparse``, ``/embed_all``, ``/tokenize``, ``/decode``
and ``GET /info``. The request goes through the same admission, auth, limits, prompts, cache and
batcher as ``/v1/embeddings`` (:func:`~gateway.http.routes.embeddings.answer_with`); only the body
and answer shapes differ, and errors take TEI's ``{"error", "error_type"}`` with its statuses (413
and 422 for bad input, 424 for a failed computation, 429 for overload, with Retry-After).

Where we differ from TEI, on purpose: token-id inputs are refused (TEI embeds the model's own ids;
the OpenAI route's ids are cl100k's, and mixing the two would be a trap); ``normalize: false``
returns what the model gives (a model that normalises, like bge-m3, stays normalised: the cache
holds one vector per text); ``truncate`` follows the server's ``EMBED_TRUNCATE`` (a request cannot
turn truncation on per call, since the cache namespace records it), but ``truncate: false`` on a
truncating server is honoured: an input over the limit is a 413, never a prefix's vector;
``/embed_all`` returns bge-m3's ColBERT token vectors, the model's own token-level output, not the
raw last hidden state.

The routes are split by what they do: embeddings and ``/info`` here (with the router that serves
them all), ``/tokenize`` and ``/decode`` in :mod:`~gateway.http.routes.tei_tokens`, and what every
TEI route shares (its OpenAPI entry, TEI's error answers) in :mod:`~gateway.http.routes.tei_common`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Request, Response, Router, get
from litestar.exceptions import HTTPException

from encoder.cross_encoder import CrossEncoderModel
from encoder.kinds import SparseWeights
from encoder.model_files import read_model_spec
from encoder.packing import default_max_batch_tokens
from gateway.core.errors import (
    GatewayError,
    InvalidInputError,
)
from gateway.core.outputs import (
    COLBERT,
    DENSE,
    SPARSE,
    Answer,
    ResponseOptions,
    float_json,
    normalised,
    shorten,
)
from gateway.core.schemas import decode_with
from gateway.http.errors import TEI_ERRORS, tei_error
from gateway.http.routes.common import runtime_of
from gateway.http.routes.embeddings import accept_body, answer_with
from gateway.http.routes.rerank import TEI_RERANK
from gateway.http.routes.tei_common import TEI_EMBEDDING_OPT, tei_post
from gateway.http.routes.tei_tokens import TeiDecode, TeiTokenize, tei_decode, tei_tokenize
from gateway.http.runtime import ServedModel

__all__ = ["TEI_ROUTER", "TEI_ROUTES", "body_schemas"]

TeiInput = str | list[str | int | list[int]]  # TEI also takes token ids; refused here (see above)


class TeiEmbed(msgspec.Struct, kw_only=True):
    """``POST /embed`` (TEI's EmbedRequest; ``model`` and ``input_type`` are ours)."""

    inputs: TeiInput
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    prompt_name: str | None = None
    input_type: str | None = None
    dimensions: int | None = None
    model: str | None = None

    @property
    def input(self) -> str | list[str | int | list[int]]:
        return _texts(self.inputs, self.truncation_direction)


class TeiEmbedOther(msgspec.Struct, kw_only=True):
    """``POST /embed_sparse`` and ``/embed_all``."""

    inputs: TeiInput
    truncate: bool | None = None
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    prompt_name: str | None = None
    input_type: str | None = None
    model: str | None = None

    @property
    def input(self) -> str | list[str | int | list[int]]:
        return _texts(self.inputs, self.truncation_direction)


class SparseValue(msgspec.Struct):
    index: int
    value: float


class EmbeddingModel(msgspec.Struct):
    pooling: str


class ClassifierModel(msgspec.Struct):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(msgspec.Struct, omit_defaults=True):
    """TEI's ``oneOf``: an embedding model's pooling, or a reranker's labels."""

    embedding: EmbeddingModel | None = None
    reranker: ClassifierModel | None = None


class Info(msgspec.Struct):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str


def _texts(inputs: TeiInput, direction: str) -> str | list[str | int | list[int]]:
    if direction.lower() != "right":
        raise InvalidInputError("only truncation_direction 'right' is served here", param="truncation_direction")
    items = inputs if isinstance(inputs, list) else [inputs]
    if any(not isinstance(item, str) for item in items):
        raise InvalidInputError("send text: token-id inputs are not taken on the TEI routes", param="inputs")
    return inputs if isinstance(inputs, str) else [item for item in items if isinstance(item, str)]


# The same kinds, cache entries and batcher as OpenAI's routes; only the answer's shape is TEI's.
def _tei_dense(answer: Answer[np.ndarray], options: ResponseOptions) -> list[msgspec.Raw]:
    if options.normalize:
        vectors = normalised(shorten(answer.values, options.dimensions))
    else:  # TEI: the first ``dimensions`` values as the model gives them, not brought back to unit length
        vectors = [vector[: options.dimensions] for vector in answer.values]
    return [float_json(vector) for vector in vectors]


def _tei_sparse(answer: Answer[SparseWeights], _: ResponseOptions) -> list[list[SparseValue]]:
    return [
        [SparseValue(index, value) for index, value in zip(w.indices.tolist(), w.values.tolist(), strict=True)]
        for w in answer.values
    ]


def _tei_all(answer: Answer[np.ndarray], _: ResponseOptions) -> list[msgspec.Raw]:
    return [float_json(matrix) for matrix in answer.values]


TEI_DENSE = DENSE.answered_as(_tei_dense)
TEI_SPARSE = SPARSE.answered_as(_tei_sparse)
TEI_ALL = COLBERT.answered_as(_tei_all)


def body_schemas() -> dict[str, Any]:
    """JSON Schemas of the TEI bodies (decoded by our own strict decoders), for the OpenAPI components."""
    (_, components) = msgspec.json.schema_components(
        [TeiEmbed, TeiEmbedOther, TeiTokenize, TeiDecode], ref_template="#/components/schemas/{name}"
    )
    return components


@tei_post(["/embed", "/"], "TEI: embeddings", "TeiEmbed", TEI_EMBEDDING_OPT)
async def tei_embed(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime, model, data = await accept_body(request, decode_with(TeiEmbed))
    dim = model.encoder.dim
    if data.dimensions is not None and not 1 <= data.dimensions <= dim:
        raise InvalidInputError(f"'dimensions' must be between 1 and {dim} for this model", param="dimensions")
    options = ResponseOptions(dimensions=data.dimensions, normalize=data.normalize)
    return await answer_with(request, runtime, data, TEI_DENSE, options, untruncated=data.truncate is False)


@tei_post("/embed_sparse", "TEI: sparse weights (bge-m3)", "TeiEmbedOther", TEI_EMBEDDING_OPT)
async def tei_embed_sparse(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime, _, data = await accept_body(request, decode_with(TeiEmbedOther))
    return await answer_with(request, runtime, data, TEI_SPARSE, ResponseOptions(), untruncated=data.truncate is False)


@tei_post("/embed_all", "TEI: token vectors (bge-m3's ColBERT)", "TeiEmbedOther", TEI_EMBEDDING_OPT)
async def tei_embed_all(request: Request[Any, Any, Any]) -> Response[Any]:
    runtime, _, data = await accept_body(request, decode_with(TeiEmbedOther))
    return await answer_with(request, runtime, data, TEI_ALL, ResponseOptions(), untruncated=data.truncate is False)


async def _model_type(served: ServedModel) -> ModelType:
    encoder = served.encoder
    if isinstance(encoder, CrossEncoderModel):
        labels = {str(index): label for index, label in encoder.id2label.items()}
        return ModelType(reranker=ClassifierModel(labels, {label: int(index) for index, label in labels.items()}))
    pooling = await asyncio.to_thread(lambda: read_model_spec(encoder.path).pooling)
    return ModelType(embedding=EmbeddingModel(pooling={"lasttoken": "last_token"}.get(pooling, pooling)))  # TEI's name


@get("/info", summary="TEI: the served model", tags=["tei"], opt={TEI_ERRORS: True})
async def tei_info(request: Request[Any, Any, Any], model: str | None = None) -> Info:
    """The default model's, or with ``?model=`` another served one's (ours: TEI serves one)."""
    from importlib import metadata

    served = runtime_of(request).model_for(model)
    settings, encoder = served.settings, served.encoder
    return Info(
        model_id=settings.served_model,
        model_sha=settings.revision or None,
        model_dtype=encoder.dtype,
        model_type=await _model_type(served),
        max_concurrent_requests=settings.max_connections,
        max_input_length=encoder.max_tokens,
        max_batch_tokens=settings.max_batch_tokens or default_max_batch_tokens(encoder.torch_device.type),
        max_batch_requests=settings.max_batch_size,
        max_client_batch_size=settings.max_inputs,
        auto_truncate=settings.truncate,
        tokenization_workers=1,
        version=metadata.version("embedding-gateway"),
    )


TEI_ROUTES = [tei_embed, tei_embed_sparse, tei_embed_all]
TEI_OTHER_ROUTES = [tei_tokenize, tei_decode, tei_info, TEI_RERANK]
TEI_ROUTER = Router(
    "/",
    route_handlers=[*TEI_ROUTES, *TEI_OTHER_ROUTES],
    exception_handlers={GatewayError: tei_error, HTTPException: tei_error},
)
