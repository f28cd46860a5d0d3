"""The connection protocol under the app: uvicorn's httptools protocol, guarded.

What uvicorn's httptools protocol lacks, a subclass adds, each measured as an attack first
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

The modules, one part each: :mod:`~gateway.http.wire.limits` (the limits and the refusals sent when
one is passed), :mod:`~gateway.http.wire.regions` (the stream cutter),
:mod:`~gateway.http.wire.deadlines` (the deadlines and owed refusals) and
:mod:`~gateway.http.wire.protocol` (the parser's callbacks, and :func:`guarded_protocol`, which puts
them together). :mod:`gateway.http.server` hands the result to uvicorn.
"""

from __future__ import annotations

from gateway.http.wire.limits import ConnectionLimits
from gateway.http.wire.protocol import guarded_protocol

__all__ = ["ConnectionLimits", "guarded_protocol"]
