"""One table from domain errors to HTTP, and OpenAI's error envelope for everything else.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` and never a stack trace:
the core's :class:`~gateway.core.errors.GatewayError` subclasses through :data:`ERROR_TABLE`,
Litestar's own HTTP exceptions (unrouted 404, 405, 413) through :func:`_http_error`, and anything
unexpected as a 500 that names the request id for the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap
from redis.exceptions import RedisError

from gateway.core.errors import (
    ClientDisconnectedError,
    ConflictError,
    EncoderFailedError,
    GatewayError,
    InvalidInputError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    RequestsRateLimitedError,
    TokensRateLimitedError,
    UnauthenticatedError,
)

__all__ = [
    "ERROR_TABLE",
    "TEI_ERRORS",
    "ErrorEnvelope",
    "TeiError",
    "error_response",
    "exception_handlers",
    "gateway_error",
    "tei_error",
]

logger = logging.getLogger(__name__)


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


# Domain error -> (status, OpenAI error type). Subclasses inherit their parent's row
# (OutputNotSupportedError is an InvalidInputError; ShuttingDownError an OverloadedError).
ERROR_TABLE: dict[type[GatewayError], tuple[int, str]] = {
    InvalidInputError: (400, "invalid_request_error"),
    UnauthenticatedError: (401, "invalid_request_error"),
    ModelNotFoundError: (404, "invalid_request_error"),
    NotFoundError: (404, "invalid_request_error"),
    ConflictError: (409, "invalid_request_error"),
    ClientDisconnectedError: (499, "invalid_request_error"),  # nobody reads it: nginx's status, for our logs
    EncoderFailedError: (500, "server_error"),
    OverloadedError: (503, "server_error"),
    RequestsRateLimitedError: (429, "requests"),  # OpenAI's types for rate limits (issue 13)
    TokensRateLimitedError: (429, "tokens"),
}

# Litestar's own exceptions: status -> code.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[bytes]:
    body = msgspec.json.encode(ErrorEnvelope(ErrorBody(message=message, type=error_type, param=param, code=code)))
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers or {}))


def _request_id(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    status, error_type = next(ERROR_TABLE[cls] for cls in type(exc).__mro__ if cls in ERROR_TABLE)
    message = exc.message
    if status >= 500:
        message = f"{message}. Quote request id {_request_id(request)} when reporting it."
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return error_response(status, message, error_type=error_type, param=exc.param, code=exc.code, headers=headers)


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    """Turn Litestar's validation detail into one sentence and the offending parameter."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    for entry in extra:
        if isinstance(entry, dict) and entry.get("message"):
            key = entry.get("key")
            param = str(key).removeprefix("$.").split(".")[0].split("[")[0] if key else None
            where = f" for '{param}'" if param else ""
            return f"Invalid request body{where}: {entry['message']}", param
    return f"Invalid request body: {exc.detail}", None


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")
    if status >= 500:
        return error_response(status, "The server could not handle the request.", error_type="server_error")
    message = exc.detail or "Invalid request"
    if status == 413:
        message = "The request body is larger than this server accepts."
    code = _HTTP_CODES.get(status, "invalid_request")
    return error_response(status, message, code=code, headers=exc.headers)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    request_id = _request_id(request)
    logger.exception("unhandled error (request %s)", request_id, exc_info=exc)
    return error_response(
        500,
        f"The server hit an internal error. Quote request id {request_id} when reporting it.",
        error_type="server_error",
        code="internal_error",
    )


def _store_down(request: Request[Any, Any, Any], exc: RedisError) -> Response[bytes]:
    """Redis failed under a route that needs it (the Batch API's job store; the cache never raises:
    it turns into misses): the client should retry, as OpenAI's clients do on a 503."""
    logger.warning("request %s: Redis failed: %s", _request_id(request), exc)
    return error_response(
        503,
        "The server's job store (Redis) is unreachable; retry shortly.",
        error_type="server_error",
        code="store_unavailable",
        headers={"Retry-After": "5"},
    )


def exception_handlers() -> ExceptionHandlersMap:
    """The app's handlers; Litestar picks the most specific along the exception's MRO."""
    return {GatewayError: gateway_error, HTTPException: _http_error, RedisError: _store_down, Exception: _unexpected}


# TEI's routes answer in TEI's shape (its clients read ``error`` and the status): a route with
# ``opt={TEI_ERRORS: True}`` gets it from the router's handlers and from the middlewares that refuse
# before the router (the API-key check, the in-flight cap).
TEI_ERRORS = "tei_errors"

ErrorType = Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer"]


class TeiError(msgspec.Struct):
    error: str
    error_type: ErrorType


_TOO_LARGE = ("request_too_large", "context_length_exceeded", "too_many_inputs")


def tei_error(request: Request[Any, Any, Any], exc: Exception) -> Response[TeiError]:
    """Our errors in TEI's shape and statuses (413 and 422 for bad input, 424 for a failed computation,
    429 for overload with Retry-After, as TEI's docs/openapi.json gives them)."""
    headers: dict[str, str] = {}
    status: int
    kind: ErrorType
    if isinstance(exc, OverloadedError):
        status, kind = 429, "Overloaded"
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, EncoderFailedError):
        status, kind = 424, "Backend"
    elif isinstance(exc, UnauthenticatedError):
        status, kind = 401, "Validation"
    elif isinstance(exc, GatewayError) and exc.code in _TOO_LARGE:
        status, kind = 413, "Validation"  # TEI's "batch size error" status for what is too big
    elif isinstance(exc, GatewayError):
        status, kind = (404 if exc.code == "model_not_found" else 422), "Validation"
    elif isinstance(exc, HTTPException) and exc.status_code < 500:
        status, kind = exc.status_code, "Validation"
    else:
        status, kind = 500, "Backend"
    message = exc.message if isinstance(exc, GatewayError) else getattr(exc, "detail", "") or "internal error"
    return Response(TeiError(error=str(message), error_type=kind), status_code=status, headers=headers)
