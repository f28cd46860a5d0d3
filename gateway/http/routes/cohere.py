"""Cohere's ``POST /v2/embed``: a thin adapter over the same core as ``/v1/embeddings``.

The body names ``texts``, ``embedding_types`` and an ``input_type``; the texts go through the same
admission, API key limits, in-flight cap, prompts, cache and micro-batcher as OpenAI's route
(:func:`~gateway.http.routes.embeddings.compute`): the ``float`` answer is the cached dense vector,
and every other type is made from it (:mod:`gateway.core.quantize`), so asking for five types costs
one lookup and at most one pass. ``int8`` and ``uint8`` use ranges calibrated once per model (the
first calibration of its cache namespace, shared by every replica through the cache), shown by
``GET /v2/embed/ranges``; ``binary`` and ``ubinary`` need none. Errors are OpenAI's envelope (the
``cohere`` SDK raises its ``BadRequestError`` and friends with that body).

What is honoured, and what is refused with a 400 naming the field (never silently ignored):
- ``input_type``: the model's prompt for it, as ``/v1/embeddings``' ``input_type`` picks it (a
  model without a matching prompt gets none); ``image`` is refused, as are ``images`` and
  ``inputs``: this server embeds text.
- ``embedding_types``: float, int8, uint8, binary, ubinary and base64 (little-endian float32);
  absent: ``["float"]``.
- ``truncate``: ``NONE`` refuses a text over the model's limit; ``END`` (and absent, Cohere's
  default) cuts its end where the server truncates (``EMBED_TRUNCATE``), and where it does not, a
  text over the limit is refused saying so; ``START`` is served for texts within the limit, and a
  text over it is refused (the server only cuts the end, and a prefix's vector is not the suffix's).
- ``output_dimension``: the first n dimensions, re-normalised (``/v1/embeddings``' ``dimensions``);
  int8/uint8 then use ranges calibrated at that width.
- ``max_tokens``: accepted when it is at least the model's limit (then it changes nothing); a
  smaller one is refused, as cutting each text at another length is not served.
"""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import msgspec
import numpy as np
import orjson
from litestar import Request, Response, get, post
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema

from gateway.core.errors import InvalidInputError
from gateway.core.outputs import DENSE, float_json, shorten
from gateway.core.quantize import CALIBRATION_VERSION, Calibrated, Calibrator, quantize
from gateway.core.schemas import decode_with
from gateway.core.service import EmbeddingService
from gateway.http.auth import KEY_REQUESTS
from gateway.http.routes.common import ERRORS, runtime_of
from gateway.http.routes.embeddings import EMBEDDING_OPT, accept_body, compute
from gateway.http.routes.rerank import ApiVersion
from gateway.http.runtime import ServedModel

__all__ = ["COHERE_ROUTES", "CohereEmbedRequest", "CohereEmbedResponse", "embed_ranges", "embed_v2"]

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
_QUANTISED = ("int8", "uint8", "binary", "ubinary")


class CohereEmbedRequest(msgspec.Struct, kw_only=True):
    """``POST /v2/embed`` (Cohere's v2 EmbedRequest). Unknown fields are ignored."""

    texts: Annotated[list[str] | None, msgspec.Meta(description="The texts to embed (required here).")] = None
    model: str | None = None
    input_type: Annotated[
        str | None,
        msgspec.Meta(
            description="search_document, search_query, classification or clustering: the model's "
            "instruction prompt for it, where it has one (GET /v1/models lists them)"
        ),
    ] = None
    embedding_types: Annotated[
        list[EmbeddingType] | None, msgspec.Meta(description='The types to answer; absent: ["float"].')
    ] = None
    truncate: Annotated[
        Literal["NONE", "START", "END"] | None,
        msgspec.Meta(description="NONE: a text over the limit is a 400; END: cut where the server truncates"),
    ] = None
    max_tokens: Annotated[int | None, msgspec.Meta(description="At least the model's limit, or absent.")] = None
    output_dimension: Annotated[
        int | None, msgspec.Meta(description="The first n dimensions, re-normalised (1..the model's width).")
    ] = None
    # declared so that a client sending them gets a clear 400: this server embeds text only
    images: list[Any] | None = None
    inputs: list[Any] | None = None


class _Embeddings(msgspec.Struct, omit_defaults=True):
    """What is sent: each asked type as pre-encoded JSON (absent types left out)."""

    float_: msgspec.Raw | None = msgspec.field(default=None, name="float")
    int8: msgspec.Raw | None = None
    uint8: msgspec.Raw | None = None
    binary: msgspec.Raw | None = None
    ubinary: msgspec.Raw | None = None
    base64: list[memoryview] | None = None


