"""The frames between HTTP workers and the engine: msgpack (msgspec), each behind a 4-byte length.

One connection per worker carries many requests at once; every request and its answer share an
``id``. Vectors travel as raw little-endian float32 bytes (msgpack ``bin``), never as JSON numbers.
"""

from __future__ import annotations

import asyncio
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
    "StatsAnswer",
    "StatsAsk",
    "decode_outputs",
    "encode_outputs",
    "read_frame",
    "write_frame",
]

MAX_FRAME_BYTES = 1 << 30


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


class Collect(msgspec.Struct, tag="collect", array_like=True):
    """The engine asks a worker for its counters now (another worker answers /stats)."""


class StatsAsk(msgspec.Struct, tag="stats", array_like=True):
    id: int
    pid: int
    state: TelemetryState


class StatsAnswer(msgspec.Struct, tag="stats_answer", array_like=True):
    id: int
    engine: TelemetryState
    workers: list[TelemetryState]  # the last counters of every worker seen (dead ones too)
    queue_tokens: int
    in_flight: int
    tokens_per_second: float
    gpu: GpuStats | None
    worker_count: int
    engine_restarts: int
    worker_restarts: int


Frame = Hello | EngineInfo | EmbedCall | Cancel | EmbedResult | EmbedFailed | Push | Collect | StatsAsk | StatsAnswer

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


def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    payload = _encoder.encode(frame)
    writer.write(len(payload).to_bytes(4, "big") + payload)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame; ``asyncio.IncompleteReadError`` when the peer has gone."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {size} bytes is larger than {MAX_FRAME_BYTES}")
    frame: Frame = _decoder.decode(await reader.readexactly(size))
    return frame
