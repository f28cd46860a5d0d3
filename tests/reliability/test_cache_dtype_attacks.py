"""Attacks on EMBED_CACHE_DTYPE and Cohere's POST /v2/embed (issue 24).

"The vector served is the vector stored: a miss answers the same rounded vector its later hit
returns, bit for bit" on every route and in every cache state; the stored formats misread across
types; non-finite and tiny values; the int8/uint8 calibration (fixed across replicas, under a small
queue, free of repeated work); Cohere's codes against sentence-transformers. Tests whose docstring
starts with FINDING expose a defect; "Held attack." ones stay as regression tests.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from encoder.int8_probe import probe_texts
from encoder.kinds import SparseWeights
from gateway.core.cache import MemoryBlobCache
from gateway.core.cache.formats import (
    pack_colbert,
    pack_dense,
    pack_sparse,
    unpack_colbert,
    unpack_dense,
    unpack_sparse,
)
from gateway.core.outputs import DENSE, float_json
from gateway.core.service import EmbeddingService, cache_namespace
from gateway.core.telemetry import Telemetry

TIMEOUT = 60


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _f32(rows: Any) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def _dense_of(response: httpx.Response, path: str, body: dict[str, Any]) -> bytes:
    """The answer's vectors as float32 bytes, whatever the route's shape."""
    data = _ok(response)
    if path == "/embed":
        return b"".join(_f32(row).tobytes() for row in data)
    if body.get("encoding_format") == "base64":
        return b"".join(base64.b64decode(row["embedding"]) for row in data["data"])
    return b"".join(_f32(row["embedding"]).tobytes() for row in data["data"])


def _wait_for_hits(url: str, path: str, body: dict[str, Any], count: int) -> httpx.Response:
    for _ in range(100):  # the write-back runs after the answer
        again = _post(url, path, body)
        if again.headers.get("x-cache-hits") == str(count):
            return again
    raise AssertionError(f"{path}: never a full hit: {dict(again.headers)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the vector served is the vector stored ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_held_every_dense_route_answers_a_miss_as_its_hit(gateway_factory: Any, dtype: str) -> None:
    """Held attack. On a float16 / int8 server, a miss answered to two concurrent identical requests
    (in flight together) and its later hit are the same bytes on /v1/embeddings float, base64 and
    ``dimensions``, and on TEI's /embed with and without ``normalize`` and with ``dimensions``."""
    gateway = gateway_factory(cache_dtype=dtype)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("/v1/embeddings", {"encoding_format": "float"}),
        ("/v1/embeddings", {"encoding_format": "base64"}),
        ("/v1/embeddings", {"dimensions": 100}),
        ("/embed", {"normalize": True}),
        ("/embed", {"normalize": False, "dimensions": 50}),
    ]
    for number, (path, extra) in enumerate(variants):
        texts = [f"variant {number} of {dtype}: {word}" for word in ("alpha", "beta", "gamma")]
        body = {("inputs" if path == "/embed" else "input"): texts, **extra}
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(_post, [gateway.url] * 2, [path] * 2, [body] * 2)
        hit = _wait_for_hits(gateway.url, path, body, 3)
        expected = _dense_of(hit, path, body)
        assert _dense_of(first, path, body) == expected, (path, extra, "first miss differs from the hit")
        assert _dense_of(second, path, body) == expected, (path, extra, "second miss differs from the hit")


def test_held_bge_m3_sparse_and_token_vectors_miss_equals_hit(serve_app: Any, bge_m3: Any) -> None:
    """Held attack. bge-m3 on an int8 server: /embed_sparse, /embed_all, /v1/embeddings/sparse and
    /v1/embeddings/multivector answer a miss with the very values of its hit (one-word texts give
    ColBERT matrices of a row or two)."""
    gateway = serve_app(bge_m3, model_name="m3", cache_dtype="int8")
    texts = ["a", "the vector served is the vector stored", "zwei"]
    for path, body in [
        ("/embed_sparse", {"inputs": texts}),
        ("/embed_all", {"inputs": texts}),
        ("/v1/embeddings/sparse", {"input": [f"{t} (v1)" for t in texts]}),
        ("/v1/embeddings/multivector", {"input": [f"{t} (v1)" for t in texts]}),
    ]:
        miss = _ok(_post(gateway.url, path, body))
        hit = _wait_for_hits(gateway.url, path, body, 3).json()
        assert miss == hit, path
    rows = _ok(_post(gateway.url, "/embed_all", {"inputs": ["a"]}))[0]
    assert 1 <= len(rows) <= 3 and all(np.isfinite(row).all() for row in rows)


