"""int8 on the CPU (issue 15): export, the quality gate, the on-disk cache, the cache namespace.

Real models only: all-MiniLM-L6-v2 must pass the real gate; the tiny random bge-m3-shaped model
checks the export of an XLM-RoBERTa with 8192 positions and its three outputs (its gate figures
mean nothing, so it runs with the floor at the bottom). One session-wide cache folder holds the
MiniLM export, so only the first test pays for it.
"""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from encoder import Encoder, load_encoder
from encoder.model_files import read_model_spec
from encoder.onnx_int8 import (
    DEFAULT_RECIPE,
    GateFloor,
    OnnxBackend,
    artifact_ok,
    cpu_int8_features,
    expected_speedup,
    for_this_cpu,
    measure_gate,
    prepare_int8,
)
from gateway import cli

NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)
TEXTS = [
    "int8 keeps retrieval intact",
    "The quick brown fox jumps over the lazy dog while the cache keeps every vector warm. " * 6,
    "bonjour",
    "def f(x):\n    return x * 2",
]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def int8_minilm(minilm_dir: Path, onnx_cache: Path) -> Encoder:
    return load_encoder(str(minilm_dir), quantize="int8", onnx_cache_dir=onnx_cache, truncate=True)


def _prepare(folder: Path, cache: Path, floor: GateFloor | None = None):  # type: ignore[no-untyped-def]
    spec = read_model_spec(folder)
    return prepare_int8(spec, AutoTokenizer.from_pretrained(str(folder)), cache_dir=cache, threads=1, floor=floor)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_float_export_matches_torch_on_padded_batches(
    int8_minilm: Encoder, minilm_encoder: Encoder, onnx_cache: Path
) -> None:
    (fp32_file,) = onnx_cache.glob("*/fp32-*/model.onnx")
    exported = OnnxBackend(fp32_file, threads=1)
    ids = minilm_encoder.tokenize(TEXTS)  # four lengths: three rows padded, the mask must be honoured
    longest = max(map(len, ids))
    input_ids = np.full((len(ids), longest), minilm_encoder.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    ours = exported.forward(input_ids, mask).numpy()
    theirs = minilm_encoder.backend.forward(input_ids, mask).numpy()
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() < 1e-4
    # and one row alone (no padding at all) equals the same row inside the padded batch
    alone = exported.forward(input_ids[2:3, : len(ids[2])], mask[2:3, : len(ids[2])]).numpy()
    assert np.abs(alone[0] - ours[2, : len(ids[2])]).max() < 1e-4


def test_minilm_passes_the_real_gate_and_really_runs_int8(
    int8_minilm: Encoder, minilm_encoder: Encoder, minilm_dir: Path, onnx_cache: Path
) -> None:
    prepared = _prepare(minilm_dir, onnx_cache)  # the real floor: raises if below it
    assert not prepared.built, "the session's first load already built it"
    gate = prepared.gate
    assert gate.passes(GateFloor())
    assert gate.worst_cosine >= 0.98 and gate.mean_cosine >= 0.995 and gate.top10_overlap >= 0.95
    assert int8_minilm.backend.name == "onnxruntime"
    assert int8_minilm.numerics == f"onnxruntime:int8:{for_this_cpu(DEFAULT_RECIPE).name}"
    assert int8_minilm.quantization == "int8" and minilm_encoder.quantization == "none"
    ours, theirs = int8_minilm.embed(TEXTS), minilm_encoder.embed(TEXTS)
    cosines = _cosines(ours, theirs)
    assert cosines.min() > 0.98
    assert not np.allclose(ours, theirs, atol=1e-5), "int8 vectors equal float32 ones: int8 is not in use"


def test_the_served_graph_is_fused_and_its_feed_forward_is_int8_per_token(int8_minilm: Encoder) -> None:
    import onnx

    graph = onnx.load(str(int8_minilm.backend.path)).graph
    ops = [node.op_type for node in graph.node]
    constants = {tensor.name for tensor in graph.initializer}
    layers = 6
    # attention: ONNX Runtime's MultiHeadAttention kernel behind an If, one per layer: without padding
    # the node gets no mask (the memory-efficient kernel), with padding the masked one (issue 27)
    assert ops.count("If") == layers and "Attention" not in ops
    for node in (n for n in graph.node if n.op_type == "If"):
        branches = {attribute.name: attribute.g.node for attribute in node.attribute}
        (unpadded,), (masked,) = branches["then_branch"], branches["else_branch"]
        assert unpadded.op_type == masked.op_type == "MultiHeadAttention"
        assert list(unpadded.input) == list(masked.input[:4]) and len(masked.input) == 5 and masked.input[4]
    assert ops.count("QuantizeLinear") == 2 * layers, "each feed-forward input quantised per token"
    assert ops.count("MatMulIntegerToFloat") == 2 * layers
    assert ops.count("MatMulInteger") == layers, "the attention output projection: quantize_dynamic's int8"
    float_weights = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    assert len(float_weights) == 3 * layers, f"projections left in float32: {float_weights}"
    assert all(re.search(r"/attention/self/(query|key|value)/", name) for name in float_weights), float_weights


def test_onnx_runtime_threads_do_not_spin_between_kernels(int8_minilm: Encoder) -> None:
    # In the server the cores are shared with the event loop and the tokenizer: a spinning
    # intra-op pool took them (README "int8 on CPU" has the HTTP figures).
    options = int8_minilm.backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_gate_measures_what_it_says() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30, 16)).astype(np.float32)
    same = measure_gate(reference, reference * 3, queries=10)  # scale does not matter
    assert (same.worst_cosine, same.top10_overlap) == (pytest.approx(1.0), 1.0)
    noisy = measure_gate(reference, reference + rng.normal(scale=0.5, size=reference.shape), queries=10)
    assert noisy.worst_cosine < 0.99 and noisy.top10_overlap < 1.0
    assert not noisy.passes(GateFloor())


