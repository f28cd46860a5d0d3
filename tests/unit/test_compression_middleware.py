"""Litestar's compression middleware as configured here: small single answers build no compressor."""

from __future__ import annotations

from io import BytesIO
from typing import Any, ClassVar

import pytest
import zstandard
from litestar.config.compression import CompressionConfig
from litestar.enums import CompressionEncoding

from gateway.http.compression import ZstdCompression, compression_config
from gateway.settings import Settings


class _Counted(ZstdCompression):
    made: ClassVar[int] = 0

    def __init__(
        self, buffer: BytesIO, compression_encoding: CompressionEncoding | str, config: CompressionConfig
    ) -> None:
        type(self).made += 1
        super().__init__(buffer, compression_encoding, config)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _serve(chunks: list[bytes], accept: bytes) -> tuple[dict[bytes, bytes], bytes]:
    config = compression_config(Settings(compression_min_bytes=1000))
    assert config is not None
    config.compression_facade = _Counted
    length = str(sum(map(len, chunks))).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]})
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    middleware = config.middleware_class(app=app, config=config)
    scope = {"type": "http", "headers": [(b"accept-encoding", accept)], "state": {}, "path": "/", "route_handler": None}
    await middleware(scope, receive, send)  # type: ignore[arg-type]
    headers = {name.lower(): value for name, value in sent[0]["headers"]}
    return headers, b"".join(message["body"] for message in sent[1:])


@pytest.mark.anyio
async def test_small_answers_build_no_compressor_and_large_ones_are_compressed() -> None:
    _Counted.made = 0
    small = b"s" * 999
    headers, body = await _serve([small], b"gzip, deflate, zstd")
    assert body == small and b"content-encoding" not in headers and _Counted.made == 0
    headers, body = await _serve([small], b"gzip")
    assert body == small and b"content-encoding" not in headers
    large = b"l" * 5000
    headers, body = await _serve([large], b"gzip, deflate, zstd")
    assert headers[b"content-encoding"] == b"zstd" and _Counted.made == 1
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == large
    headers, body = await _serve([b"a" * 10, b"b" * 10], b"zstd")  # streamed: Litestar's wrapper as it is
    assert headers[b"content-encoding"] == b"zstd"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == b"a" * 10 + b"b" * 10