def test_held_a_failing_cache_and_no_cache_answer_the_stored_vector(gateway_factory: Any) -> None:
    """Held attack. An int8 server whose Redis is down (every lookup and write fails) and one with
    the cache off answer the same int8-rounded vector a working int8 cache serves as a hit, bit for
    bit: the rounding does not depend on whether the write succeeds."""
    texts = ["a cache that fails must not change the vector", "second one"]
    body = {"input": texts, "encoding_format": "base64"}
    working = gateway_factory(cache_dtype="int8")
    _post(working.url, "/v1/embeddings", body)
    stored = _dense_of(_wait_for_hits(working.url, "/v1/embeddings", body, 2), "/v1/embeddings", body)
    down = gateway_factory(cache_dtype="int8", redis_url=f"redis://127.0.0.1:{_free_port()}/0", cache_timeout_ms=100)
    off = gateway_factory(cache_dtype="int8", cache=False)
    for gateway in (down, off):
        for _ in range(2):  # a second time too: nothing was kept anywhere
            answer = _post(gateway.url, "/v1/embeddings", body)
            assert answer.headers["x-cache-misses"] == "2"
            assert _dense_of(answer, "/v1/embeddings", body) == stored


# --- formats ---------------------------------------------------------------------------------------


def test_held_formats_edge_shapes_round_trip() -> None:
    """Held attack. ColBERT matrices of one and of zero rows, a sparse vector with no entries, a
    zero vector and a row of zeros among others, each in float16 and int8: unpacked to the shape
    packed, finite, zeros kept zero; a value packed in one kind is never unpacked as another."""
    rng = np.random.default_rng(3)
    for dtype in ("float16", "int8"):
        one = rng.standard_normal((1, 16)).astype(np.float32)
        got = unpack_colbert(pack_colbert(2, one, dtype), 16)
        assert got is not None and got[1].shape == (1, 16) and np.isfinite(got[1]).all()
        none = unpack_colbert(pack_colbert(1, np.zeros((0, 16), np.float32), dtype), 16)
        assert none is not None and none[1].shape == (0, 16)
        mixed = np.vstack([one, np.zeros((1, 16), np.float32), one * 1e-30])
        rows = unpack_colbert(pack_colbert(3, mixed, dtype), 16)
        assert rows is not None and np.isfinite(rows[1]).all() and not rows[1][1].any()
        empty = unpack_sparse(pack_sparse(1, SparseWeights(np.zeros(0, np.int64), np.zeros(0, np.float32)), dtype), 0)
        assert empty is not None and empty[1].values.shape == (0,)
        packed = pack_dense(1, np.ones(16, np.float32), dtype)
        assert unpack_sparse(packed, 16) is None and unpack_colbert(packed, 16) is None