class CohereEmbeddings(msgspec.Struct, omit_defaults=True):
    """One list per asked type, a row per text in order (only the asked types are present)."""

    float_: list[list[float]] | None = msgspec.field(default=None, name="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class EmbedBilledUnits(msgspec.Struct):
    input_tokens: int  # the texts' tokens (with their prompts), hits and misses alike


class EmbedMeta(msgspec.Struct):
    api_version: ApiVersion
    billed_units: EmbedBilledUnits


class _EmbedAnswer(msgspec.Struct):
    id: str
    embeddings: _Embeddings
    texts: list[str]
    meta: EmbedMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class CohereEmbedResponse(msgspec.Struct):
    """Cohere's EmbedByTypeResponse (what the route sends, as the OpenAPI document shows it)."""

    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: EmbedMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class Calibration(msgspec.Struct):
    version: int  # changes when the calibration texts or method change
    texts: int  # calibration vectors the ranges span (texts x prompts)
    prompts: list[str]  # the model's prompts calibrated beside the plain texts
    digest: str  # xxh3-64 of the ranges as little-endian float32: equal digests, comparable codes


class RangesResponse(msgspec.Struct):
    """``GET /v2/embed/ranges``: the int8/uint8 ranges of one model at one width."""

    model: str
    dimensions: int
    min: list[float]
    max: list[float]
    calibration: Calibration


def _inline(kind: type[msgspec.Struct]) -> type[Operation]:
    """An operation whose request body is ``kind``'s JSON Schema, written in place: our body is decoded
    by our own strict decoder, and its schema cannot join the document's components from here."""
    found = msgspec.json.schema(kind)
    schema = _spec(found["$defs"][kind.__name__])

    @dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)}, required=True
            )

    return BodyOperation


def _spec(node: dict[str, Any]) -> Schema:
    """A JSON Schema (msgspec's, without references) as Litestar's OpenAPI ``Schema``."""
    aliases = Schema.field_aliases()
    fields: dict[str, Any] = {}
    for key, value in node.items():
        name = aliases.get(key, key)
        if name == "properties":
            fields[name] = {prop: _spec(sub) for prop, sub in value.items()}
        elif name == "items":
            fields[name] = _spec(value)
        elif name in ("any_of", "one_of", "all_of"):
            fields[name] = [_spec(sub) for sub in value]
        elif name != "required" or value:  # an empty "required" is left out, as Litestar does
            fields[name] = value
    return Schema(**fields)


# One calibrator per model's service, kept as long as the service lives.
_calibrators: weakref.WeakKeyDictionary[EmbeddingService, Calibrator] = weakref.WeakKeyDictionary()


def calibrator_for(model: ServedModel) -> Calibrator:
    """``model``'s calibrator (made on first use; it calibrates on its first int8/uint8 request)."""
    found = _calibrators.get(model.service)
    if found is None:
        found = _calibrators[model.service] = Calibrator(model.service, model.prompts)
    return found


def _check(data: CohereEmbedRequest, model: ServedModel) -> tuple[list[str], list[EmbeddingType], int]:
    """The texts, the asked types and the answer's width, or a 400 naming what cannot be served."""
    if data.images or data.inputs:
        field = "images" if data.images else "inputs"
        raise InvalidInputError(f"'{field}' is not served: this server embeds text; send 'texts'", param=field)
    if data.input_type == "image":
        raise InvalidInputError("input_type 'image' is not served: this server embeds text", param="input_type")
    texts = data.texts
    limit = model.settings.max_inputs
    if not texts or len(texts) > limit:
        count = len(texts) if texts is not None else 0
        raise InvalidInputError(
            f"'texts' holds {count} texts; send 1 to {limit}", param="texts", code="too_many_inputs" if texts else None
        )
    empty = next((i for i, text in enumerate(texts) if not text), None)
    if empty is not None:
        raise InvalidInputError(f"texts[{empty}] is an empty string; every text must hold text", param="texts")
    if data.embedding_types is not None and not data.embedding_types:
        raise InvalidInputError("'embedding_types' is empty; name one or more types", param="embedding_types")
    asked: list[EmbeddingType] = data.embedding_types or ["float"]
    types = list(dict.fromkeys(asked))
    dim = model.encoder.dim
    width = dim if data.output_dimension is None else data.output_dimension
    if not 1 <= width <= dim:
        raise InvalidInputError(
            f"'output_dimension' must be between 1 and {dim} for this model", param="output_dimension"
        )
    limit_tokens = model.encoder.max_tokens
    if data.max_tokens is not None and data.max_tokens < limit_tokens:
        raise InvalidInputError(
            f"'max_tokens' {data.max_tokens} is below this model's limit of {limit_tokens} tokens: cutting texts "
            f"shorter than the model's limit is not served; leave it out or send at least {limit_tokens}",
            param="max_tokens",
        )
    return texts, types, width


