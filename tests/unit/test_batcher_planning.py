"""The micro-batcher's planner, :class:`encoder.packing.BatchQueue`, on its own: packing, fair
turns, and work per batch that does not grow with the queue."""

from __future__ import annotations

import random

import pytest

from encoder.packing import BatchQueue, QueuedInput, plan_batches


class _Input(QueuedInput):
    __slots__ = ("owner",)

    def __init__(self, length: int, owner: str = "") -> None:
        super().__init__(length)
        self.owner = owner


def _lengths(count: int, seed: int) -> list[int]:
    """A RAG-like mix: mostly short, a long tail up to 512 tokens."""
    rng = random.Random(seed)
    return [min(512, int(rng.lognormvariate(4, 1)) + 3) for _ in range(count)]


def _drain(queue: BatchQueue[_Input]) -> list[list[_Input]]:
    batches = []
    while batch := queue.take():
        batches.append(batch)
    return batches


def _padded(batch: list[_Input]) -> int:
    return len(batch) * max(item.length for item in batch)


@pytest.mark.parametrize(("budget", "size"), [(512, 64), (4096, 32), (16384, 128)])
def test_batches_respect_the_budget_and_pad_about_as_little_as_sorting_everything(budget: int, size: int) -> None:
    lengths = _lengths(3000, seed=budget)
    queue: BatchQueue[_Input] = BatchQueue(budget, size)
    items = [_Input(length) for length in lengths]
    for item in items:
        queue.add(item, queue.flow())  # one-text callers, each its own flow
    batches = _drain(queue)
    taken = [item for batch in batches for item in batch]
    assert sorted(map(id, taken)) == sorted(map(id, items)), "every input exactly once"
    assert len(queue) == 0
    for batch in batches:
        assert len(batch) <= size
        assert len(batch) == 1 or _padded(batch) <= budget
        assert [item.length for item in batch] == sorted((item.length for item in batch), reverse=True)
    ours = sum(_padded(batch) for batch in batches)
    sorted_plan = sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths, budget, size))
    # Batches are runs of neighbouring lengths: padding stays within a few percent of a full sort.
    assert ours <= 1.1 * sorted_plan, (ours, sorted_plan, sum(lengths))


def test_an_input_longer_than_the_budget_gets_a_batch_of_its_own() -> None:
    queue: BatchQueue[_Input] = BatchQueue(100, 8)
    for length in (300, 10, 10):
        queue.add(_Input(length), queue.flow())
    assert [[item.length for item in batch] for batch in _drain(queue)] == [[300], [10, 10]]


def _examined_per_input(callers: int) -> float:
    """What planning looked at (inputs, lengths, heap entries) per input, draining ``callers``
    one-text callers queued at once."""
    queue: BatchQueue[_Input] = BatchQueue(16384, 128)
    for length in _lengths(callers, seed=7):
        queue.add(_Input(length), queue.flow())
    taken = 0
    while batch := queue.take():
        taken += len(batch)
    return queue.examined / taken


def test_planning_work_per_input_does_not_grow_with_the_queue() -> None:
    # Amortised: a stale heap entry is dropped once, an input is looked at about once. Re-planning
    # the whole queue for every batch looks at each input once per batch: ~N/256 times here.
    small = _examined_per_input(1_000)
    large = _examined_per_input(50_000)
    assert small <= 3
    assert large <= 3, large


def test_a_one_text_flow_waits_at_most_one_batch_behind_a_bulk_flow() -> None:
    queue: BatchQueue[_Input] = BatchQueue(64, 4)
    bulk = queue.flow()
    for _ in range(40):
        queue.add(_Input(16, "bulk"), bulk)
    queue.add(_Input(8, "query"), queue.flow())
    owners = [[item.owner for item in batch] for batch in _drain(queue)[:2]]
    assert "query" in owners[0] + owners[1], owners


def test_the_neediest_flow_fills_its_own_batch_before_older_flows_of_the_same_length() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 4)
    first, second = queue.flow(), queue.flow()
    for _ in range(12):
        queue.add(_Input(10, "first"), first)
    for _ in range(12):
        queue.add(_Input(10, "second"), second)
    owners = [{item.owner for item in batch} for batch in _drain(queue)]
    # Whole batches in turn, not the newcomer's one input topped up with the older flow's.
    assert owners == [{"first"}, {"second"}] * 3, owners


def test_tenants_take_turns_and_a_returning_tenant_starts_at_its_peers_count() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 2)
    a = queue.flow("a")
    for _ in range(20):
        queue.add(_Input(10, "a"), a)
    for _ in range(3):  # a alone for three batches
        queue.take()
    b = queue.flow("b")
    gone = _Input(10, "b")
    queue.add(gone, b)
    assert queue.remove(gone)  # b leaves before compute: it is forgotten, and charged nothing
    assert not queue.remove(gone)
    back = queue.flow("b")
    for _ in range(4):
        queue.add(_Input(10, "b"), back)
    owners = [{item.owner for item in batch} for batch in _drain(queue)[:4]]
    # b starts at a's count (not at 0, which would give it every batch until it caught up).
    assert owners == [{"a"}, {"b"}, {"a"}, {"b"}], owners
