"""Frames between workers and the engine: a turn's frames leave in one write, in order."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.engine.protocol import Cancel, read_frame, write_frame


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _CountingTransportWrites:
    """Counts the writes that reach the socket (each one a system call and a wake-up of the peer)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.calls = 0
        transport = writer.transport
        inner_write, inner_writelines = transport.write, transport.writelines

        inside = False  # writelines may call write (Python 3.11 joins, then writes): count it once

        def write(data: bytes) -> None:
            if not inside:
                self.calls += 1
            inner_write(data)

        def writelines(data: list[bytes]) -> None:
            nonlocal inside
            self.calls += 1
            inside = True
            try:
                inner_writelines(data)
            finally:
                inside = False

        transport.write = write  # type: ignore[method-assign]
        transport.writelines = writelines  # type: ignore[method-assign]


@pytest.mark.anyio
async def test_frames_written_in_one_turn_leave_in_one_write_and_in_order() -> None:
    left, right = socket.socketpair()
    reader, left_writer = await asyncio.open_connection(sock=left)
    _right_reader, writer = await asyncio.open_connection(sock=right)
    counting = _CountingTransportWrites(writer)
    try:
        for call_id in range(1, 201):
            write_frame(writer, Cancel(call_id))
        write_frame(writer, Cancel(999), max_frame_bytes=4)  # cut into several frames, kept together
        assert counting.calls == 0, "nothing is written before the turn ends"
        await asyncio.sleep(0)
        assert counting.calls == 1
        got = [await asyncio.wait_for(read_frame(reader), 5) for _ in range(201)]
        assert [frame.id for frame in got if isinstance(frame, Cancel)] == [*range(1, 201), 999]
        write_frame(writer, Cancel(1000))  # a later turn: its own write
        await asyncio.sleep(0)
        assert counting.calls == 2
        assert isinstance(frame := await asyncio.wait_for(read_frame(reader), 5), Cancel) and frame.id == 1000
    finally:
        writer.close()
        left_writer.close()
