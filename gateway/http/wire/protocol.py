"""The protocol uvicorn runs: httptools', with header limits, deadlines and the in-flight mark.

:func:`guarded_protocol` builds the class for one set of :class:`ConnectionLimits`. Its parts:

* :class:`~gateway.http.wire.regions.StreamCutter` cuts the byte stream and counts header bytes;
* :class:`~gateway.http.wire.deadlines.DeadlineProtocol` keeps the deadlines and sends refusals;
* the class here answers the parser's callbacks: it counts header fields, learns where the body
  ends, arms the body deadline, refuses an upgrade uvicorn does not make, keeps the running
  request's task, and marks that request disconnected when its connection is lost.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import cast

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.http.middleware import CLIENT_GONE
from gateway.http.wire.limits import TOO_MANY, ConnectionLimits
from gateway.http.wire.regions import BODY, CHUNK_LINE, HEAD, StreamCutter

__all__ = ["guarded_protocol"]


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with header limits, head, body and drain deadlines and the in-flight mark."""

    class GuardedHttpToolsProtocol(StreamCutter):
        _connection_limits = limits
        _headers_seen = 0
        _content_length = 0
        _chunked = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(cast(asyncio.Transport, transport))
            self._arm(self._connection_limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            running = self._running
            if running is not None and not running.response_complete:
                # uvicorn marks only the latest request (maybe a queued one) disconnected: the one
                # running would write its answer to the closed transport (a RuntimeError traceback,
                # counted 200). Its client left before its answer: the middleware counts a 499.
                if not running.response_started:
                    running.scope["state"][CLIENT_GONE] = True
                running.disconnected = True
                running.message_event.set()
            super().connection_lost(exc)

        # --- parser callbacks ---------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_seen, self._head_done, self._content_length, self._chunked = 0, False, 0, False

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refusal is not None:
                return
            self._headers_seen += 1
            if self._headers_seen > self._connection_limits.max_headers:
                self._over_limit(TOO_MANY)
                return
            if not self._head_done:  # llhttp has checked both, and refuses a request with both
                lowered = name.lower()
                if lowered == b"content-length":
                    self._content_length = int(value)
                elif lowered == b"transfer-encoding":
                    self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._refusal is not None or self.transport.is_closing():
                return
            self._head_done = True
            self._disarm()  # the head deadline
            if self._chunked:
                self._region, self._size_line = CHUNK_LINE, b""
            else:
                self._region, self._left = BODY, self._content_length
            if self._chunked or self._content_length:
                self._in_body = True
                self._body_since = self._body_last = self.loop.time()
                self._body_bytes = 0
                self._arm(self._connection_limits.body_timeout_s)
            super().on_headers_complete()
            if self.parser.should_upgrade() and self.transport.get_protocol() is self and not self._should_upgrade():
                # An upgrade uvicorn does not make (not WebSocket): llhttp stops at the head and
                # would parse what follows, the request's own body included, as a new request. The
                # request is answered; the rest of the connection is never parsed, and it is closed.
                self._last_head = True
                self.cycle.keep_alive = False

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
            # uvicorn's own, keeping the task.
            if self.config.reset_contextvars:
                task = self.loop.create_task(cycle.run_asgi(app), context=contextvars.Context())
            else:
                task = self.loop.create_task(cycle.run_asgi(app))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            self._running, self._running_task = cycle, task

        def on_message_complete(self) -> None:
            # What follows is the next request's head, whether or not the parser has seen its first byte.
            self._region, self._line_begun, self._tail, self._meta_bytes = HEAD, False, b"", 0
            self._head_done = False
            if self._in_body:
                self._in_body = False
                self._disarm()
                self._await_next_head()  # the answer may have gone out before the body ended (a 413)
            if self._refusal is not None or self.transport.is_closing():
                return
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_next_head()

        def shutdown(self) -> None:
            # SIGTERM: a request whose body is still arriving cannot be answered in time; cut it
            # off now rather than let it hold the drain until the graceful timeout cancels it.
            if self._in_body and not self.transport.is_closing():
                self._close()
            super().shutdown()

    return GuardedHttpToolsProtocol
