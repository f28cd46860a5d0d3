"""Thin HTTP handlers: parse, delegate to :class:`~gateway.service.EmbeddingService`, shape the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from litestar import MediaType, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody

from encoder.model import COLBERT, DENSE, SPARSE
from gateway.errors import (
    ClientDisconnectedError,
    ErrorEnvelope,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)
from gateway.inputs import normalise_input
from gateway.metrics import CONTENT_TYPE
from gateway.runtime import Runtime
from gateway.schemas import (
    EmbeddingData,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    MultiVectorData,
    MultiVectorResponse,
    OutputsRequest,
    RequestBodyError,
    SparseData,
    SparseResponse,
    SparseVector,
    Usage,
    decode_embedding_request,
    decode_outputs_request,
)
from gateway.service import EmbedResult

__all__ = ["ROUTES"]

_ERRORS = {
    status: ResponseSpec(ErrorEnvelope, description=description, generate_examples=False)
    for status, description in {
        400: "Invalid input (OpenAI error envelope)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        503: "Overloaded or not ready; honour Retry-After",
    }.items()
}


def _documented_body(schema: str) -> type[Operation]:
    """Bodies are decoded by our own strict msgspec decoders, so document them here."""

    @dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=Reference(f"#/components/schemas/{schema}"))},
                required=True,
            )

    return BodyOperation


T = TypeVar("T")
B = TypeVar("B")


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    # Read from app state directly: dependency injection costs more than the lookup on the hot path.
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _disconnect_guard(request: Request[Any, Any, Any]) -> Callable[[Awaitable[T]], Awaitable[T]]:
    """Wrap an await so that it is cancelled (dropping its queued inputs) if the client leaves.

    Only waits on the encoder are guarded: a cache hit answers faster than a watcher task starts.
    """

    async def guarded(work: Awaitable[T]) -> T:
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


def _check_model(runtime: Runtime, model: str | None) -> None:
    if model is not None and model not in runtime.settings.accepted_models:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist on this server; it serves '{runtime.settings.served_model}'.",
            param="model",
        )


def _shape(vectors: list[np.ndarray], dimensions: int | None, dim: int) -> list[np.ndarray]:
    """Truncate to ``dimensions`` and re-normalise, as OpenAI's text-embedding-3 models do."""
    if dimensions is None or dimensions == dim:
        return vectors
    cut = np.stack(vectors)[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return list((cut / np.where(norms > 0, norms, 1.0)).astype(np.float32))


@post(
    ["/v1/embeddings", "/embeddings"],
    status_code=200,
    summary="Create embeddings",
    description="OpenAI-compatible. Vectors are served from the cache when the same text was seen before.",
    responses=_ERRORS,
    tags=["embeddings"],
    operation_class=_documented_body("EmbeddingRequest"),
    opt={"auth": "api"},
)
async def create_embeddings(request: Request[Any, Any, Any]) -> EmbeddingResponse:
    runtime, data = await _accept(request, decode_embedding_request)
    dim = runtime.encoder.dim
    if data.dimensions is not None and not 1 <= data.dimensions <= dim:
        raise InvalidRequestError(f"'dimensions' must be between 1 and {dim} for this model", param="dimensions")
    result = await _run(request, runtime, data.input, DENSE)
    vectors = _shape(result.values, data.dimensions, dim)
    if data.encoding_format == "base64":
        # msgspec writes a memoryview as base64 while it encodes the JSON: no str per vector.
        encoded: list[Any] = [np.ascontiguousarray(row, dtype="<f4").data for row in vectors]
    else:
        encoded = [row.tolist() for row in vectors]
    usage = sum(result.tokens)
    return EmbeddingResponse(
        data=[EmbeddingData(embedding=vector, index=index) for index, vector in enumerate(encoded)],
        model=runtime.settings.served_model,
        usage=Usage(prompt_tokens=usage, total_tokens=usage),
    )


async def _accept(request: Request[Any, Any, Any], decode: Callable[[bytes], B]) -> tuple[Runtime, B]:
    """What every embeddings route does first: refuse while draining, decode strictly, check the model."""
    runtime = _runtime(request)
    if runtime.draining:
        raise OverloadedError("the server is shutting down", retry_after=1, code="shutting_down")
    try:
        data = decode(await request.body())
    except RequestBodyError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    _check_model(runtime, getattr(data, "model", None))
    return runtime, data


async def _run(request: Request[Any, Any, Any], runtime: Runtime, value: Any, kind: str) -> EmbedResult:
    """Normalise ``input``, compute ``kind`` through the service, and count it for logs and stats."""
    texts = await normalise_input(value, max_inputs=runtime.settings.max_inputs, decoder=runtime.token_decoder)
    result = await runtime.service.embed(texts, kind=kind, guard=_disconnect_guard(request))
    request.state.cache_hits, request.state.cache_misses = result.hits, result.misses
    request.state.inputs, request.state.tokens = len(texts), sum(result.tokens)
    runtime.stats.inputs += len(texts)
    runtime.stats.tokens += sum(result.tokens)
    return result


async def _outputs(request: Request[Any, Any, Any], kind: str) -> tuple[Runtime, OutputsRequest, EmbedResult]:
    """The shared path of /v1/embeddings/sparse and /v1/embeddings/multivector."""
    runtime, data = await _accept(request, decode_outputs_request)
    return runtime, data, await _run(request, runtime, data.input, kind)


def _usage(result: EmbedResult) -> Usage:
    total = sum(result.tokens)
    return Usage(prompt_tokens=total, total_tokens=total)


@post(
    "/v1/embeddings/sparse",
    status_code=200,
    summary="Sparse lexical weights (bge-m3)",
    description="Per input: token ids ascending and their weights, as Qdrant, Milvus and Pinecone take them.",
    responses=_ERRORS,
    tags=["embeddings"],
    operation_class=_documented_body("OutputsRequest"),
    opt={"auth": "api"},
)
async def create_sparse(request: Request[Any, Any, Any]) -> SparseResponse:
    runtime, data, result = await _outputs(request, SPARSE)
    tokenizer = runtime.encoder.tokenizer
    items = []
    for index, (ids, weights) in enumerate(result.values):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist()) if data.return_tokens else None
        items.append(SparseData(SparseVector(ids.tolist(), weights.tolist(), tokens), index))
    return SparseResponse(data=items, model=runtime.settings.served_model, usage=_usage(result))


