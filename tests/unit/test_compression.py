"""Compression as configured here: which coding a client gets, and when an answer stays plain."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
import zstandard

from gateway.http.compression import AnswerCompressor, accepted_encoding


def _scope(accept: bytes | None) -> dict[str, object]:
    headers = [(b"host", b"x")] + ([(b"accept-encoding", accept)] if accept is not None else [])
    return {"type": "http", "headers": headers}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"gzip, deflate, zstd", "zstd"),  # python clients with zstandard installed: zstd first
        (b"gzip, deflate", "gzip"),
        (b"GZIP", "gzip"),
        (b"zstd;q=0, gzip;q=0.5", "gzip"),  # q=0 refuses a coding
        (b"gzip;q=0", None),
        (b"identity", None),
        (b"br", None),
        (b"gzip;q=oops", "gzip"),  # a malformed weight is not a refusal
        (b"gzip;level=1;q=0", None),  # the weight among other parameters
        (b"gzip ; q = 0", None),
        (b"gzip;q=1, zstd;q=0.1", "gzip"),  # the client's weights choose
        (b"*", "zstd"),  # anything: the server's first
        (b"*, zstd;q=0", "gzip"),
        (b"*;q=0", None),
        (None, None),
    ],
)
def test_the_coding_follows_accept_encoding(accept: bytes | None, expected: str | None) -> None:
    assert accepted_encoding(_scope(accept)) == expected  # type: ignore[arg-type]


def test_every_accept_encoding_line_counts() -> None:
    scope = {"type": "http", "headers": [(b"accept-encoding", b"identity"), (b"accept-encoding", b"gzip")]}
    assert accepted_encoding(scope) == "gzip"  # type: ignore[arg-type]


def test_small_answers_stay_plain_and_large_ones_are_compressed_and_vary() -> None:
    compressor = AnswerCompressor(min_bytes=1000)
    small = b"s" * 999
    assert compressor.compress(_scope(b"gzip, zstd"), small) == (small, [])  # type: ignore[arg-type]
    large = b'{"data": "' + b"l" * 5000 + b'"}'
    body, headers = compressor.compress(_scope(b"gzip, deflate, zstd"), large)  # type: ignore[arg-type]
    assert dict(headers) == {b"content-encoding": b"zstd", b"vary": b"accept-encoding"}
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == large and len(body) < len(large)
    body, headers = compressor.compress(_scope(b"gzip"), large)  # type: ignore[arg-type]
    assert dict(headers)[b"content-encoding"] == b"gzip" and gzip.decompress(body) == large
    body, headers = compressor.compress(_scope(None), large)  # type: ignore[arg-type]
    assert body == large and headers == [(b"vary", b"accept-encoding")]


# --- the middleware of the other routes (issue 26, item 9) ------------------------------------


def _run_middleware(accept: bytes | None, parts: list[bytes]) -> tuple[dict[bytes, bytes], bytes]:
    """(headers, body) that ``NegotiatedCompression`` sends for an app answering ``parts``."""
    import asyncio

    from gateway.http.compression import compression_middleware
    from gateway.settings import Settings

    async def app(scope: object, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for number, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": number < len(parts) - 1})

    define = compression_middleware(Settings(compression_min_bytes=1000))
    assert define is not None
    middleware = define(app)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {**_scope(accept), "path": "/metrics", "raw_path": b"/metrics", "method": "GET", "state": {}}
    asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
    headers: dict[bytes, bytes] = {}
    for name, value in sent[0]["headers"]:
        headers[bytes(name).lower()] = bytes(value)
    return headers, b"".join(message.get("body", b"") for message in sent[1:])


@pytest.mark.parametrize(
    "accept", [b"gzip;q=0", b"gzip ; q = 0", b"*;q=0", b"identity", b"zstd;q=0, gzip;q=0", b"br", None]
)
def test_the_middleware_leaves_refused_answers_plain(accept: bytes | None) -> None:
    """Litestar's middleware matched ``gzip`` as a substring: ``gzip;q=0`` got gzip."""
    large = b"m" * 5000
    headers, body = _run_middleware(accept, [large])
    assert b"content-encoding" not in headers and body == large
    assert headers[b"vary"].lower() == b"accept-encoding", "a shared cache must not serve it to a gzip client"
    headers, body = _run_middleware(accept, [b"small"])
    assert b"content-encoding" not in headers and b"vary" not in headers and body == b"small"


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        (b"gzip", b"gzip"),
        (b"gzip, zstd", b"zstd"),
        (b"zstd;q=0, *", b"gzip"),
        (b"*", b"zstd"),
        (b"gzip;q=1, zstd;q=0.1", b"gzip"),
    ],
)
def test_the_middleware_uses_the_negotiated_coding(accept: bytes, coding: bytes) -> None:
    large = b"m" * 5000
    headers, body = _run_middleware(accept, [large])
    assert headers[b"content-encoding"] == coding and headers[b"vary"].lower() == b"accept-encoding"
    plain = (
        gzip.decompress(body) if coding == b"gzip" else zstandard.ZstdDecompressor().decompressobj().decompress(body)
    )
    assert plain == large


def test_a_streamed_plain_answer_varies_too() -> None:
    headers, body = _run_middleware(b"gzip;q=0", [b"a", b"b"])
    assert body == b"ab" and b"content-encoding" not in headers and b"vary" in headers
