"""Issues 27 and 28 on the wire: raw sockets against the app under our own uvicorn protocol.

Each server here is the real app under ``uvicorn_config`` (the protocol, limits and deadlines that
``embedding-gateway serve`` uses), in a thread of the test process, sharing the loaded encoder; a
:class:`~tests.gates.GatedEncoder` holds the model where a test needs requests in flight.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn

from gateway import Settings, create_app
from gateway.core.telemetry import Telemetry
from gateway.http.server import uvicorn_config
from tests.gates import GatedEncoder
from tests.servers import free_port

pytestmark = pytest.mark.slow


@dataclass
class Served:
    port: int
    telemetry: Telemetry
    server: uvicorn.Server
    thread: threading.Thread
    gated: GatedEncoder | None = None
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> Wire:
        wire = Wire(socket.create_connection(("127.0.0.1", self.port), timeout=10))
        self.sockets.append(wire.sock)
        return wire

    def statuses(self, endpoint: str) -> dict[int, int]:
        return {status: n for (path, status), n in self.telemetry.counters.by_endpoint.items() if path == endpoint}


@pytest.fixture
def serve(minilm_encoder: Any) -> Iterator[Callable[..., Served]]:
    """Start the app under ``uvicorn_config(app, settings)`` with the given settings."""
    started: list[Served] = []

    def start(gated: bool = False, **overrides: Any) -> Served:
        fields: dict[str, Any] = {
            "model_name": "all-MiniLM-L6-v2",
            "cache": False,
            "cache_prefix": f"test-{uuid.uuid4().hex[:8]}",
            "host": "127.0.0.1",
            "port": free_port(),
            "shutdown_timeout_s": 2,
        }
        fields.update(overrides)
        settings = Settings(model=str(minilm_encoder.path), **fields)
        encoder = GatedEncoder(minilm_encoder) if gated else None
        telemetry = Telemetry()
        app = create_app(settings, encoder=encoder or minilm_encoder, telemetry=telemetry)  # type: ignore[arg-type]
        server = uvicorn.Server(uvicorn_config(app, settings))
        thread = threading.Thread(target=server.run, name=f"wire-{settings.port}", daemon=True)
        served = Served(settings.port, telemetry, server, thread, encoder)
        started.append(served)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return served

    yield start
    for served in started:
        if served.gated is not None:
            served.gated.gate.set()
        for sock in served.sockets:
            sock.close()
        served.server.should_exit = True
        served.thread.join(timeout=30)


class Wire:
    """One raw connection: send bytes, read whole responses, see whether the server hung up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def send(self, data: bytes) -> bool:
        """``False`` once the server has closed the connection (the rest is not sent)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def send_in_pieces(self, data: bytes, piece: int = 64 * 1024) -> bool:
        return all(self.send(data[start : start + piece]) for start in range(0, len(data), piece))

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return False
        self.pending += chunk
        return bool(chunk)

    def response(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next response's status and body, or ``None`` when the connection ended (or stayed
        silent for ``timeout``) before a whole one came."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.pending:
            if not self._fill(deadline):
                return None
        head, _, self.pending = self.pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        while len(self.pending) < length:
            if not self._fill(deadline):
                return None
        body, self.pending = self.pending[:length], self.pending[length:]
        return int(lines[0].split()[1]), body

    def closed_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def _text(words: str) -> bytes:
    return msgspec.json.encode({"input": words})


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- issue 28 #4: every header byte is counted, trailers and pipelined heads included ---------------


def test_a_trailer_section_past_the_head_limit_is_refused(serve: Callable[..., Served]) -> None:
    """Before: trailers were never counted; a 120 MB trailer got 200 (and /livez took 5.2 s
    meanwhile: httptools grows a header value by concatenation, quadratic in its size)."""
    served = serve()
    wire = served.connect()
    body = _text("a request with a trailer")
    wire.send(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\nx-trailer: "
    )
    wire.send_in_pieces(b"a" * (2 << 20))
    wire.send(b"\r\n\r\n")
    answer = wire.response()
    assert answer is not None and answer[0] == 431, answer
    assert msgspec.json.decode(answer[1])["error"]["code"] == "request_header_fields_too_large"
    assert wire.closed_within(5)
    assert httpx.get(f"{served.url}/livez", timeout=5).status_code == 200
    _wait_for(lambda: served.statuses("/v1/embeddings") == {431: 1})  # what the client got, not a 499


def test_a_chunked_request_with_small_trailers_is_served(serve: Callable[..., Served]) -> None:
    served = serve()
    wire = served.connect()
    body = _text("chunked, in two pieces")
    wire.send(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n" % 5
        + body[:5]
        + b"\r\n"
        + b"%x;name=value\r\n" % (len(body) - 5)
        + body[5:]
        + b"\r\n0\r\nx-checksum: 1\r\n\r\n"
    )
    answer = wire.response()
    assert answer is not None and answer[0] == 200, answer
    wire.send(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (wire.response() or (0, b""))[0] == 200


def test_chunk_framing_is_not_counted_but_chunk_extensions_are(serve: Callable[..., Served]) -> None:
    served = serve()
    wire = served.connect()
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    body = _text("one byte per chunk") + b" " * 20_000
    framed = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))  # 120 KB on the wire
    wire.send(head + framed + b"0\r\n\r\n")
    answer = wire.response()
    assert answer is not None and answer[0] == 200, answer

    wire = served.connect()
    wire.send(head + b"5;" + b"e" * (100 << 10) + b"\r\n")  # 100 KB of chunk extensions
    answer = wire.response()
    assert answer is not None and answer[0] == 431, answer
    assert wire.closed_within(5)


def test_a_pipelined_head_past_the_limit_gets_431_after_the_answer_before_it(serve: Callable[..., Served]) -> None:
    """Before: a head that arrived while the request before it was being served was never counted:
    a 50 MB pipelined head got 200."""
    served = serve(gated=True)
    assert served.gated is not None
    served.gated.gate.clear()
    wire = served.connect()
    wire.send(_post(_text("the first request, held in the encoder")))
    assert served.gated.entered.wait(10)
    wire.send(b"GET /livez HTTP/1.1\r\nhost: x\r\nx-big: ")
    wire.send_in_pieces(b"a" * (1 << 20))
    wire.send(b"\r\n\r\n")
    time.sleep(0.3)
    served.gated.gate.set()
    first = wire.response()
    assert first is not None and first[0] == 200, first
    second = wire.response()
    assert second is not None and second[0] == 431, second
    assert wire.closed_within(5)


def test_pipelined_requests_within_the_limits_are_all_answered_in_order(serve: Callable[..., Served]) -> None:
    served = serve(max_header_bytes=4096)
    wire = served.connect()
    padding = b"x-pad: " + b"p" * 3000 + b"\r\n"  # each head about 3.1 KB; together far past the limit
    requests = [_post(_text(f"pipelined {i}"), padding) for i in range(4)]
    requests.insert(2, b"\r\nGET /livez HTTP/1.1\r\nhost: x\r\n" + padding + b"\r\n")  # an empty line first is allowed
    wire.send(b"".join(requests))
    answers = [wire.response() or (0, b"") for _ in requests]
    assert [status for status, _ in answers] == [200] * len(requests)
    assert [body == b'{"status":"ok"}' for _, body in answers] == [False, False, True, False, False]


# --- issue 28 #5: the body deadline is an idle timeout (with a documented minimum rate) ---------------


def test_a_slow_upload_that_keeps_arriving_is_served(serve: Callable[..., Served]) -> None:
    """Before: the body deadline was a total time: at the defaults (60 s, 32 MiB) any upload slower
    than about 560 KB/s was cut off, with no answer."""
    served = serve(body_timeout_s=1.0)
    wire = served.connect()
    request = _post(_text("slow but steady") + b" " * 12_000)  # 4 KB/s: over the default minimum rate
    head_end = request.index(b"\r\n\r\n") + 4
    wire.send(request[:head_end])
    body = request[head_end:]
    pieces = 12
    step = -(-len(body) // pieces)
    for start in range(0, len(body), step):  # about 3 s in all, never 1 s without data
        time.sleep(0.25)
        assert wire.send(body[start : start + step]), "the upload was cut off while it kept arriving"
    answer = wire.response()
    assert answer is not None and answer[0] == 200, answer


def test_a_body_dripping_below_the_minimum_rate_gets_408(serve: Callable[..., Served]) -> None:
    """An idle timeout alone lets one byte every (timeout - 1) s hold a request for ever."""
    served = serve(body_timeout_s=1.0, body_min_bytes_per_s=100)
    wire = served.connect()
    wire.send(_post(b" " * 1000)[:-1000])
    started = time.monotonic()
    while time.monotonic() - started < 6:  # a byte every 0.3 s: never idle for the 1 s timeout
        answered, _, _ = select.select([wire.sock], [], [], 0.3)
        if answered or not wire.send(b" "):
            break
    answer = wire.response(timeout=3)
    elapsed = time.monotonic() - started
    assert answer is not None and answer[0] == 408, answer
    assert elapsed < 4, f"cut after {elapsed:.1f} s"
    _wait_for(lambda: served.statuses("/v1/embeddings").get(408) == 1)


def test_a_stalled_body_gets_408_and_is_counted_so(serve: Callable[..., Served]) -> None:
    served = serve(body_timeout_s=0.5)
    wire = served.connect()
    wire.send(_post(b'{"input": "never finished"}')[:-5])
    answer = wire.response(timeout=5)
    assert answer is not None and answer[0] == 408, answer
    assert msgspec.json.decode(answer[1])["error"]["code"] == "request_timeout"
    assert wire.closed_within(2)
    _wait_for(lambda: served.statuses("/v1/embeddings") == {408: 1})


# --- issue 28 #7: a client that leaves mid-upload is a 499, not a 500 --------------------------------


def test_a_client_that_hangs_up_mid_upload_is_a_499(serve: Callable[..., Served], caplog: Any) -> None:
    """Before: Litestar turned the disconnect into a 500, counted and logged as a server error."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    served = serve()
    wire = served.connect()
    wire.send(_post(b'{"input": "' + b"a" * 99_000 + b'"}')[:-50_000])
    time.sleep(0.2)
    wire.sock.close()
    _wait_for(lambda: bool(served.statuses("/v1/embeddings")))
    time.sleep(0.2)
    assert served.statuses("/v1/embeddings") == {499: 1}
    assert served.telemetry.counters.request_errors == 1
    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.access"]
    assert any("status=499" in line for line in lines), lines
    assert not any("status=500" in line for line in lines), lines