def test_finding_a_float32_server_reads_another_storage_types_value_as_a_hit(minilm_encoder: Any) -> None:
    """Fixed finding (low). formats.py promises "a value ... of another kind, dimension or storage type
    decodes as a miss", but ``unpack_dense`` / ``unpack_sparse`` / ``unpack_colbert`` accept any
    digit (``_opened`` checks ``data[1:2] in _WIDTH``) and are never told the server's type: the
    namespace is the only guard. An int8 value under a float32 server's key (a namespace collision
    of the 8-hex-digit tag, a restore or copy between prefixes, a tool writing raw values) is
    served as a hit: expected a miss (recomputed and overwritten with full float32), got the
    int8-rounded vector with ``hits == 1``. Fix: pass the expected ``CacheDtype`` to ``unpack`` (the
    ``OutputSpec`` has it through the service) and treat another digit as a miss."""
    import anyio

    from encoder.batcher import MicroBatcher

    async def run() -> tuple[int, np.ndarray]:
        cache = MemoryBlobCache(max_bytes=1 << 22, ttl_seconds=60)
        telemetry = Telemetry()
        batcher = MicroBatcher(minilm_encoder, observer=telemetry)
        await batcher.start()
        try:
            service = EmbeddingService(
                encoder=minilm_encoder,
                batcher=batcher,
                cache=cache,
                telemetry=telemetry,
                cache_prefix="foreign",
                max_request_tokens=10_000,
                truncate=True,
            )
            text = "a float32 server must not serve an int8 value"
            exact = minilm_encoder.embed([text])[0]
            await cache.put_blobs([(service.key(text), pack_dense(12, exact, "int8"))])
            result = await service.embed([text], DENSE)
            return result.hits, result.values[0]
        finally:
            await batcher.stop()

    hits, served = anyio.run(run)
    exact = minilm_encoder.embed(["a float32 server must not serve an int8 value"])[0]
    assert hits == 0 and np.array_equal(served, exact), (
        f"float32 server served a foreign int8 value as a hit (hits={hits}, "
        f"max diff {np.abs(served - exact).max():.2e})"
    )


def test_finding_non_finite_values_are_stored_as_other_vectors() -> None:
    """Fixed finding (low). ``formats._payload`` has no guard for values the type cannot hold: float16
    stores 70000 (an unnormalised model's large activation) as inf, which ``float_json`` answers as
    JSON ``null``; int8 turns a vector holding one inf into all NaN, and one holding a NaN into a
    vector whose NaN silently became 0 (``scale`` falls back to 1 because ``nan > 0`` is false) --
    a different vector cached for a week. The storage gate only checks the probe set. Expected:
    each stored value finite and the rest of the vector kept (float16 saturating to +-65504, int8
    refusing or keeping non-finite input out of the scale), or the value not stored. Got inf/NaN/0."""
    problems = []
    big = np.array([70000.0, 1.0, -2.0], np.float32)
    half = unpack_dense(pack_dense(1, big, "float16"), 3)
    assert half is not None
    if not np.isfinite(half[1]).all():
        problems.append(f"float16 of 70000 -> {half[1].tolist()}, JSON {bytes(float_json(half[1])).decode()}")
    with np.errstate(all="ignore"):
        inf = unpack_dense(pack_dense(1, np.array([np.inf, 1.0, -2.0], np.float32), "int8"), 3)
        nan = unpack_dense(pack_dense(1, np.array([np.nan, 1.0, -2.0], np.float32), "int8"), 3)
    assert inf is not None and nan is not None
    if not np.isfinite(inf[1][1:]).all():
        problems.append(f"int8 of [inf, 1, -2] -> {inf[1].tolist()}")
    if not np.isnan(nan[1][0]):
        problems.append(f"int8 of [nan, 1, -2] -> {nan[1].tolist()} (the NaN became a number)")
    assert not problems, "; ".join(problems)


def test_finding_int8_sparse_answers_zero_weight_entries(serve_app: Any, bge_m3: Any) -> None:
    """Fixed finding (low). The encoder keeps only weights > 0 (``encoder/model.py`` ``_sparse_row``), and a
    float32 or float16 server answers no zero weight; an int8 server rounds every weight below
    ``max / 254`` to code 0 and still answers its token (``formats.pack_sparse`` keeps all indices),
    so /embed_sparse and /v1/embeddings/sparse return ``{"index": i, "value": 0.0}`` entries. On a
    real bge-m3 (weights 0.001..0.3 in one text) that is many dead entries per vector sent to the
    vector store. Expected no zero weights; got some. Fix: drop entries whose int8 code is 0 when
    packing (miss and hit then agree), or keep the smallest code at 1."""
    texts = [
        "the vector served is the vector stored, a longer sentence with many tokens in it to spread weights",
        "ein zweiter Text",
    ]
    zeros = {}
    for dtype in ("float32", "int8"):
        gateway = serve_app(bge_m3, model_name="m3", cache_dtype=dtype)
        rows = _ok(_post(gateway.url, "/embed_sparse", {"inputs": texts}))
        zeros[dtype] = sum(1 for row in rows for entry in row if entry["value"] == 0.0)
    assert zeros["float32"] == 0
    assert zeros["int8"] == 0, f"int8 server answered {zeros['int8']} sparse entries of weight 0.0"


