"""One exception tree, mapped once to OpenAI's error envelope.

Handlers raise :class:`APIError` subclasses; Litestar's own HTTP exceptions (404 route, 405,
413, validation) and anything unexpected are translated by :func:`exception_handlers` so every
error body is ``{"error": {"message", "type", "param", "code"}}`` and never a stack trace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

__all__ = [
    "APIError",
    "AuthenticationError",
    "ClientDisconnectedError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OverloadedError",
    "error_response",
    "exception_handlers",
]

logger = logging.getLogger(__name__)


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class APIError(Exception):
    """An error the client caused or can act on; becomes an OpenAI error envelope."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(APIError):
    """400: the request is malformed or breaks a limit."""


class ModelNotFoundError(APIError):
    status_code = 404
    code = "model_not_found"


class AuthenticationError(APIError):
    status_code = 401
    code = "invalid_api_key"


class ClientDisconnectedError(APIError):
    """The client hung up before the answer; its queued work was withdrawn. Nobody reads this
    response; the status (nginx's 499) is for our own logs and counters."""

    status_code = 499
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the response")


class OverloadedError(APIError):
    """503 with ``Retry-After``: queue full, model not ready, or shutting down."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


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


def _api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[bytes]:
    return error_response(
        exc.status_code,
        exc.message,
        error_type=exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=exc.headers(),
    )


_HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
    415: ("unsupported_media_type", "invalid_request_error"),
}


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
    code, error_type = _HTTP_CODES.get(status, ("invalid_request", "invalid_request_error"))
    message = exc.detail or "Invalid request"
    if status == 413:
        message = "The request body is larger than this server accepts (EMBED_MAX_BODY_BYTES)."
    return error_response(status, message, error_type=error_type, code=code, headers=exc.headers)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    logger.exception("unhandled error (request %s)", request_id, exc_info=exc)
    return error_response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        f"The server hit an internal error. Quote request id {request_id} when reporting it.",
        error_type="server_error",
        code="internal_error",
    )


def exception_handlers() -> ExceptionHandlersMap:
    """The app's handlers, most specific first (Litestar matches along the MRO)."""
    return {APIError: _api_error, HTTPException: _http_error, Exception: _unexpected}
