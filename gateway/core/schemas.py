"""Request and response bodies, field for field as OpenAI names them (msgspec only, no web framework).

``input`` is typed as ``str | list[str | int | list[int]]`` because msgspec allows only one
array-like member in a union; :func:`gateway.core.inputs.normalise_input` then checks that a list is
all strings, all token ids or all token-id lists, as OpenAI's four shapes require.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from gateway.core.errors import InvalidInputError

T = TypeVar("T")

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ModelCard",
    "ModelList",
    "MultiVectorResponse",
    "OutputsRequest",
    "SparseResponse",
    "Usage",
    "decode_embedding_request",
    "decode_outputs_request",
    "decode_with",
    "request_schema_components",
]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI's SDKs may add new ones."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    prompt_name: str | None = None  # one of the model's prompts (GET /v1/models lists them)
    input_type: str | None = None  # query / document (Cohere's and Voyage's names too): the prompt for it


class OutputsRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings/sparse and /v1/embeddings/multivector: bge-m3's other two outputs."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # multivector only (sparse: 400 unless float)
    return_tokens: bool = False  # sparse only: also the token strings
    user: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    # Declared so that a client sending it gets a 400, not a silently full-width answer: neither output
    # has a meaningful truncation (sparse weights are per token; ColBERT rows were not trained nested).
    dimensions: int | None = None


class SparseVector(msgspec.Struct, omit_defaults=True):
    """The shape Qdrant, Milvus and Pinecone take: token ids ascending, and their weights."""

    indices: list[int]
    values: list[float]
    tokens: list[str] | None = None


class SparseData(msgspec.Struct):
    embedding: SparseVector
    index: int
    object: Literal["sparse_embedding"] = "sparse_embedding"


class MultiVectorData(msgspec.Struct):
    # base64 (a memoryview is written as base64): little-endian float32, row-major, of ``shape``;
    # float: a pre-encoded JSON matrix (msgspec.Raw) in float32's shortest digits
    embedding: list[list[float]] | memoryview | msgspec.Raw
    shape: list[int]  # [tokens after CLS, dimension]
    index: int
    object: Literal["multivector_embedding"] = "multivector_embedding"


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(msgspec.Struct):
    # memoryview: msgspec writes it as base64 while encoding, no str per vector;
    # msgspec.Raw: a pre-encoded JSON array of float32's shortest round-trip digits (orjson's)
    embedding: list[float] | memoryview | msgspec.Raw
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: Usage
    object: Literal["list"] = "list"


class SparseResponse(msgspec.Struct):
    data: list[SparseData]
    model: str
    usage: Usage
    object: Literal["list"] = "list"


class MultiVectorResponse(msgspec.Struct):
    data: list[MultiVectorData]
    model: str
    usage: Usage
    object: Literal["list"] = "list"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "embedding-gateway"
    object: Literal["model"] = "model"
    # the model's instruction prompts by name (request field prompt_name), and the one applied by default
    prompts: dict[str, str] = msgspec.field(default_factory=dict)
    default_prompt_name: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


_request_decoder = msgspec.json.Decoder(EmbeddingRequest)  # strict: "64" is not an int
_outputs_decoder = msgspec.json.Decoder(OutputsRequest)


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    """Decode and type-check a request body in one pass (no intermediate dict); InvalidInputError if it is not one."""
    return _decode(_request_decoder, body)


def decode_outputs_request(body: bytes) -> OutputsRequest:
    return _decode(_outputs_decoder, body)


@functools.cache
def decode_with(kind: type[T]) -> Callable[[bytes], T]:
    """A strict decoder of ``kind`` (built once per type) raising InvalidInputError, as the others."""
    decoder = msgspec.json.Decoder(kind)
    return functools.partial(_decode, decoder)


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = None
        if " - at `$." in message:
            message, _, path = message.rpartition(" - at `$.")
            param = path.rstrip("`").split(".")[0].split("[")[0]
        elif "missing required field `" in message:
            param = message.split("`")[1]
        where = f" for '{param}'" if param else ""
        raise InvalidInputError(f"Invalid request body{where}: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec follows nesting even inside fields it ignores
        raise InvalidInputError("The request body is nested too deeply to be a valid request.") from None


class _Wire:
    """The answers' items as clients see them on the wire (the runtime types hold a memoryview or a
    pre-encoded ``msgspec.Raw``, which a schema generator cannot describe)."""

    class EmbeddingData(msgspec.Struct):
        embedding: Annotated[
            list[float] | str,
            msgspec.Meta(description="float: numbers (float32's shortest digits); base64: little-endian float32"),
        ]
        index: int
        object: Literal["embedding"] = "embedding"

    class MultiVectorData(msgspec.Struct):
        embedding: Annotated[
            list[list[float]] | str,
            msgspec.Meta(description="float: a matrix of ``shape``; base64: little-endian float32, row-major"),
        ]
        shape: list[int]
        index: int
        object: Literal["multivector_embedding"] = "multivector_embedding"


def request_schema_components() -> dict[str, Any]:
    """JSON Schemas of the bodies we decode and encode ourselves, for the OpenAPI document's components."""
    (_, components) = msgspec.json.schema_components(
        [EmbeddingRequest, OutputsRequest, _Wire.EmbeddingData, _Wire.MultiVectorData],
        ref_template="#/components/schemas/{name}",
    )
    return components
