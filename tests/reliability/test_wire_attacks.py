"""Attacks on the wire protocol of ``gateway.http.server`` (the stream cutter, deadlines and the
in-flight cap), each a raw-socket reproduction on 127.0.0.1 with bounded time.

Each test states what it found. They reuse the ``serve`` fixture and the ``Wire`` helper of
``test_wire_protocol`` (the real app under ``uvicorn_config``, in a thread of the test process).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, cast

import msgspec
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.http.server import ConnectionLimits, guarded_protocol
from tests.reliability import test_wire_protocol
from tests.reliability.test_wire_protocol import Served, _post, _text, _wait_for

pytestmark = pytest.mark.slow

serve = test_wire_protocol.serve  # the fixture: the real app under uvicorn_config, in a thread


def _chunked(body: bytes, trailers: bytes = b"", path: bytes = b"/v1/embeddings") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + trailers + b"\r\n"
    )


def _statuses(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _read_until_closed(wire: Any, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not wire._fill(deadline):
            break
    return bytes(wire.pending)


def _asgi_errors(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "uvicorn.error" and r.levelno >= logging.ERROR]


# --- 1. one-byte chunks: the cutter costs ~20x uvicorn's CPU per chunk; one client stalls /livez ----------


class _Transport:
    """Just enough of an asyncio transport for the protocol (writes are kept, reads never pause)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)


