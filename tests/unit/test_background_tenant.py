"""The queue's background tenant (OpenAI Batch API work): below interactive traffic, never idle.

:data:`encoder.batch_queue.BACKGROUND_TENANT` is charged
:data:`~encoder.batch_queue.BACKGROUND_COST` times its tokens and loses ties, so interactive work
overtakes it at once and each interactive tenant gets 16 times its compute while both wait (16/17
against one), yet it has the device to
itself whenever nothing else is queued, and its own flows share its turns fairly.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from encoder.batch_queue import BACKGROUND_COST, BACKGROUND_TENANT, BatchQueue
from encoder.queue_records import Flow, QueuedInput
from gateway.engine.protocol import EmbedCall, read_frame, write_frame


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Input(QueuedInput):
    __slots__ = ("owner",)

    def __init__(self, length: int, owner: str) -> None:
        super().__init__(length)
        self.owner = owner


def _queue(flow: Flow, queue: BatchQueue[_Input], owner: str, lengths: list[int]) -> list[_Input]:
    items = [_Input(length, owner) for length in lengths]
    for item in items:
        queue.add(item, flow)
    return items


def test_the_background_tenant_cannot_be_an_api_key_name() -> None:
    assert BACKGROUND_TENANT == " batch"
    assert BACKGROUND_TENANT.strip() != BACKGROUND_TENANT  # key names are stripped
    assert BACKGROUND_COST == 16


@pytest.mark.parametrize("taken_before", [0, 1, 3])
@pytest.mark.parametrize("query_length", [10, 12, 7])
def test_interactive_inputs_go_in_the_very_next_batch(taken_before: int, query_length: int) -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 4)
    _queue(queue.flow(BACKGROUND_TENANT), queue, "batch", [10] * 200)
    for _ in range(taken_before):
        assert {item.owner for item in queue.take()} == {"batch"}
    # Arrives at the background tenant's count (the least-served peer's) and wins the tie.
    query = _queue(queue.flow("alice"), queue, "alice", [query_length] * 2)
    batch = queue.take()
    assert all(item in batch for item in query), [(item.owner, item.length) for item in batch]
    # Room left is topped up with background inputs of nearby length: the device stays busy.
    assert len(batch) == 4
    assert {item.owner for item in batch} == {"alice", "batch"}


@pytest.mark.parametrize(("lengths", "interactive"), [((10, 10), 1), ((10, 40), 1), ((32, 8), 2)])
def test_interactive_tenants_get_about_sixteen_seventeenths_while_both_wait(
    lengths: tuple[int, int], interactive: int
) -> None:
    queue: BatchQueue[_Input] = BatchQueue(1024, 8)
    _queue(queue.flow(BACKGROUND_TENANT), queue, "batch", [lengths[1]] * 5000)
    for index in range(interactive):
        _queue(queue.flow(f"key{index}"), queue, "interactive", [lengths[0]] * 5000)
    tokens = {"batch": 0, "interactive": 0}
    for _ in range(400):
        batch = queue.take()
        assert batch
        for item in batch:
            tokens[item.owner] += item.length
    share = tokens["interactive"] / (tokens["interactive"] + tokens["batch"])
    assert tokens["batch"], "the background tenant is slowed, never starved"
    # Each interactive tenant gets BACKGROUND_COST times the background tenant's tokens: 16/17 of
    # the compute against one, 32/33 against two.
    expected = BACKGROUND_COST * interactive / (BACKGROUND_COST * interactive + 1)
    assert share == pytest.approx(expected, abs=0.01), tokens
    assert len(queue) > 0, "both kept work queued throughout"


def test_background_work_alone_fills_every_batch() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 4)
    background = _queue(queue.flow(BACKGROUND_TENANT), queue, "batch", [10, 11, 12, 13, 14] * 20)
    batches = []
    while batch := queue.take():
        batches.append(batch)
        # Full, or the last of the queue.
        assert len(batch) == 4 or not len(queue), (len(batches), len(batch), len(queue))
        # Queue an interactive input now and then: once it is served, background work resumes.
        if len(batches) % 7 == 0:
            _queue(queue.flow("alice"), queue, "alice", [12])
    taken = [item for batch in batches for item in batch]
    assert sum(item.owner == "alice" for item in taken) == len(batches) // 7
    assert sorted(map(id, (item for item in taken if item.owner == "batch"))) == sorted(map(id, background))
    assert all(len(batch) == 4 for batch in batches[:-1]), [len(batch) for batch in batches]


def test_an_interactive_caller_joining_a_background_input_takes_it_at_its_own_pace() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 2)
    items = _queue(queue.flow(BACKGROUND_TENANT), queue, "batch", [10] * 40)
    _queue(queue.flow("bob"), queue, "bob", [10] * 40)
    shared = items[-1]  # the background tenant's last: about 40 * 16 tokens of virtual time away
    query = queue.flow("alice")
    assert queue.join(shared, query)
    assert shared.flow is query
    assert shared in queue.take() + queue.take()


@pytest.mark.parametrize("with_interactive", [False, True])
def test_background_flows_share_its_turns_fairly(with_interactive: bool) -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 4)
    first = _queue(queue.flow(BACKGROUND_TENANT), queue, "first", [10] * 2000)
    if with_interactive:
        _queue(queue.flow("alice"), queue, "alice", [10] * 5000)
    for _ in range(20):  # first alone in its tenant for a while
        queue.take()
    # A second flow of twice the length arrives: it starts at first's count, then they alternate
    # by tokens (one of its inputs per two of first's), not by inputs nor by arrival.
    second = _queue(queue.flow(BACKGROUND_TENANT), queue, "second", [20] * 2000)
    before = {"first": sum(not item.queued for item in first), "second": 0}
    tokens = {"first": 0, "second": 0, "alice": 0}
    for _ in range(1200 if with_interactive else 120):
        for item in queue.take():
            tokens[item.owner] += item.length
    assert any(item.queued for item in first) and any(item.queued for item in second)
    assert tokens["second"] > 0 and before["first"] > 0
    assert tokens["first"] == pytest.approx(tokens["second"], rel=0.05), tokens
    if with_interactive:
        background = tokens["first"] + tokens["second"]
        assert background / (background + tokens["alice"]) == pytest.approx(1 / 17, abs=0.015), tokens


@pytest.mark.anyio
async def test_the_background_tenant_crosses_the_worker_engine_link_unchanged() -> None:
    # A worker sends its callers' tenant in EmbedCall (gateway.engine.client); the engine hands
    # call.tenant to its batcher, whose queue it names (gateway.engine.server).
    left, right = socket.socketpair()
    reader, left_writer = await asyncio.open_connection(sock=left)
    _right_reader, writer = await asyncio.open_connection(sock=right)
    try:
        write_frame(writer, EmbedCall(7, ["a text"], [[1, 2, 3]], ["dense"], BACKGROUND_TENANT))
        frame = await asyncio.wait_for(read_frame(reader), 5)
        assert isinstance(frame, EmbedCall)
        assert frame.tenant == BACKGROUND_TENANT
    finally:
        writer.close()
        left_writer.close()
