"""Sealed byte formats for cached outputs: every value checks itself.

Each value is ``magic | header | payload | xxh3_64 of everything before it``, little-endian, so a
value that is short, of another kind, dimension or storage type, or has a flipped bit decodes as a
miss (and is overwritten by the next write), never as a wrong vector. Input text is never stored.

The storage type (``EMBED_CACHE_DTYPE``) is the magic's digit: 1 float32, 2 float16, 3 int8 with a
float16 scale per block of a vector (of a ColBERT row: blocks of 1, 1, 2, 4, 8 and 16 values, then
of 32), ``round(x / scale)`` in -127..127 where ``scale = max|x| / 127`` over the block. Blocks, not
one scale per vector: a vector cut short (``dimensions``) keeps the precision of its own first
values, whatever the largest value further on. Unpacking always gives float32, so everything after
the cache reads one type, and it takes the type it is asked for (or exact float32): another type's
value is a miss. A value the type cannot hold (a non-finite value; past float16's range) is stored
as float32, exactly.

* dense   ``E1 | uint32 tokens | dim x float32`` / ``E2 | tokens | dim x float16`` /
  ``E3 | tokens | one float16 scale a block | dim x int8``
* sparse  ``S1 | uint32 tokens | uint32 n | n x uint32 ids | n x float32 weights`` (``S2``: float16
  weights; ``S3``: block scales, then int8 weights; a weight stored as 0 is dropped with its id)
* colbert ``C1 | uint32 tokens | uint32 rows | uint32 dim | rows x dim x float32`` (``C2``: float16;
  ``C3``: each row's block scales, then rows x dim x int8)
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


_BLOCK = 32  # int8: values per scale past the head
_FLOAT16_MAX = 65504.0


def _edges(width: int) -> np.ndarray:
    """Where int8 blocks start: 1, 1, 2, 4, 8 and 16 values at the head, then 32 at a time. Small
    blocks at the head keep a vector cut short (``dimensions``, Matryoshka style) as precise as the
    whole: every cut to a power of two up to 32, or a multiple of 32, ends on a block's edge."""
    head = [edge for edge in (0, 1, 2, 4, 8, 16) if edge < width]
    return np.array([*head, *range(_BLOCK, width, _BLOCK)], dtype=np.int64)


def _holds(values: np.ndarray, dtype: CacheDtype) -> CacheDtype:
    """``dtype``, or float32 where the values do not fit it (stored exactly rather than wrong)."""
    if dtype == "float32" or not values.size:
        return dtype
    if not np.isfinite(values).all() or (dtype == "float16" and float(np.abs(values).max()) > _FLOAT16_MAX):
        return "float32"
    return dtype


def _widen(scales: np.ndarray, edges: np.ndarray, width: int) -> np.ndarray:
    """Each block's scale repeated over its values: rows x width float32."""
    return np.repeat(scales.astype(np.float32), np.diff(np.append(edges, width)), axis=1)


