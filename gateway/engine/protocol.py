"""The messages between HTTP workers and the engine: msgpack (msgspec), cut into frames.

One connection per worker carries many requests at once; every request and its answer share an
``id``. Vectors travel as raw little-endian float32 bytes (msgpack ``bin``), never as JSON numbers.

A message goes out as one or more frames, each at most ``max_frame_bytes`` of it behind a header:
its length (64 bits), the request ``id`` it belongs to (0: none) and a "more follows" flag. So an
answer of any size the server allows (bge-m3 ColBERT rows for 300k tokens are over 1 GiB) crosses
the link, and a frame this side refuses (over its limit) or a message it cannot decode costs only
that request (:class:`Unreadable` names it), never the connection and every request on it.
A message's frames are written in one synchronous call, so they are never interleaved with
another message's.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np

from encoder.kinds import Outputs, SparseWeights
from gateway.core.telemetry import GpuStats, TelemetryState

__all__ = [
    "Cancel",
    "Collect",
    "EmbedCall",
    "EmbedFailed",
    "EmbedResult",
    "EncodedOutputs",
    "EngineInfo",
    "Frame",
    "Hello",
    "Push",
    "QueueState",
    "StatsAnswer",
    "StatsAsk",
    "Unreadable",
    "decode_outputs",
    "encode_outputs",
    "read_frame",
    "write_frame",
]

MAX_FRAME_BYTES = 1 << 30  # of one frame; a longer message is cut into several
_HEADER = struct.Struct(">QqB")  # this frame's length, the request id (0: none), flags
_MORE = 1  # flag: the message goes on in the next frame
_SKIP_BYTES = 1 << 20  # a refused frame is read past in pieces of this size, never held whole


class Hello(msgspec.Struct, tag="hello", array_like=True):
    pid: int


class EngineInfo(msgspec.Struct, tag="info", array_like=True):
    pid: int
    fingerprint: str
    numerics: str
    dim: int
    max_tokens: int
    widths: dict[str, int]  # output kind -> floats per row (the kinds this model has)
    device: str
    dtype: str
    threads: int
    path: str
    max_queue_tokens: int
    # The engine's queue as it is now: a worker's figures start from these after every (re)connect.
    queue_tokens: int = 0
    tokens_per_second: float = 3000.0
    ready: bool = True  # the engine's batch worker runs (False while it backs off after a crash)


class EmbedCall(msgspec.Struct, tag="embed", array_like=True):
    id: int
    texts: list[str]
    token_ids: list[list[int]]
    kinds: list[str]
    tenant: str


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    id: int


class EncodedOutputs(msgspec.Struct, array_like=True):
    tokens: int
    dense: bytes | None = None  # float32
    sparse_ids: bytes | None = None  # int64
    sparse_values: bytes | None = None  # float32
    colbert: bytes | None = None  # float32, rows x width


class EmbedResult(msgspec.Struct, tag="result", array_like=True):
    id: int
    outputs: list[EncodedOutputs]
    queue_tokens: int
    tokens_per_second: float


class EmbedFailed(msgspec.Struct, tag="failed", array_like=True):
    id: int
    kind: Literal["queue_full", "input_failed", "crashed", "error"]
    message: str
    retry_after: float = 0.0
    queued: int = 0
    limit: int = 0


class Push(msgspec.Struct, tag="push", array_like=True):
    """A worker's counters (cumulative), sent every second and with each stats question."""

    pid: int
    state: TelemetryState


class QueueState(msgspec.Struct, tag="queue", array_like=True):
    """The engine's queue now, its answer to every :class:`Push`: a worker's queue figures (its
    ``x-ratelimit-*`` headers) stay fresh while it gets no answers of its own."""

    queue_tokens: int
    tokens_per_second: float
    ready: bool = True  # the engine's batch worker runs: every worker's /readyz follows it


class Collect(msgspec.Struct, tag="collect", array_like=True):
    """The engine asks a worker for its counters now (another worker answers /stats)."""


class StatsAsk(msgspec.Struct, tag="stats", array_like=True):
    id: int
    pid: int
    state: TelemetryState


class StatsAnswer(msgspec.Struct, tag="stats_answer", array_like=True):
    id: int
    engine: TelemetryState
    workers: list[TelemetryState]  # every other process's last counters: workers, live or dead, and dead engines
    queue_tokens: int
    in_flight: int
    tokens_per_second: float
    gpu: GpuStats | None
    worker_count: int
    engine_restarts: int
    worker_restarts: int
    from_engine: bool = True  # False: the worker's own answer from the ledger while the engine is away
    engine_name: str = ""  # the ledger name ``engine``'s counts are kept under
    names: list[str] = msgspec.field(default_factory=list)  # the ledger name of each of ``workers``