def test_finding_int8_with_dimensions_one_answers_a_zero_vector(gateway_factory: Any, minilm_encoder: Any) -> None:
    """Fixed finding (low). The storage gate measures whole vectors, but ``dimensions`` / TEI
    ``dimensions`` / Cohere ``output_dimension`` cut the stored vector and re-normalise it: under
    int8 (one scale per vector) a small leading component rounds to 0, and a short cut of it is the
    zero vector (``shorten`` keeps a zero vector zero) -- OpenAI's ``dimensions`` promises a unit
    vector. At 2 dimensions the probe set's worst cosine is about 0.997, below int8's 0.999 floor.
    Expected ``[+-1.0]`` for ``dimensions: 1`` (as the float32 server answers); got ``[0.0]``. Fix:
    gate (or refuse) short cuts under int8, or quantise per block instead of per vector."""
    exact = minilm_encoder.embed(probe_texts())
    peaks = np.abs(exact).max(axis=1) / 254
    victims = [text for text, row, peak in zip(probe_texts(), exact, peaks, strict=True) if abs(row[0]) < peak]
    assert victims, "no probe text with a leading component under half an int8 step"
    body = {"input": victims[:1], "dimensions": 1}
    full = _ok(_post(gateway_factory().url, "/v1/embeddings", body))["data"][0]["embedding"]
    assert abs(full[0]) == 1.0
    served = _ok(_post(gateway_factory(cache_dtype="int8").url, "/v1/embeddings", body))["data"][0]["embedding"]
    assert served == full, f"int8 server answered {served} for dimensions=1 (float32 server: {full})"


def test_held_namespace_separates_types_with_shared_numerics() -> None:
    """Held attack. ``EMBED_CACHE_SHARE_NUMERICS`` leaves the numerics out of the namespace, never the
    storage type: six combinations, six namespaces; float32 keeps its pre-setting keys."""
    seen = {
        (share, dtype): cache_namespace("fp", "torch-fp32", truncate=True, share_numerics=share, cache_dtype=dtype)
        for share in (False, True)
        for dtype in ("float32", "float16", "int8")
    }
    assert len(set(seen.values())) == 6
    assert seen[(True, "int8")] == cache_namespace(
        "fp", "onnx-int8", truncate=True, share_numerics=True, cache_dtype="int8"
    )
    assert seen[(False, "float32")] == cache_namespace("fp", "torch-fp32", truncate=True)


# --- the storage gate and cache stats ---------------------------------------------------------------


