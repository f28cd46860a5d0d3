"""int8 and long inputs (issue 27, item 3): attention memory grows with the length, not its square.

ONNX Runtime's fused ``Attention`` kernel builds the whole ``batch x heads x length x length`` score
matrix: one 8,192-token input of a bge-m3-shaped model took +4 GB. The served graph now runs
attention as ``MultiHeadAttention`` behind an ``If``: a batch without padding takes the kernel
without a mask, which ONNX Runtime computes with its memory-efficient (flash) CPU kernel; a padded
batch whose score matrix would pass a budget is split by the backend into rows run alone. The gate
embeds long inputs too, so a start sees that path. The tiny bge-m3-shaped model (4 heads, 8,194
positions) is enough: at 4,096 tokens the full score matrix is 4 x 4096 x 4096 x 4 B = 256 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from encoder import Encoder, load_encoder
from encoder.model_files import read_model_spec
from encoder.onnx_int8 import GateFloor, GateResult, Int8Model, OnnxBackend, Shape, fuse_transformer, prepare_int8

NO_FLOOR = GateFloor(min_cosine=-1.0, mean_cosine=-1.0, top10_overlap=0.0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-long")


@pytest.fixture(scope="module")
def tiny_int8(tiny_bge_m3_dir: Path, long_cache: Path) -> Int8Model:
    spec = read_model_spec(tiny_bge_m3_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir))
    return prepare_int8(spec, tokenizer, cache_dir=long_cache, threads=1, floor=NO_FLOOR)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bge_m3_dir: Path, long_cache: Path, tiny_int8: Int8Model) -> Encoder:
    return load_encoder(str(tiny_bge_m3_dir), quantize="int8", onnx_cache_dir=long_cache, int8_floor=NO_FLOOR)


_PEAK_CHILD = """
import sys
sys.path.insert(0, {root!r})
from encoder import load_encoder
from encoder.onnx_int8 import GateFloor

encoder = load_encoder({model!r}, quantize="int8", onnx_cache_dir={cache!r}, int8_floor=GateFloor(-1.0, -1.0, 0.0))
encoder.encode([[0, 5, 2]])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024

before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak) to the resident size now
except OSError:
    print("no-clear-refs")
    raise SystemExit(0)
encoder.encode([[0] + [5] * ({tokens} - 2) + [2]])
print(status("VmHWM") - before)
"""


def test_one_long_int8_input_takes_memory_linear_in_its_length(
    tiny_bge_m3_dir: Path, long_cache: Path, tiny_int8: Int8Model
) -> None:
    tokens = 4096
    code = _PEAK_CHILD.format(root=str(ROOT), model=str(tiny_bge_m3_dir), cache=str(long_cache), tokens=tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    last = out.stdout.split()[-1]
    if last == "no-clear-refs":
        pytest.skip("/proc/self/clear_refs is not writable here: the peak cannot be reset")
    grown_mib = int(last)
    scores_mib = 4 * tokens * tokens * 4 / 2**20  # heads x length x length float32: 256 MiB
    assert grown_mib < scores_mib / 4, f"one {tokens}-token input grew the peak by {grown_mib} MiB"


class _Recorder:
    """Wraps an ONNX Runtime session and keeps the shape and padding of every batch it ran."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.runs: list[tuple[tuple[int, ...], bool]] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        mask = feeds["attention_mask"]
        self.runs.append((mask.shape, bool(mask.min() == 0)))
        return self.session.run(names, feeds)


def _padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(map(len, rows))
    ids = np.full((len(rows), longest), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)], mask[index, : len(row)] = row, 1
    return ids, mask


def test_a_padded_batch_of_long_inputs_is_run_row_by_row_and_gives_the_same_rows(tiny_int8: Int8Model) -> None:
    backend = OnnxBackend(tiny_int8.backend.path, threads=1, heads=4)
    rng = np.random.default_rng(0)
    rows = [[0, *rng.integers(5, 260, size=length - 2).tolist(), 2] for length in (3000, 2000)]
    ids, mask = _padded(rows, pad=1)  # 2 x 4 heads x 3000^2 x 4 B = 275 MiB of scores if run as one batch
    recorder = _Recorder(backend.session)
    backend.session = recorder
    hidden = backend.forward(ids, mask).numpy()
    assert hidden.shape == (2, 3000, 32)
    assert recorder.runs == [((1, 3000), False), ((1, 2000), False)], "each long row alone, unpadded"
    alone = backend.forward(ids[1:, :2000], mask[1:, :2000]).numpy()
    assert np.abs(hidden[1, :2000] - alone[0]).max() < 1e-5
    assert not hidden[1, 2000:].any(), "padding positions are zeros"
    # short padded batches stay one batch: splitting them would only cost speed
    recorder.runs.clear()
    short_ids, short_mask = _padded([row[:40] for row in rows] + [rows[0][:9]], pad=1)
    backend.forward(short_ids, short_mask)
    assert recorder.runs == [((3, 40), True)]


