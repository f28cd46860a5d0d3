"""The limits a connection is held to, and the canned answers sent when one is passed.

:class:`ConnectionLimits` comes from the settings (``EMBED_MAX_HEADER_BYTES``, ``EMBED_MAX_HEADERS``,
``EMBED_HEADER_TIMEOUT_S``, ``EMBED_BODY_TIMEOUT_S``, ``EMBED_BODY_MIN_BYTES_PER_S``). The refusals are
whole HTTP/1.1 responses, encoded once at import: they are written straight to the transport by the
protocol, below Litestar, so they are built by hand in the same ``{"error": ...}`` shape the app's
error table gives, and each closes the connection (after a refusal nothing more of it is parsed).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from gateway.http.errors import ErrorBody, ErrorEnvelope

__all__ = ["TIMED_OUT", "TOO_LARGE", "TOO_MANY", "ConnectionLimits"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int  # a request's head plus its trailers and chunk extensions
    max_headers: int  # header fields, trailer fields included
    header_timeout_s: float
    body_timeout_s: float  # idle: any byte of the body restarts it
    body_min_bytes_per_s: int = 0  # 0: no minimum rate


def _refusal(status: bytes, code: str, message: str) -> bytes:
    body = msgspec.json.encode(ErrorEnvelope(ErrorBody(message=message, type="invalid_request_error", code=code)))
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


TOO_LARGE = _refusal(
    b"431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    "The request's header fields are larger than this server accepts.",
)
TOO_MANY = _refusal(
    b"431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    "The request has more header fields than this server accepts.",
)
TIMED_OUT = _refusal(
    b"408 Request Timeout", "request_timeout", "The request body stopped arriving, or arrived too slowly."
)
