"""Sealed byte formats for cached outputs: every value checks itself.

Each value is ``magic | header | payload | xxh3_64 of everything before it``, little-endian, so a
value that is short, of another kind, dimension or storage type, or has a flipped bit decodes as a
miss (and is overwritten by the next write), never as a wrong vector. Input text is never stored.

The storage type (``EMBED_CACHE_DTYPE``) is the magic's digit: 1 float32, 2 float16, 3 int8 with a
float32 scale per vector (per ColBERT row), ``round(x / scale)`` in -127..127 where ``scale =
max|x| / 127``. Unpacking always gives float32, so everything after the cache reads one type.

* dense   ``E1 | uint32 tokens | dim x float32`` / ``E2 | tokens | dim x float16`` /
  ``E3 | tokens | float32 scale | dim x int8``
* sparse  ``S1 | uint32 tokens | uint32 n | n x uint32 ids | n x float32 weights`` (``S2``: float16
  weights; ``S3``: a float32 scale, then int8 weights)
* colbert ``C1 | uint32 tokens | uint32 rows | uint32 dim | rows x dim x float32`` (``C2``: float16;
  ``C3``: rows x float32 scales, then rows x dim x int8)
"""

from __future__ import annotations

import struct
from typing import Literal

import numpy as np
import xxhash

from encoder.kinds import SparseWeights

__all__ = [
    "CACHE_DTYPES",
    "CacheDtype",
    "pack_colbert",
    "pack_dense",
    "pack_sparse",
    "unpack_colbert",
    "unpack_dense",
    "unpack_sparse",
]

CacheDtype = Literal["float32", "float16", "int8"]
CACHE_DTYPES: tuple[CacheDtype, ...] = ("float32", "float16", "int8")
_DIGIT = {"float32": b"1", "float16": b"2", "int8": b"3"}
_WIDTH = {b"1": 4, b"2": 2, b"3": 1}  # bytes per stored value

_CHECKSUM = struct.Struct("<Q")
_DENSE = struct.Struct("<2sI")  # magic, tokens
_SPARSE = struct.Struct("<2sII")  # magic, tokens, entries
_COLBERT = struct.Struct("<2sIII")  # magic, tokens, rows, dim
_SCALE = struct.Struct("<f")


def _seal(body: bytes) -> bytes:
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _opened(data: bytes | None, kind: bytes, header: struct.Struct) -> memoryview | None:
    """The body of a sealed value of this kind (any storage type), or None when it is short,
    foreign or corrupt."""
    if data is None or len(data) < header.size + _CHECKSUM.size or data[:1] != kind or data[1:2] not in _WIDTH:
        return None
    body = memoryview(data)[: -_CHECKSUM.size]  # no copies: this runs for every hit
    if _CHECKSUM.unpack_from(data, len(body))[0] != xxhash.xxh3_64_intdigest(body):
        return None
    return body


def _int8_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row float32 scales and int8 codes of a 2-D float array (a zero row keeps scale 1)."""
    rows = np.asarray(values, dtype=np.float32)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), dtype=np.float32)
    scales = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return scales, codes


def _payload(values: np.ndarray, dtype: CacheDtype) -> bytes:
    """A 2-D float array (one row for a vector) as stored: float32 / float16, or per-row scales then
    int8 codes."""
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    scales, codes = _int8_rows(values)
    return scales.astype("<f4").tobytes() + codes.tobytes()


def _values(body: memoryview, offset: int, digit: bytes, rows: int, width: int) -> np.ndarray | None:
    """``rows x width`` float32 values stored from ``offset`` (None when the size is wrong)."""
    count = rows * width
    if digit == b"3":
        if len(body) != offset + 4 * rows + count:
            return None
        scales = np.frombuffer(body, dtype="<f4", count=rows, offset=offset)
        codes = np.frombuffer(body, dtype=np.int8, count=count, offset=offset + 4 * rows).reshape(rows, width)
        restored: np.ndarray = codes.astype(np.float32) * scales[:, None]
        return restored
    if len(body) != offset + _WIDTH[digit] * count:
        return None
    stored = np.frombuffer(body, dtype="<f4" if digit == b"1" else "<f2", count=count, offset=offset)
    return (stored if digit == b"1" else stored.astype(np.float32)).reshape(rows, width)


def pack_dense(tokens: int, vector: np.ndarray, dtype: CacheDtype = "float32") -> bytes:
    return _seal(_DENSE.pack(b"E" + _DIGIT[dtype], tokens) + _payload(vector.reshape(1, -1), dtype))


def unpack_dense(data: bytes | None, dim: int) -> tuple[int, np.ndarray] | None:
    """(tokens, vector) or ``None`` for anything that is not a whole, intact vector of ``dim``."""
    body = _opened(data, b"E", _DENSE)
    if body is None:
        return None
    values = _values(body, _DENSE.size, bytes(body[1:2]), 1, dim)
    return None if values is None else (_DENSE.unpack_from(body)[1], values[0])


def pack_sparse(tokens: int, weights: SparseWeights, dtype: CacheDtype = "float32") -> bytes:
    header = _SPARSE.pack(b"S" + _DIGIT[dtype], tokens, len(weights.indices))
    values = np.asarray(weights.values, dtype=np.float32).reshape(1, -1)
    return _seal(header + weights.indices.astype("<u4").tobytes() + _payload(values, dtype))


def unpack_sparse(data: bytes | None, dim: int) -> tuple[int, SparseWeights] | None:
    """``dim`` is unused (a sparse value has no fixed width); the parameter keeps one signature."""
    body = _opened(data, b"S", _SPARSE)
    if body is None:
        return None
    _, tokens, count = _SPARSE.unpack_from(body)
    if len(body) < _SPARSE.size + 4 * count:
        return None
    indices = np.frombuffer(body, dtype="<u4", count=count, offset=_SPARSE.size).astype(np.int64)
    values = _values(body, _SPARSE.size + 4 * count, bytes(body[1:2]), 1, count)
    return None if values is None else (tokens, SparseWeights(indices, values[0]))


def pack_colbert(tokens: int, vectors: np.ndarray, dtype: CacheDtype = "float32") -> bytes:
    rows, dim = vectors.shape
    return _seal(_COLBERT.pack(b"C" + _DIGIT[dtype], tokens, rows, dim) + _payload(vectors, dtype))


def unpack_colbert(data: bytes | None, dim: int) -> tuple[int, np.ndarray] | None:
    body = _opened(data, b"C", _COLBERT)
    if body is None:
        return None
    _, tokens, rows, stored_dim = _COLBERT.unpack_from(body)
    if stored_dim != dim:
        return None
    values = _values(body, _COLBERT.size, bytes(body[1:2]), rows, dim)
    return None if values is None else (tokens, values)
