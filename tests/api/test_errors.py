"""Every invalid request gets OpenAI's error envelope with the right status, never a 500."""

from __future__ import annotations

import httpx
import pytest


def _post(url: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", timeout=30, **kwargs)  # type: ignore[arg-type]


def _assert_envelope(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return str(error["message"])


@pytest.fixture
def strict(gateway_factory):  # type: ignore[no-untyped-def]
    return gateway_factory(max_inputs=4, max_request_tokens=600, max_body_bytes=64 * 1024, truncate=False)


CASES_400 = [
    ("empty string", {"input": ""}, "input"),
    ("empty list", {"input": []}, "input"),
    ("empty string in list", {"input": ["ok", ""]}, "input"),
    ("too many inputs", {"input": ["a", "b", "c", "d", "e"]}, "input"),
    ("number", {"input": 5}, "input"),
    ("null input", {"input": None}, "input"),
    ("missing input", {"model": "all-MiniLM-L6-v2"}, "input"),
    ("nested wrong type", {"input": [{"text": "x"}]}, "input"),
    ("mixed list", {"input": ["a", 1]}, "input"),
    ("mixed token lists", {"input": [[1, 2], "a"]}, "input"),
    ("empty token list", {"input": [[]]}, "input"),
    ("dimensions zero", {"input": "x", "dimensions": 0}, "dimensions"),
    ("dimensions negative", {"input": "x", "dimensions": -3}, "dimensions"),
    ("dimensions too big", {"input": "x", "dimensions": 385}, "dimensions"),
    ("dimensions string", {"input": "x", "dimensions": "64"}, "dimensions"),
    ("encoding format", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("model type", {"input": "x", "model": 3}, "model"),
]


@pytest.mark.parametrize(("case", "body", "param"), CASES_400, ids=[case[0] for case in CASES_400])
def test_invalid_bodies_are_400(strict, case: str, body: dict[str, object], param: str) -> None:  # type: ignore[no-untyped-def]
    _assert_envelope(_post(strict.url, json=body), 400, param=param)


def test_invalid_json_and_non_object(strict) -> None:  # type: ignore[no-untyped-def]
    _assert_envelope(_post(strict.url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _assert_envelope(_post(strict.url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _assert_envelope(_post(strict.url, content=b"", headers={"content-type": "application/json"}), 400)


def test_overlong_input_names_limit_and_count(strict) -> None:  # type: ignore[no-untyped-def]
    message = _assert_envelope(_post(strict.url, json={"input": ["short", "word " * 300]}), 400, param="input")
    assert "input[1]" in message
    assert "302 tokens" in message
    assert "256" in message


def test_truncation_on_accepts_the_same_input(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    lenient = gateway_factory(truncate=True)
    response = _post(lenient.url, json={"input": "word " * 300})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 256


def test_request_over_the_token_budget(strict) -> None:  # type: ignore[no-untyped-def]
    texts = ["word " * 200] * 3 + ["other " * 50]  # 3 x 202 + 52 tokens > 600; duplicates count too
    message = _assert_envelope(_post(strict.url, json={"input": texts}), 400, param="input")
    assert "600" in message


def test_unknown_model_is_404(strict) -> None:  # type: ignore[no-untyped-def]
    message = _assert_envelope(
        _post(strict.url, json={"input": "x", "model": "text-embedding-3-large"}), 404, "model", "model_not_found"
    )
    assert "text-embedding-3-large" in message
    _assert_envelope(httpx.get(f"{strict.url}/v1/models/nope"), 404, "model", "model_not_found")


def test_body_over_the_limit_is_413(strict) -> None:  # type: ignore[no-untyped-def]
    _assert_envelope(_post(strict.url, json={"input": "x" * (70 * 1024)}), 413, code="request_too_large")


def test_unknown_route_and_method_use_the_envelope(strict) -> None:  # type: ignore[no-untyped-def]
    _assert_envelope(httpx.get(f"{strict.url}/v1/nothing"), 404)
    _assert_envelope(httpx.get(f"{strict.url}/v1/embeddings"), 405)


def test_request_id_is_echoed_or_made(strict) -> None:  # type: ignore[no-untyped-def]
    mine = _post(strict.url, json={"input": "x"}, headers={"x-request-id": "abc-123"})
    assert mine.status_code == 200
    assert mine.headers["x-request-id"] == "abc-123"
    theirs = _post(strict.url, json={"input": "x"})
    assert len(theirs.headers["x-request-id"]) == 32
    hostile = _post(strict.url, json={"input": "x"}, headers={"x-request-id": "a b\tc" * 100})
    assert hostile.headers["x-request-id"] != "a b\tc" * 100


def test_unknown_fields_are_ignored_and_model_is_optional(strict) -> None:  # type: ignore[no-untyped-def]
    response = _post(strict.url, json={"input": "x", "user": "u-1", "something_new": {"a": 1}})
    assert response.status_code == 200
    assert response.json()["model"] == "all-MiniLM-L6-v2"


def test_models_list_names_the_served_id_and_aliases(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(model_aliases=("text-embedding-3-small", "bge"))
    body = httpx.get(f"{live.url}/v1/models").json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["all-MiniLM-L6-v2", "text-embedding-3-small", "bge"]
    assert all(card["object"] == "model" for card in body["data"])
    assert _post(live.url, json={"input": "x", "model": "bge"}).status_code == 200
