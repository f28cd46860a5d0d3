"""Compression as configured here: which coding a client gets, and when an answer stays plain."""

from __future__ import annotations

import gzip

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
