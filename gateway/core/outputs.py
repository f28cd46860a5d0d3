"""The output registry: for each kind, where it is cached, how its bytes look, how it is answered.

The service is generic over :class:`OutputSpec`: ``service.embed(texts, DENSE)`` returns an
``EmbedResult[np.ndarray]``, ``service.embed(texts, SPARSE)`` an ``EmbedResult[SparseWeights]``.
A new kind (a binary vector, a reranking score) is one ``OutputSpec`` here plus its head in
:mod:`encoder.model`; nothing else on the request path changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import msgspec
import numpy as np
import orjson

from encoder.kinds import OutputKind, Outputs, SparseWeights
from gateway.core.cache import formats
from gateway.core.cache.formats import CacheDtype
from gateway.core.schemas import (
    EmbeddingData,
    EmbeddingResponse,
    MultiVectorData,
    MultiVectorResponse,
    SparseData,
    SparseResponse,
    SparseVector,
    Usage,
)

__all__ = [
    "COLBERT",
    "DENSE",
    "SCORE",
    "SPARSE",
    "Answer",
    "OutputSpec",
    "ResponseOptions",
    "float_json",
    "normalised",
    "shorten",
]

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    """What the request asked about the answer's shape (each kind reads the options it knows)."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # dense: truncate, then re-normalise
    return_tokens: bool = False  # sparse: also the token strings
    token_names: Callable[[list[int]], list[str]] | None = None  # sparse: ids -> token strings
    normalize: bool = False  # dense: L2-normalise (TEI's default; the model's own normalisation stays)


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """What the response builder gets: values in input order, per-input token counts, the model id."""

    values: Sequence[T]
    tokens: Sequence[int]
    model: str

    @property
    def usage(self) -> Usage:
        total = sum(self.tokens)
        return Usage(prompt_tokens=total, total_tokens=total)


@dataclass(frozen=True, slots=True)
class OutputSpec(Generic[T, R]):
    """One output kind. ``T`` is its value (a vector, sparse weights, a matrix), ``R`` its response body."""

    kind: OutputKind
    namespace: str  # appended to the fingerprint in cache keys ("" keeps dense keys short)
    pack: Callable[[int, T, CacheDtype], bytes]  # (tokens, value, storage type) -> sealed bytes
    # (bytes, width, storage type) -> (tokens, value), or a miss (another type's value is one too)
    unpack: Callable[[bytes | None, int, CacheDtype], tuple[int, T] | None]
    take: Callable[[Outputs], T]  # this kind's value from the encoder's outputs
    respond: Callable[[Answer[T], ResponseOptions], R]

    def answered_as(self, respond: Callable[[Answer[T], ResponseOptions], S]) -> OutputSpec[T, S]:
        """The same kind, cache entries and encoder output, answered in another API's shape (TEI's)."""
        return OutputSpec(self.kind, self.namespace, self.pack, self.unpack, self.take, respond)


def _dense(outputs: Outputs) -> np.ndarray:
    assert outputs.dense is not None, "the encoder always computes the dense output"
    return outputs.dense


def _sparse(outputs: Outputs) -> SparseWeights:
    assert outputs.sparse is not None, "asked for sparse, so the encoder computed it"
    return outputs.sparse


def _colbert(outputs: Outputs) -> np.ndarray:
    assert outputs.colbert is not None, "asked for colbert, so the encoder computed it"
    return outputs.colbert


def _score(outputs: Outputs) -> np.ndarray:
    assert outputs.score is not None, "a cross-encoder always computes its score"
    return outputs.score


def _float32_le(array: np.ndarray) -> memoryview:
    # msgspec writes a memoryview as base64 while it encodes the JSON: no str per vector.
    return np.ascontiguousarray(array, dtype="<f4").data


