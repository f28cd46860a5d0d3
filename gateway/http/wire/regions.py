"""The byte stream of a connection, cut into regions before httptools sees it.

httptools grows a header value by concatenation, quadratic in its size, and tells nobody how many
bytes it has taken, so the size limits cannot be kept from its callbacks: :class:`StreamCutter`
finds where heads, bodies, chunk framing and trailers begin and end, counts every head, trailer and
chunk-extension byte against ``max_header_bytes`` before the parser sees it, and feeds the parser
one region at a time. The parser's callbacks then fire exactly at a cut, and a head past the limit
is never fed (issue 28).

Chunked bodies cost about what httptools alone pays: runs of small chunks are matched in C by one
regular expression (:data:`SMALL_CHUNKS`) and fed in one call, with no Python step per chunk.
"""

from __future__ import annotations

import re
from typing import cast

from gateway.http.wire.deadlines import DeadlineProtocol
from gateway.http.wire.limits import TOO_LARGE

__all__ = ["BODY", "CHUNK_DATA", "CHUNK_LINE", "HEAD", "TRAILERS", "StreamCutter"]

HEAD_END = b"\r\n\r\n"
REQUEST_LINE = re.compile(rb"[^\r\n]")  # llhttp skips empty lines before a request line
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
SIZE_LINE = 18  # a chunk size needs at most 16 hex digits and CRLF: the rest is extensions, metadata
# A run of whole chunks of 1 to 15 bytes, matched in C: a stream of tiny chunks must cost about
# what httptools alone pays for it, not a Python step per chunk. Their size lines (extensions
# included) are at most SIZE_LINE bytes long (the lookahead): nothing of them is counted. After the
# zeros the alternatives differ in their first byte and the quantifiers are possessive: no
# backtracking. A bigger chunk, or a longer line, costs one Python step.
SMALL_CHUNKS = re.compile(
    rb"(?:(?=[^\r\n]{1,%d}\r\n)0*+(?:" % (SIZE_LINE - 2)
    + b"|".join(b"[%x%X](?:;[^\r\n]*+)?+\r\n.{%d}\r\n" % (n, n, n) for n in range(1, 16))
    + rb"))++",
    re.DOTALL,
)

# Where the next byte of the connection falls.
HEAD = 0  # a request head (with the empty lines allowed before it)
BODY = 1  # a Content-Length body
CHUNK_LINE = 2  # a chunk-size line, extensions included
CHUNK_DATA = 3  # a chunk's data and the CRLF after it
TRAILERS = 4  # the trailer section after the last, empty chunk


class StreamCutter(DeadlineProtocol):
    """Feeds httptools region by region, counting the limits first (see the module's docstring)."""

    # Where the stream is, and what is known of the region it is in.
    _region = HEAD
    _line_begun = False  # HEAD: the request line has started
    _tail = b""  # HEAD, TRAILERS: the last bytes seen, to find an end split across reads
    _left = 0  # BODY, CHUNK_DATA: bytes the region still has
    _size_line = b""  # CHUNK_LINE: the line so far, when a read ended inside it (bounded by the limit)
    _meta_bytes = 0  # this message's head, trailer and chunk-extension bytes
    _last_head = False  # after an upgrade request nothing more of the connection is parsed

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
        if region == BODY and self._left > 0:
            size = min(self._left, end - start)
            self._left -= size
            return size
        if region in (CHUNK_LINE, CHUNK_DATA):
            return self._chunks(data, start)
        # A head or a trailer section (or, as a fallback, any byte the regions above did not expect).
        if not self._line_begun and region != TRAILERS:
            first = REQUEST_LINE.search(data, start)
            if first is None or first.start() > start:
                size = (end if first is None else first.start()) - start
                return self._count(size, size)
            self._line_begun = True
        seam = (self._tail + data[start : start + 3]).find(HEAD_END)
        if seam >= 0:
            size = seam + len(HEAD_END) - len(self._tail)
        else:
            found = data.find(HEAD_END, start)
            size = end - start if found < 0 else found + len(HEAD_END) - start
            self._tail = (self._tail + data[max(start, end - 3) : end])[-3:]
        return self._count(size, size)

    def _chunks(self, data: bytes, start: int) -> int | None:
        """The chunks from ``start`` up to the end of the read or of the last, empty chunk, as
        one region: httptools parses them in one call, with no Python step per small chunk and
        no chunk callbacks; chunk-extension bytes are counted."""
        end = len(data)
        pos, meta = start, 0
        if self._region == CHUNK_DATA:
            if self._left > end - pos:
                self._left -= end - pos
                return end - pos
            pos += self._left
        self._region = CHUNK_LINE
        while pos < end:
            partial = self._size_line
            if not partial:
                small = SMALL_CHUNKS.match(data, pos)
                if small is not None:
                    pos = small.end()
                    if pos == end:
                        break
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline + 1
            before, after = len(partial), len(partial) + stop - pos
            meta += max(0, after - SIZE_LINE) - max(0, before - SIZE_LINE)
            if newline < 0:
                if meta + self._meta_bytes <= self._connection_limits.max_header_bytes:
                    self._size_line = partial + data[pos:end]
                pos = end
                break
            if partial:
                digits = CHUNK_SIZE.match(partial + data[pos:stop])
                self._size_line = b""
            else:
                digits = CHUNK_SIZE.match(data, pos, stop)
            pos = stop
            size = int(digits.group(), 16) if digits else 0  # no digits: httptools refuses the line
            if not size:
                self._region, self._tail = TRAILERS, b"\r\n"  # an empty trailer section is one more CRLF
                break
            if size + 2 > end - pos:  # the chunk's data and the CRLF after it
                self._region, self._left = CHUNK_DATA, size + 2 - (end - pos)
                pos = end
                break
            pos += size + 2
        return self._count(meta, pos - start)

    def _count(self, meta: int, size: int) -> int | None:
        self._meta_bytes += meta
        if self._meta_bytes > self._connection_limits.max_header_bytes:
            self._over_limit(TOO_LARGE)
            return None
        return size