def test_below_the_floor_the_server_refuses_with_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], int8_minilm: Encoder, minilm_dir: Path, onnx_cache: Path
) -> None:
    flags = ["--model", str(minilm_dir), "--quantize", "int8", "--onnx-cache-dir", str(onnx_cache)]
    code = cli.main(["serve", *flags, "--log-level", "warning", "--int8-min-cosine", "0.99999"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, lines
    assert "int8 quality gate failed" in lines[0]
    assert "worst cosine 0." in lines[0] and ">= 0.99999" in lines[0] and "EMBED_INT8_MIN_COSINE" in lines[0]


def test_int8_on_a_gpu_device_is_refused_before_loading() -> None:
    problem = cli._int8_preflight("cuda")
    assert problem is not None and "EMBED_QUANTIZE (--quantize)" in problem and "CPU only" in problem
    assert cli._int8_preflight("cpu") is None  # onnxruntime and onnx are installed here
    with pytest.raises(ValueError, match="none or int8"):
        load_encoder("unused", quantize="int4")


def test_a_second_load_reuses_and_a_corrupt_file_is_rebuilt(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    first = _prepare(tiny_bge_m3_dir, tmp_path, NO_FLOOR)
    assert first.built
    assert {"load", "export", "quantise", "reference", "gate"} <= set(first.steps)
    second = _prepare(tiny_bge_m3_dir, tmp_path, NO_FLOOR)
    assert not second.built and second.folder == first.folder
    assert second.gate == first.gate
    model_file = first.folder / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still parses, but its digest no longer matches
    model_file.write_bytes(bytes(data))
    assert not artifact_ok(first.folder)
    (first.folder.parent / ".tmp-int8-crashed-builder").mkdir()  # a builder killed half-way
    third = _prepare(tiny_bge_m3_dir, tmp_path, NO_FLOOR)
    assert third.built and artifact_ok(third.folder)
    assert third.gate == first.gate
    assert not list(third.folder.parent.glob(".tmp-*")), "leftovers of crashed builders are removed"
    (third.folder / "model.onnx").write_bytes(b"not a model")  # truncated: rebuilt too
    assert _prepare(tiny_bge_m3_dir, tmp_path, NO_FLOOR).built


def test_two_loaders_at_once_build_once_and_both_get_a_whole_model(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    results: list[object] = []

    def load() -> None:
        try:
            results.append(_prepare(tiny_bge_m3_dir, tmp_path, NO_FLOOR))
        except Exception as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    built = [getattr(result, "built", result) for result in results]
    assert sorted(map(str, built)) == ["False", "False", "True"], built
    folders = list(tmp_path.glob("*/int8-*"))
    assert len(folders) == 1 and artifact_ok(folders[0])


def test_bge_m3_shape_three_outputs_stay_close_to_float32(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    fp32 = load_encoder(str(tiny_bge_m3_dir))
    int8 = load_encoder(str(tiny_bge_m3_dir), quantize="int8", onnx_cache_dir=tmp_path, int8_floor=NO_FLOOR)
    assert int8.outputs == fp32.outputs == {"dense", "sparse", "colbert"}
    kinds = frozenset(int8.outputs)
    texts = ["short", TEXTS[1], "Быстрая коричневая лиса прыгает через ленивую собаку. " * 3, "素早い茶色の狐"]
    ids = fp32.tokenize(texts)
    for ours, theirs in zip(int8.encode_outputs(ids, kinds), fp32.encode_outputs(ids, kinds), strict=True):
        assert ours.tokens == theirs.tokens
        assert ours.dense is not None and theirs.dense is not None
        assert float(ours.dense @ theirs.dense) > 0.99
        assert ours.colbert is not None and theirs.colbert is not None
        assert ours.colbert.shape == theirs.colbert.shape
        assert _cosines(ours.colbert, theirs.colbert).min() > 0.98
        assert ours.sparse is not None and theirs.sparse is not None
        common = np.intersect1d(ours.sparse.indices, theirs.sparse.indices)
        assert len(common) >= 0.8 * max(len(theirs.sparse.indices), 1)
        mine = dict(zip(ours.sparse.indices.tolist(), ours.sparse.values.tolist(), strict=True))
        ref = dict(zip(theirs.sparse.indices.tolist(), theirs.sparse.values.tolist(), strict=True))
        scale = max(ref.values(), default=1.0)
        assert max(abs(mine[i] - ref[i]) for i in common.tolist()) < 0.1 * scale


def test_int8_vectors_have_their_own_fingerprint(int8_minilm: Encoder, minilm_encoder: Encoder) -> None:
    assert int8_minilm.fingerprint != minilm_encoder.fingerprint
    assert len(int8_minilm.fingerprint) == len(minilm_encoder.fingerprint) == 16


def test_an_int8_gateway_never_reads_float32_vectors_and_says_what_it_runs(
    int8_minilm: Encoder, minilm_encoder: Encoder
) -> None:
    from gateway import Settings, create_app
    from gateway.core.cache import MemoryBlobCache
    from tests.servers import ThreadedGateway

    shared = MemoryBlobCache(max_bytes=1 << 24, ttl_seconds=600)  # one cache, one prefix, two numerics
    settings = Settings(model=str(minilm_encoder.path), model_name="m", cache_prefix="shared")
    body = {"input": TEXTS, "model": "m", "encoding_format": "base64"}

    def vectors(url: str) -> np.ndarray:
        data = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()["data"]
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])

    with ThreadedGateway(create_app(settings, encoder=minilm_encoder, cache=shared)) as fp32_gateway:
        float_vectors = vectors(fp32_gateway.url)
        assert httpx.get(f"{fp32_gateway.url}/stats").json()["encoder"]["quantization"] == "none"
    with ThreadedGateway(create_app(settings, encoder=int8_minilm, cache=shared)) as int8_gateway:
        int8_vectors = vectors(int8_gateway.url)
        stats = httpx.get(f"{int8_gateway.url}/stats").json()
        metrics = httpx.get(f"{int8_gateway.url}/metrics").text
        again = vectors(int8_gateway.url)
        hits = httpx.get(f"{int8_gateway.url}/stats").json()["cache"]["hits"]
    assert stats["cache"]["hits"] == 0, "the int8 gateway read float32 vectors from the cache"
    assert stats["fingerprint"] == int8_minilm.fingerprint
    assert (stats["encoder"]["backend"], stats["encoder"]["quantization"]) == ("onnxruntime", "int8")
    assert 'embedding_encoder_info{backend="onnxruntime",quantization="int8"} 1.0' in metrics
    assert not np.array_equal(int8_vectors, float_vectors)
    assert _cosines(int8_vectors, float_vectors).min() > 0.98
    assert hits == len(TEXTS) and np.array_equal(again, int8_vectors), "int8 vectors are cached under their own keys"


def test_check_reports_the_cpus_int8_features(
    capsys: pytest.CaptureFixture[str], minilm_dir: Path, tmp_path: Path
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
    assert cpu_int8_features(cpuinfo) == ["avx512_vnni", "avx512f", "avx2"]
    assert cpu_int8_features(tmp_path / "missing") == []
    assert "VNNI" in expected_speedup(["avx512_vnni", "avx2"])
    assert "AVX2 without VNNI" in expected_speedup(["avx2"])
    assert "AMX" in expected_speedup(["amx_int8", "avx512_vnni"])
    cli.main(["check", "--model", str(minilm_dir), "--cache", "off", "--quantize", "int8"])
    out = capsys.readouterr().out
    assert "int8       CPU flags: " in out
    assert "expect: " in out
