"""Request context: an ``x-request-id`` on every response, timing, and one log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import Metrics, endpoint_label

__all__ = ["RequestContextMiddleware", "add_request_id_header", "request_id"]

logger = logging.getLogger("gateway.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` when it is sane, else a fresh one; stored in the scope."""
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _CLIENT_ID.match(candidate) else None
                break
        rid = rid or uuid.uuid4().hex
        state["request_id"] = rid
    return str(rid)


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """Litestar ``before_send`` hook: runs for every response, unrouted 404s included."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", []))
        headers.append((b"x-request-id", request_id(scope).encode()))
        message["headers"] = headers


class RequestContextMiddleware:
    """Times each routed request, counts it, and logs one line without any input text."""

    def __init__(self, app: ASGIApp, metrics: Metrics, json_logs: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.json_logs = json_logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.observe_request(endpoint_label(scope.get("path", "")), status, seconds)
            self._log(scope, rid, status, seconds)

    def _log(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        state: dict[str, Any] = scope.get("state", {})
        fields = {
            "request_id": rid,
            "method": scope.get("method", ""),
            "path": scope.get("path", ""),
            "status": status,
            "inputs": state.get("inputs", 0),
            "hits": state.get("cache_hits", 0),
            "misses": state.get("cache_misses", 0),
            "tokens": state.get("tokens", 0),
            "ms": round(seconds * 1e3, 2),
        }
        if not logger.isEnabledFor(logging.INFO):
            return
        if self.json_logs:
            logger.info("request", extra={"fields": fields})
        else:
            logger.info(" ".join(f"{key}={value}" for key, value in fields.items()))
