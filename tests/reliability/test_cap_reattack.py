"""Re-attack of the in-flight cap kept by the request middleware (8c3a0dd) and of the workers' ledger
fallback for /metrics and /stats (b133598).

Each server here is the real app under ``uvicorn_config`` in a thread of the test process (the
``serve`` fixture of :mod:`tests.reliability.test_wire_protocol`); ``gated=True`` holds the encoder,
so requests stay in flight as long as a test needs. The cap's own count (:class:`InFlight`) is read
from the app's middleware definition, so a leak (a slot never given back) or a double release (a
count below zero: the cap silently raised) is seen exactly, not only by its effect.

A failing test is a finding; its docstring says what was expected and what happened. The four
findings (a limited key's requests escaping the cap, a refusal spending a request of the key's
limit, a slow /tokenize upload holding a slot, /tokenize refused in OpenAI's shape) are fixed: the
tests marked "Expected" pass since.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.middleware import InFlight
from tests.reliability import test_wire_protocol
from tests.reliability.test_wire_protocol import Served, Wire
from tests.servers import GatewayProcess

pytestmark = pytest.mark.slow

serve = test_wire_protocol.serve  # the fixture: the real app under our uvicorn protocol, in a thread

KEYS = """
[[keys]]
name = "open"
key = "open-key"

[[keys]]
name = "rpm"
key = "rpm-key"
requests_per_minute = 100000

[[keys]]
name = "tpm"
key = "tpm-key"
tokens_per_minute = 10000000

