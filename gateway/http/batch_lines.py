"""Run one batch line through the very route its batch names, in-process: :class:`LineExecutor`.

A line of a ``/v1/embeddings`` batch is the body of a ``POST /v1/embeddings``, so it is answered by
that route's handler, called with a request made here (no socket): the same decoding, checks,
prompts, cache and answer bytes, so a batch's vectors are those of the route, bit for bit, and a
line the route would refuse gets the route's own error. What differs is marked in the scope
(:data:`BACKGROUND_LINE`): the work runs as the batch tenant (the encoder's smallest share), with
no client to hang up, no in-flight cap (the runner bounds its own work) and no per-minute key
limit (a batch is paced by its share, not by a bucket).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import msgspec
from litestar import Litestar, Request
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute
from litestar.types import HTTPRequestEvent, HTTPScope

from gateway.core.batch.lines import LineAnswer
from gateway.core.errors import GatewayError
from gateway.http.errors import ERROR_TABLE, ErrorBody, ErrorEnvelope
from gateway.http.routes.embeddings import BACKGROUND_LINE, create_embeddings
from gateway.http.routes.rerank import rerank_v1
from gateway.http.runtime import Runtime

__all__ = ["BATCH_ROUTES", "LineExecutor"]

# The endpoints a batch may name, and the handler that answers each.
BATCH_ROUTES: Mapping[str, HTTPRouteHandler] = {"/v1/embeddings": create_embeddings, "/v1/rerank": rerank_v1}

_encode = msgspec.json.Encoder().encode
_ROOM_POLL_S = 0.01


class LineExecutor:
    """``await executor(endpoint, body, owner)``: the route's answer to ``body`` (see the module)."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self._waiting = asyncio.Lock()  # one line polls for room; the rest wait their turn behind it
        # The app's own copies of the handlers (Litestar copies each into the app it registers, and
        # resolves its layers there, the body limit too); never the module's originals, whose
        # resolved values would leak into every app registered after.
        self.handlers: dict[str, HTTPRouteHandler] = {}
        for route in app.routes:
            if isinstance(route, HTTPRoute) and route.path in BATCH_ROUTES and "POST" in route.route_handler_map:
                self.handlers[route.path] = route.route_handler_map["POST"][0]

    async def _room(self) -> None:
        """Wait while batch work fills half of the encoder queue: the other half stays free for
        interactive requests, which a full queue would refuse (503); the device stays busy."""
        runtime: Runtime = self.app.state.runtime
        limit = runtime.settings.max_queue_tokens // 2

        def full() -> bool:
            return sum(model.batcher.queue_tokens for model in runtime.models) >= limit

        if not full():
            return
        async with self._waiting:
            # The queue's figure has no event to wait on: polled, by this one line.
            while full():  # noqa: ASYNC110
                await asyncio.sleep(_ROOM_POLL_S)

    async def __call__(self, endpoint: str, body: bytes, owner: str) -> LineAnswer:
        await self._room()
        handler = self.handlers[endpoint]
        scope: dict[str, Any] = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": endpoint,
            "raw_path": endpoint.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": None,
            "server": None,
            "app": self.app,
            "litestar_app": self.app,
            "route_handler": handler,
            "path_params": {},
            "state": {BACKGROUND_LINE: True},
        }
        request: Request[Any, Any, Any] = Request(cast(HTTPScope, scope), receive=_receive(body))
        try:
            response = await handler.fn(request)
        except GatewayError as exc:
            return _error(exc)
        except HTTPException as exc:
            return _failed(exc.status_code, str(exc.detail), "invalid_request_error", None, None)
        return LineAnswer(200, bytes(response.body))


def _receive(body: bytes) -> Any:
    sent = False

    async def receive() -> HTTPRequestEvent:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # nobody hangs up: a batch line has no client
        raise AssertionError("unreachable")

    return receive


def _error(exc: GatewayError) -> LineAnswer:
    status, error_type = next(ERROR_TABLE[cls] for cls in type(exc).__mro__ if cls in ERROR_TABLE)
    return _failed(status, exc.message, error_type, exc.param, exc.code)


def _failed(status: int, message: str, error_type: str, param: str | None, code: str | None) -> LineAnswer:
    body = _encode(ErrorEnvelope(ErrorBody(message=message, type=error_type, param=param, code=code)))
    return LineAnswer(status, body, error_code=code or error_type, error_message=message)
