"""POST /v1/embeddings (OpenAI's), /v1/embeddings/sparse and /v1/embeddings/multivector (bge-m3's).

Each handler only decodes, checks the model, and hands the texts to the service with its output
kind; the kind's registry entry (:mod:`gateway.core.outputs`) builds the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from litestar import Request, Response, post
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody

from encoder.batch_queue import BACKGROUND_TENANT
from encoder.kinds import Outputs
from gateway.core.errors import (
    ClientDisconnectedError,
    EncoderFailedError,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
)
from gateway.core.inputs import normalise_input
from gateway.core.outputs import COLBERT, DENSE, SPARSE, Answer, OutputSpec, ResponseOptions
from gateway.core.schemas import (
    EmbeddingResponse,
    MultiVectorResponse,
    OutputsRequest,
    SparseResponse,
    decode_embedding_request,
    decode_outputs_request,
)
from gateway.core.service import EmbedResult
from gateway.http.auth import client_name, token_reservation
from gateway.http.middleware import ADMIT_AFTER_BODY, admit, outcome
from gateway.http.routes.common import ERRORS, runtime_of
from gateway.http.runtime import Runtime, ServedModel

__all__ = [
    "BACKGROUND_LINE",
    "EMBEDDING_OPT",
    "accept_body",
    "answer_with",
    "compute",
    "create_embeddings",
    "create_multivector",
    "create_sparse",
    "documented_body",
]

T = TypeVar("T")
R = TypeVar("R")

# The scope state key that marks a batch's line run through a route in-process (no client, no socket).
BACKGROUND_LINE = "gateway.batch_line"


def documented_body(schema: str) -> type[Operation]:
    """Bodies are decoded by our own strict msgspec decoders, so document them here."""

    @dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=Reference(f"#/components/schemas/{schema}"))},
                required=True,
            )

    return BodyOperation


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _disconnect_guard(
    request: Request[Any, Any, Any],
) -> Callable[[Awaitable[list[Outputs]]], Awaitable[list[Outputs]]]:
    """Wrap the wait for the encoder so it is cancelled (dropping its queued inputs) if the client leaves.

    Only waits on the encoder are guarded: a cache hit answers faster than a watcher task starts.
    """

    async def guarded(work: Awaitable[list[Outputs]]) -> list[Outputs]:
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            raise ClientDisconnectedError
        return task.result()

    return guarded


async def compute(
    request: Request[Any, Any, Any],
    model: ServedModel,
    texts: list[str],
    output: OutputSpec[T, R],
    *,
    untruncated: bool = False,
) -> EmbedResult[T]:
    """``output`` for ``texts`` through ``model``'s service, for the request's API key and client:
    its tokens reserved before any encoding, its queued work dropped if the client leaves, and the
    request's outcome (inputs, hits, misses, tokens) recorded for the headers, logs and key stats."""
    results = await compute_outputs(request, model, texts, [output], untruncated=untruncated)
    return cast(EmbedResult[T], results[0])


async def compute_outputs(
    request: Request[Any, Any, Any],
    model: ServedModel,
    texts: list[str],
    outputs: list[OutputSpec[Any, Any]],
    *,
    untruncated: bool = False,
) -> list[EmbedResult[Any]]:
    """Several outputs of ``texts`` at once, one pass for a text that misses any (see :func:`compute`)."""
    # The key's name is the unit the encoder queue is fair between (one tenant's bulk ingest does
    # not freeze another's queries); anonymous requests share one tenant and are fair per request.
    # A batch line (gateway.http.batch_lines) runs as the batch tenant, with no client to hang up.
    background = request.scope.get("state", {}).get(BACKGROUND_LINE, False)
    tenant = BACKGROUND_TENANT if background else client_name(request.scope) or ""
    # A key's tokens per minute is taken once the request's tokens are counted, before any encoding,
    # and stays taken if the client hangs up; not charged after the answer, when it is too late.
    reservation = token_reservation(request.scope)
    try:
        results = await model.service.embed_outputs(
            texts,
            outputs,
            guard=None if background else _disconnect_guard(request),
            tenant=tenant,
            reserve=reservation.cover if reservation is not None else None,
            # more than the key's whole limit is refused before the rest of it is tokenised
            max_tokens=reservation.key.tokens_per_minute if reservation is not None else None,
            untruncated=untruncated,
        )
    except (OverloadedError, EncoderFailedError):
        if reservation is not None:
            reservation.release()  # the server failed it, not the client: nothing to pay for
        raise
    first = results[0]
    done = outcome(request.scope)
    done.inputs, done.hits, done.misses, done.tokens = len(texts), first.hits, first.misses, sum(first.tokens)
    return results