def _too_long(exc: InvalidInputError, truncate: str | None, server_truncates: bool) -> InvalidInputError:
    """The service's error about ``input[i]`` (or the request's tokens) in this route's words."""
    message = exc.message.replace("input[", "texts[", 1).replace("; shorten or split it", "")
    if exc.code == "context_length_exceeded":
        if truncate == "START":
            message += "; truncate START (cutting the beginning) is not served: shorten it" + (
                ", or send truncate END" if server_truncates else " (this server does not truncate)"
            )
        elif truncate != "NONE" and not server_truncates:
            message += "; this server does not truncate (EMBED_TRUNCATE=false), so truncate END is not honoured"
        else:
            message += "; shorten or split it"
    return InvalidInputError(message, param="texts" if exc.param == "input" else exc.param, code=exc.code)


def _json(array: np.ndarray) -> msgspec.Raw:
    return msgspec.Raw(orjson.dumps(np.ascontiguousarray(array), option=orjson.OPT_SERIALIZE_NUMPY))


@post(
    "/v2/embed",
    status_code=200,
    summary="Embed (Cohere v2)",
    description=(
        "Cohere's v2 embed: float, int8, uint8, binary, ubinary and base64 embeddings of texts, made from the "
        "cached float vectors. int8 and uint8 use per-dimension ranges calibrated once per model "
        "(GET /v2/embed/ranges)."
    ),
    responses=ERRORS,
    tags=["cohere"],
    operation_class=_inline(CohereEmbedRequest),
    opt=EMBEDDING_OPT,
)
async def embed_v2(request: Request[Any, Any, Any]) -> Response[CohereEmbedResponse]:
    runtime, model, data = await accept_body(request, decode_with(CohereEmbedRequest))
    texts, types, width = _check(data, model)
    prompt_name = model.prompts.name_for(None, data.input_type)  # an unknown input type: 400 before any work
    prompted = model.prompts.prepend(texts, prompt_name)
    calibrated: Calibrated | None = None
    if "int8" in types or "uint8" in types:
        # Before compute() takes the key's tokens: a calibration that fails (503) costs the key nothing.
        calibrated = await calibrator_for(model).ranges(width)
    try:
        result = await compute(request, model, prompted, DENSE, untruncated=data.truncate in ("NONE", "START"))
    except InvalidInputError as exc:
        if exc.param != "input":
            raise
        raise _too_long(exc, data.truncate, model.service.truncate) from None
    vectors = np.stack(shorten(result.values, width if width != model.encoder.dim else None)).astype(np.float32)
    embeddings = _Embeddings()
    for kind in types:
        if kind == "float":
            embeddings.float_ = float_json(vectors)
        elif kind == "base64":
            embeddings.base64 = [np.ascontiguousarray(row, dtype="<f4").data for row in vectors]
        else:
            ranges = calibrated.ranges if calibrated is not None else None
            setattr(embeddings, kind, _json(quantize(vectors, kind, ranges)))
    answer = _EmbedAnswer(
        id=str(uuid.uuid4()),
        embeddings=embeddings,
        texts=texts,
        meta=EmbedMeta(ApiVersion("2"), EmbedBilledUnits(sum(result.tokens))),
    )
    # the answer holds pre-encoded JSON; the OpenAPI document shows it as CohereEmbedResponse
    return cast(Response[CohereEmbedResponse], runtime.answers.prepare(request.scope, answer))


@get(
    "/v2/embed/ranges",
    summary="int8/uint8 calibration ranges (Cohere v2 embed)",
    description=(
        "Each dimension's min and max that /v2/embed quantises int8 and uint8 with (sentence-transformers' "
        "quantize_embeddings ranges), calibrated once per model on a fixed set of texts; calibrates now if "
        "no int8/uint8 request did yet."
    ),
    responses=ERRORS,
    tags=["cohere"],
    opt={KEY_REQUESTS: True},
)
async def embed_ranges(
    request: Request[Any, Any, Any], model: str | None = None, output_dimension: int | None = None
) -> RangesResponse:
    served = runtime_of(request).model_for(model)
    dim = served.encoder.dim
    width = dim if output_dimension is None else output_dimension
    if not 1 <= width <= dim:
        raise InvalidInputError(
            f"'output_dimension' must be between 1 and {dim} for this model", param="output_dimension"
        )
    calibrated = await calibrator_for(served).ranges(width)
    return RangesResponse(
        model=served.settings.served_model,
        dimensions=width,
        min=calibrated.ranges[0].tolist(),
        max=calibrated.ranges[1].tolist(),
        calibration=Calibration(
            version=CALIBRATION_VERSION,
            texts=calibrated.texts,
            prompts=list(calibrated.prompts),
            digest=calibrated.digest,
        ),
    )


COHERE_ROUTES = [embed_v2, embed_ranges]
