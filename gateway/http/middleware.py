"""Request context: an ``x-request-id`` on every response, timing, telemetry and one log line per request.

The in-flight cap (``EMBED_MAX_CONNECTIONS``) is kept here, by :class:`InFlight`, because only
the routes know when a request becomes work: a request counts once its body is complete. One whose
body is still arriving holds no slot (a few uploads trickling at a legal rate must not refuse every
other request while ``/readyz`` says 200); its memory is bounded by the body limits and deadlines
instead. Routes that read a body (``opt={"embedding": True}``) call :func:`admit` once they have
it; any other request is counted as it starts. Probes and ``/metrics`` are never counted or refused.

Two marks in a request's ``scope["state"]`` come from the server protocol (:mod:`gateway.http.server`),
which sees the connection but not the routes: :data:`CUT_STATUS` (the protocol answered the request
itself, 408 or 431, and cut it off), and :data:`CLIENT_GONE` (the connection was lost before the
answer started, whether or not the app asked for more of the body: a 499).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from gateway.core.errors import OverloadedError
from gateway.core.telemetry import Telemetry
from gateway.http.errors import TEI_ERRORS, ErrorBody, ErrorEnvelope

__all__ = [
    "ADMIT_AFTER_BODY",
    "CLIENT_GONE",
    "CUT_STATUS",
    "TEI_ERRORS",
    "AtCapacityError",
    "InFlight",
    "RequestContextMiddleware",
    "RequestOutcome",
    "admit",
    "outcome",
    "request_id",
]

logger = logging.getLogger("gateway.access")

CUT_STATUS = "gateway.cut_status"
CLIENT_GONE = "gateway.client_gone"

# Served even at the cap: the kubelet restarts a pod whose liveness probe fails for long, a busy
# replica must not look dead or unready for being busy, and the scraper must see the overload.
_NEVER_REFUSED = frozenset({"/livez", "/readyz", "/health", "/metrics"})

# The client left before its answer: nginx's status. Whatever the app made of the disconnect
# (Litestar turns a body cut short into a 500), it is no server error and must not page anyone.
_CLIENT_LEFT = 499

_AT_CAPACITY = "The server has as many requests in flight as it takes; retry shortly."
_OVER_CAPACITY_BODY = msgspec.json.encode(
    ErrorEnvelope(ErrorBody(message=_AT_CAPACITY, type="server_error", code="overloaded"))
)
_OVER_CAPACITY_HEADERS = (
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVER_CAPACITY_BODY)).encode()),
    (b"retry-after", b"1"),
)
# TEI's clients read TEI's shape: 429 {"error", "error_type": "Overloaded"} (gateway.http.routes.tei).
_TEI_OVER_CAPACITY_BODY = msgspec.json.encode({"error": _AT_CAPACITY, "error_type": "Overloaded"})
_TEI_OVER_CAPACITY_HEADERS = (
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_TEI_OVER_CAPACITY_BODY)).encode()),
    (b"retry-after", b"1"),
)
# The request's pending admission, for admit() (a name of its own: the API-key hooks keep theirs).
_ADMISSION = "gateway.cap_admission"

# Route options (``opt``) this middleware reads.
ADMIT_AFTER_BODY = "admit_after_body"  # the route reads a body and calls admit() once it has it


async def _refuse_over_capacity(send: Send, *, tei: bool = False) -> None:
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 429 if tei else 503,
        "headers": list(_TEI_OVER_CAPACITY_HEADERS if tei else _OVER_CAPACITY_HEADERS),
    }
    body: HTTPResponseBodyEvent = {
        "type": "http.response.body",
        "body": _TEI_OVER_CAPACITY_BODY if tei else _OVER_CAPACITY_BODY,
        "more_body": False,
    }
    await send(start)
    await send(body)


class AtCapacityError(OverloadedError):
    """``EMBED_MAX_CONNECTIONS`` requests are in flight: this one is refused (503, Retry-After 1)."""

    def __init__(self) -> None:
        super().__init__(_AT_CAPACITY, retry_after=1.0)


class InFlight:
    """The requests of this process that count against the cap ``cap`` (None: no cap), shared by
    every route's middleware (Litestar builds one middleware stack per route)."""

    def __init__(self, cap: int | None, telemetry: Telemetry) -> None:
        self.cap = cap
        self.telemetry = telemetry
        self.count = 0

    def full(self) -> bool:
        return self.cap is not None and self.count >= self.cap

    def take(self) -> bool:
        """Count one more request; False (and counted as refused) when the cap is reached."""
        if self.cap is not None and self.count >= self.cap:
            self.telemetry.refused_at_capacity()
            return False
        self.count += 1
        return True


class _Admission:
    __slots__ = ("admitted", "in_flight")

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight
        self.admitted = False


def admit(scope: Scope) -> None:
    """Count this request, whose body is now complete, against the in-flight cap; raise
    :class:`AtCapacityError` at the cap. A second call, or one outside the middleware, does nothing."""
    admission = scope.get("state", {}).get(_ADMISSION)
    if isinstance(admission, _Admission) and not admission.admitted:
        if not admission.in_flight.take():
            raise AtCapacityError
        admission.admitted = True


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
    paths clients send; routes with ``opt={"embedding": True}`` count as embedding requests. A
    request whose client left before its answer started is a 499 (or the 408/431 the protocol
    sent before cutting it off). ``in_flight`` is the process's cap (see the module's docstring):
    a request past it gets 503 ``overloaded`` here (or from :func:`admit`), counted as refused.
    """

    def __init__(
        self, app: ASGIApp, telemetry: Telemetry, json_logs: bool = False, in_flight: InFlight | None = None
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.json_logs = json_logs
        self.in_flight = in_flight if in_flight is not None else InFlight(None, telemetry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        status = 500
        answering = False
        client_left = False

        async def send_with_status(message: Message) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
            await send(message)

        async def receive_watching() -> ReceiveMessage:
            nonlocal client_left
            message = await receive()
            client_left = client_left or (message["type"] == "http.disconnect" and not answering)
            return message

        state: dict[str, Any] = scope["state"]  # request_id() made sure of it
        handler = scope.get("route_handler")
        opt: dict[str, Any] = handler.opt if handler is not None else {}
        admission = _Admission(self.in_flight)
        refused = False
        if scope.get("path_template") in _NEVER_REFUSED:
            pass
        elif opt.get(ADMIT_AFTER_BODY):
            if self.in_flight.full():
                # Already at the cap: refused now, before its key's buckets are charged or its body
                # read. Below it, it is counted once the route has its body (admit).
                self.telemetry.refused_at_capacity()
                refused = True
            else:
                state[_ADMISSION] = admission
        else:
            admission.admitted = self.in_flight.take()
            refused = not admission.admitted
        try:
            if refused:
                await _refuse_over_capacity(send_with_status, tei=bool(opt.get(TEI_ERRORS)))
            else:
                await self.app(scope, receive_watching, send_with_status)
        finally:
            if admission.admitted:
                self.in_flight.count -= 1
            if client_left or state.get(CLIENT_GONE):
                status = state.get(CUT_STATUS, _CLIENT_LEFT)
            seconds = time.perf_counter() - started
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
