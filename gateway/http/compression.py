"""Compressed answers: zstd when the client accepts it, gzip otherwise, never for small bodies.

Two places compress, with the same codecs, levels and threshold:

* embedding answers are compressed by their route (:class:`AnswerCompressor`), which holds the
  whole body anyway: the hit path builds no middleware layer, send wrapper or buffer for the
  single-vector answers that stay under the threshold;
* every other route (``/metrics``, ``/stats``, the dashboard, ``/docs``, ``/v1/models``) goes
  through :class:`NegotiatedCompression`: Litestar's compression middleware (which also compresses
  streamed bodies), with our zstd facade and Litestar's gzip.

Both choose the coding with one function, :func:`accepted_encoding` (weights, ``q=0`` refusals,
``*``, every header line). Litestar's own middleware looks for ``gzip`` as a substring of the first
``Accept-Encoding`` line, so ``gzip;q=0`` (a refusal) got gzip on every route but the embedding ones.

Python clients send ``Accept-Encoding: gzip, deflate, zstd`` once ``zstandard`` is installed; httpx
and urllib3 decode it. Both codecs run at their fastest levels: on a 1,000 x 384 float answer gzip
level 1 takes a fifth of the time of level 6 for 12% more bytes, and zstd level 1 is faster and
smaller still. Bodies under ``EMBED_COMPRESSION_MIN_BYTES`` go out as they are: a single-vector
answer gains a few hundred bytes and would pay more in CPU than the hit path's budget
(``bench/features.py`` measures both).
"""

from __future__ import annotations

import gzip
from io import BytesIO
from typing import ClassVar

import zstandard
from litestar.config.compression import CompressionConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import CompressionEncoding
from litestar.middleware import DefineMiddleware
from litestar.middleware.compression import CompressionMiddleware
from litestar.types import HTTPResponseStartEvent, Message, Receive, Scope, Send

from gateway.settings import Settings

__all__ = [
    "GZIP_LEVEL",
    "ZSTD_LEVEL",
    "AnswerCompressor",
    "NegotiatedCompression",
    "ZstdCompression",
    "accepted_encoding",
    "compression_middleware",
]

GZIP_LEVEL = 1
ZSTD_LEVEL = 1
_PREFERRED = ("zstd", "gzip")  # the tie-break when a client weighs both alike


class ZstdCompression:
    """Litestar ``CompressionFacade`` for ``Content-Encoding: zstd`` (one frame per response)."""

    __slots__ = ("buffer", "compressor")

    encoding: ClassVar[str] = "zstd"

    def __init__(
        self, buffer: BytesIO, compression_encoding: CompressionEncoding | str, config: CompressionConfig
    ) -> None:
        self.buffer = buffer
        # Made on the first write: the middleware builds a facade for every response whose client
        # accepts zstd, and most answers stay under the threshold (a context costs ~18 us).
        self.compressor: zstandard.ZstdCompressionObj | None = None

    def write(self, body: bytes) -> None:
        if self.compressor is None:
            self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self.buffer.write(self.compressor.compress(body))

    def close(self) -> None:
        if self.compressor is not None:
            self.buffer.write(self.compressor.flush())


def accepted_encoding(scope: Scope) -> str | None:
    """The coding to answer this request in: ``zstd`` or ``gzip``, whichever its ``Accept-Encoding``
    (every such header line) weighs higher, zstd on a tie; ``*`` stands for both where they are not
    named, and ``q=0`` refuses. None: a plain body."""
    weights: dict[str, float] = {}
    for name, value in scope["headers"]:
        if name != b"accept-encoding":
            continue
        for part in value.decode("latin-1").lower().split(","):
            coding, *params = (piece.strip() for piece in part.split(";"))
            if not coding:
                continue
            weight = 1.0
            for param in params:
                key, _, raw = param.partition("=")
                if key.strip() == "q":
                    weight = _weight(raw.strip())
            weights[coding] = weight
    if not weights:
        return None
    anything = weights.get("*", 0.0)
    best = max(_PREFERRED, key=lambda coding: weights.get(coding, anything))  # the first of equals: zstd
    return best if weights.get(best, anything) > 0 else None


def _weight(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return 1.0  # a malformed weight is a client bug, not a refusal


class AnswerCompressor:
    """Compresses a whole answer body for its request, or leaves it as it is.

    ``compress(scope, body)`` returns the body to send and the headers that go with it:
    ``Content-Encoding`` and ``Vary: Accept-Encoding`` when compressed, ``Vary`` alone when the
    body was large enough but the client takes neither coding, nothing for a small body (whose
    answer does not vary). One zstd context serves every answer, which is safe only from one thread:
    call it on the event loop (the embedding handlers are async), never from a worker thread.
    """

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def compress(self, scope: Scope, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if len(body) < self.min_bytes:
            return body, []
        encoding = accepted_encoding(scope)
        if encoding == "zstd":
            return self._zstd.compress(body), [(b"content-encoding", b"zstd"), _VARY]
        if encoding == "gzip":
            return gzip.compress(body, GZIP_LEVEL), [(b"content-encoding", b"gzip"), _VARY]
        return body, [_VARY]


_VARY = (b"vary", b"accept-encoding")


class NegotiatedCompression(CompressionMiddleware):
    """Litestar's compression middleware, choosing the coding with :func:`accepted_encoding`.

    What it sends follows :class:`AnswerCompressor`'s rules: compressed (with ``Vary``) in the chosen
    coding, plain with ``Vary`` when the body was large enough but the client took neither coding,
    plain without ``Vary`` when it is small.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoding = accepted_encoding(scope)
        if encoding is None:
            await self.app(scope, receive, self._plain(send))
            return
        # "zstd" gets the configured facade (ZstdCompression), "gzip" Litestar's GzipCompression.
        await self.app(
            scope, receive, self.create_compression_send_wrapper(send=send, compression_encoding=encoding, scope=scope)
        )

    def _plain(self, send: Send) -> Send:
        """``send`` that adds ``Vary: Accept-Encoding`` to an answer large enough to have been compressed:
        a shared cache must not hand this plain body to a client that asked for gzip, nor the reverse."""
        minimum = self.config.minimum_size
        start: HTTPResponseStartEvent | None = None

        async def send_plain(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # held until the first body part says how large the answer is
                return
            if start is not None:
                if message["type"] == "http.response.body" and (
                    message.get("more_body") or len(message.get("body", b"")) >= minimum
                ):
                    MutableScopeHeaders(start).extend_header_value("vary", "Accept-Encoding")
                held, start = start, None
                await send(held)
            await send(message)

        return send_plain


def compression_middleware(settings: Settings) -> DefineMiddleware | None:
    """The compression middleware for the routes that do not compress their own answers."""
    if not settings.compression:
        return None
    config = CompressionConfig(
        backend="zstd",
        compression_facade=ZstdCompression,
        gzip_fallback=True,
        gzip_compress_level=GZIP_LEVEL,
        minimum_size=settings.compression_min_bytes,
    )
    return DefineMiddleware(NegotiatedCompression, config=config)