async def _sink(scope: Any, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _parse_seconds(protocol: Any, stream: bytes) -> float:
    """Event-loop seconds the protocol takes to parse ``stream`` arriving in 64 KiB reads."""

    async def run() -> float:
        config = uvicorn.Config(_sink, http=protocol, lifespan="off", access_log=False, log_level="warning")
        config.load()
        best = float("inf")
        for _ in range(3):
            proto: Any = cast(Any, config.http_protocol_class)(config=config, server_state=ServerState(), app_state={})
            transport = _Transport()
            transport.protocol = proto
            proto.connection_made(transport)
            started = time.perf_counter()
            for start in range(0, len(stream), 65536):
                proto.data_received(stream[start : start + 65536])
            best = min(best, time.perf_counter() - started)
            for _ in range(5):
                await asyncio.sleep(0)
            assert bytes(transport.out).startswith(b"HTTP/1.1 200"), bytes(transport.out[:100])
            proto.connection_lost(None)
        return best

    return asyncio.run(run())


def test_one_byte_chunks_cost_at_most_a_few_times_what_uvicorn_pays() -> None:
    """Found: each chunk is cut into three regions (size line, data, CRLF), each a Python
    ``_measure`` plus a ``feed_data`` call, plus two Python chunk callbacks httptools otherwise
    never makes: 100k one-byte chunks (0.6 MB) take ~0.4 s of event loop against ~0.02 s for
    uvicorn's own protocol (and the previous version): ~20x."""
    body = b"a" * 100_000
    stream = (
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
        + b"0\r\n\r\n"
    )
    limits = ConnectionLimits(
        max_header_bytes=65536, max_headers=100, header_timeout_s=10, body_timeout_s=60, body_min_bytes_per_s=1024
    )
    plain = _parse_seconds(HttpToolsProtocol, stream)
    guarded = _parse_seconds(guarded_protocol(limits), stream)
    assert guarded < 5 * plain + 0.02, (
        f"guarded {guarded:.3f} s against uvicorn's {plain:.3f} s ({guarded / plain:.0f}x)"
    )


def test_one_client_sending_one_byte_chunks_does_not_stall_livez(serve: Callable[..., Served]) -> None:
    """Found: one connection streaming ``1\\r\\na\\r\\n`` pins the event loop (~1.6 MB/s of
    chunks is all one core parses); /livez took ~1 s (against the CLI server: p50 984 ms while
    30 MB arrived; the previous version: 83 ms). The deployment's readiness probe times out at
    3 s and liveness at 5 s: a few such clients get a pod marked unready, then restarted."""
    served = serve()
    wire = served.connect()
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            urllib.request.urlopen(f"{served.url}/livez", timeout=30).read()
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.2)
    unit = b"1\r\na\r\n" * 10_000
    request = (
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + unit * 60 + b"0\r\n\r\n"  # 3.6 MB, 600k chunks
    )
    sender = threading.Thread(target=wire.send_in_pieces, args=(request,), daemon=True)
    sender.start()
    answer = wire.response(timeout=60)  # once every chunk has been parsed (the body is no JSON)
    done.set()
    prober.join(30)
    sender.join(30)
    assert answer is not None, "no answer"
    assert latencies, "no probe answered"
    median = sorted(latencies)[len(latencies) // 2]
    print(
        f"/livez while the chunks arrived: {len(latencies)} probes, median {median * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms"
    )
    assert max(latencies) < 0.3, f"/livez median {median * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms"


# --- 2. a cut (trailers / chunk extensions past a limit) of a queued pipelined request ------------------


def test_a_queued_request_cut_for_its_trailers_leaves_earlier_answers_and_no_traceback(
    serve: Callable[..., Served], caplog: Any
) -> None:
    """Found: when the request whose trailers (or chunk extensions) pass a limit is queued behind
    one in flight (both in one read), ``_cut`` closes the connection at once. The request in
    flight, fully received, loses its answer; uvicorn marks only the latest cycle disconnected,
    so the earlier one writes to a closed uvloop transport: ``ERROR uvicorn.error: Exception in
    ASGI application`` with a ``RuntimeError: unable to perform operation on <TCPTransport
    closed=True ...>`` traceback, and it is counted (and logged) as a 200. Heads past the limit
    wait for the answers before them; cuts do not. Split across reads, the same bytes get
    ``200`` then ``431``."""
    caplog.set_level(logging.INFO)
    served = serve()
    wire = served.connect()
    trailers = b"".join(b"x-t%d: 1\r\n" % i for i in range(120))  # over EMBED_MAX_HEADERS (100)
    wire.send(_post(_text("answered first")) + _chunked(_text("queued, trailers too many"), trailers))
    answers = _statuses(_read_until_closed(wire, 5))
    time.sleep(0.5)
    errors = _asgi_errors(caplog)
    assert answers[:1] == [200], f"the request received before the bad one got {answers}"
    assert not errors, errors


def test_a_client_that_pipelines_and_hangs_up_is_a_499_not_a_server_error(
    serve: Callable[..., Served], caplog: Any
) -> None:
    """Found (uvicorn's, but against this commit's '499, not a server error'): a client pipelines
    an embedding request and any second request, then hangs up while the first is computed.
    uvicorn marks only the queued cycle disconnected; the first one's answer is written to the
    closed transport: ``Exception in ASGI application`` (RuntimeError traceback, ERROR level)
    and the request counted and logged as status=200."""
    caplog.set_level(logging.INFO)
    served = serve(gated=True)
    assert served.gated is not None
    served.gated.gate.clear()
    wire = served.connect()
    wire.send(_post(_text("computed for nobody")) + b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
    assert served.gated.entered.wait(10)
    time.sleep(0.2)
    wire.sock.close()
    time.sleep(0.3)
    served.gated.gate.set()
    _wait_for(lambda: bool(served.statuses("/v1/embeddings")))
    time.sleep(0.3)
    assert not _asgi_errors(caplog), _asgi_errors(caplog)
    assert served.statuses("/v1/embeddings") == {499: 1}


# --- 3. the in-flight cap counts a pipelined request's own predecessor ---------------------------------


def test_a_pipelined_request_is_not_refused_because_of_its_own_predecessor(serve: Callable[..., Served]) -> None:
    """Found: the cap is checked when a head is parsed, against ``len(tasks)``; a pipelined
    request queued behind one in flight on the same connection counts that one, though it only
    starts when that one ends. With EMBED_MAX_CONNECTIONS=1 and nothing else on the server,
    every second pipelined request is refused 503 (and counted refused_at_cap); with N, it is
    refused whenever N-1 others are in flight."""
    served = serve(max_connections=1)
    wire = served.connect()
    wire.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
    first, second = wire.response(), wire.response()
    assert first is not None and second is not None
    assert (first[0], second[0]) == (200, 200), (first, second)
    assert served.telemetry.counters.refused_at_cap == 0


# --- 4. the body of a non-WebSocket upgrade request is parsed as the next request ---------------------


def test_the_body_of_an_upgrade_request_is_never_served_as_a_request(serve: Callable[..., Served]) -> None:
    """Found (llhttp skips the body of an ``Upgrade`` request; uvicorn serves the request anyway
    and resumes parsing): ``POST`` with ``Connection: upgrade``, ``Upgrade: foo`` and a
    ``Content-Length`` body: the body is parsed and answered as a second request. The previous
    version dropped the rest of the read after the upgrade, so a smuggled request in the same
    packet was lost; the cutter feeds it, so it is now served deterministically. Exploitable
    only behind a proxy that forwards ``Connection: upgrade`` (the bundled nginx sets
    ``Connection ""``)."""
    served = serve()
    wire = served.connect()
    smuggled = b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n"
    wire.send(
        b"POST /livez HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: foo\r\n"
        b"content-length: %d\r\n\r\n" % len(smuggled) + smuggled
    )
    received = _read_until_closed(wire, 2)
    assert b'"cache"' not in received, f"/readyz answered from inside a body: {_statuses(received)}"
    assert len(_statuses(received)) <= 1, _statuses(received)


def test_pipelined_heads_split_anywhere_are_counted_alike(serve: Callable[..., Served]) -> None:
    """Held (a regression guard): the same pipelined bytes, written whole and one byte at a time,
    get the same answers; a head of exactly EMBED_MAX_HEADER_BYTES passes, one byte more is 431."""
    served = serve(max_header_bytes=4096)
    base = b"GET /livez HTTP/1.1\r\nhost: x\r\nx-pad: \r\n\r\n"
    exact = base[:-4] + b"a" * (4096 - len(base)) + b"\r\n\r\n"
    over = base[:-4] + b"a" * (4097 - len(base)) + b"\r\n\r\n"
    stream = _chunked(_text("chunked first"), b"x-t: 1\r\n") + exact + over
    for piece in (len(stream), 1):
        wire = served.connect()
        for start in range(0, len(stream), piece):
            if not wire.send(stream[start : start + piece]):
                break
        answers = _statuses(_read_until_closed(wire, 5))
        assert answers == [200, 200, 431], (piece, answers)


# --- 5. a client that never reads its answer pins it in memory, with no deadline and no cap -------------


def test_a_client_that_never_reads_its_answer_does_not_pin_it_for_ever(serve: Callable[..., Served]) -> None:
    """Found: a request for 2048 copies of one short text (~40 KB sent; deduplicated, so one
    forward pass) gets a ~9.8 MB JSON answer. A client that never reads it (zero receive window)
    leaves it in the transport's buffer: the task is done, so the in-flight cap does not count it,
    and the keep-alive/head deadline calls ``transport.close()``, which waits for the buffer to
    drain: the connection and ~11 MB of RSS stay for as long as the peer keeps TCP alive. With
    uvicorn's ``limit_concurrency`` gone, nothing bounds how many (against the CLI server:
    10 such sockets, +110 MB RSS, all still established 40 s later; the previous version refused
    requests past EMBED_MAX_CONNECTIONS open connections, so held at most that many)."""
    served = serve(max_connections=1, header_timeout_s=0.5, keepalive_timeout_s=1)
    body = msgspec.json.encode({"input": ["the same short text"] * 2048})
    answered = 0

    def all_answered() -> bool:
        return served.statuses("/v1/embeddings").get(200, 0) >= answered

    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        served.sockets.append(sock)
        sock.sendall(_post(body))
        answered += 1
        _wait_for(all_answered, 30)  # one at a time: each under the cap
    time.sleep(4)  # far past header_timeout_s + keepalive_timeout_s
    held = list(served.server.server_state.connections)
    buffered = sum(p.transport.get_write_buffer_size() for p in held if p.transport is not None)
    closing = sum(p.transport.is_closing() for p in held if p.transport is not None)
    assert not held, (
        f"{len(held)} connections still open ({closing} closing), {buffered / 1e6:.1f} MB of answers buffered"
    )


def test_a_client_that_pipelines_and_never_reads_does_not_pin_a_request_in_flight(serve: Callable[..., Served]) -> None:
    """Found while fixing the one above: two big answers pipelined to a client that never reads; the
    second request waits in uvicorn's ``flow.drain()`` for the first to be taken: in flight (under
    the cap) for ever, with no deadline, since head deadlines never cut a request in flight."""
    served = serve(max_connections=1, header_timeout_s=0.5, keepalive_timeout_s=1)
    body = msgspec.json.encode({"input": ["the same short text"] * 2048})
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    served.sockets.append(sock)
    sock.sendall(_post(body) * 2)
    _wait_for(lambda: served.statuses("/v1/embeddings").get(200, 0) >= 1, 30)
    _wait_for(lambda: not served.server.server_state.connections, 10)
    _wait_for(lambda: sum(served.statuses("/v1/embeddings").values()) >= 2, 5)
    assert served.statuses("/v1/embeddings") == {200: 1, 499: 1}
