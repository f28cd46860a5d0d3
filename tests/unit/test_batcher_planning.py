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


# --- shared inputs: join, rehome, move -------------------------------------------------------------


def _bulk_with_a_shared_last_input(queue: BatchQueue[_Input]) -> tuple[_Input, list[_Input]]:
    bulk = queue.flow("bulk")
    items = [_Input(3, "bulk") for _ in range(40)]
    shared = _Input(3, "shared")
    for item in [*items, shared]:
        queue.add(item, bulk)
    queue.take()  # bulk has been served a little
    return shared, items


def test_an_input_joined_by_a_needier_caller_moves_to_its_flow_and_is_served_at_its_pace() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 2)
    shared, _ = _bulk_with_a_shared_last_input(queue)
    searcher = queue.flow("searcher")
    assert queue.join(shared, searcher)
    assert shared.flow is searcher
    assert not queue.join(shared, searcher)  # already there
    batches = _drain(queue)
    served_at = next(index for index, batch in enumerate(batches) if shared in batch)
    assert served_at <= 1, served_at  # one bulk batch at most, not the whole ingest (20 batches)
    assert sum(len(batch) for batch in batches) == 39  # 41 queued, a batch of 2 taken before: each once
    assert len(queue) == 0


def test_an_input_is_not_moved_to_a_caller_that_would_be_served_later() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 2)
    query = _Input(3, "query")
    queue.add(query, queue.flow("searcher"))
    bulk = queue.flow("bulk")
    for _ in range(40):
        queue.add(_Input(3, "bulk"), bulk)
    assert not queue.join(query, bulk)  # it would be last of 41 there
    owners = [item.owner for item in _drain(queue)[0]]
    assert "query" in owners, owners


def test_a_shared_input_whose_caller_left_moves_to_the_neediest_remaining_waiter() -> None:
    queue: BatchQueue[_Input] = BatchQueue(1000, 2)
    owner = queue.flow("owner")
    shared = _Input(3, "shared")
    queue.add(shared, owner)
    later = queue.flow("owner")
    for _ in range(30):
        queue.add(_Input(3, "later"), later)
    busy, idle = queue.flow("busy"), queue.flow("idle")
    for _ in range(30):
        queue.add(_Input(3, "busy"), busy)
    assert queue.rehome(shared, [owner, busy, idle])  # the owner left: not a candidate
    assert shared.flow is idle
    assert not queue.rehome(shared, [idle])
    taken = [item for batch in _drain(queue) for item in batch]
    assert len(taken) == 61 and len(set(map(id, taken))) == 61


def test_an_input_moved_away_and_back_is_taken_once_and_counts_stay_right() -> None:
    rng = random.Random(5)
    queue: BatchQueue[_Input] = BatchQueue(64, 4)
    flows = [queue.flow(tenant) for tenant in ("a", "a", "b", "c")]
    items = [_Input(rng.choice([4, 8, 16]), str(index)) for index in range(200)]
    for item in items:
        queue.add(item, rng.choice(flows))
    removed = set()
    taken: list[_Input] = []
    for step in range(600):
        item = rng.choice(items)
        if step % 50 == 49:
            taken += queue.take()
        elif step % 7 == 0 and item.queued:
            assert queue.remove(item)
            removed.add(id(item))
        else:
            queue.move(item, rng.choice(flows))  # back and forth: stale entries in runs and lists
    taken += [item for batch in _drain(queue) for item in batch]
    assert len(queue) == 0
    assert len(set(map(id, taken))) == len(taken) == len(items) - len(removed)
    assert not any(item.queued for item in items)
    assert all(id(item) not in removed for item in taken)
    for flow in flows:
        assert not flow.registered and flow.queued == 0 and flow.tokens == 0