async def answer_with(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    data: _Body,
    output: OutputSpec[T, R],
    options: ResponseOptions,
    *,
    untruncated: bool = False,
) -> Response[R]:
    """Normalise ``input``, put the asked prompt in front of each text, compute ``output`` with the
    model the body names, and build the whole answer. ``untruncated``: refuse inputs over the
    model's limit even where the server truncates (TEI's ``truncate: false``)."""
    model = runtime.model_for(data.model)
    prompt_name = model.prompts.name_for(data.prompt_name, data.input_type)  # a bad name: 400 before any work
    texts = await normalise_input(data.input, max_inputs=model.settings.max_inputs, decoder=runtime.token_decoder)
    texts = model.prompts.prepend(texts, prompt_name)
    result = await compute(request, model, texts, output, untruncated=untruncated)
    content = output.respond(Answer(result.values, result.tokens, model.settings.served_model), options)
    return runtime.answers.prepare(request.scope, content)


class _Named(Protocol):
    """What every model route's body has: the model it names (None: the default)."""

    @property
    def model(self) -> str | None: ...


class _Body(_Named, Protocol):
    """What every embeddings route's body has (OpenAI's, and TEI's through properties)."""

    @property
    def input(self) -> str | list[str | int | list[int]]: ...

    @property
    def prompt_name(self) -> str | None: ...

    @property
    def input_type(self) -> str | None: ...


B = TypeVar("B", bound=_Named)


async def accept_body(
    request: Request[Any, Any, Any], decode: Callable[[bytes], B], *, reranker: bool = False
) -> tuple[Runtime, ServedModel, B]:
    """What every model route does first: refuse while draining, decode strictly, find the model
    (by default the first of the route's kind: an embedding model, or a ``reranker``)."""
    runtime = runtime_of(request)
    if runtime.draining:
        raise ShuttingDownError("the server is shutting down; retry on another replica", retry_after=1)
    body = await request.body()
    admit(request.scope)  # counted in flight from here: an upload still arriving holds no slot
    data = decode(body)
    return runtime, runtime.model_for(data.model, reranker=reranker), data


EMBEDDING_OPT = {"embedding": True, ADMIT_AFTER_BODY: True}


def _refuse_dimensions(data: OutputsRequest, output: str) -> None:
    """An option an output cannot honour is an error: a client must never get a full-width answer
    it believes was shortened."""
    if data.dimensions is not None:
        raise InvalidInputError(
            f"'dimensions' applies to dense embeddings (/v1/embeddings), not to {output} outputs", param="dimensions"
        )


@post(
    ["/v1/embeddings", "/embeddings"],
    status_code=200,
    summary="Create embeddings",
    description="OpenAI-compatible. Vectors are served from the cache when the same text was seen before.",
    responses=ERRORS,
    tags=["embeddings"],
    operation_class=documented_body("EmbeddingRequest"),
    opt=EMBEDDING_OPT,
)
async def create_embeddings(request: Request[Any, Any, Any]) -> Response[EmbeddingResponse]:
    runtime, model, data = await accept_body(request, decode_embedding_request)
    dim = model.encoder.dim
    if data.dimensions is not None and not 1 <= data.dimensions <= dim:
        raise InvalidInputError(f"'dimensions' must be between 1 and {dim} for this model", param="dimensions")
    options = ResponseOptions(encoding_format=data.encoding_format, dimensions=data.dimensions)
    return await answer_with(request, runtime, data, DENSE, options)


@post(
    "/v1/embeddings/sparse",
    status_code=200,
    summary="Sparse lexical weights (bge-m3)",
    description="Per input: token ids ascending and their weights, as Qdrant, Milvus and Pinecone take them.",
    responses=ERRORS,
    tags=["embeddings"],
    operation_class=documented_body("OutputsRequest"),
    opt=EMBEDDING_OPT,
)
async def create_sparse(request: Request[Any, Any, Any]) -> Response[SparseResponse]:
    runtime, model, data = await accept_body(request, decode_outputs_request)
    _refuse_dimensions(data, "sparse")
    if data.encoding_format != "float":
        raise InvalidInputError(
            "sparse answers are token ids and weights in JSON; 'encoding_format' must be 'float' here",
            param="encoding_format",
        )
    options = ResponseOptions(return_tokens=data.return_tokens, token_names=model.encoder.token_names)
    return await answer_with(request, runtime, data, SPARSE, options)


@post(
    "/v1/embeddings/multivector",
    status_code=200,
    summary="ColBERT multi-vectors (bge-m3)",
    description="Per input: one L2-normalised vector per token after CLS; base64 is little-endian float32, row-major.",
    responses=ERRORS,
    tags=["embeddings"],
    operation_class=documented_body("OutputsRequest"),
    opt=EMBEDDING_OPT,
)
async def create_multivector(request: Request[Any, Any, Any]) -> Response[MultiVectorResponse]:
    runtime, _, data = await accept_body(request, decode_outputs_request)
    _refuse_dimensions(data, "multivector")
    options = ResponseOptions(encoding_format=data.encoding_format)
    return await answer_with(request, runtime, data, COLBERT, options)
