"""Run the app under uvicorn with the limits a public server needs.

uvicorn gives us keep-alive timeouts (``timeout_keep_alive``), a connection and task cap that
answers 503 past it (``limit_concurrency``), and a bounded graceful shutdown
(``timeout_graceful_shutdown``); we use those as they are. What its httptools protocol lacks, a
small subclass adds, each measured as an attack first (README, Reliability):

* header size and count limits: a 100 MB header used to be read whole (14.9 s, stalling every
  other request); now the connection gets ``431`` as soon as the limit is passed;
* a deadline for the request head: a connection that opens and sends nothing, or trickles its
  headers (slowloris), is closed after ``header_timeout_s``;
* a deadline for the body: a client that stops sending its body mid-way is cut off after
  ``body_timeout_s`` instead of holding a task (and SIGTERM) forever.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http.errors import ErrorBody, ErrorEnvelope
from gateway.settings import Settings

__all__ = ["ConnectionLimits", "guarded_protocol", "uvicorn_config"]

logger = logging.getLogger("gateway.server")

_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float


def _refusal(status: bytes, message: str) -> bytes:
    body = msgspec.json.encode(ErrorEnvelope(ErrorBody(message=message, type="invalid_request_error")))
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


_TOO_LARGE = _refusal(
    b"431 Request Header Fields Too Large", "The request headers are larger than this server accepts."
)
_TOO_MANY = _refusal(b"431 Request Header Fields Too Large", "The request has more headers than this server accepts.")


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with header limits and header/body deadlines."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True  # reading a request head (true from the first byte of a connection)
        _head_bytes = 0
        _head_tail = b""  # the last bytes seen, to find a head end split across reads
        _headers_seen = 0
        _in_body = False
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(cast(asyncio.Transport, transport))
            self._arm(limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                window = self._head_tail + data
                end = window.find(_HEAD_END)
                counted = len(data) if end < 0 else end + len(_HEAD_END) - len(self._head_tail)
                self._head_bytes += max(counted, 0)
                if self._head_bytes > limits.max_header_bytes:
                    self._refuse(_TOO_LARGE)
                    return
                self._head_tail = window[-3:]
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_seen = 0

        def on_header(self, name: bytes, value: bytes) -> None:
            self._headers_seen += 1
            if self._headers_seen > limits.max_headers:
                self._refuse(_TOO_MANY)
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self.transport.is_closing():
                return
            self._in_head, self._head_bytes, self._head_tail = False, 0, b""
            self._in_body = True
            self._arm(limits.body_timeout_s)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            self._disarm()
            super().on_message_complete()

        def shutdown(self) -> None:
            # SIGTERM: a request whose body is still arriving cannot be answered in time; cut it
            # off now rather than let it hold the drain until the graceful timeout cancels it.
            if self._in_body and not self.transport.is_closing():
                self.transport.close()
            super().shutdown()

        def on_response_complete(self) -> None:
            self._in_head = True  # the next bytes on this keep-alive connection start a new head
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(limits.header_timeout_s + self.timeout_keep_alive)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                # No response: the client is not reading one. A request still being served
                # sees a disconnect and is withdrawn from the encoder queue.
                self.transport.close()

        def _refuse(self, response: bytes) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedHttpToolsProtocol


class _CancelledAtShutdown(logging.Filter):
    """uvicorn logs a request cancelled by its graceful-shutdown timeout as an error with a
    traceback; it is expected then: one line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.levelno = (
                "a request was cancelled: the shutdown timeout passed before it finished",
                (),
                None,
                logging.WARNING,
            )
            record.levelname = "WARNING"
        return True


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for ``app``: its own limits and timeouts, plus :func:`guarded_protocol`."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CancelledAtShutdown) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_CancelledAtShutdown())
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        log_config=None,  # keep the logging set up by the CLI (JSON when asked)
        access_log=False,  # our middleware logs one richer line per request
        lifespan="on",
        timeout_keep_alive=settings.keepalive_timeout_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
