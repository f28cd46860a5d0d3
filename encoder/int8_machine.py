"""This machine and int8: its CPU's int8 instructions, what to expect, and settings that do not fit.

Whether int8 helps, and even whether it computes right, depends on the CPU: ONNX Runtime's int8
GEMM saturates on full-range weights where the CPU has neither VNNI nor AMX, so there a recipe runs
with 7-bit weights (:func:`for_this_cpu`, its own cache folder and namespace). This module reads
the CPU's flags (:func:`cpu_int8_features`), says what speed-up to expect from them
(:func:`expected_speedup`, for ``embedding-gateway check``), refuses a half dtype with int8
(:func:`int8_dtype_problem`), and says whether long inputs get ONNX Runtime's memory-efficient
attention kernel here (:func:`long_input_attention`, for the start log). All of it is read at
start, before anything is built.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encoder.int8_recipe import Recipe

__all__ = [
    "cpu_int8_features",
    "expected_speedup",
    "for_this_cpu",
    "int8_dtype_problem",
    "long_input_attention",
    "saturates_int8",
]

_FLASH_OFF_VARIABLE = "ORT_DISABLE_FLASH_ATTENTION"  # ONNX Runtime's switch for its CPU flash kernel
_SC_LEVEL2_CACHE_SIZE = 191  # glibc's sysconf name: what ONNX Runtime asks for the L2 cache size

_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_int8_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The int8-relevant flags of this CPU, best first (empty where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in _INT8_FLAGS if flag in flags]


def saturates_int8(features: Sequence[str], machine: str | None = None) -> bool:
    """Does this CPU's int8 GEMM saturate on full-range int8 weights? On x86 without VNNI or AMX,
    ONNX Runtime multiplies uint8 x int8 with ``(v)pmaddubsw``, which adds each pair of products in
    16 bits: 255 x 127 x 2 overflows it, 255 x 63 x 2 does not (hence ``reduce_range``)."""
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    return x86 and not any(flag in features for flag in ("amx_int8", "avx512_vnni", "avx_vnni"))


def for_this_cpu(recipe: Recipe, features: Sequence[str] | None = None, machine: str | None = None) -> Recipe:
    """``recipe`` as this CPU must run it: with 7-bit weights (``reduce_range``, name ``<name>-7bit``:
    another cache folder and cache namespace) where its int8 GEMM would saturate on 8-bit ones."""
    features = cpu_int8_features() if features is None else features
    if recipe.reduce_range or not saturates_int8(features, machine):
        return recipe
    return replace(recipe, name=f"{recipe.name}-7bit", reduce_range=True)


def expected_speedup(features: Sequence[str]) -> str:
    """What int8 should give over float32 with these CPU flags, from our measurements."""
    if "amx_int8" in features:
        return (
            "AMX int8: ONNX Runtime's int8 GEMMs run on AMX or VNNI; expect at least the VNNI figure "
            "(not measured here); measure with python -m bench.int8"
        )
    if "avx512_vnni" in features or "avx_vnni" in features:
        return (
            "VNNI: recipe r2 measured 1.82x torch float32 in-process and 1.57x through the server on a quiet "
            "2-core AMD EPYC with AVX-512 VNNI (all-MiniLM-L6-v2); measure with python -m bench.int8"
        )
    if "avx2" in features:
        return (
            "AVX2 without VNNI: weights at 7 bits (recipe r2-7bit; 8-bit ones saturate there); measured 1.18x "
            "torch float32 in-process on a quiet 2-core AMD EPYC with AVX2 only (all-MiniLM-L6-v2); "
            "measure with python -m bench.int8 before switching"
        )
    return "no AVX2: int8 is unlikely to help; keep float32"


_HALF_DTYPES = {"float16", "fp16", "half", "bfloat16", "bf16"}


def int8_dtype_problem(dtype: str) -> str | None:
    """Why ``dtype`` cannot go with int8, as one line (``None``: auto or float32 are fine).

    int8 computes in float32 around its int8 weights, and ONNX Runtime returns a float32 hidden
    state: a half dtype would apply to nothing but bge-m3's sparse and ColBERT heads, which then fail
    on that float32 tensor (a 500 per request), and no cache namespace would say it.
    """
    name = dtype.strip().lower()
    if name not in _HALF_DTYPES:
        return None
    return (
        f"{name} does not go with int8: int8 computes in float32 around its int8 weights on the CPU "
        "(bge-m3's sparse and ColBERT heads included); set it to auto or float32, or serve without int8"
    )


def _l2_cache_bytes() -> int | None:
    """This CPU's L2 cache size as ONNX Runtime reads it on Linux (glibc's sysconf); None: not asked."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.sysconf.restype = ctypes.c_long
        return int(libc.sysconf(_SC_LEVEL2_CACHE_SIZE))
    except (OSError, AttributeError):
        return None


def long_input_attention() -> str:
    """How int8 attends long inputs here, for the start log: memory-efficient, or why not.

    ONNX Runtime's CPU flash kernel sizes its blocks from the L2 cache size and is off where it
    cannot read one (it asks glibc's sysconf on Linux) or where ``ORT_DISABLE_FLASH_ATTENTION`` is
    set; then an input's attention scores take heads x length^2 x 4 bytes (bge-m3, 8,192 tokens: 4 GB).
    """
    setting = os.environ.get(_FLASH_OFF_VARIABLE, "").strip().lower()
    if setting not in ("", "0", "false"):
        return (
            f"NOT memory-efficient: {_FLASH_OFF_VARIABLE}={setting} turns ONNX Runtime's flash kernel off, so one "
            "input's attention takes heads x length^2 x 4 bytes; unset it, or cap EMBED_MAX_INPUT_TOKENS"
        )
    l2 = _l2_cache_bytes()
    if l2 is not None and l2 <= 0:
        return (
            "NOT memory-efficient: ONNX Runtime cannot read this CPU's L2 cache size (sysconf), so its flash "
            "kernel is off and one input's attention takes heads x length^2 x 4 bytes; cap EMBED_MAX_INPUT_TOKENS "
            "or serve float32"
        )
    where = f"L2 {l2 // 1024} KiB" if l2 else "L2 size not checked on this platform"
    return f"memory-efficient (ONNX Runtime's flash kernel for unpadded batches; {where})"