def test_held_gate_with_a_models_file_names_the_embedding_model_on_one_line(
    minilm_dir: Path, cross_dir: Path, tmp_path: Path
) -> None:
    """Held attack. A models file of a reranker first and an embedding model second, int8 with an
    impossible floor: the reranker (scores stay float32) is not gated, the embedding model is, and
    the server exits 2 with one line naming it -- no traceback."""
    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nname = "ranker"\npath = "{cross_dir}"\nkind = "reranker"\ntruncate = true\n\n'
        f'[[models]]\nname = "mini"\npath = "{minilm_dir}"\n'
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBED_CACHE": "off",
        "EMBED_MODELS_FILE": str(models),
        "EMBED_CACHE_DTYPE": "int8",
        "EMBED_CACHE_DTYPE_MIN_COSINE": "0.9999999",
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    refusals = [line for line in done.stderr.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and "'mini'" in refusals[0] and "cache dtype int8" in refusals[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_held_cache_stats_shows_smaller_entries_for_int8(
    gateway_factory: Any, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held attack. ``cache stats --json`` gives each namespace its bytes per entry; an int8
    namespace's entries are smaller than a float32 one's for the same texts, and the table form
    prints the column."""
    import json

    from gateway.cli import main

    prefix = f"stats-{uuid.uuid4().hex[:8]}"
    texts = [f"cache stats text {i}" for i in range(12)]
    namespaces = {}
    for dtype in ("float32", "int8"):
        gateway = gateway_factory(cache_dtype=dtype, redis_url=redis_server.url, cache_prefix=prefix)
        _post(gateway.url, "/v1/embeddings", {"input": texts})
        _wait_for_hits(gateway.url, "/v1/embeddings", {"input": texts}, len(texts))
        namespaces[dtype] = httpx.get(f"{gateway.url}/stats", timeout=10).json()["cache"]["namespace"]
    capsys.readouterr()
    assert main(["cache", "stats", "--redis-url", redis_server.url, "--cache-prefix", prefix, "--json"]) == 0
    groups = {g["fingerprint"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    full, small = groups[namespaces["float32"]], groups[namespaces["int8"]]
    assert full["keys"] == small["keys"] == len(texts)
    assert 0 < small["bytes_per_entry"] < full["bytes_per_entry"], (small, full)
    assert main(["cache", "stats", "--redis-url", redis_server.url, "--cache-prefix", prefix]) == 0
    assert "bytes/entry" in capsys.readouterr().out


# --- Cohere /v2/embed ---------------------------------------------------------------------------------


def test_finding_calibration_ranges_differ_between_replicas(gateway_factory: Any) -> None:
    """Fixed finding (medium). int8/uint8 ranges are "calibrated once per model" so codes from any replica
    compare, but ``Calibrator._calibrate`` takes them from whatever floats this process's
    micro-batcher computes for the calibration texts (gathered chunks batched with one another and
    with traffic): the last bits depend on batch composition, so two replicas without a shared warm
    cache (the default in-process cache, EMBED_CACHE=off, a cold or evicted Redis, each HTTP worker
    under EMBED_WORKERS with the in-process cache) calibrate different ranges -- different digests
    on GET /v2/embed/ranges, and int8/uint8 codes of the same vector that differ by one step at
    boundaries. Observed even with identical settings: three processes gave digests 56627431...,
    9caa045d... and d69665ec... depending on warm-up and timing. Expected one digest for the model;
    got several. Fix: calibrate deterministically (each calibration text encoded alone, or ranges
    rounded to a coarse grid such as float16 before use), or keep the ranges in the cache under
    the namespace so every replica reads the first calibration. Fixed: both (each text computed
    alone; the first calibration stored with put_first and adopted by every replica sharing the
    cache: tests/unit/test_cache_put_first.py)."""
    digests = {}
    for name, settings in [
        ("default", {}),
        ("max_batch_size=1", {"max_batch_size": 1}),
        ("max_batch_tokens=64", {"max_batch_tokens": 64}),
    ]:
        gateway = gateway_factory(cache=False, **settings)
        shown = _ok(httpx.get(f"{gateway.url}/v2/embed/ranges", timeout=TIMEOUT))
        digests[name] = shown["calibration"]["digest"]
    assert len(set(digests.values())) == 1, f"replicas of one model calibrated different ranges: {digests}"


def test_finding_int8_is_refused_forever_by_an_idle_server_with_a_small_queue(gateway_factory: Any) -> None:
    """Fixed finding (low). ``Calibrator._calibrate`` gathers every calibration chunk at once, so all of
    them (~130 texts x prompts, ~2.5k tokens for MiniLM) must fit EMBED_MAX_QUEUE_TOKENS together;
    the batcher admits only the first into an empty queue (``encoder/batcher.py``: refused when
    ``queued + new > max``). With a 1,000-token queue and the cache off, an idle server answers
    every int8/uint8 request 503 "the encoder queue is full" forever (with a cache it takes one
    retry per chunk), while a /v1/embeddings request bigger than the client's is served (and each
    503 charges the key: see the next test). Expected 200; got 503. Fix: calibrate
    the chunks one after another (or admit calibration past the queue bound). Fixed: the texts are
    calibrated one after another, one in the queue at a time."""
    gateway = gateway_factory(cache=False, max_queue_tokens=1000)
    bigger = _post(gateway.url, "/v1/embeddings", {"input": ["hello world, a longer text"] * 60})
    assert bigger.status_code == 200
    answers = [_post(gateway.url, "/v2/embed", {"texts": ["hi"], "embedding_types": ["int8"]}) for _ in range(3)]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200, 200, 200], f"idle server: {statuses}: {answers[-1].text[:200]}"


def test_finding_a_failed_calibration_charges_the_keys_tokens(gateway_factory: Any, tmp_path: Path) -> None:
    """Fixed finding (low). ``compute_outputs`` releases a key's token reservation when the server fails a
    request (OverloadedError / EncoderFailedError: "the server failed it, not the client: nothing
    to pay for"), but /v2/embed calibrates *after* ``compute`` returned (``embed_v2`` ->
    ``calibrator_for(model).ranges``), so a calibration that fails (queue full, encoder failure)
    answers 503 with the key's tokens kept: three 503s cost a 100-token key 12 tokens. Expected
    x-ratelimit-remaining-tokens 100 after 503s; got 96, 92, 88. Fix: calibrate before ``compute``
    (ranges do not depend on the texts), or release the reservation when calibration fails. Fixed:
    ``embed_v2`` gets the ranges before ``compute``; checked below with a calibration that fails."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "k"\nkey = "sk-calibration-key-1"\ntokens_per_minute = 100\n')
    gateway = gateway_factory(cache=False, max_queue_tokens=1000, api_keys_file=str(keys))
    headers = {"authorization": "Bearer sk-calibration-key-1"}
    body = {"texts": ["hi there"], "embedding_types": ["int8"]}
    import time

    charged = []
    left = 100
    last = time.monotonic()
    for _ in range(3):
        answer = httpx.post(f"{gateway.url}/v2/embed", json=body, headers=headers, timeout=TIMEOUT)
        now = int(answer.headers["x-ratelimit-remaining-tokens"])
        refilled = int(100 * (time.monotonic() - last) / 60) + 1  # 100 a minute flow back meanwhile
        last = time.monotonic()
        if answer.status_code == 200:  # served: its tokens are due
            left -= answer.json()["meta"]["billed_units"]["input_tokens"]
        else:
            assert answer.status_code == 503, answer.text[:200]
            charged.append(max(0, left - now))
        assert now <= min(100, left + refilled)
        left = now
    assert not any(charged), f"failed (503) requests were charged {charged} tokens each"
    # calibration now fits a small queue: make it fail outright, and the key still pays nothing
    from gateway.core.errors import OverloadedError
    from gateway.core.quantize import Calibrator

    async def failing(self: Calibrator) -> Any:
        raise OverloadedError("calibration failed (test)", retry_after=1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Calibrator, "_calibrate", failing)
        other = gateway_factory(cache=False, api_keys_file=str(keys))
        for _ in range(3):
            answer = httpx.post(f"{other.url}/v2/embed", json=body, headers=headers, timeout=TIMEOUT)
            assert answer.status_code == 503, answer.text[:200]
            assert answer.headers["x-ratelimit-remaining-tokens"] == "100", dict(answer.headers)


def test_held_cohere_codes_equal_sentence_transformers_at_odd_widths(gateway_factory: Any) -> None:
    """Held attack. binary, ubinary, int8 and uint8 at output_dimension 13, 100 and 384 (widths not a
    multiple of 8 pad the last byte) equal sentence-transformers' quantize_embeddings on the
    answer's float rows with the ranges GET /v2/embed/ranges shows for that width, bit for bit,
    including texts outside the calibrated ranges (clipped)."""
    from sentence_transformers.quantization import quantize_embeddings

    gateway = gateway_factory(cache_dtype="int8")
    texts = ["!!!!!!!!", "🙂" * 30, "zzzz qqqq xxxx", "SELECT * FROM t;", "an ordinary sentence"]
    kinds = ["float", "int8", "uint8", "binary", "ubinary"]
    for width in (13, 100, 384):
        data = _ok(
            _post(gateway.url, "/v2/embed", {"texts": texts, "embedding_types": kinds, "output_dimension": width})
        )
        floats = _f32(data["embeddings"]["float"])
        assert floats.shape == (len(texts), width)
        shown = _ok(httpx.get(f"{gateway.url}/v2/embed/ranges", params={"output_dimension": width}, timeout=TIMEOUT))
        ranges = _f32([shown["min"], shown["max"]])
        for kind in ("binary", "ubinary"):
            expected = quantize_embeddings(floats, precision=kind)
            assert np.array_equal(np.array(data["embeddings"][kind]), expected.astype(np.int64)), (width, kind)
        for kind in ("int8", "uint8"):
            expected = quantize_embeddings(floats, precision=kind, ranges=ranges)
            assert np.array_equal(np.array(data["embeddings"][kind]), expected.astype(np.int64)), (width, kind)


def test_held_cohere_miss_equals_hit_on_an_int8_cache_with_headers(gateway_factory: Any) -> None:
    """Held attack. On an int8 cache every Cohere type of a miss equals its hit (the float row is the
    stored int8-rounded one, equal to /v1/embeddings'), the calibration pass triggered inside the
    request does not leak into its x-cache headers, and billed input tokens are the v1 usage."""
    gateway = gateway_factory(cache_dtype="int8")
    texts = ["cohere miss then hit", "cohere miss then hit", "another text"]
    body = {"texts": texts, "embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"]}
    miss = _post(gateway.url, "/v2/embed", body)
    assert miss.headers["x-cache-misses"] == "2" and miss.headers["x-cache-hits"] == "0", dict(miss.headers)
    hit = _wait_for_hits(gateway.url, "/v2/embed", body, 2)
    assert miss.json()["embeddings"] == hit.json()["embeddings"]
    v1 = _ok(_post(gateway.url, "/v1/embeddings", {"input": texts}))
    assert np.array_equal(_f32([row["embedding"] for row in v1["data"]]), _f32(hit.json()["embeddings"]["float"]))
    assert hit.json()["meta"]["billed_units"]["input_tokens"] == v1["usage"]["prompt_tokens"]


def test_held_ranges_at_every_width_cost_no_encoder_work(gateway_factory: Any) -> None:
    """Held attack. Once calibrated, a client asking GET /v2/embed/ranges at 40 widths (or int8 at
    them) triggers no new encoder work: the stats' miss count does not move and the digest at the
    full width stays the same."""
    gateway = gateway_factory()
    first = _ok(httpx.get(f"{gateway.url}/v2/embed/ranges", timeout=TIMEOUT))["calibration"]["digest"]
    before = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    for width in range(1, 385, 10):
        _ok(httpx.get(f"{gateway.url}/v2/embed/ranges", params={"output_dimension": width}, timeout=TIMEOUT))
    after = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    assert after["cache"]["misses"] == before["cache"]["misses"], (before["cache"], after["cache"])
    again = _ok(httpx.get(f"{gateway.url}/v2/embed/ranges", timeout=TIMEOUT))["calibration"]["digest"]
    assert again == first


def test_held_openai_encoding_format_stays_openai_and_cohere_refuses_unknown_types(gateway_factory: Any) -> None:
    """Held attack. /v1/embeddings' encoding_format takes only float and base64 (int8, binary,
    ubinary: 400); /v2/embed refuses an unknown embedding type, output_dimension 0 and
    input_type image with a 400 the cohere SDK raises as its ApiError."""
    import cohere
    from cohere.core.api_error import ApiError

    gateway = gateway_factory()
    for fmt in ("int8", "binary", "ubinary", "uint8"):
        answer = _post(gateway.url, "/v1/embeddings", {"input": ["x"], "encoding_format": fmt})
        assert answer.status_code == 400, (fmt, answer.status_code, answer.text[:200])
    for body in (
        {"texts": ["x"], "embedding_types": ["int4"]},
        {"texts": ["x"], "output_dimension": 0},
        {"texts": ["x"], "input_type": "image"},
    ):
        assert _post(gateway.url, "/v2/embed", body).status_code == 400, body
    client = cohere.ClientV2(api_key="unused", base_url=gateway.url)
    with pytest.raises(ApiError) as raised:
        client.embed(model="all-MiniLM-L6-v2", texts=["x"], input_type="image", embedding_types=["float"])
    assert raised.value.status_code == 400
