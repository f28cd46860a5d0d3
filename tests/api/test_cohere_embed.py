"""Cohere's ``POST /v2/embed`` (issue 24): the real ``cohere`` SDK, float vectors equal to the
encoder's and ``/v1/embeddings``', binary/ubinary and int8/uint8 equal to sentence-transformers'
``quantize_embeddings`` bit for bit (int8/uint8 with the ranges calibrated once per model), prompts
by ``input_type``, the shared cache, and 400s for what is not served."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from gateway.core.quantize import CALIBRATION_TEXTS, quantize, ranges_of
from tests.servers import ThreadedGateway

TEXTS = [
    "how do vector caches work",
    "Redis keeps the vectors for a week under a key made of the model and the text.",
    "A third, longer sentence about approximate nearest neighbour search and quantised vectors.",
]
TYPES = ["float", "int8", "uint8", "binary", "ubinary"]
LONG = "word " * 400  # over all-MiniLM-L6-v2's 256 tokens
PROMPTS = {"query": "query: ", "passage": "passage: ", "classification": "classify: "}


def _start(encoder: Any, **overrides: Any) -> ThreadedGateway:
    fields = {"model_name": "all-MiniLM-L6-v2", "cache_prefix": f"cohere-{uuid.uuid4().hex[:8]}", **overrides}
    return ThreadedGateway(create_app(Settings(model=str(encoder.path), **fields), encoder=encoder)).__enter__()


@pytest.fixture(scope="module")
def gateway(minilm_encoder: Any) -> Iterator[ThreadedGateway]:
    """One gateway for the module: it calibrates once, as a server does."""
    started = _start(minilm_encoder, max_inputs=256)
    yield started
    started.__exit__(None, None, None)


@pytest.fixture
def serve(minilm_encoder: Any) -> Iterator[Any]:
    gateways: list[ThreadedGateway] = []

    def start(encoder: Any = None, **overrides: Any) -> ThreadedGateway:
        gateways.append(_start(encoder or minilm_encoder, **overrides))
        return gateways[-1]

    yield start
    for started in gateways:
        started.__exit__(None, None, None)


def _embed(gateway: ThreadedGateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v2/embed", json=body, timeout=120)


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def _floats(response: httpx.Response) -> np.ndarray:
    return np.array(_ok(response)["embeddings"]["float"], dtype=np.float32)


def _v1(gateway: ThreadedGateway, texts: list[str], **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/embeddings", json={"input": texts, **body}, timeout=120)


def _v1_floats(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def _ranges(gateway: ThreadedGateway, **params: Any) -> tuple[np.ndarray, dict[str, Any]]:
    answer = httpx.get(f"{gateway.url}/v2/embed/ranges", params=params, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    return np.array([data["min"], data["max"]], dtype=np.float32), data


def test_cohere_sdk_client_v2_embeds_all_five_types(gateway: ThreadedGateway) -> None:
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=gateway.url)
    answer = client.embed(model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_document", embedding_types=TYPES)
    assert answer.response_type == "embeddings_by_type" and answer.id
    assert answer.texts == TEXTS
    embeddings = answer.embeddings
    assert embeddings.float_ is not None and np.array(embeddings.float_).shape == (3, 384)
    for kind, width, low, high in [
        ("int8", 384, -128, 127),
        ("uint8", 384, 0, 255),
        ("binary", 48, -128, 127),
        ("ubinary", 48, 0, 255),
    ]:
        values = np.array(getattr(embeddings, kind))
        assert values.shape == (3, width), kind
        assert low <= values.min() and values.max() <= high, kind
    assert answer.meta is not None and answer.meta.api_version is not None
    assert answer.meta.api_version.version == "2"
    assert answer.meta.billed_units is not None
    usage = _v1(gateway, TEXTS).json()["usage"]["prompt_tokens"]
    assert answer.meta.billed_units.input_tokens == usage
    # only the asked types are in the answer
    only = _ok(_embed(gateway, texts=TEXTS, embedding_types=["ubinary"]))
    assert set(only["embeddings"]) == {"ubinary"}
    assert set(_ok(_embed(gateway, texts=TEXTS))["embeddings"]) == {"float"}, "absent embedding_types: float"


def test_cohere_sdk_reads_our_errors(gateway: ThreadedGateway) -> None:
    import cohere
    from cohere.core.api_error import ApiError

    client = cohere.ClientV2(api_key="unused", base_url=gateway.url)
    with pytest.raises(ApiError) as raised:
        client.embed(model="all-MiniLM-L6-v2", texts=[""], input_type="search_query", embedding_types=["float"])
    assert raised.value.status_code == 400
    assert "texts[0] is an empty string" in raised.value.body["error"]["message"]
    with pytest.raises(ApiError) as missing:
        client.embed(model="no-such-model", texts=TEXTS, input_type="search_query", embedding_types=["float"])
    assert missing.value.status_code == 404


def test_float_equals_the_encoder_and_v1_embeddings(gateway: ThreadedGateway, minilm_encoder: Any) -> None:
    texts = [f"{text} (float check)" for text in TEXTS]
    mine = _floats(_embed(gateway, texts=texts, embedding_types=["float"]))
    np.testing.assert_array_equal(mine, _v1_floats(_v1(gateway, texts)))
    np.testing.assert_allclose(mine, minilm_encoder.embed(texts), rtol=1e-5, atol=1e-6)
    # base64: the same vectors as little-endian float32
    import base64

    rows = _ok(_embed(gateway, texts=texts, embedding_types=["base64"]))["embeddings"]["base64"]
    np.testing.assert_array_equal(np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows]), mine)


def test_binary_and_ubinary_equal_sentence_transformers(gateway: ThreadedGateway) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    data = _ok(_embed(gateway, texts=TEXTS, embedding_types=["float", "binary", "ubinary"]))
    floats = np.array(data["embeddings"]["float"], dtype=np.float32)
    for precision in ("binary", "ubinary"):
        expected = quantize_embeddings(floats, precision=precision)
        got = np.array(data["embeddings"][precision])
        np.testing.assert_array_equal(got, expected.astype(np.int64), err_msg=precision)
    assert np.array(data["embeddings"]["binary"]).min() < 0, "binary is signed: the ubinary byte minus 128"


def test_int8_and_uint8_use_ranges_calibrated_once_on_the_fixed_set(gateway: ThreadedGateway) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    data = _ok(_embed(gateway, texts=TEXTS, embedding_types=["float", "int8", "uint8"]))
    floats = np.array(data["embeddings"]["float"], dtype=np.float32)
    ranges, shown = _ranges(gateway)
    assert shown["dimensions"] == 384 and shown["calibration"]["texts"] == len(CALIBRATION_TEXTS)
    assert shown["calibration"]["prompts"] == [] and shown["calibration"]["version"] == 1
    for precision in ("int8", "uint8"):
        expected = quantize_embeddings(floats, precision=precision, ranges=ranges)
        np.testing.assert_array_equal(np.array(data["embeddings"][precision]), expected.astype(np.int64))
    # the ranges are the per-dimension min and max of the calibration texts' cached vectors
    calibration = _v1(gateway, list(CALIBRATION_TEXTS))
    assert calibration.headers["x-cache-hits"] == str(len(CALIBRATION_TEXTS)), "calibrated through the cache"
    np.testing.assert_array_equal(ranges, ranges_of(_v1_floats(calibration)))
    # not the batch's own ranges (sentence-transformers' default)
    batch_ranges = quantize_embeddings(floats, precision="uint8")
    assert not np.array_equal(np.array(data["embeddings"]["uint8"]), batch_ranges.astype(np.int64))


def test_a_texts_codes_do_not_depend_on_the_other_texts(gateway: ThreadedGateway) -> None:
    kinds = ["int8", "uint8", "binary", "ubinary"]
    together = _ok(_embed(gateway, texts=TEXTS, embedding_types=kinds))["embeddings"]
    alone = _ok(_embed(gateway, texts=[TEXTS[1]], embedding_types=kinds))["embeddings"]
    shuffled = _ok(_embed(gateway, texts=["something else entirely", TEXTS[1], TEXTS[0]], embedding_types=kinds))
    digest = _ranges(gateway)[1]["calibration"]["digest"]
    for kind in kinds:
        assert alone[kind][0] == together[kind][1] == shuffled["embeddings"][kind][1], kind
        assert shuffled["embeddings"][kind][2] == together[kind][0], kind
    assert _ranges(gateway)[1]["calibration"]["digest"] == digest, "the ranges are kept, not recalibrated"


def test_concurrent_first_requests_calibrate_once(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.core.quantize import Calibrator

    calls: list[int] = []
    original = Calibrator._calibrate

    async def counted(self: Calibrator) -> Any:
        calls.append(1)
        return await original(self)

    monkeypatch.setattr(Calibrator, "_calibrate", counted)
    gateway = serve()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _embed(gateway, texts=[TEXTS[i % 3]], embedding_types=["int8"]), range(4)))
    assert [answer.status_code for answer in answers] == [200] * 4
    assert len(calls) == 1
    # the requests' own cache headers count their texts, never the calibration's
    assert all(int(a.headers["x-cache-hits"]) + int(a.headers["x-cache-misses"]) == 1 for a in answers)


def test_a_repeat_is_served_from_the_cache_shared_with_v1(gateway: ThreadedGateway) -> None:
    texts = [f"{text} (cache check)" for text in TEXTS]
    first = _embed(gateway, texts=texts, embedding_types=TYPES)
    assert first.headers["x-cache-misses"] == "3"
    again = _embed(gateway, texts=texts, embedding_types=TYPES)
    assert again.headers["x-cache-hits"] == "3" and again.headers["x-cache-misses"] == "0"
    assert _ok(again)["embeddings"] == _ok(first)["embeddings"]
    v1 = _v1(gateway, texts)
    assert v1.headers["x-cache-hits"] == "3", "one cache: /v1/embeddings reads what /v2/embed wrote"


def test_output_dimension_shortens_and_quantises_at_that_width(gateway: ThreadedGateway) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    data = _ok(_embed(gateway, texts=TEXTS, embedding_types=["float", "int8", "binary"], output_dimension=64))
    floats = np.array(data["embeddings"]["float"], dtype=np.float32)
    np.testing.assert_array_equal(floats, _v1_floats(_v1(gateway, TEXTS, dimensions=64)))
    ranges, shown = _ranges(gateway, output_dimension=64)
    assert ranges.shape == (2, 64) and shown["dimensions"] == 64
    expected = quantize_embeddings(floats, precision="int8", ranges=ranges)
    np.testing.assert_array_equal(np.array(data["embeddings"]["int8"]), expected.astype(np.int64))
    np.testing.assert_array_equal(np.array(data["embeddings"]["binary"]), quantize_embeddings(floats, "binary"))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"texts": TEXTS, "embedding_types": ["float16"]}, "embedding_types"),
        ({"texts": TEXTS, "embedding_types": []}, "embedding_types"),
        ({"texts": TEXTS, "embedding_types": "float"}, "embedding_types"),
        ({"texts": []}, "texts"),
        ({}, "texts"),
        ({"texts": ["x"] * 257}, "texts"),
        ({"texts": ["fine", ""]}, "texts"),
        ({"texts": "one string"}, "texts"),
        ({"texts": [1, 2]}, "texts"),
        ({"texts": TEXTS, "images": ["data:image/png;base64,iVBORw0KGgo="]}, "images"),
        ({"inputs": [{"content": [{"type": "text", "text": "hi"}]}]}, "inputs"),
        ({"texts": TEXTS, "input_type": "image"}, "input_type"),
        ({"texts": TEXTS, "input_type": "poetry"}, "input_type"),
        ({"texts": TEXTS, "truncate": "MIDDLE"}, "truncate"),
        ({"texts": TEXTS, "output_dimension": 0}, "output_dimension"),
        ({"texts": TEXTS, "output_dimension": 385}, "output_dimension"),
        ({"texts": TEXTS, "max_tokens": 16}, "max_tokens"),
        ({"texts": TEXTS, "model": 7}, "model"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field(gateway: ThreadedGateway, body: dict[str, Any], param: str) -> None:
    answer = _embed(gateway, **body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]


def test_not_json_and_unknown_model(gateway: ThreadedGateway) -> None:
    raw = httpx.post(f"{gateway.url}/v2/embed", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert _embed(gateway, texts=TEXTS, model="nope").status_code == 404
    assert httpx.get(f"{gateway.url}/v2/embed/ranges", params={"model": "nope"}, timeout=30).status_code == 404
    bad_width = httpx.get(f"{gateway.url}/v2/embed/ranges", params={"output_dimension": 0}, timeout=30)
    assert bad_width.status_code == 400
    assert _embed(gateway, texts=TEXTS, max_tokens=256).status_code == 200, "the model's own limit changes nothing"


def test_truncate_none_start_and_end(serve: Any, gateway: ThreadedGateway) -> None:
    # a server that does not truncate (the default): an over-long text is refused whatever truncate says
    for truncate, said in [("NONE", "shorten"), ("END", "does not truncate"), (None, "does not truncate")]:
        body: dict[str, Any] = {"texts": ["short", LONG], **({"truncate": truncate} if truncate else {})}
        answer = _embed(gateway, **body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "texts" and error["code"] == "context_length_exceeded"
        assert "texts[1]" in error["message"] and said in error["message"], error
    # a truncating server: END (and absent) cut the end, as /v1/embeddings does; NONE and START refuse
    cutting = serve(truncate=True)
    cut = _floats(_embed(cutting, texts=[LONG], truncate="END"))
    np.testing.assert_array_equal(cut, _v1_floats(_v1(cutting, [LONG])))
    np.testing.assert_array_equal(_floats(_embed(cutting, texts=[LONG])), cut)
    refused = _embed(cutting, texts=["short", LONG], truncate="NONE")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    start = _embed(cutting, texts=["short", LONG], truncate="START")
    assert start.status_code == 400 and "START" in start.json()["error"]["message"], start.text
    # START with texts within the limit cuts nothing: served
    assert _embed(cutting, texts=TEXTS, truncate="START").status_code == 200


def test_api_keys_apply(serve: Any) -> None:
    import cohere
    from cohere.core.api_error import ApiError

    gateway = serve(api_keys="cohere-key")
    good = cohere.ClientV2(api_key="cohere-key", base_url=gateway.url)
    assert good.embed(model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_query", embedding_types=["float"])
    with pytest.raises(ApiError) as raised:
        cohere.ClientV2(api_key="wrong", base_url=gateway.url).embed(
            model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_query", embedding_types=["float"]
        )
    assert raised.value.status_code == 401
    assert httpx.get(f"{gateway.url}/v2/embed/ranges", timeout=30).status_code == 401


@pytest.fixture(scope="module")
def prompted_encoder(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """all-MiniLM-L6-v2 with sentence-transformers prompts in its config (no default)."""
    from encoder import load_encoder

    folder = tmp_path_factory.mktemp("cohere-prompted") / "model"
    shutil.copytree(minilm_dir, folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config["prompts"] = PROMPTS
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    return load_encoder(str(folder), truncate=True)


def test_input_type_picks_the_models_prompt(serve: Any, prompted_encoder: Any) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    gateway = serve(prompted_encoder, model_name="prompted")
    plain = _v1_floats(_v1(gateway, TEXTS))
    for input_type, prompt in [
        ("search_query", "query"),
        ("search_document", "passage"),
        ("classification", "classification"),
        ("clustering", None),  # no clustering prompt: none
    ]:
        answer = _embed(gateway, texts=TEXTS, input_type=input_type, embedding_types=["float", "uint8"])
        expected = _v1_floats(_v1(gateway, TEXTS, prompt_name=prompt)) if prompt else plain
        np.testing.assert_array_equal(_floats(answer), expected, err_msg=input_type)
        assert prompt is None or not np.array_equal(_floats(answer), plain), input_type
    # the ranges span the plain texts and each prompt the input types pick
    ranges, shown = _ranges(gateway)
    assert shown["calibration"]["prompts"] == ["query", "passage", "classification"]
    assert shown["calibration"]["texts"] == 4 * len(CALIBRATION_TEXTS)
    floats = _floats(answer)
    expected_codes = quantize_embeddings(floats, precision="uint8", ranges=ranges)
    np.testing.assert_array_equal(np.array(answer.json()["embeddings"]["uint8"]), expected_codes.astype(np.int64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_equals_sentence_transformers_bit_for_bit(seed: int) -> None:
    """The pure-numpy functions against ``quantize_embeddings``: widths not a multiple of 8, zeros,
    a constant dimension (a zero step), values outside the ranges (clipped)."""
    from sentence_transformers.util.quantization import quantize_embeddings

    rng = np.random.default_rng(seed)
    width = [384, 37, 1024][seed]
    calibration = rng.normal(size=(200, width)).astype(np.float32)
    calibration[:, 3] = 0.5  # a constant dimension
    vectors = (rng.normal(size=(17, width)) * 1.5).astype(np.float32)
    vectors[0] = 0.0
    ranges = ranges_of(calibration)
    for precision in ("int8", "uint8"):
        expected = quantize_embeddings(vectors, precision=precision, ranges=ranges)
        got = quantize(vectors, precision, ranges)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        # and with sentence-transformers' calibration_embeddings, which computes the same ranges
        np.testing.assert_array_equal(
            got, quantize_embeddings(vectors, precision=precision, calibration_embeddings=calibration)
        )
    for precision in ("binary", "ubinary"):
        expected = quantize_embeddings(vectors, precision=precision)
        got = quantize(vectors, precision)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