[[keys]]
name = "tight"
key = "tight-key"
requests_per_minute = 1
"""


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def _in_flight(served: Served) -> InFlight:
    app: Any = served.server.config.app
    for definition in app.middleware:
        keywords = getattr(definition.middleware, "keywords", {})
        found = keywords.get("in_flight")
        if isinstance(found, InFlight):
            return found
    raise AssertionError("no InFlight in the app's middleware")


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _request(path: str, body: bytes, key: str | None = None, extra: bytes = b"") -> bytes:
    auth = f"authorization: Bearer {key}\r\n".encode() if key else b""
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n".encode()
        + auth
        + extra
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _embed(text: str, key: str | None = None, path: str = "/v1/embeddings") -> bytes:
    field = "inputs" if path in ("/embed", "/tokenize") else "input"
    return _request(path, json.dumps({field: text}).encode(), key)


def _hold_one(served: Served, key: str | None = None) -> Wire:
    """One embedding request stuck in the (gated) encoder: it holds one slot of the cap."""
    assert served.gated is not None
    served.gated.gate.clear()
    served.gated.entered.clear()
    wire = served.connect()
    wire.send(_embed("hold the encoder", key))
    assert served.gated.entered.wait(10), "the held request never reached the encoder"
    return wire


def _release(served: Served, held: Wire) -> None:
    assert served.gated is not None
    served.gated.gate.set()
    answer = held.response(timeout=20)
    assert answer is not None and answer[0] == 200, answer


# ------------------------------------------------------------------- 1: requests that escape the cap


@pytest.mark.parametrize("key", ["rpm-key", "tpm-key"])
def test_a_rate_limited_keys_requests_are_held_to_the_cap(
    serve: Callable[..., Served], keys_file: Path, key: str
) -> None:
    """Expected: with EMBED_MAX_CONNECTIONS=1 and one request in the encoder, a second embedding
    request is refused 503 ``overloaded`` whatever key it carries.

    Happened: a key with ``requests_per_minute`` or ``tokens_per_minute`` is never counted against
    the cap. ``gateway.http.clients`` keeps the rate limiter's ``Admission`` under the scope-state
    key ``"gateway.admission"``, the very key ``gateway.http.middleware`` uses for its pending
    ``_Admission``; the ApiKeyMiddleware runs after the request middleware and overwrites it, so
    :func:`admit` finds no ``_Admission`` and does nothing. Every request of a limited key runs
    uncounted (the InFlight count stays 0 while they are in flight), and the second one queues
    behind the first instead of being refused."""
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys_file))
    in_flight = _in_flight(served)
    held = _hold_one(served, key)
    try:
        counted_while_held = in_flight.count
        second = served.connect()
        second.send(_embed("a second request at the cap", key))
        answer = second.response(timeout=3)
    finally:
        _release(served, held)
    assert answer is not None and answer[0] == 503, (
        f"the second request of {key} at the cap got {answer} (no answer: queued behind the first); "
        f"the held one counted {counted_while_held} in flight"
    )


def test_a_request_refused_at_the_cap_spends_none_of_its_keys_requests_per_minute(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    """Expected: a request refused at the cap did no work and was not the client's fault; it must
    not spend one of its key's ``requests_per_minute`` (before 8c3a0dd it could not: the request
    middleware refused it before the ApiKeyMiddleware ran). With a key of 2 requests a minute:
    the first is held in the encoder, the second refused 503 at the cap, the third (after the first
    is answered) served 200.

    Happened: the second request escapes the cap (the scope-state collision above) and spends the
    key's second request; the third gets 429. Fixing the collision alone still leaves the order
    wrong: the ApiKeyMiddleware takes the request from the key's bucket before the route reaches
    :func:`admit`, so a 503 at the cap still spends it (and a client retrying on Retry-After 1
    drains its own quota with refusals)."""
    keys = tmp_path / "two.toml"
    keys.write_text('[[keys]]\nname = "two"\nkey = "two-key"\nrequests_per_minute = 2\n')
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys))
    held = _hold_one(served, "two-key")
    try:
        second = served.connect()
        second.send(_embed("at the cap", "two-key"))
        refused = second.response(timeout=3)
    finally:
        _release(served, held)
    third = httpx.post(
        f"{served.url}/v1/embeddings", json={"input": "after"}, headers={"authorization": "Bearer two-key"}, timeout=10
    )
    assert (refused[0] if refused else None, third.status_code) == (503, 200), (refused, third.text[:200])


def test_with_the_key_collision_repaired_a_refusal_at_the_cap_still_spends_a_request_per_minute(
    serve: Callable[..., Served], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expected: as above, 503 at the cap then 200, once the scope-state collision is repaired
    (simulated here by giving ``gateway.http.clients`` its own state key).

    Happened: the 503 comes, but the third request gets 429: the key's bucket was charged by the
    ApiKeyMiddleware for the request that the cap then refused. The cap check must come before the
    key's buckets are charged (or the charge be given back on the 503)."""
    from gateway.http import clients

    monkeypatch.setattr(clients, "_ADMISSION", "gateway.ratelimit_admission")
    keys = tmp_path / "two.toml"
    keys.write_text('[[keys]]\nname = "two"\nkey = "two-key"\nrequests_per_minute = 2\n')
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys))
    held = _hold_one(served, "two-key")
    try:
        second = served.connect()
        second.send(_embed("at the cap", "two-key"))
        refused = second.response(timeout=3)
    finally:
        _release(served, held)
    third = httpx.post(
        f"{served.url}/v1/embeddings", json={"input": "after"}, headers={"authorization": "Bearer two-key"}, timeout=10
    )
    assert refused is not None and refused[0] == 503, refused  # the collision, repaired
    assert third.status_code == 200, third.text[:200]


def test_an_open_keys_requests_are_held_to_the_cap(serve: Callable[..., Served], keys_file: Path) -> None:
    """Held (the control of the test above): a key without limits is counted and refused at the cap."""
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys_file))
    held = _hold_one(served, "open-key")
    try:
        assert _in_flight(served).count == 1
        second = served.connect()
        second.send(_embed("a second request at the cap", "open-key"))
        answer = second.response(timeout=5)
    finally:
        _release(served, held)
    assert answer is not None and answer[0] == 503, answer
    assert _wait_for(lambda: _in_flight(served).count == 0)