# --- issue 28 #8: a pipelined request in progress is never cut by the keep-alive deadline --------------


def test_a_pipelined_request_in_progress_outlives_the_keep_alive_deadline(serve: Callable[..., Served]) -> None:
    """Before: after a response the keep-alive deadline was armed even when uvicorn had just started
    the next pipelined request, which was then cut after header + keep-alive timeouts (15 s)."""
    served = serve(gated=True, header_timeout_s=0.5, keepalive_timeout_s=1)
    assert served.gated is not None
    served.gated.gate.clear()
    wire = served.connect()
    wire.send(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n" + _post(_text("pipelined behind a probe")))
    first = wire.response()
    assert first is not None and first[0] == 200, first
    assert served.gated.entered.wait(10)
    time.sleep(2.5)  # past 0.5 + 1 s
    served.gated.gate.set()
    second = wire.response()
    assert second is not None and second[0] == 200, second


def test_an_idle_keep_alive_connection_is_still_closed(serve: Callable[..., Served]) -> None:
    served = serve(header_timeout_s=0.5, keepalive_timeout_s=1)
    wire = served.connect()
    wire.send(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (wire.response() or (0, b""))[0] == 200
    wire.send(b"GET /livez HTTP/1.1\r\n")  # a head that never ends, after an answer
    assert wire.closed_within(4)


def test_a_connection_answered_before_its_body_ended_still_gets_a_head_deadline(serve: Callable[..., Served]) -> None:
    served = serve(max_body_bytes=1000, header_timeout_s=0.5, keepalive_timeout_s=1)
    wire = served.connect()
    request = _post(b" " * 5000)
    wire.send(request[:-4900])
    answer = wire.response()
    assert answer is not None and answer[0] == 413, answer
    wire.send(request[-4900:])  # the rest of the body, after the answer; then nothing
    assert wire.closed_within(4), "an idle connection must not stay open for ever"


# --- issue 27 #1: probes and /metrics answer at the cap; the refusals are counted ---------------------


_PROBES = ("/livez", "/readyz", "/health", "/metrics")


def test_idle_connections_do_not_refuse_anything(serve: Callable[..., Served]) -> None:
    """Before: uvicorn's ``limit_concurrency`` counted idle keep-alive connections, so with the cap
    at 5 and 5 idle sockets every probe got 503 (and the kubelet restarts a pod whose liveness
    probe fails for 30 s)."""
    served = serve(max_connections=3)
    for _ in range(5):
        served.connect()
    time.sleep(0.2)
    for path in _PROBES:
        assert httpx.get(served.url + path, timeout=5).status_code == 200, path
    assert httpx.post(f"{served.url}/v1/embeddings", json={"input": "idle sockets"}, timeout=30).status_code == 200


def test_at_the_cap_probes_answer_and_refusals_are_counted(serve: Callable[..., Served]) -> None:
    served = serve(gated=True, max_connections=3)
    assert served.gated is not None
    served.gated.gate.clear()
    results: list[int] = []
    held = [
        threading.Thread(
            target=lambda i=i: results.append(
                httpx.post(f"{served.url}/v1/embeddings", json={"input": f"held {i}"}, timeout=30).status_code
            )
        )
        for i in range(3)
    ]
    for thread in held:
        thread.start()
    assert served.gated.entered.wait(10)
    time.sleep(0.5)  # all three in flight

    refused = httpx.post(f"{served.url}/v1/embeddings", json={"input": "one too many"}, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-request-id"]
    for path in _PROBES:
        assert httpx.get(served.url + path, timeout=5).status_code == 200, path
    scraped = httpx.get(f"{served.url}/metrics", timeout=5).text
    assert "embedding_requests_refused_at_cap_total 1.0" in scraped
    assert 'embedding_requests_total{endpoint="/v1/embeddings",status="503"} 1.0' in scraped

    served.gated.gate.set()
    for thread in held:
        thread.join(30)
    assert results == [200, 200, 200]
    stats = httpx.get(f"{served.url}/stats", timeout=5).json()
    assert stats["requests"]["refused_at_cap"] == 1