@post(
    "/v1/embeddings/multivector",
    status_code=200,
    summary="ColBERT multi-vectors (bge-m3)",
    description="Per input: one L2-normalised vector per token after CLS; base64 is little-endian float32, row-major.",
    responses=_ERRORS,
    tags=["embeddings"],
    operation_class=_documented_body("OutputsRequest"),
    opt={"auth": "api"},
)
async def create_multivector(request: Request[Any, Any, Any]) -> MultiVectorResponse:
    runtime, data, result = await _outputs(request, COLBERT)
    items = []
    for index, matrix in enumerate(result.values):
        embedding: Any = (
            np.ascontiguousarray(matrix, dtype="<f4").data if data.encoding_format == "base64" else matrix.tolist()
        )
        items.append(MultiVectorData(embedding=embedding, shape=list(matrix.shape), index=index))
    return MultiVectorResponse(data=items, model=runtime.settings.served_model, usage=_usage(result))


def _model_cards(runtime: Runtime) -> list[ModelCard]:
    created = int(runtime.stats.started_at)
    names = dict.fromkeys([runtime.settings.served_model, *runtime.settings.model_aliases])
    return [ModelCard(id=name, created=created) for name in names]


@get("/v1/models", summary="List models", tags=["models"], responses={401: _ERRORS[401]}, opt={"auth": "api"})
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    runtime = _runtime(request)
    return ModelList(data=_model_cards(runtime))


@get("/v1/models/{model_id:str}", summary="Retrieve a model", tags=["models"], responses=_ERRORS, opt={"auth": "api"})
async def retrieve_model(model_id: str, request: Request[Any, Any, Any]) -> ModelCard:
    runtime = _runtime(request)
    _check_model(runtime, model_id)
    return ModelCard(id=model_id, created=int(runtime.stats.started_at))


