"""Run the app under uvicorn with the limits a public server needs.

uvicorn gives us keep-alive timeouts (``timeout_keep_alive``) and a bounded graceful shutdown
(``timeout_graceful_shutdown``); we use those as they are. Its ``limit_concurrency`` we do not use:
it counts open connections, idle keep-alive ones included, and answers 503 before any route runs,
so a handful of idle sockets (a proxy's keep-alive pool) made ``/livez`` and ``/readyz`` fail, the
kubelet restarted busy pods, and no counter saw the refusals (issue 27). Idle connections cost a
few KB and their deadlines close them; what needs a cap is the work in flight. So the cap counts
requests in flight, and is kept by the request middleware (:class:`~gateway.http.middleware.InFlight`),
which sees the route: a request counts once its body is complete, and probes and ``/metrics`` never.

What uvicorn's httptools protocol lacks, a small subclass adds, each measured as an attack first
(README, Reliability):

* header size and count limits over every header byte: a request's head, a pipelined head that
  arrives while an earlier request is served, and chunked trailers (issue 28). httptools grows a
  header value by concatenation, quadratic in its size, and tells nobody how many bytes it has
  taken, so the subclass cuts the byte stream itself where heads, bodies, chunk framing and
  trailers begin and end and feeds the parser one region at a time: the parser's callbacks then
  fire exactly at a cut, every region is counted before httptools sees it, and a head past the
  limit is never fed. A head gets ``431`` (after the answers owed before it, in order); trailers
  get ``431`` while the request's answer has not started (a queued request's after the answers
  before it), else the connection is closed;
* a deadline for the request head: a connection that opens and sends nothing, or trickles its
  headers (slowloris), is closed after ``header_timeout_s``; it never cuts a request in flight;
* an idle deadline for the body: a body that sends nothing for ``body_timeout_s``, or that
  averages under ``body_min_bytes_per_s`` once its first ``body_timeout_s`` are over (Apache's
  ``RequestReadTimeout ... MinRate``), gets ``408`` and is cut off, instead of holding a task (and
  SIGTERM) for ever; time while the server itself stopped reading does not count;
* a deadline for answers to drain: a client that takes nothing of an answer the transport still
  holds for ``header_timeout_s`` + the keep-alive timeout (after the answer, or while a request
  waits for the transport to drain) has its connection aborted, not closed (``close()`` waits for
  the buffer to drain, for ever); a client that keeps reading, however slowly, gets another period;
* chunked bodies cost about what httptools alone pays: runs of chunks are fed in one call (small
  chunks matched in C, no chunk callbacks), chunk-extension bytes counted as they pass;
* an upgrade uvicorn does not make (anything but WebSocket) is answered and the connection closed:
  nothing after its head is parsed (llhttp would parse its body as the next request);
* the request running when its connection is lost is marked disconnected (uvicorn marks only the
  latest, maybe a queued one): its answer is dropped, and counted 499, with no traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import uvicorn
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.http.errors import ErrorBody, ErrorEnvelope
from gateway.http.middleware import CLIENT_GONE, CUT_STATUS
from gateway.settings import Settings

__all__ = ["ConnectionLimits", "guarded_protocol", "uvicorn_config"]

logger = logging.getLogger("gateway.server")

_HEAD_END = b"\r\n\r\n"
_REQUEST_LINE = re.compile(rb"[^\r\n]")  # llhttp skips empty lines before a request line
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
_SIZE_LINE = 18  # a chunk size needs at most 16 hex digits and CRLF: the rest is extensions, metadata
# A run of whole chunks of 1 to 15 bytes, matched in C: a stream of tiny chunks must cost about
# what httptools alone pays for it, not a Python step per chunk. Their size lines (extensions
# included) are at most _SIZE_LINE bytes long (the lookahead): nothing of them is counted. After the
# zeros the alternatives differ in their first byte and the quantifiers are possessive: no
# backtracking. A bigger chunk, or a longer line, costs one Python step.
_SMALL_CHUNKS = re.compile(
    rb"(?:(?=[^\r\n]{1,%d}\r\n)0*+(?:" % (_SIZE_LINE - 2)
    + b"|".join(b"[%x%X](?:;[^\r\n]*+)?+\r\n.{%d}\r\n" % (n, n, n) for n in range(1, 16))
    + rb"))++",
    re.DOTALL,
)

# Where the next byte of the connection falls.
_HEAD = 0  # a request head (with the empty lines allowed before it)
_BODY = 1  # a Content-Length body
_CHUNK_LINE = 2  # a chunk-size line, extensions included
_CHUNK_DATA = 3  # a chunk's data and the CRLF after it
_TRAILERS = 4  # the trailer section after the last, empty chunk


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


_TOO_LARGE = _refusal(
    b"431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    "The request's header fields are larger than this server accepts.",
)
_TOO_MANY = _refusal(
    b"431 Request Header Fields Too Large",
    "request_header_fields_too_large",
    "The request has more header fields than this server accepts.",
)
_TIMED_OUT = _refusal(
    b"408 Request Timeout", "request_timeout", "The request body stopped arriving, or arrived too slowly."
)


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with header limits, head, body and drain deadlines and the in-flight mark."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        # Where the stream is, and what is known of the region it is in.
        _region = _HEAD
        _line_begun = False  # _HEAD: the request line has started
        _tail = b""  # _HEAD, _TRAILERS: the last bytes seen, to find an end split across reads
        _left = 0  # _BODY, _CHUNK_DATA: bytes the region still has
        _size_line = b""  # _CHUNK_LINE: the line so far, when a read ended inside it (bounded by the limit)
        _meta_bytes = 0  # this message's head, trailer and chunk-extension bytes
        _headers_seen = 0
        _head_done = False  # header fields after the head are trailers
        _content_length = 0
        _chunked = False
        _refusal: bytes | None = None  # a 431 owed once the answers before it are out; nothing more is read
        _last_head = False  # after an upgrade request nothing more of the connection is parsed
        # The request uvicorn runs now (a later one may wait in ``pipeline``), and its task.
        _running: RequestResponseCycle | None = None
        _running_task: asyncio.Task[None] | None = None
        # Deadlines: one timer, for the head, for the body (while one is expected) or for an answer to drain.
        _deadline: asyncio.TimerHandle | None = None
        _in_body = False
        _body_since = 0.0
        _body_last = 0.0
        _body_bytes = 0
        _unsent = 0  # the answer bytes the transport still held when last looked at

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(cast(asyncio.Transport, transport))
            self._arm(limits.header_timeout_s)

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

        # --- the byte stream, cut into regions ----------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._refusal is not None or self._last_head:
                return  # the connection ends with a refusal (or after an upgrade): nothing more is parsed
            if self._in_body:
                self._body_last = self.loop.time()
                self._body_bytes += len(data)
            view = memoryview(data)  # slices of it copy nothing; httptools reads any buffer
            start, end = 0, len(data)
            while start < end:
                size = self._measure(data, start)
                if size is None:
                    return
                super().data_received(cast(bytes, view[start : start + size]))
                if self._refusal is not None or self._last_head or self.transport.is_closing():
                    return  # a 400, a refusal or an upgrade request ends the connection
                if self.transport.get_protocol() is not self:
                    return  # upgraded to WebSocket: uvicorn passed the head on, as it does without us
                start += size

        def _measure(self, data: bytes, start: int) -> int | None:
            """How many bytes from ``start`` belong to the current region, counted against the
            limits; ``None`` when they pass one (the refusal is under way)."""
            end = len(data)
            region = self._region
            if region == _BODY and self._left > 0:
                size = min(self._left, end - start)
                self._left -= size
                return size
            if region in (_CHUNK_LINE, _CHUNK_DATA):
                return self._chunks(data, start)
            # A head or a trailer section (or, as a fallback, any byte the regions above did not expect).
            if not self._line_begun and region != _TRAILERS:
                first = _REQUEST_LINE.search(data, start)
                if first is None or first.start() > start:
                    size = (end if first is None else first.start()) - start
                    return self._count(size, size)
                self._line_begun = True
            seam = (self._tail + data[start : start + 3]).find(_HEAD_END)
            if seam >= 0:
                size = seam + len(_HEAD_END) - len(self._tail)
            else:
                found = data.find(_HEAD_END, start)
                size = end - start if found < 0 else found + len(_HEAD_END) - start
                self._tail = (self._tail + data[max(start, end - 3) : end])[-3:]
            return self._count(size, size)

        def _chunks(self, data: bytes, start: int) -> int | None:
            """The chunks from ``start`` up to the end of the read or of the last, empty chunk, as
            one region: httptools parses them in one call, with no Python step per small chunk and
            no chunk callbacks; chunk-extension bytes are counted."""
            end = len(data)
            pos, meta = start, 0
            if self._region == _CHUNK_DATA:
                if self._left > end - pos:
                    self._left -= end - pos
                    return end - pos
                pos += self._left
            self._region = _CHUNK_LINE
            while pos < end:
                partial = self._size_line
                if not partial:
                    small = _SMALL_CHUNKS.match(data, pos)
                    if small is not None:
                        pos = small.end()
                        if pos == end:
                            break
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                before, after = len(partial), len(partial) + stop - pos
                meta += max(0, after - _SIZE_LINE) - max(0, before - _SIZE_LINE)
                if newline < 0:
                    if meta + self._meta_bytes <= limits.max_header_bytes:
                        self._size_line = partial + data[pos:end]
                    pos = end
                    break
                if partial:
                    digits = _CHUNK_SIZE.match(partial + data[pos:stop])
                    self._size_line = b""
                else:
                    digits = _CHUNK_SIZE.match(data, pos, stop)
                pos = stop
                size = int(digits.group(), 16) if digits else 0  # no digits: httptools refuses the line
                if not size:
                    self._region, self._tail = _TRAILERS, b"\r\n"  # an empty trailer section is one more CRLF
                    break
                if size + 2 > end - pos:  # the chunk's data and the CRLF after it
                    self._region, self._left = _CHUNK_DATA, size + 2 - (end - pos)
                    pos = end
                    break
                pos += size + 2
            return self._count(meta, pos - start)

        def _count(self, meta: int, size: int) -> int | None:
            self._meta_bytes += meta
            if self._meta_bytes > limits.max_header_bytes:
                self._over_limit(_TOO_LARGE)
                return None
            return size

        # --- parser callbacks ---------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_seen, self._head_done, self._content_length, self._chunked = 0, False, 0, False

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._refusal is not None:
                return
            self._headers_seen += 1
            if self._headers_seen > limits.max_headers:
                self._over_limit(_TOO_MANY)
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
                self._region, self._size_line = _CHUNK_LINE, b""
            else:
                self._region, self._left = _BODY, self._content_length
            if self._chunked or self._content_length:
                self._in_body = True
                self._body_since = self._body_last = self.loop.time()
                self._body_bytes = 0
                self._arm(limits.body_timeout_s)
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
            self._region, self._line_begun, self._tail, self._meta_bytes = _HEAD, False, b"", 0
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

        # --- deadlines ----------------------------------------------------------------------
        def _answers_owed(self) -> bool:
            """Whether a request of this connection is running or waits its turn."""
            running = self._running
            return bool(self.pipeline) or (running is not None and not running.response_complete)

        def _await_next_head(self) -> None:
            """Once nothing is in flight: send the refusal owed, or give the next head its deadline."""
            if self._in_body or self._answers_owed():
                # uvicorn has started the next pipelined request, or a body is still arriving (on
                # the body's own deadline): no head deadline may cut them.
                return
            if self.transport.is_closing():
                self._watch_drain()
                return
            if self._refusal is not None:
                self._send_refusal()
                return
            # The next request's head must start within the keep-alive timeout (uvicorn closes the
            # connection otherwise) and end within the head timeout; an answer not yet taken by
            # the client must make progress within the same time (see _expired).
            self._unsent = self.transport.get_write_buffer_size()
            self._arm(self._idle_s())

        def pause_writing(self) -> None:
            super().pause_writing()
            if not self._in_body:  # (a body has its own deadline, and the answer is rarely first)
                self._watch_drain()  # a request in flight may wait for the client to read

        def _idle_s(self) -> float:
            return limits.header_timeout_s + self.timeout_keep_alive

        def _watch_drain(self) -> None:
            """A closing connection whose answer the client has not taken yet: the drain deadline."""
            self._unsent = self.transport.get_write_buffer_size()
            if self._unsent:
                self._arm(self._idle_s())

        def _close(self) -> None:
            self.transport.close()  # it sends what it holds first: bounded by the drain deadline
            self._watch_drain()

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self._in_body:
                if self._answers_owed() and not self.flow.write_paused:
                    return  # a request in flight is never cut by a head deadline
                unsent = self.transport.get_write_buffer_size()
                if unsent and unsent < self._unsent:
                    # The client takes its answer, however slowly: it gets another period.
                    self._unsent = unsent
                    self._arm(self._idle_s())
                elif unsent:
                    # The client took nothing of its answers for a whole period: close() would wait
                    # for it for ever, holding them (megabytes) and the connection, and a request
                    # whose answer waits for the transport to drain would stay in flight for ever.
                    self.transport.abort()
                elif not self._answers_owed() and not self.transport.is_closing():
                    self.transport.close()  # no whole head in time, and no request in flight
                return
            if self.transport.is_closing():
                return
            now = self.loop.time()
            if self.flow.read_paused:
                # The server stopped reading (a pipelined request waits its turn, or the app has
                # not taken what came): no stall of the client's. Measure afresh from here.
                self._body_since = self._body_last = now
                self._body_bytes = 0
                self._arm(limits.body_timeout_s)
                return
            due = self._body_last + limits.body_timeout_s
            if limits.body_min_bytes_per_s:
                # Apache's MinRate: the first body_timeout_s are free, then each second needs its bytes.
                paid = self._body_bytes / limits.body_min_bytes_per_s
                due = min(due, self._body_since + limits.body_timeout_s + paid)
            if now < due:
                self._arm(due - now)  # data came since the timer was set: one timer, re-armed lazily
                return
            self._cut(_TIMED_OUT, 408)

        # --- refusals -----------------------------------------------------------------------
        def _over_limit(self, response: bytes) -> None:
            if self._head_done:
                self._cut(response, 431)  # trailers or chunk extensions of a request already passed on
                return
            # A head: its answer comes after those of the requests before it (HTTP/1.1 answers in
            # order), so it may be owed for a while; nothing more of the connection is read.
            self._refusal = response
            self._disarm()
            if not self._answers_owed():
                self._send_refusal()

        def _send_refusal(self) -> None:
            self._disarm()
            if self._refusal is not None and not self.transport.is_closing():
                self.transport.write(self._refusal)
                self._close()

        def _cut(self, response: bytes, status: int) -> None:
            """End the request whose body or trailers are arriving: with ``response`` while its own
            answer has not begun, after the answers owed before it, else by closing the connection."""
            self._disarm()
            self._in_body = False
            if self.transport.is_closing():
                return
            cycle = self.cycle
            queued = [entry for entry in self.pipeline if entry[0] is cycle]
            if queued:
                # It waits behind a request in flight (both came in one read): it never runs, and
                # its refusal is owed after the answers before it, as a head's is.
                self.pipeline.remove(queued[0])
                self._refusal = response
                if not self._answers_owed():
                    self._send_refusal()
                return
            if cycle is not None and not cycle.response_started:
                # The app sees a disconnect and its answer, if any, is dropped: this one replaces it.
                # The request middleware counts ``status`` for it, not the 499 of a client that left.
                cycle.scope["state"][CUT_STATUS] = status
                cycle.disconnected = True
                cycle.message_event.set()
                self.transport.write(response)
            self._close()

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
    """uvicorn's settings for ``app``: its own timeouts, plus :func:`guarded_protocol`."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CancelledAtShutdown) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_CancelledAtShutdown())
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_bytes_per_s=settings.body_min_bytes_per_s,
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
        # no limit_concurrency: it counts idle connections and refuses probes (module docstring)
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
