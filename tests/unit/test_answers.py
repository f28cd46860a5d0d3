"""PreparedAnswer: an embedding answer Litestar sends as built, layers' headers and cookies kept."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import Cookie, ResponseHeader
from litestar.testing import TestClient
from litestar.types import Scope

from gateway.http.answers import AnswerBuilder, PreparedAnswer
from gateway.http.compression import AnswerCompressor


class Body(msgspec.Struct):
    values: list[int]


def test_the_body_and_headers_go_out_as_built_with_what_the_layers_add() -> None:
    ran: list[str] = []

    @post(
        "/plain",
        response_headers=[ResponseHeader(name="x-layer", value="kept")],
        response_cookies=[Cookie(key="c", value="v")],
        background=BackgroundTask(ran.append, "after"),
    )
    async def plain() -> Response[Body]:
        return PreparedAnswer(Body([1, 2]), b'{"values":[1,2]}', [(b"x-pacing", b"7")])

    with TestClient(Litestar([plain])) as client:
        answer = client.post("/plain")
    assert answer.status_code == 200 and answer.json() == {"values": [1, 2]}
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(b'{"values":[1,2]}'))
    assert answer.headers["x-pacing"] == "7" and answer.headers["x-layer"] == "kept"
    assert answer.cookies["c"] == "v"
    assert ran == ["after"]


def test_what_an_after_request_hook_sets_on_the_answer_is_sent() -> None:
    async def stamp(response: Response[Any]) -> Response[Any]:
        response.set_header("x-after", "1")
        response.set_cookie("after", "yes")
        return response

    @post("/hooked", after_request=stamp, response_headers=[ResponseHeader(name="x-after", value="layer")])
    async def hooked() -> Response[Body]:
        return PreparedAnswer(Body([3]), b'{"values":[3]}', [])

    with TestClient(Litestar([hooked])) as client:
        answer = client.post("/hooked")
    assert answer.headers["x-after"] == "1", "the response's own header wins over the layer's, as in Litestar"
    assert answer.cookies["after"] == "yes" and answer.json() == {"values": [3]}


def test_the_builder_encodes_compresses_and_adds_the_clients_headers() -> None:
    seen: list[int] = []

    def client_headers(scope: Scope, status: int) -> list[tuple[bytes, bytes]]:
        seen.append(status)
        return [(b"x-cache-hits", b"1")]

    builder = AnswerBuilder(client_headers, AnswerCompressor(min_bytes=64))

    @post("/built")
    async def built(request: Request[Any, Any, Any]) -> Response[Body]:
        return builder.prepare(request.scope, Body(list(range(100))))

    with TestClient(Litestar([built])) as client:
        answer = client.post("/built", headers={"accept-encoding": "gzip"})
        plain = client.post("/built", headers={"accept-encoding": "identity"})
    assert answer.headers["content-encoding"] == "gzip" and answer.json() == {"values": list(range(100))}
    assert plain.headers.get("content-encoding") is None and plain.content == msgspec.json.encode(
        Body(list(range(100)))
    )
    assert answer.headers["x-cache-hits"] == "1" and seen == [200, 200]
