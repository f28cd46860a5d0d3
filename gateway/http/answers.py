"""Embedding answers that leave the route final: body encoded, every header in place.

For a value a handler returns, Litestar builds a ``Response``, then an ``ASGIResponse`` (its
headers go through a case-insensitive mutable mapping, its body through the app's serializer),
then the two ASGI messages: 27 us per answer here, against 3 us for the two messages alone, on a
hit path of ~450 us. The embedding routes know everything about their answer (the body, the
pacing and cache headers, the compression), so they build it once and return a
:class:`PreparedAnswer`: Litestar's own response path (``to_asgi_response``) with nothing left to
compute. The messages still go through the app's middleware and ``before_send`` hook, and the
handlers stay annotated ``Response[EmbeddingResponse]``, so the OpenAPI document is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from litestar import Response
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send, TypeEncodersMap

from gateway.http.compression import AnswerCompressor

if TYPE_CHECKING:
    from litestar.app import Litestar
    from litestar.connection import Request

__all__ = ["AnswerBuilder", "PreparedAnswer"]

T = TypeVar("T")

_JSON = (b"content-type", b"application/json")


class PreparedAnswer(Response[T]):
    """A 200 JSON answer: ``content`` (the schema value, for OpenAPI and introspection), ``body``
    (its encoding, perhaps compressed) and ``headers`` (besides content type and length)."""

    __slots__ = ("body", "raw_headers")

    def __init__(self, content: T, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(content, media_type=MediaType.JSON, status_code=200)
        self.body = body
        self.raw_headers = headers

    def to_asgi_response(
        self,
        app: Litestar | None,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        sent = [_JSON, (b"content-length", str(len(self.body)).encode()), *self.raw_headers]
        # What the handler's layers or an after_request hook add (none today; empty on the hit path).
        # As in Litestar's own merge, the response's headers win over the layers'.
        extra = {**headers, **self.headers} if headers else self.headers
        if extra:
            sent += [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in extra.items()]
        for cookie in [*self.cookies, *(cookies or ())]:
            if not cookie.documentation_only:
                sent.append(cookie.to_encoded_header())
        return _Sender(self.body, sent, self.background or background)


class _Sender(ASGIResponse):
    """Sends a prepared body and headers as they are (no header mapping, no serializer)."""

    __slots__ = ("raw_headers",)

    def __init__(
        self, body: bytes, headers: list[tuple[bytes, bytes]], background: BackgroundTask | BackgroundTasks | None
    ) -> None:
        # ASGIResponse.__init__ is not called on purpose: it would rebuild what is already final.
        self.body = body
        self.raw_headers = headers
        self.status_code = 200
        self.background = background

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})
        await self.after_response()  # the background tasks, if any


Headers = list[tuple[bytes, bytes]]


class AnswerBuilder:
    """Turns an embedding route's response value into its :class:`PreparedAnswer`: the JSON body
    (msgspec, as Litestar's serializer would write it), compressed when the client takes it, with
    the headers ``client_headers(scope, status)`` gives (the key's pacing and cache headers:
    :meth:`~gateway.http.clients.ClientHooks.answer_headers`, which also charges and counts it)."""

    def __init__(self, client_headers: Callable[[Scope, int], Headers], compressor: AnswerCompressor | None) -> None:
        self.client_headers = client_headers
        self.compressor = compressor
        self._encode = msgspec.json.Encoder().encode

    def prepare(self, scope: Scope, content: T) -> PreparedAnswer[T]:
        body = self._encode(content)
        coding: Headers = []
        if self.compressor is not None:
            body, coding = self.compressor.compress(scope, body)
        # Last: it charges and counts the answer, which nothing after it may fail.
        return PreparedAnswer(content, body, self.client_headers(scope, 200) + coding)
