"""Deadlines on a connection, and the answers that end a request early.

One timer per connection (:meth:`DeadlineProtocol._arm`) serves whichever deadline applies now:

* the request head must arrive within ``header_timeout_s`` (slowloris), and the next head start
  within the keep-alive timeout;
* a body that sends nothing for ``body_timeout_s``, or averages under ``body_min_bytes_per_s`` once
  its first ``body_timeout_s`` are over (Apache's ``RequestReadTimeout ... MinRate``), gets ``408``;
  time while the server itself stopped reading does not count;
* an answer the client takes nothing of for a whole period has its connection aborted: ``close()``
  would wait for the buffer to drain for ever.

A refusal (a ``431`` for a head over the limits, a ``408``) is owed after the answers of the requests
before it, because HTTP/1.1 answers in order: :meth:`DeadlineProtocol._over_limit` and
:meth:`DeadlineProtocol._cut` hold it until nothing is in flight, then send it and close. Deadlines
and refusals share one class because each needs the other: a deadline ends in a refusal, and a
refusal waits for the drain deadline.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.http.middleware import CUT_STATUS
from gateway.http.wire.limits import TIMED_OUT, ConnectionLimits

__all__ = ["DeadlineProtocol"]


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and refusals; the byte stream is cut by
    :class:`~gateway.http.wire.regions.StreamCutter` and the protocol finished by
    :func:`~gateway.http.wire.protocol.guarded_protocol`, which sets ``_connection_limits``."""

    _connection_limits: ConnectionLimits
    _refusal: bytes | None = None  # a 431 owed once the answers before it are out; nothing more is read
    _head_done = False  # header fields after the head are trailers
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
        return self._connection_limits.header_timeout_s + self.timeout_keep_alive

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
            self._arm(self._connection_limits.body_timeout_s)
            return
        due = self._body_last + self._connection_limits.body_timeout_s
        if self._connection_limits.body_min_bytes_per_s:
            # Apache's MinRate: the first body_timeout_s are free, then each second needs its bytes.
            paid = self._body_bytes / self._connection_limits.body_min_bytes_per_s
            due = min(due, self._body_since + self._connection_limits.body_timeout_s + paid)
        if now < due:
            self._arm(due - now)  # data came since the timer was set: one timer, re-armed lazily
            return
        self._cut(TIMED_OUT, 408)

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
