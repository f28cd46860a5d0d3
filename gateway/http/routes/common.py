"""What every route shares: the runtime from app state, and the documented error responses."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.openapi import ResponseSpec

from gateway.http.errors import ErrorEnvelope
from gateway.http.runtime import Runtime

__all__ = ["ERRORS", "runtime_of"]

ERRORS = {
    status: ResponseSpec(ErrorEnvelope, description=description, generate_examples=False)
    for status, description in {
        400: "Invalid input (OpenAI error envelope)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        429: "Over the API key's requests or tokens per minute (rate_limit_exceeded); honour Retry-After",
        500: "A bug or an encoder failure; the message names the request id",
        503: "Overloaded or not ready; honour Retry-After",
    }.items()
}


def runtime_of(request: Request[Any, Any, Any]) -> Runtime:
    # Read from app state directly: dependency injection costs more than the lookup on the hot path.
    runtime: Runtime = request.app.state.runtime
    return runtime