def float_json(array: np.ndarray) -> msgspec.Raw:
    """``array`` as a JSON array in the shortest text that reads back to the identical float32.

    orjson prints float32 with float32's own shortest round-trip digits (about 9 where a float64
    needs 17): 40% fewer bytes than ``tolist()``, and a parser that reads the numbers as float64
    and casts them to float32 gets the very same bits back. msgspec copies the fragment as it is.
    """
    return msgspec.Raw(orjson.dumps(np.ascontiguousarray(array, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY))


def shorten(vectors: Sequence[np.ndarray], dimensions: int | None) -> Sequence[np.ndarray]:
    """Truncate to ``dimensions`` and re-normalise, as OpenAI's text-embedding-3 models do."""
    if dimensions is None or not vectors or dimensions == len(vectors[0]):
        return vectors
    cut = np.stack(vectors)[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return list((cut / np.where(norms > 0, norms, 1.0)).astype(np.float32))


def normalised(vectors: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """Each vector at unit length (a zero vector stays zero). Vectors already at unit length (a model
    that normalises) are kept bit for bit: dividing by 0.99999994 would change their last digits."""
    if not vectors:
        return vectors
    stacked = np.stack(vectors).astype(np.float32)
    norms = np.linalg.norm(stacked.astype(np.float64), axis=1, keepdims=True)
    scale = np.where((norms > 0) & (np.abs(norms - 1.0) > 1e-6), norms, 1.0)
    return list((stacked / scale).astype(np.float32))


def _dense_response(answer: Answer[np.ndarray], options: ResponseOptions) -> EmbeddingResponse:
    vectors = shorten(answer.values, options.dimensions)
    if options.encoding_format == "base64":
        data = [EmbeddingData(embedding=_float32_le(row), index=i) for i, row in enumerate(vectors)]
    else:
        data = [EmbeddingData(embedding=float_json(row), index=i) for i, row in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=answer.model, usage=answer.usage)


def _sparse_response(answer: Answer[SparseWeights], options: ResponseOptions) -> SparseResponse:
    items = []
    for index, weights in enumerate(answer.values):
        ids = weights.indices.tolist()
        names = options.token_names(ids) if options.return_tokens and options.token_names else None
        items.append(SparseData(SparseVector(ids, weights.values.tolist(), names), index))
    return SparseResponse(data=items, model=answer.model, usage=answer.usage)


def _colbert_response(answer: Answer[np.ndarray], options: ResponseOptions) -> MultiVectorResponse:
    items = [
        MultiVectorData(
            embedding=_float32_le(matrix) if options.encoding_format == "base64" else float_json(matrix),
            shape=list(matrix.shape),
            index=index,
        )
        for index, matrix in enumerate(answer.values)
    ]
    return MultiVectorResponse(data=items, model=answer.model, usage=answer.usage)


DENSE: OutputSpec[np.ndarray, EmbeddingResponse] = OutputSpec(
    OutputKind.DENSE, "", formats.pack_dense, formats.unpack_dense, _dense, _dense_response
)
SPARSE: OutputSpec[SparseWeights, SparseResponse] = OutputSpec(
    OutputKind.SPARSE, ":sparse", formats.pack_sparse, formats.unpack_sparse, _sparse, _sparse_response
)
COLBERT: OutputSpec[np.ndarray, MultiVectorResponse] = OutputSpec(
    OutputKind.COLBERT, ":colbert", formats.pack_colbert, formats.unpack_colbert, _colbert, _colbert_response
)


# A cross-encoder's raw logits (one per label) for one query-document pair; the rerank routes apply
# the model's activation (or not: TEI's raw_scores) when they answer.
def _pack_score(tokens: int, logits: np.ndarray, dtype: CacheDtype = "float32") -> bytes:
    return formats.pack_dense(tokens, logits)  # a few floats: always float32, whatever the vectors' type


def _unpack_score(data: bytes | None, width: int, dtype: CacheDtype = "float32") -> tuple[int, np.ndarray] | None:
    return formats.unpack_dense(data, width, "float32")


SCORE: OutputSpec[np.ndarray, list[float]] = OutputSpec(
    OutputKind.SCORE,
    ":score",
    _pack_score,
    _unpack_score,
    _score,
    lambda answer, _: [float(logits[0]) for logits in answer.values],
)
