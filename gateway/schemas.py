"""Request and response bodies, field for field as OpenAI names them.

``input`` is typed as ``str | list[str | int | list[int]]`` because msgspec allows only one
array-like member in a union; :func:`gateway.inputs.normalise_input` then checks that a list is
all strings, all token ids or all token-id lists, as OpenAI's four shapes require.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ModelCard",
    "ModelList",
    "RequestBodyError",
    "Usage",
    "decode_embedding_request",
    "request_schema_components",
]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI's SDKs may add new ones."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(msgspec.Struct):
    embedding: list[float] | str
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: Usage
    object: Literal["list"] = "list"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "embedding-gateway"
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class RequestBodyError(ValueError):
    """The body is not valid JSON or does not fit the schema; ``param`` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


_request_decoder = msgspec.json.Decoder(EmbeddingRequest)  # strict: "64" is not an int


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    """Decode and type-check a request body in one pass (no intermediate dict)."""
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = None
        if " - at `$." in message:
            message, _, path = message.rpartition(" - at `$.")
            param = path.rstrip("`").split(".")[0].split("[")[0]
        elif "missing required field `" in message:
            param = message.split("`")[1]
        where = f" for '{param}'" if param else ""
        raise RequestBodyError(f"Invalid request body{where}: {message}", param) from None
    except msgspec.DecodeError as exc:
        raise RequestBodyError(f"The request body is not valid JSON: {exc}", None) from None


def request_schema_components() -> dict[str, Any]:
    """JSON Schemas of the request body, for the OpenAPI document's components."""
    (_, components) = msgspec.json.schema_components([EmbeddingRequest], ref_template="#/components/schemas/{name}")
    return components
