"""Every route picks the answer's coding with the one negotiation (issue 26, item 9).

Litestar's own compression middleware looks for ``gzip`` as a substring of ``Accept-Encoding``, so
``gzip;q=0`` (a refusal) got gzip on every route but the embedding ones. Here each route is asked
with the same headers as the unit table of :func:`~gateway.http.compression.accepted_encoding`, and
must answer exactly in the coding that function names (or plainly, when it names none).
"""

from __future__ import annotations

import httpx
import pytest

from gateway.http.compression import accepted_encoding

ROUTES = ["/metrics", "/stats", "/dashboard", "/docs", "/docs/openapi.json", "/v1/models", "/v1/embeddings"]

ACCEPT = [
    "gzip;q=0",
    "GZIP;Q=0",
    "gzip ; q = 0",
    "gzip;level=1;q=0",
    "identity",
    "identity, gzip;q=0",
    "*;q=0",
    "zstd;q=0, gzip;q=0",
    "br",
    "deflate",
    "gzip",
    "zstd",
    "gzip, deflate, zstd",
    "zstd;q=0, gzip;q=0.5",
    "gzip;q=1, zstd;q=0.1",
    "*",
    "*, zstd;q=0",
]


@pytest.fixture(scope="module")
def live(minilm_encoder):  # type: ignore[no-untyped-def]
    """One app for the whole table; every answer is above the threshold (a 1-byte minimum)."""
    from gateway import Settings, create_app
    from tests.servers import ThreadedGateway

    settings = Settings(
        model=str(minilm_encoder.path), model_name="all-MiniLM-L6-v2", compression_min_bytes=1, cache=False
    )
    with ThreadedGateway(create_app(settings, encoder=minilm_encoder)) as gateway:
        yield gateway


def _get(url: str, path: str, accept: str) -> httpx.Response:
    headers = {"accept-encoding": accept}
    if path == "/v1/embeddings":
        return httpx.post(f"{url}{path}", json={"input": ["negotiated"] * 3}, headers=headers, timeout=60)
    return httpx.get(f"{url}{path}", headers=headers, timeout=60, follow_redirects=True)


def _expected(accept: str) -> str | None:
    return accepted_encoding({"type": "http", "headers": [(b"accept-encoding", accept.encode())]})  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("accept", ACCEPT)
def test_every_route_answers_in_the_negotiated_coding(live, path: str, accept: str) -> None:  # type: ignore[no-untyped-def]
    answer = _get(live.url, path, accept)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers.get("content-encoding") == _expected(accept), (path, accept)
    assert len(answer.content) > 0  # httpx decoded whatever came
    assert "accept-encoding" in answer.headers.get("vary", "").lower(), "the answer depends on the header"


@pytest.mark.parametrize("path", ROUTES)
def test_a_request_without_accept_encoding_gets_a_plain_answer(live, path: str) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        request = client.build_request("GET", f"{live.url}{path}")
        if path == "/v1/embeddings":
            request = client.build_request("POST", f"{live.url}{path}", json={"input": "negotiated"})
        del request.headers["accept-encoding"]
        answer = client.send(request)
    assert answer.status_code == 200
    assert answer.headers.get("content-encoding") is None


@pytest.mark.parametrize("path", ["/metrics", "/v1/models", "/docs/openapi.json"])
def test_every_accept_encoding_line_counts_on_every_route(live, path: str) -> None:  # type: ignore[no-untyped-def]
    """Litestar's middleware read only the first line; the negotiation reads each."""
    with httpx.Client(timeout=60) as client:
        request = client.build_request("GET", f"{live.url}{path}")
        raw = [(name, value) for name, value in request.headers.raw if name.lower() != b"accept-encoding"]
        request.headers = httpx.Headers([*raw, (b"accept-encoding", b"identity"), (b"accept-encoding", b"gzip")])
        answer = client.send(request)
    assert answer.headers.get("content-encoding") == "gzip"


def test_small_answers_stay_plain_without_vary(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()  # the default threshold (4096 bytes): /v1/models is far below it
    answer = httpx.get(f"{live.url}/v1/models", headers={"accept-encoding": "gzip"}, timeout=30)
    assert answer.headers.get("content-encoding") is None
    assert "vary" not in answer.headers