Frame = (
    Hello
    | EngineInfo
    | EmbedCall
    | Cancel
    | EmbedResult
    | EmbedFailed
    | Push
    | QueueState
    | Collect
    | StatsAsk
    | StatsAnswer
)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """What :func:`read_frame` gives for a message it could not take: a frame over its limit, or
    bytes that do not decode. The stream is still in step; only request ``id`` (0: none) fails."""

    id: int
    reason: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode_outputs(outputs: Outputs) -> EncodedOutputs:
    sparse = outputs.sparse
    return EncodedOutputs(
        tokens=outputs.tokens,
        dense=None if outputs.dense is None else np.asarray(outputs.dense, dtype="<f4").tobytes(),
        sparse_ids=None if sparse is None else np.asarray(sparse.indices, dtype="<i8").tobytes(),
        sparse_values=None if sparse is None else np.asarray(sparse.values, dtype="<f4").tobytes(),
        colbert=None if outputs.colbert is None else np.asarray(outputs.colbert, dtype="<f4").tobytes(),
    )


def decode_outputs(encoded: EncodedOutputs, colbert_width: int) -> Outputs:
    sparse = None
    if encoded.sparse_ids is not None and encoded.sparse_values is not None:
        sparse = SparseWeights(
            np.frombuffer(encoded.sparse_ids, dtype="<i8"), np.frombuffer(encoded.sparse_values, dtype="<f4")
        )
    colbert = None
    if encoded.colbert is not None:
        colbert = np.frombuffer(encoded.colbert, dtype="<f4").reshape(-1, max(colbert_width, 1))
    return Outputs(
        tokens=encoded.tokens,
        dense=None if encoded.dense is None else np.frombuffer(encoded.dense, dtype="<f4"),
        sparse=sparse,
        colbert=colbert,
    )


def write_frame(writer: asyncio.StreamWriter, frame: Frame, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    """Queue ``frame`` on ``writer``, in as many frames of at most ``max_frame_bytes`` as it takes.

    Frames written in one turn of the event loop leave together, in one write (one system call, one
    wake-up of the peer) when the turn ends: a pass's answers to a worker's many callers, or a
    worker's burst of calls, cross the link as one send, not one each. The order is kept, and a
    message's frames are queued in one call, so they are never interleaved with another's.
    """
    payload = _encoder.encode(frame)
    call_id = getattr(frame, "id", 0)
    pending = _pending.get(writer)
    if pending is None:
        pending = _pending[writer] = []
        asyncio.get_running_loop().call_soon(_flush, writer)
    if len(payload) <= max_frame_bytes:  # the usual case
        pending.append(_HEADER.pack(len(payload), call_id, 0) + payload)
        return
    view = memoryview(payload)
    for start in range(0, len(view), max_frame_bytes):
        chunk = view[start : start + max_frame_bytes]
        more = _MORE if start + max_frame_bytes < len(view) else 0
        pending.append(_HEADER.pack(len(chunk), call_id, more))
        pending.append(chunk)


# Frames queued per writer in this turn of the event loop, written when it ends (``_flush``).
_pending: weakref.WeakKeyDictionary[asyncio.StreamWriter, list[bytes | memoryview]] = weakref.WeakKeyDictionary()


def _flush(writer: asyncio.StreamWriter) -> None:
    pending = _pending.pop(writer, None)
    if pending and not writer.is_closing():
        writer.writelines(pending)


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int = MAX_FRAME_BYTES) -> Frame | Unreadable:
    """The next message; ``asyncio.IncompleteReadError`` when the peer has gone.

    A frame over ``max_frame_bytes`` is read past (never held) and its message comes back as
    :class:`Unreadable`, as does one that does not decode: the link lives on.
    """
    parts: list[bytes] = []
    problem = ""
    while True:
        size, call_id, flags = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > max_frame_bytes:
            problem = problem or f"a frame of {size} bytes is over the link's limit of {max_frame_bytes}"
            parts.clear()
        if problem:
            await _skip(reader, size)
        else:
            parts.append(await reader.readexactly(size))
        if not flags & _MORE:
            break
    if problem:
        return Unreadable(call_id, problem)
    try:
        frame: Frame = _decoder.decode(parts[0] if len(parts) == 1 else b"".join(parts))
    except msgspec.DecodeError as exc:
        return Unreadable(call_id, f"a message that does not decode ({exc})")
    return frame


async def _skip(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        size -= len(await reader.readexactly(min(size, _SKIP_BYTES)))