def test_a_limited_key_escapes_the_cap_of_other_keys(serve: Callable[..., Served], keys_file: Path) -> None:
    """Expected: the cap is one per process, whoever takes it: with an open key's request taking
    the one slot, a limited key's request is refused 503.

    Happened: the limited key's request is admitted past the cap (same scope-state collision as
    above): it queues in the encoder behind the held one and is answered 200 once the gate opens."""
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys_file))
    held = _hold_one(served, "open-key")
    try:
        second = served.connect()
        second.send(_embed("a limited key at the cap", "rpm-key"))
        answer = second.response(timeout=3)
    finally:
        _release(served, held)
    assert answer is not None and answer[0] == 503, f"a limited key's request at the cap got {answer}"


def test_a_slow_tokenize_upload_holds_no_slot(serve: Callable[..., Served]) -> None:
    """Expected (the change's own promise: "an upload still arriving holds no slot"): with
    EMBED_MAX_CONNECTIONS=1, a TEI ``POST /tokenize`` whose body trickles in at a legal rate does
    not refuse an embedding request.

    Happened: ``/tokenize`` and ``/decode`` read a body but are not ``embedding`` routes, so the
    middleware counts them as they *start*, before their body; one trickling upload per slot
    refuses every embedding request with 503 while /readyz says 200 (issue 27's attack, moved to
    TEI's routes)."""
    served = serve(max_connections=1, body_timeout_s=5)
    upload = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    served.sockets.append(upload)
    upload.sendall(
        b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 100000\r\n\r\n" + b'{"inputs": "'
    )
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                upload.sendall(b"a" * 512)
            except OSError:
                return
            time.sleep(0.1)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        time.sleep(0.5)
        counted = _in_flight(served).count
        ready = httpx.get(f"{served.url}/readyz", timeout=5).status_code
        embedded = httpx.post(f"{served.url}/v1/embeddings", json={"input": "while an upload trickles"}, timeout=10)
    finally:
        stop.set()
        feeder.join(timeout=5)
    assert ready == 200
    assert (counted, embedded.status_code) == (0, 200), (
        f"a trickling /tokenize upload held {counted} slot(s); the embedding request got "
        f"{embedded.status_code} {embedded.text[:120]}"
    )


# ------------------------------------------------------------------- 2: the refusal itself


