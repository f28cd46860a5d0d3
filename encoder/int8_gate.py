"""The int8 quality gate: the probe set through float32 and int8, compared against a floor.

int8 is served only if its vectors stay close to float32 torch's on a fixed probe set
(:mod:`encoder.int8_probe`: queries and documents in several languages, plus two long inputs for
models that take more than 512 tokens). :func:`measure_gate` compares the two by per-text cosine
and per-query top-10 overlap (:class:`GateResult`); below the :class:`GateFloor` the server does
not start (:class:`QualityGateError`). The float32 side is computed once, when the int8 model is
built, and stored beside it; the int8 side at every start. This module also turns the probe texts
into token ids as the encoder would (:func:`probe_ids`, :func:`long_probe_ids`) and embeds ids
with any forward function (:func:`embed_ids`, :func:`torch_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from encoder.int8_probe import PROBE_QUERIES, long_probe_texts, probe_texts
from encoder.model_files import ModelSpec
from encoder.pooling import normalize, pool

__all__ = [
    "LONG_PROBE_TOKENS",
    "GateFloor",
    "GateResult",
    "QualityGateError",
    "embed_ids",
    "long_probe_ids",
    "measure_gate",
    "measure_long",
    "probe_ids",
    "torch_forward",
]

_PROBE_MAX_TOKENS = 512
# The gate's long probes: two inputs of up to this many tokens (and half of it), each embedded alone.
# Long enough to run the long-input path of a model that takes 8,192 tokens, short enough for every
# start (memory is linear in the length there, so 2,048 tokens shows what 8,192 would need per token).
LONG_PROBE_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class GateFloor:
    """The least quality int8 may have against float32 on the probe set."""

    min_cosine: float = 0.98
    mean_cosine: float = 0.995
    top10_overlap: float = 0.95


@dataclass(frozen=True, slots=True)
class GateResult:
    """int8 against float32 on the probe set: per-text cosine and per-query top-10 overlap.

    ``long_cosine`` is the worst cosine of the long probes (``long_tokens`` the longest of them,
    0 when the model takes no more than the regular probes): held to the same worst-cosine floor.
    """

    worst_cosine: float
    mean_cosine: float
    top10_overlap: float
    texts: int
    long_cosine: float = 1.0
    long_tokens: int = 0

    def passes(self, floor: GateFloor) -> bool:
        return (
            self.worst_cosine >= floor.min_cosine
            and self.mean_cosine >= floor.mean_cosine
            and self.top10_overlap >= floor.top10_overlap
            and (self.long_tokens == 0 or self.long_cosine >= floor.min_cosine)
        )

    def describe(self) -> str:
        text = (
            f"worst cosine {self.worst_cosine:.4f}, mean cosine {self.mean_cosine:.4f}, "
            f"top-10 overlap {self.top10_overlap:.3f} over {self.texts} probe texts"
        )
        if self.long_tokens:
            text += f"; long inputs (up to {self.long_tokens} tokens, each alone): worst cosine {self.long_cosine:.4f}"
        return text


class QualityGateError(RuntimeError):
    """int8 vectors are further from float32 than the floor allows: the server must not start."""

    def __init__(self, result: GateResult, floor: GateFloor, recipe: str) -> None:
        self.result, self.floor = result, floor
        super().__init__(
            f"int8 quality gate failed (recipe {recipe}): {result.describe()}; the floor is worst cosine "
            f">= {floor.min_cosine}, mean >= {floor.mean_cosine}, top-10 overlap >= {floor.top10_overlap}; "
            "serve float32 (EMBED_QUANTIZE=none) or lower EMBED_INT8_MIN_COSINE / EMBED_INT8_MIN_MEAN_COSINE / "
            "EMBED_INT8_MIN_TOP10_OVERLAP on purpose"
        )


def measure_gate(reference: np.ndarray, candidate: np.ndarray, queries: int = len(PROBE_QUERIES)) -> GateResult:
    """Compare two ``(texts, dim)`` arrays whose first ``queries`` rows are queries, the rest documents."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    got = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(1e-12)
    cosines = np.sum(ref * got, axis=1)
    k = min(10, len(ref) - queries)
    top_ref = np.argsort(-(ref[:queries] @ ref[queries:].T), axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-(got[:queries] @ got[queries:].T), axis=1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref.tolist(), top_got.tolist(), strict=True)])
    return GateResult(float(cosines.min()), float(cosines.mean()), float(overlap), len(ref))


def probe_ids(spec: ModelSpec, tokenizer: Any) -> list[list[int]]:
    """The probe texts as the encoder would tokenise them (cut at 512 tokens or the model's limit)."""
    texts = [text.strip() for text in probe_texts()]
    if spec.do_lower_case:
        texts = [text.lower() for text in texts]
    limit = min(spec.max_tokens, _PROBE_MAX_TOKENS)
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit, verbose=False)
    ids: list[list[int]] = encoded["input_ids"]
    return ids


def long_probe_ids(spec: ModelSpec, tokenizer: Any, tokens: int = LONG_PROBE_TOKENS) -> list[list[int]]:
    """The gate's long probes: two inputs cut at ``tokens`` and half of it (at most the model's limit),
    none when the model takes no more than the regular probes already have (512 tokens)."""
    longest = min(spec.max_tokens, tokens)
    if longest <= _PROBE_MAX_TOKENS:
        return []
    ids: list[list[int]] = []
    for raw, limit in zip(long_probe_texts(longest * 12), (longest, longest // 2), strict=True):
        text = raw.strip().lower() if spec.do_lower_case else raw.strip()
        encoded = tokenizer([text], add_special_tokens=True, truncation=True, max_length=limit, verbose=False)
        ids.append(encoded["input_ids"][0])
    return ids


def embed_ids(forward: Any, ids: list[list[int]], spec: ModelSpec, pad_token_id: int, batch: int = 16) -> np.ndarray:
    """Pooled, normalised vectors of ``ids`` with ``forward(ids, mask) -> hidden`` (length-sorted batches)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), spec.dim), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        longest = max(len(ids[i]) for i in rows)
        input_ids = np.full((len(rows), longest), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        with torch.inference_mode():
            hidden = forward(input_ids, mask)
            vectors = normalize(pool(hidden.float(), torch.from_numpy(mask), spec.pooling))
        out[rows] = vectors.numpy()
    return out


def torch_forward(model: torch.nn.Module) -> Any:
    def forward(input_ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            hidden: torch.Tensor = model(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)
            ).last_hidden_state
        return hidden

    return forward


def measure_long(reference: np.ndarray, candidate: np.ndarray, ids: list[list[int]]) -> tuple[float, int]:
    """Worst cosine of the long probes and their longest length (``(1.0, 0)`` without any)."""
    if not ids:
        return 1.0, 0
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    got = candidate / np.linalg.norm(candidate, axis=1, keepdims=True).clip(1e-12)
    return float(np.sum(ref * got, axis=1).min()), max(map(len, ids))
