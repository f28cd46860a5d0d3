"""Sealed byte formats for cached outputs: every value checks itself.

Each value is ``magic | header | payload | xxh3_64 of everything before it``, little-endian, so a
value that is short, of another kind or dimension, or has a flipped bit decodes as a miss (and is
overwritten by the next write), never as a wrong vector. Input text is never stored.

* dense  ``b"E1" | uint32 tokens | dim x float32``
* sparse ``b"S1" | uint32 tokens | uint32 n | n x uint32 ids | n x float32 weights``
* colbert ``b"C1" | uint32 tokens | uint32 rows | uint32 dim | rows x dim x float32``
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from encoder.kinds import SparseWeights

__all__ = ["pack_colbert", "pack_dense", "pack_sparse", "unpack_colbert", "unpack_dense", "unpack_sparse"]

_CHECKSUM = struct.Struct("<Q")
_DENSE = struct.Struct("<2sI")  # magic, tokens
_SPARSE = struct.Struct("<2sII")  # magic, tokens, entries
_COLBERT = struct.Struct("<2sIII")  # magic, tokens, rows, dim


def _seal(body: bytes) -> bytes:
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _opened(data: bytes | None, magic: bytes, header: struct.Struct) -> memoryview | None:
    """The body of a sealed value with this magic, or None when it is short, foreign or corrupt."""
    if data is None or len(data) < header.size + _CHECKSUM.size or not data.startswith(magic):
        return None
    body = memoryview(data)[: -_CHECKSUM.size]  # no copies: this runs for every hit
    if _CHECKSUM.unpack_from(data, len(body))[0] != xxhash.xxh3_64_intdigest(body):
        return None
    return body


def pack_dense(tokens: int, vector: np.ndarray) -> bytes:
    return _seal(_DENSE.pack(b"E1", tokens) + np.ascontiguousarray(vector, dtype="<f4").tobytes())


def unpack_dense(data: bytes | None, dim: int) -> tuple[int, np.ndarray] | None:
    """(tokens, vector) or ``None`` for anything that is not a whole, intact vector of ``dim``."""
    if data is None or len(data) != _DENSE.size + 4 * dim + _CHECKSUM.size:
        return None
    body = _opened(data, b"E1", _DENSE)
    if body is None:
        return None
    return _DENSE.unpack_from(body)[1], np.frombuffer(body, dtype="<f4", offset=_DENSE.size)


def pack_sparse(tokens: int, weights: SparseWeights) -> bytes:
    header = _SPARSE.pack(b"S1", tokens, len(weights.indices))
    return _seal(header + weights.indices.astype("<u4").tobytes() + weights.values.astype("<f4").tobytes())


def unpack_sparse(data: bytes | None, dim: int) -> tuple[int, SparseWeights] | None:
    """``dim`` is unused (a sparse value has no fixed width); the parameter keeps one signature."""
    body = _opened(data, b"S1", _SPARSE)
    if body is None:
        return None
    _, tokens, count = _SPARSE.unpack_from(body)
    if len(body) != _SPARSE.size + 8 * count:
        return None
    indices = np.frombuffer(body, dtype="<u4", count=count, offset=_SPARSE.size).astype(np.int64)
    values = np.frombuffer(body, dtype="<f4", count=count, offset=_SPARSE.size + 4 * count)
    return tokens, SparseWeights(indices, values)


def pack_colbert(tokens: int, vectors: np.ndarray) -> bytes:
    rows, dim = vectors.shape
    return _seal(_COLBERT.pack(b"C1", tokens, rows, dim) + np.ascontiguousarray(vectors, dtype="<f4").tobytes())


def unpack_colbert(data: bytes | None, dim: int) -> tuple[int, np.ndarray] | None:
    body = _opened(data, b"C1", _COLBERT)
    if body is None:
        return None
    _, tokens, rows, stored_dim = _COLBERT.unpack_from(body)
    if stored_dim != dim or len(body) != _COLBERT.size + 4 * rows * dim:
        return None
    return tokens, np.frombuffer(body, dtype="<f4", offset=_COLBERT.size).reshape(rows, dim)