def test_both_attention_branches_give_what_the_float_export_gives(tiny_int8: Int8Model, tmp_path: Path) -> None:
    # The rewrite alone, in float32 (no quantisation to blur it): the padded branch (masked kernel)
    # and the unpadded one (memory-efficient kernel) both give the export's hidden states.
    import onnx

    (fp32_file,) = tiny_int8.folder.parent.glob("fp32-*/model.onnx")
    fused = fuse_transformer(fp32_file, Shape(heads=4, hidden=32), flash=True)
    assert [node.op_type for node in fused.graph.node].count("If") == 2, "one per layer"
    onnx.save(fused, str(tmp_path / "branched.onnx"))
    branched, export = OnnxBackend(tmp_path / "branched.onnx", threads=1), OnnxBackend(fp32_file, threads=1)
    rng = np.random.default_rng(1)
    rows = [[0, *rng.integers(5, 260, size=length - 2).tolist(), 2] for length in (64, 23)]
    ids, mask = _padded(rows, pad=1)
    reference = export.forward(ids, mask).numpy()
    padded = branched.forward(ids, mask).numpy()
    alone = branched.forward(ids[1:, :23], mask[1:, :23]).numpy()
    real = mask.astype(bool)
    assert np.abs(padded - reference)[real].max() < 1e-4
    assert np.abs(alone[0] - reference[1, :23]).max() < 1e-4


def test_the_gate_embeds_long_inputs_alone_and_holds_them_to_the_cosine_floor(
    tiny_int8: Int8Model, tiny_encoder: Encoder
) -> None:
    gate = tiny_int8.gate
    assert gate.long_tokens == 2048, "the tiny model takes 8,192 tokens: the gate's long probes go to 2,048"
    assert -1.0 <= gate.long_cosine <= 1.0 + 1e-6  # float32 rounding may pass 1 by an ulp
    assert "2048 tokens" in gate.describe()
    failing = GateResult(0.999, 0.999, 1.0, 82, long_cosine=0.5, long_tokens=2048)
    assert not failing.passes(GateFloor()), "a long input far from float32 fails the gate like a short one"
    assert GateResult(0.999, 0.999, 1.0, 82, long_cosine=0.99, long_tokens=2048).passes(GateFloor())
    # the encoder serves the same long text in one piece: vectors of any length come from int8
    text = "Быстрая коричневая лиса прыгает через ленивую собаку. " * 400
    (ids,) = tiny_encoder.tokenize([text], truncate=True)
    assert len(ids) > 2048
    assert tiny_encoder.encode([ids]).shape == (1, 32)


def test_models_that_take_short_inputs_only_have_no_long_probe(minilm_dir: Path, tmp_path: Path) -> None:
    spec = read_model_spec(minilm_dir)  # 256 tokens: the regular probe set already covers its range
    gate = prepare_int8(spec, AutoTokenizer.from_pretrained(str(minilm_dir)), cache_dir=tmp_path, threads=1).gate
    assert gate.long_tokens == 0
    assert "long" not in gate.describe()


def test_the_start_log_says_how_long_inputs_are_attended(monkeypatch: pytest.MonkeyPatch) -> None:
    from encoder.onnx_int8 import long_input_attention

    # ONNX Runtime runs its memory-efficient kernel only where it knows the L2 cache size (glibc's
    # sysconf on Linux) and ORT_DISABLE_FLASH_ATTENTION is unset; the start log says which it is.
    assert long_input_attention().startswith("memory-efficient"), long_input_attention()
    monkeypatch.setenv("ORT_DISABLE_FLASH_ATTENTION", "1")
    line = long_input_attention()
    assert "ORT_DISABLE_FLASH_ATTENTION" in line and "\n" not in line