def _int8_blocks(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float16 scales (rows x blocks) and int8 codes (rows x width) of a 2-D float array."""
    rows = np.asarray(rows, dtype=np.float32)
    count, width = rows.shape
    edges = _edges(width)
    if not len(edges) or not count:
        return np.zeros((count, len(edges)), dtype=np.float16), np.zeros((count, width), dtype=np.int8)
    peaks = np.maximum.reduceat(np.abs(rows), edges, axis=1)
    scales = (peaks / np.float32(127)).astype(np.float16)
    scales[scales == 0] = np.float16(1)  # an all-zero block (or one below float16's range) stays zero
    codes = np.clip(np.rint(rows / _widen(scales, edges, width)), -127, 127).astype(np.int8)
    return scales, codes


def _payload(values: np.ndarray, dtype: CacheDtype) -> bytes:
    """A 2-D float array (one row for a vector) as stored: float32 / float16, or block scales then
    int8 codes."""
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    scales, codes = _int8_blocks(values)
    return scales.astype("<f2").tobytes() + codes.tobytes()


def _values(body: memoryview, offset: int, digit: bytes, rows: int, width: int) -> np.ndarray | None:
    """``rows x width`` float32 values stored from ``offset`` (None when the size is wrong)."""
    count = rows * width
    if digit == b"3":
        edges = _edges(width)
        blocks = len(edges)
        if len(body) != offset + 2 * rows * blocks + count:
            return None
        scales = np.frombuffer(body, dtype="<f2", count=rows * blocks, offset=offset).reshape(rows, blocks)
        codes = np.frombuffer(body, dtype=np.int8, count=count, offset=offset + 2 * rows * blocks).reshape(rows, width)
        restored: np.ndarray = codes.astype(np.float32) * _widen(scales, edges, width)
        return restored
    if len(body) != offset + _WIDTH[digit] * count:
        return None
    stored = np.frombuffer(body, dtype="<f4" if digit == b"1" else "<f2", count=count, offset=offset)
    return (stored if digit == b"1" else stored.astype(np.float32)).reshape(rows, width)


def _accepted(body: memoryview, dtype: CacheDtype | None) -> bytes | None:
    """The value's storage digit when a reader of ``dtype`` takes it: its own type, or exact float32
    (a value the type could not hold); None for another type's value. ``None`` takes any type."""
    digit = bytes(body[1:2])
    if dtype is None or digit == _DIGIT[dtype] or digit == b"1":
        return digit
    return None


def pack_dense(tokens: int, vector: np.ndarray, dtype: CacheDtype = "float32") -> bytes:
    row = np.asarray(vector).reshape(1, -1)
    dtype = _holds(row, dtype)
    return _seal(_DENSE.pack(b"E" + _DIGIT[dtype], tokens) + _payload(row, dtype))


def unpack_dense(data: bytes | None, dim: int, dtype: CacheDtype | None = None) -> tuple[int, np.ndarray] | None:
    """(tokens, vector) or ``None`` for anything that is not a whole, intact vector of ``dim`` (of
    ``dtype``, or exact float32, when it is given)."""
    body = _opened(data, b"E", _DENSE)
    digit = None if body is None else _accepted(body, dtype)
    if body is None or digit is None:
        return None
    values = _values(body, _DENSE.size, digit, 1, dim)
    return None if values is None else (_DENSE.unpack_from(body)[1], values[0])


def pack_sparse(tokens: int, weights: SparseWeights, dtype: CacheDtype = "float32") -> bytes:
    values = np.asarray(weights.values, dtype=np.float32).reshape(1, -1)
    indices = np.asarray(weights.indices)
    dtype = _holds(values, dtype)
    if dtype != "float32":  # a weight the type stores as 0 is no weight: drop it with its id
        stored = _values(memoryview(b"S1" + _payload(values, dtype)), 2, _DIGIT[dtype], 1, values.shape[1])
        assert stored is not None
        kept = stored[0] != 0
        values, indices = values[:, kept], indices[kept]
    header = _SPARSE.pack(b"S" + _DIGIT[dtype], tokens, len(indices))
    return _seal(header + indices.astype("<u4").tobytes() + _payload(values, dtype))


def unpack_sparse(data: bytes | None, dim: int, dtype: CacheDtype | None = None) -> tuple[int, SparseWeights] | None:
    """``dim`` is unused (a sparse value has no fixed width); the parameter keeps one signature."""
    body = _opened(data, b"S", _SPARSE)
    digit = None if body is None else _accepted(body, dtype)
    if body is None or digit is None:
        return None
    _, tokens, count = _SPARSE.unpack_from(body)
    if len(body) < _SPARSE.size + 4 * count:
        return None
    indices = np.frombuffer(body, dtype="<u4", count=count, offset=_SPARSE.size).astype(np.int64)
    values = _values(body, _SPARSE.size + 4 * count, digit, 1, count)
    return None if values is None else (tokens, SparseWeights(indices, values[0]))


def pack_colbert(tokens: int, vectors: np.ndarray, dtype: CacheDtype = "float32") -> bytes:
    rows, dim = vectors.shape
    dtype = _holds(np.asarray(vectors), dtype)
    return _seal(_COLBERT.pack(b"C" + _DIGIT[dtype], tokens, rows, dim) + _payload(vectors, dtype))


def unpack_colbert(data: bytes | None, dim: int, dtype: CacheDtype | None = None) -> tuple[int, np.ndarray] | None:
    body = _opened(data, b"C", _COLBERT)
    digit = None if body is None else _accepted(body, dtype)
    if body is None or digit is None:
        return None
    _, tokens, rows, stored_dim = _COLBERT.unpack_from(body)
    if stored_dim != dim:
        return None
    values = _values(body, _COLBERT.size, digit, rows, dim)
    return None if values is None else (tokens, values)