def test_a_refusal_at_the_cap_is_one_openai_503_counted_once(serve: Callable[..., Served]) -> None:
    """Held: the second request at the cap gets OpenAI's 503 ``overloaded`` (type server_error)
    with Retry-After 1, ``refused_at_cap`` grows by exactly one per refusal, and the count is 1
    while held and 0 after (a refused request neither takes nor gives back a slot)."""
    served = serve(gated=True, max_connections=1)
    in_flight = _in_flight(served)
    held = _hold_one(served)
    try:
        before = served.telemetry.counters.refused_at_cap
        answers = []
        for index in range(3):
            wire = served.connect()
            wire.send(_embed(f"refused {index}"))
            raw_sock = wire.sock
            raw_sock.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = raw_sock.recv(65536)
                assert chunk, "closed without an answer"
                head += chunk
            answers.append(head)
        counted = in_flight.count
        refused = served.telemetry.counters.refused_at_cap - before
    finally:
        _release(served, held)
    for head in answers:
        status_line, _, rest = head.partition(b"\r\n")
        headers_part, _, body = rest.partition(b"\r\n\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in headers_part.split(b"\r\n"))
        assert status_line.split()[1] == b"503", head
        assert headers.get(b"retry-after") == b"1", headers
        error = msgspec.json.decode(body)["error"]
        assert (error["type"], error["code"]) == ("server_error", "overloaded"), error
    assert counted == 1
    assert refused == 3
    assert _wait_for(lambda: in_flight.count == 0), in_flight.count
    _wait_for(lambda: served.statuses("/v1/embeddings").get(503) == 3)
    assert served.statuses("/v1/embeddings") == {200: 1, 503: 3}


def test_a_tei_embed_refused_at_the_cap_answers_in_teis_shape(serve: Callable[..., Served]) -> None:
    """Held: TEI's ``/embed`` at the cap answers TEI's 429 ``Overloaded`` with Retry-After (its
    clients' retry logic reads that), counted once as refused."""
    served = serve(gated=True, max_connections=1)
    held = _hold_one(served)
    try:
        before = served.telemetry.counters.refused_at_cap
        answer = httpx.post(f"{served.url}/embed", json={"inputs": "at the cap"}, timeout=5)
        refused = served.telemetry.counters.refused_at_cap - before
    finally:
        _release(served, held)
    assert answer.status_code == 429, answer.text
    assert answer.headers.get("retry-after") == "1"
    assert answer.json()["error_type"] == "Overloaded"
    assert refused == 1


def test_a_tei_tokenize_refused_at_the_cap_answers_in_teis_shape(serve: Callable[..., Served]) -> None:
    """Expected: TEI's ``/tokenize`` refused at the cap answers as every other TEI route does when
    overloaded (``/embed`` above: 429, ``{"error", "error_type": "Overloaded"}``, Retry-After).

    Happened: a non-embedding route is refused by the request middleware's canned answer, OpenAI's
    503 ``{"error": {"type": "server_error", "code": "overloaded"}}``: a TEI client (huggingface_hub,
    LlamaIndex) sees an unknown error shape and a status it does not retry the same way."""
    served = serve(gated=True, max_connections=1)
    held = _hold_one(served)
    try:
        answer = httpx.post(f"{served.url}/tokenize", json={"inputs": "at the cap"}, timeout=5)
    finally:
        _release(served, held)
    assert answer.headers.get("retry-after") == "1"
    assert (answer.status_code, sorted(answer.json())) == (429, ["error", "error_type"]), (
        answer.status_code,
        answer.text,
    )


def test_probes_and_metrics_are_never_counted_or_refused_at_the_cap(serve: Callable[..., Served]) -> None:
    """Held: at the cap, /livez, /readyz, /health and /metrics answer 200 and take no slot; /stats
    (another route) is refused 503 and counted once."""
    served = serve(gated=True, max_connections=1)
    in_flight = _in_flight(served)
    held = _hold_one(served)
    try:
        before = served.telemetry.counters.refused_at_cap
        for path in ("/livez", "/readyz", "/health", "/metrics"):
            assert httpx.get(f"{served.url}{path}", timeout=5).status_code == 200, path
        assert in_flight.count == 1
        assert served.telemetry.counters.refused_at_cap == before
        assert httpx.get(f"{served.url}/stats", timeout=5).status_code == 503
        assert served.telemetry.counters.refused_at_cap == before + 1
    finally:
        _release(served, held)
    assert _wait_for(lambda: in_flight.count == 0)


# ------------------------------------------------------------------- 3: leaks and double releases


def test_no_slot_leaks_or_double_release_after_every_kind_of_failure(
    serve: Callable[..., Served], keys_file: Path
) -> None:
    """Held: 400 (bad JSON, unknown model, bad dimensions), 401 (no key, wrong key), 413, 429
    (requests per minute), 404 model, a hang-up mid-body, a hang-up while in the encoder, pipelined
    requests and a refusal at the cap each leave the count at exactly 0 (never below: a double
    release would raise the cap silently), and the cap still refuses the second request after."""
    served = serve(gated=True, max_connections=1, api_keys_file=str(keys_file), max_body_bytes=4096)
    in_flight = _in_flight(served)
    url = served.url
    seen: dict[str, int] = {}

    def settled(name: str) -> None:
        _wait_for(lambda: in_flight.count == 0, 5)
        seen[name] = in_flight.count

    auth = {"authorization": "Bearer open-key"}
    cases: list[tuple[str, Callable[[], httpx.Response]]] = [
        ("bad json", lambda: httpx.post(f"{url}/v1/embeddings", content=b"{nope", headers=auth, timeout=5)),
        ("model", lambda: httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": "nope"}, headers=auth)),
        ("dims", lambda: httpx.post(f"{url}/v1/embeddings", json={"input": "x", "dimensions": 9999}, headers=auth)),
        ("no key", lambda: httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=5)),
        (
            "bad key",
            lambda: httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer z"}),
        ),
        ("413", lambda: httpx.post(f"{url}/v1/embeddings", json={"input": "x" * 10000}, headers=auth, timeout=5)),
        ("413 tei", lambda: httpx.post(f"{url}/embed", json={"inputs": "x" * 10000}, headers=auth, timeout=5)),
        ("tokenize 400", lambda: httpx.post(f"{url}/tokenize", content=b"[", headers=auth, timeout=5)),
    ]
    statuses = {}
    for name, call in cases:
        statuses[name] = call().status_code
        settled(name)
    tight = {"authorization": "Bearer tight-key"}
    statuses["rpm 1"] = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers=tight, timeout=10).status_code
    statuses["rpm 2 (429)"] = httpx.post(f"{url}/v1/embeddings", json={"input": "y"}, headers=tight).status_code
    settled("429")

    # a hang-up mid-body
    wire = served.connect()
    wire.send(_request("/v1/embeddings", b'{"input": "' + b"a" * 200 + b'"}', "open-key")[:-50])
    time.sleep(0.2)
    wire.sock.close()
    settled("hang-up mid-body")

    # a hang-up while in the encoder, and a refusal at the cap meanwhile
    held = _hold_one(served, "open-key")
    refused = served.connect()
    refused.send(_embed("refused at the cap", "open-key"))
    statuses["at the cap"] = (refused.response(timeout=5) or (0,))[0]
    held.sock.close()
    time.sleep(0.3)
    assert served.gated is not None
    served.gated.gate.set()
    settled("hang-up in the encoder")

    # pipelined: three embedding requests and a /stats on one connection
    wire = served.connect()
    wire.send(
        _embed("pipe one", "open-key")
        + _embed("pipe two", "open-key")
        + b"GET /stats HTTP/1.1\r\nhost: x\r\nauthorization: Bearer open-key\r\n\r\n"
        + _embed("pipe three", "open-key")
    )
    statuses["pipelined"] = tuple((wire.response(timeout=10) or (0,))[0] for _ in range(4))  # type: ignore[assignment]
    settled("pipelined")

    assert statuses == {
        "bad json": 400,
        "model": 404,
        "dims": 400,
        "no key": 401,
        "bad key": 401,
        "413": 413,
        "413 tei": 413,
        "tokenize 400": 422,
        "rpm 1": 200,
        "rpm 2 (429)": 429,
        "at the cap": 503,
        "pipelined": (200, 200, 200, 200),
    }, statuses
    assert set(seen.values()) == {0}, seen

    # the cap still holds exactly one
    held = _hold_one(served, "open-key")
    try:
        second = served.connect()
        second.send(_embed("still capped", "open-key"))
        answer = second.response(timeout=5)
    finally:
        _release(served, held)
    assert answer is not None and answer[0] == 503, answer


