"""The storage type's quality gate: a float16 or int8 cache is checked before the server starts.

``EMBED_CACHE_DTYPE=float16`` or ``int8`` stores every output smaller (see
:mod:`gateway.core.cache.formats`), and the server answers what it stores, a miss too. So before
the first request the model's own outputs of the int8 probe set (:mod:`encoder.int8_probe`: prose,
code, other languages, short and long texts) go through the storage and back, and the worst cosine
between an output and its stored form must reach the type's floor: 0.99999 for float16, 0.999 for
int8 (or ``EMBED_CACHE_DTYPE_MIN_COSINE``). Dense vectors (whole, and cut to 1, 2, 4, ... 512
dimensions as ``dimensions`` cuts them), sparse weights (over the value's token ids) and every
ColBERT row are measured; a reranker's scores are always stored as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from encoder.int8_probe import probe_texts
from encoder.kinds import OutputKind, Outputs, SparseWeights
from gateway.core.cache.formats import CacheDtype
from gateway.core.outputs import COLBERT, DENSE, SPARSE, OutputSpec

__all__ = ["FLOORS", "StorageGate", "StorageGateError", "check_storage"]

# The worst cosine each storage type must keep; float32 is stored as computed.
FLOORS: dict[CacheDtype, float] = {"float32": 1.0, "float16": 0.99999, "int8": 0.999}
_MAX_TOKENS = 512


class _LocalEncoder(Protocol):
    @property
    def outputs(self) -> frozenset[OutputKind]: ...

    def output_width(self, kind: OutputKind) -> int: ...

    def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]: ...

    def encode_outputs(
        self, token_ids: Sequence[Sequence[int]], kinds: frozenset[OutputKind] | Sequence[frozenset[OutputKind]]
    ) -> list[Outputs]: ...


@dataclass(frozen=True, slots=True)
class StorageGate:
    dtype: CacheDtype
    floor: float
    worst: dict[str, float]  # output kind -> worst cosine over the probe set
    bytes_per_entry: dict[str, float]  # output kind -> mean stored bytes (value and checksum, no key)

    @property
    def passed(self) -> bool:
        return all(value >= self.floor for value in self.worst.values())

    def describe(self) -> str:
        figures = ", ".join(
            f"{kind} worst cosine {self.worst[kind]:.6f} ({self.bytes_per_entry[kind]:.0f} bytes an entry)"
            for kind in self.worst
        )
        return f"cache dtype {self.dtype}: {figures}; the floor is {self.floor}"


class StorageGateError(RuntimeError):
    """The storage type loses more than its floor allows on this model: the server must not start."""

    def __init__(self, model: str, gate: StorageGate) -> None:
        self.gate = gate
        super().__init__(
            f"model {model!r}: {gate.describe()}: store float32 (EMBED_CACHE_DTYPE=float32) or a wider type, "
            "or lower EMBED_CACHE_DTYPE_MIN_COSINE knowingly"
        )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norms = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return 1.0 if norms == 0 else float(a64 @ b64) / norms


def _worst(kind: OutputKind, value: Any, stored: Any) -> float:
    if isinstance(value, SparseWeights) and isinstance(stored, SparseWeights):
        # over the value's token ids (a weight stored as 0 is dropped with its id)
        by_id = dict(zip(stored.indices.tolist(), stored.values.tolist(), strict=True))
        return _cosine(value.values, np.array([by_id.get(i, 0.0) for i in value.indices.tolist()]))
    if kind == OutputKind.DENSE:  # whole, and cut short as `dimensions` cuts it (the head's blocks)
        whole, kept = np.asarray(value), np.asarray(stored)
        cuts = [width for width in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if width < len(whole)]
        return min(_cosine(whole[:width], kept[:width]) for width in [*cuts, len(whole)])
    if kind == OutputKind.COLBERT:
        rows = zip(np.asarray(value), np.asarray(stored), strict=True)
        return min((_cosine(row, kept) for row, kept in rows), default=1.0)
    return _cosine(np.asarray(value), np.asarray(stored))


def check_storage(encoder: _LocalEncoder, dtype: CacheDtype, floor: float | None = None) -> StorageGate:
    """Every stored form of the probe set's outputs against the outputs themselves (see the module)."""
    specs: list[OutputSpec[Any, Any]] = [spec for spec in (DENSE, SPARSE, COLBERT) if spec.kind in encoder.outputs]
    # Cut at 512 tokens as the int8 gate cuts its probes (the last special token kept), and run in
    # length-sorted passes of 16: a long-context model stays a few seconds' check.
    ids = [
        row if len(row) <= _MAX_TOKENS else [*row[: _MAX_TOKENS - 1], row[-1]]
        for row in encoder.tokenize(probe_texts(), truncate=True)
    ]
    ids.sort(key=len)
    kinds = frozenset(spec.kind for spec in specs)
    outputs = [
        result for start in range(0, len(ids), 16) for result in encoder.encode_outputs(ids[start : start + 16], kinds)
    ]
    worst: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for spec in specs:
        width = encoder.output_width(spec.kind)
        lowest, total = 1.0, 0
        for result in outputs:
            value = spec.take(result)
            packed = spec.pack(result.tokens, value, dtype)
            stored = spec.unpack(packed, width, dtype)
            assert stored is not None, "a value just packed unpacks"
            lowest = min(lowest, _worst(spec.kind, value, stored[1]))
            total += len(packed)
        worst[str(spec.kind)], sizes[str(spec.kind)] = lowest, total / max(1, len(outputs))
    return StorageGate(dtype, FLOORS[dtype] if floor is None else floor, worst, sizes)
