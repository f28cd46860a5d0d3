"""What an encoder can produce for one input, as a typed enum rather than strings.

bge-m3 gives three outputs from one forward pass: the dense vector (every model has it), sparse
lexical weights and ColBERT multi-vectors (each needs a head file in the model folder). A new kind
is one member here, its head in :mod:`encoder.model`, and one entry in the gateway's output registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["HEAD_FILES", "OutputKind", "Outputs", "SparseWeights"]


class OutputKind(enum.StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"
    COLBERT = "colbert"
    SCORE = "score"  # a cross-encoder's (reranker's) relevance score of a query-document pair


# The head file each non-dense kind needs in the model folder (bge-m3's names).
HEAD_FILES: dict[OutputKind, str] = {OutputKind.SPARSE: "sparse_linear.pt", OutputKind.COLBERT: "colbert_linear.pt"}


@dataclass(frozen=True, slots=True)
class SparseWeights:
    """Token ids ascending (int64) and their weights (float32), as Qdrant, Milvus and Pinecone take them."""

    indices: np.ndarray
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class Outputs:
    """What one forward pass gave one input; a kind that was not asked for stays ``None``.

    ``dense`` is a float32 vector, ``colbert`` a float32 ``(tokens after CLS, dim)`` matrix,
    ``score`` a cross-encoder's float32 scores (one per label; rerankers have one).
    """

    tokens: int
    dense: np.ndarray | None = None
    sparse: SparseWeights | None = None
    colbert: np.ndarray | None = None
    score: np.ndarray | None = None
