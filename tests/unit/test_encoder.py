"""Encoder behaviour that needs no reference library: limits, fingerprints, devices, packing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder import (
    DeviceNotAvailableError,
    Encoder,
    InputTooLongError,
    ModelNotFoundError,
    load_encoder,
    plan_batches,
    resolve_device,
    resolve_dtype,
)
from encoder.device import configure_cpu_threads


def test_minilm_reads_its_folder(minilm_encoder: Encoder) -> None:
    assert (minilm_encoder.pooling, minilm_encoder.normalize, minilm_encoder.max_tokens) == ("mean", True, 256)
    assert minilm_encoder.dim == 384
    assert minilm_encoder.embed(["x"]).shape == (1, 384)


def test_overlong_input_names_limit_and_count(minilm_dir: Path) -> None:
    strict = load_encoder(str(minilm_dir), truncate=False)
    long_text = "word " * 400
    with pytest.raises(InputTooLongError) as info:
        strict.tokenize(["fine", long_text])
    assert isinstance(info.value, ValueError)
    assert info.value.index == 1 and info.value.limit == 256 and info.value.tokens == 402
    assert "256" in str(info.value) and "402" in str(info.value)


def test_truncation_cuts_to_the_limit(minilm_encoder: Encoder) -> None:
    assert [len(ids) for ids in minilm_encoder.tokenize(["word " * 400])] == [256]


def test_max_tokens_may_lower_but_not_raise_the_limit(minilm_dir: Path) -> None:
    assert load_encoder(str(minilm_dir), max_tokens=128).max_tokens == 128
    with pytest.raises(ValueError, match="256"):
        load_encoder(str(minilm_dir), max_tokens=1000)


def test_fingerprint_is_stable_across_loads_and_copies(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    first = load_encoder(str(tiny_bge_m3_dir)).fingerprint
    assert load_encoder(str(tiny_bge_m3_dir)).fingerprint == first
    copy = shutil.copytree(tiny_bge_m3_dir, tmp_path / "copy")
    assert load_encoder(str(copy)).fingerprint == first
    assert len(first) == 16 and int(first, 16) >= 0


def test_fingerprint_changes_with_weights_pooling_normalise_and_length(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    base = load_encoder(str(tiny_bge_m3_dir)).fingerprint
    seen = {base}

    weights = Path(shutil.copytree(tiny_bge_m3_dir, tmp_path / "weights"))
    tensors = load_file(weights / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights / "model.safetensors", metadata={"format": "pt"})
    seen.add(load_encoder(str(weights)).fingerprint)

    pooled = Path(shutil.copytree(tiny_bge_m3_dir, tmp_path / "pooled"))
    config = json.loads((pooled / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_cls_token=False, pooling_mode_mean_tokens=True)
    (pooled / "1_Pooling" / "config.json").write_text(json.dumps(config))
    seen.add(load_encoder(str(pooled)).fingerprint)

    unnormalised = Path(shutil.copytree(tiny_bge_m3_dir, tmp_path / "unnormalised"))
    modules = json.loads((unnormalised / "modules.json").read_text())
    (unnormalised / "modules.json").write_text(json.dumps([m for m in modules if "Normalize" not in m["type"]]))
    encoder = load_encoder(str(unnormalised))
    assert encoder.normalize is False
    seen.add(encoder.fingerprint)

    seen.add(load_encoder(str(tiny_bge_m3_dir), max_tokens=512).fingerprint)
    assert len(seen) == 5


def test_device_selection_on_a_cpu_only_machine() -> None:
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without CUDA")
    assert resolve_device("auto").type in {"cpu", "mps"}
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(torch.device("cpu")) is torch.float32
    assert resolve_dtype(torch.device("cuda", 0)) is torch.float16
    for absent in ("cuda", "cuda:1"):
        with pytest.raises(DeviceNotAvailableError, match="found on this machine: .*cpu"):
            resolve_device(absent)
    with pytest.raises(DeviceNotAvailableError, match="unknown device"):
        resolve_device("tpu-please")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(torch.device("cpu"), "int3")


def test_absent_device_fails_before_loading(minilm_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without CUDA")
    with pytest.raises(DeviceNotAvailableError, match="'cuda'"):
        load_encoder(str(minilm_dir), device="cuda")


def test_cpu_threads_default_to_every_core() -> None:
    import os

    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(None) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert configure_cpu_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_encoder("nobody/no-such-model-here")


def test_plan_batches_sorts_and_respects_the_budget() -> None:
    lengths = [5, 300, 7, 40, 41, 6, 300, 1000]
    batches = plan_batches(lengths, max_batch_tokens=600, max_batch_size=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [7]  # over the budget alone: a batch of its own
    for batch in batches:
        assert len(batch) <= 3
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True)
        assert len(batch) == 1 or max(widths) * len(batch) <= 600
    assert plan_batches([], 100, 4) == []