@get("/health", summary="Liveness and readiness", tags=["operations"])
async def health(request: Request[Any, Any, Any]) -> dict[str, Any]:
    runtime = _runtime(request)
    cache = runtime.cache
    cache_status = "off" if cache is None else "ok" if await cache.ping() else "unreachable"
    return {
        "status": "degraded" if cache_status == "unreachable" else "ok",
        "model": runtime.settings.served_model,
        "device": runtime.encoder.device,
        "cache": {"backend": cache.backend if cache else "off", "status": cache_status},
    }


@get(
    "/stats", summary="Counters for dashboards", tags=["operations"], responses={401: _ERRORS[401]}, opt={"auth": "ops"}
)
async def stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    runtime = _runtime(request)
    import time

    import torch

    s, batches = runtime.stats, runtime.batcher.stats
    encoder = runtime.encoder
    body: dict[str, Any] = {
        "model": runtime.settings.served_model,
        "fingerprint": encoder.fingerprint,
        "uptime_seconds": round(time.time() - s.started_at, 3),
        "requests": {"total": s.requests, "errors": s.request_errors},
        "inputs": s.inputs,
        "tokens": s.tokens,
        "cache": {
            "backend": runtime.cache.backend if runtime.cache else "off",
            "hits": s.cache_hits,
            "misses": s.cache_misses,
            "hit_rate": round(s.hit_rate, 6),
            "errors": s.cache_errors,
            "writes": s.cache_writes,
            "circuit": getattr(runtime.cache, "state", "closed"),
            "circuit_opened": getattr(runtime.cache, "opened", 0),
        },
        "encoder": {
            "device": encoder.device,
            "dtype": encoder.dtype,
            "threads": encoder.threads,
            "batches": batches.batches,
            "inputs": batches.inputs,
            "avg_batch_size": round(batches.inputs / batches.batches, 3) if batches.batches else 0.0,
            "forward_seconds": round(batches.seconds, 3),
            "avg_batch_tokens": round(batches.padded_tokens / batches.batches, 1) if batches.batches else 0.0,
            "padding_ratio": round(1 - batches.tokens / batches.padded_tokens, 4) if batches.padded_tokens else 0.0,
            "queue_tokens": batches.queue_tokens,
            "deduplicated": batches.deduplicated,
            "dropped": batches.dropped,
            "rejected": batches.rejected,
            "oom_splits": batches.oom_splits,
        },
        "latency_ms": s.latency_ms(),
        "internals": {  # for leak hunting: all three return to their idle values between bursts
            "asyncio_tasks": len(asyncio.all_tasks()),
            "pending_cache_writes": runtime.service.pending_writes,
            "inputs_in_flight": runtime.batcher.in_flight,
        },
    }
    if encoder.torch_device.type == "cuda":
        device = encoder.torch_device
        body["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "memory_reserved_bytes": torch.cuda.memory_reserved(device),
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "memory_total_bytes": torch.cuda.get_device_properties(device).total_memory,
        }
    return body


@get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["operations"],
    responses={401: _ERRORS[401]},
    opt={"auth": "ops"},
    media_type=CONTENT_TYPE,
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(_runtime(request).metrics.render(), media_type=CONTENT_TYPE)


@cache
def _dashboard_html() -> bytes:
    return (Path(__file__).parent / "static" / "dashboard.html").read_bytes()


@get(
    "/dashboard",
    summary="A self-contained live dashboard (polls /stats)",
    tags=["operations"],
    responses={401: _ERRORS[401]},
    opt={"auth": "ops"},
    media_type=MediaType.HTML,
)
async def dashboard() -> Response[bytes]:
    return Response(_dashboard_html(), media_type=MediaType.HTML)


ROUTES = [
    create_embeddings,
    create_sparse,
    create_multivector,
    list_models,
    retrieve_model,
    health,
    stats,
    metrics,
    dashboard,
]
