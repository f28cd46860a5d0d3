"""Request context: an ``x-request-id`` on every response, timing, telemetry and one log line per request."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.telemetry import Telemetry

__all__ = ["RequestContextMiddleware", "RequestOutcome", "outcome", "request_id"]

logger = logging.getLogger("gateway.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\s]")


@dataclass(slots=True)
class RequestOutcome:
    """What an embeddings route did, for the access log line (never any input text)."""

    inputs: int = 0
    hits: int = 0
    misses: int = 0
    tokens: int = 0


_OUTCOME = "gateway.outcome"


def outcome(scope: Scope) -> RequestOutcome:
    """This request's :class:`RequestOutcome`, created on first use."""
    state: dict[str, Any] = scope.setdefault("state", {})
    found = state.get(_OUTCOME)
    if not isinstance(found, RequestOutcome):
        found = state[_OUTCOME] = RequestOutcome()
    return found


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
        rid = rid or os.urandom(16).hex()  # uuid4().hex's shape, at a quarter of its cost
        state["request_id"] = rid
    return str(rid)


def log_safe(text: str, limit: int = 256) -> str:
    """``text`` with control characters and whitespace escaped, so a client cannot forge log lines."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), cut)


class RequestContextMiddleware:
    """Times each routed request, reports it to telemetry, and logs one line without any input text.

    The endpoint label is the matched route's path template, so labels stay bounded whatever
    paths clients send; routes with ``opt={"embedding": True}`` count as embedding requests.
    """

    def __init__(self, app: ASGIApp, telemetry: Telemetry, json_logs: bool = False) -> None:
        self.app = app
        self.telemetry = telemetry
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
            handler = scope.get("route_handler")
            embedding = bool(handler is not None and handler.opt.get("embedding"))
            endpoint = str(scope.get("path_template") or "other")
            self.telemetry.request_done(endpoint, status, seconds, embedding=embedding)
            self._log(scope, rid, status, seconds)

    def _log(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, object] = {
            "request_id": rid,
            "method": log_safe(str(scope.get("method", ""))),
            "path": log_safe(scope.get("path", "")),
            "status": status,
            **asdict(outcome(scope)),
            "ms": round(seconds * 1e3, 2),
        }
        if self.json_logs:
            logger.info("request", extra={"fields": fields})
        else:
            logger.info(" ".join(f"{key}={value}" for key, value in fields.items()))