def test_a_request_cancelled_at_shutdown_gives_its_slot_back(serve: Callable[..., Served]) -> None:
    """Held: a request held in the encoder when the server is asked to exit (SIGTERM's path:
    ``should_exit``; the drain deadline cancels its task) gives its slot back (the finally runs
    under cancellation), and no count goes below zero."""
    served = serve(gated=True, max_connections=2, shutdown_timeout_s=1)
    in_flight = _in_flight(served)
    held = _hold_one(served)
    assert in_flight.count == 1
    served.server.should_exit = True
    released = _wait_for(lambda: in_flight.count == 0, 10)  # the drain deadline (1 s) cancels the task
    assert served.gated is not None
    served.gated.gate.set()  # the forward thread, so the lifespan's shutdown can stop the batcher
    held.sock.close()
    served.thread.join(timeout=30)
    assert not served.thread.is_alive()
    assert released and in_flight.count == 0, in_flight.count


# ------------------------------------------------------------------- 4: workers mode, the ledger fallback


def _metric(text: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def _engine_pid(port: int) -> int:
    from tests.reliability.test_issue27_attacks import _children

    supervisors = [
        int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and _is_ours(int(entry.name), port)
    ]
    for supervisor in supervisors:
        found = _children(supervisor, "engine")
        if found:
            return found[0]
    raise AssertionError("no engine process found")


def _is_ours(pid: int, port: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"EMBED_PORT={port}".encode() in environ and b"serve" in cmdline


@pytest.fixture
def workers(minilm_dir: Path, tmp_path: Path) -> Iterator[GatewayProcess]:
    env = {
        "EMBED_MODEL": str(minilm_dir),
        "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
        "EMBED_CACHE": "false",
        "EMBED_WORKERS": "2",
        "EMBED_PUBLIC_METRICS": "true",
        "HF_HUB_OFFLINE": "1",
    }
    gateway = GatewayProcess(env, tmp_path / "workers.log")
    gateway.start(timeout=90)
    try:
        yield gateway
    finally:
        gateway.terminate()


_COUNTERS = (
    "embedding_requests_total",
    "embedding_requests_refused_at_cap_total",
    "embedding_tokens_total",
    "embedding_inputs_total",
    "embedding_cache_misses_total",
    "embedding_batcher_dropped_total",
)


def test_the_ledger_fallback_neither_double_counts_nor_goes_backwards(workers: GatewayProcess) -> None:
    """Held: with EMBED_WORKERS=2, scrapes of both workers before the engine is killed, while it
    is away (answered from the ledger) and once it is back give counters that never go down, and
    while it is away each worker's answer equals the other's (its own state is not counted twice:
    the two differ only by what the scrapes themselves add); /stats keeps its JSON schema (the same
    keys, ``workers`` 2)."""
    import os
    import signal

    url = workers.url
    with httpx.Client(timeout=10) as client:
        for index in range(12):
            assert client.post(f"{url}/v1/embeddings", json={"input": f"before {index}"}).status_code == 200
        before_stats = client.get(f"{url}/stats").json()
        history: list[dict[str, float]] = []

        def scrape(times: int = 6) -> list[tuple[str, dict[str, float]]]:
            found = []
            for _ in range(times):
                with httpx.Client(timeout=10) as fresh:  # a new connection: either worker may answer
                    answer = fresh.get(f"{url}/metrics")
                assert answer.status_code == 200, answer.text
                values = {name: _metric(answer.text, name) for name in _COUNTERS}
                found.append((answer.headers.get("x-worker-pid", "?"), values))
                history.append(values)
            return found

        scrape()
        os.kill(_engine_pid(workers.port), signal.SIGKILL)
        time.sleep(0.5)
        away = scrape(10)
        away_stats = client.get(f"{url}/stats")
        assert away_stats.status_code == 200, away_stats.text
        deadline = time.monotonic() + 90
        while client.post(f"{url}/v1/embeddings", json={"input": "back?"}).status_code != 200:
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.5)
        scrape()
        back_stats = client.get(f"{url}/stats").json()

    for name in _COUNTERS:
        series = [values[name] for values in history]
        assert all(b >= a for a, b in itertools.pairwise(series)), (name, series)
    inputs_away = {pid: values["embedding_inputs_total"] for pid, values in away}
    assert len(set(inputs_away.values())) == 1, f"the workers disagree while the engine is away: {inputs_away}"
    assert next(iter(inputs_away.values())) == before_stats["inputs"], (inputs_away, before_stats["inputs"])
    stats = away_stats.json()
    # engine_restarts appears once it is not 0 (omit_defaults): compare with the engine back
    assert _shape(stats) == _shape(back_stats), (_shape(stats), _shape(back_stats))
    assert set(_shape(before_stats)) - set(_shape(stats)) <= set(), set(_shape(before_stats)) - set(_shape(stats))
    assert stats["workers"] == 2, stats["workers"]
    assert stats["engine_restarts"] == back_stats["engine_restarts"] == 1


def _shape(value: Any, prefix: str = "") -> dict[str, str]:
    """Every key path of a JSON value with its type (lists by their first item)."""
    if isinstance(value, dict):
        found: dict[str, str] = {}
        for key, item in value.items():
            found.update(_shape(item, f"{prefix}.{key}"))
        return found
    if isinstance(value, list) and value:
        return _shape(value[0], f"{prefix}[]")
    return {prefix: type(value).__name__}
