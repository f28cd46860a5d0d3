"""What can go wrong on the request path, in the domain's words: no status codes, no framework.

The HTTP layer maps each class to a status, an OpenAI error ``type`` and a ``code`` in one table
(:mod:`gateway.http.errors`); a CLI or another protocol can map them its own way. ``param`` names
the request field at fault, ``code`` refines the class where OpenAI's clients look for one
(``context_length_exceeded``). Messages speak to the API's user: never a server path, never a
setting's environment variable.
"""

from __future__ import annotations

__all__ = [
    "ClientDisconnectedError",
    "ConflictError",
    "EncoderFailedError",
    "GatewayError",
    "InvalidInputError",
    "ModelNotFoundError",
    "NotFoundError",
    "OutputNotSupportedError",
    "OverloadedError",
    "RateLimitedError",
    "RequestsRateLimitedError",
    "ShuttingDownError",
    "TokensRateLimitedError",
    "UnauthenticatedError",
]


class GatewayError(Exception):
    """Base of every error the request path raises on purpose."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidInputError(GatewayError):
    """The request is malformed or breaks a limit; the caller must change it."""


class OutputNotSupportedError(InvalidInputError):
    """The model has no head for the asked output (for example no ``sparse_linear.pt``)."""

    code = "output_not_supported"


class ModelNotFoundError(GatewayError):
    """The request names a model this server does not serve."""

    code = "model_not_found"


class NotFoundError(GatewayError):
    """The request names a file or batch that does not exist (or belongs to another key)."""


class ConflictError(GatewayError):
    """The request asks what the object's state no longer allows (cancel a finished batch)."""


class UnauthenticatedError(GatewayError):
    """No API key, or one that is not configured."""

    code = "invalid_api_key"


class OverloadedError(GatewayError):
    """Too much queued work: retry after ``retry_after`` seconds."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(OverloadedError):
    """The server is draining before it stops: another replica (or a retry) will answer."""

    code = "shutting_down"


class RateLimitedError(OverloadedError):
    """The API key is over its requests or tokens per minute: retry after ``retry_after`` seconds."""

    code = "rate_limit_exceeded"


class RequestsRateLimitedError(RateLimitedError):
    """Over the key's requests per minute (OpenAI's error type ``requests``)."""


class TokensRateLimitedError(RateLimitedError):
    """Over the key's tokens per minute (OpenAI's error type ``tokens``)."""


class ClientDisconnectedError(GatewayError):
    """The client left before its answer; its queued work was withdrawn."""

    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the response")


class EncoderFailedError(GatewayError):
    """The encoder could not compute an input (out of memory alone, a broken model, a crashed worker)."""

    code = "encoder_error"
