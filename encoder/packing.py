"""Plan micro-batches: sort by token length, then pack under a token budget.

Padding to each batch's longest input only helps if the inputs in a batch are of similar length;
on a RAG-like mix, unsorted dynamic padding ran at 0.3x the speed of the sorted loop. Sorting is
the lever, and the budget (``longest * count``) keeps the padded tensor, and so memory, bounded.

Two planners live here:

* :func:`plan_batches` packs a whole known list at once (:meth:`encoder.Encoder.embed`);
* :class:`BatchQueue` is the micro-batcher's queue: inputs arrive and leave all the time, and each
  call to :meth:`BatchQueue.take` plans just the next batch, at a cost that does not depend on how
  much is queued (see its docstring for how).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

__all__ = ["BatchQueue", "Flow", "QueuedInput", "default_max_batch_tokens", "plan_batches"]


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group indices of ``lengths`` into batches, each padded to its own longest input.

    Indices are sorted by length (longest first, so a memory problem shows in the first batch,
    not after minutes of work) and a batch grows while ``longest * count <= max_batch_tokens`` and
    ``count <= max_batch_size``. An input longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        size = lengths[index]
        widest = max(longest, size)
        if current and (widest * (len(current) + 1) > max_batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current, widest = [], size
        current.append(index)
        longest = widest
    if current:
        batches.append(current)
    return batches


def default_max_batch_tokens(device_type: str) -> int:
    """Padded tokens per forward pass when the operator sets none.

    A CPU's cost is close to linear in padded tokens and gains little from wide batches, so narrow
    batches, which span fewer lengths and so pad less, win: all-MiniLM-L6-v2 on 2 cores, windows of
    16 mixed texts, ran at 40 texts/s with 512 and 29 with 2,048 (README, Performance). A GPU needs
    wide batches to fill its cores.
    """
    return {"cpu": 512, "mps": 8192}.get(device_type, 16384)


# The life of a queued input. Containers that keep inputs in arrival order skip taken and removed
# ones lazily (a cursor past the front), so removing one from the middle costs O(1).
_QUEUED, _TAKEN, _REMOVED = 0, 1, 2


class QueuedInput:
    """One input of ``length`` tokens, as a :class:`BatchQueue` holds it. Callers subclass it to
    carry their own fields (one object per input: a long queue is mostly these)."""

    __slots__ = ("flow", "length", "state", "tag")

    def __init__(self, length: int) -> None:
        self.length = length
        self.state = _QUEUED
        self.flow: Flow | None = None  # set by BatchQueue.add; changed by BatchQueue.move
        # Its flow's served + queued tokens when it was added: the flow's virtual time at which it
        # starts, so ``tag - flow.served`` estimates the flow's tokens still ahead of it.
        self.tag = 0

    @property
    def queued(self) -> bool:
        """Still in the queue: neither taken into a batch nor removed."""
        return self.state == _QUEUED


Q = TypeVar("Q", bound=QueuedInput)


class Flow:
    """One caller's share of a :class:`BatchQueue` (one ``embed`` call), within one tenant.

    Get one from :meth:`BatchQueue.flow`. It is registered with the queue only while it has queued
    inputs: a caller whose inputs were all deduplicated, taken or withdrawn leaves no trace.
    """

    __slots__ = ("cursor", "first", "group", "more", "queued", "seq", "served", "tenant", "tokens", "version")

    def __init__(self, tenant: str, seq: int) -> None:
        self.tenant = tenant
        self.seq = seq
        self.served = 0  # tokens taken for compute since it was registered: its virtual time
        self.queued = 0  # its inputs still queued
        self.tokens = 0  # their tokens
        self.version = 0  # bumped whenever it is re-ranked: older heap entries are stale
        self.group: _Tenant | None = None  # its tenant's registration, while it has queued inputs
        # Its inputs in arrival order: the first alone (most callers send one text, and a list
        # each would be that many more objects to allocate and collect), the rest in a list with a
        # cursor before which none is queued. An input moved to another flow (BatchQueue.move)
        # stays here, skipped: an entry counts only while its input is queued *and* in this flow.
        self.first: QueuedInput | None = None
        self.more: list[QueuedInput] | None = None
        self.cursor = 0

    @property
    def registered(self) -> bool:
        return self.group is not None

    def forget(self) -> None:
        self.group, self.first, self.more, self.cursor, self.queued, self.tokens = None, None, None, 0, 0, 0


@dataclass(eq=False, slots=True)
class _Tenant:
    """A tenant with queued inputs, and its flows by need (a heap with lazy invalidation)."""

    name: str
    seq: int
    served: int
    queued: int = 0
    tokens: int = 0  # of its queued inputs
    version: int = 0
    registered: bool = True
    flows: int = 0  # registered flows
    heap: list[tuple[int, int, int, Flow]] = field(default_factory=list)  # (served, seq, version, flow)


class _Run:
    """Queued inputs of one flow and one length beyond the first, oldest first (an input moved
    away and back appears twice: the first entry found takes it, the other is then skipped)."""

    __slots__ = ("cursor", "inputs", "live")

    def __init__(self, inputs: list[QueuedInput]) -> None:
        self.inputs = inputs
        self.cursor = 0  # inputs before it are no longer queued
        self.live = len(inputs)  # how many are queued


@dataclass(slots=True)
class _Plan:
    """One :meth:`BatchQueue.take` in progress."""

    flow: Flow  # the neediest flow: its inputs go first at every length, then its tenant's
    tenant: _Tenant  # (kept here: the flow is unregistered once its last input is taken)
    batch: list[QueuedInput] = field(default_factory=list)
    emptied: list[int] = field(default_factory=list)  # lengths whose bucket the plan emptied
    touched: dict[Flow, _Tenant] = field(default_factory=dict)  # whom it charged


class _Ranked(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def registered(self) -> bool: ...


_R = TypeVar("_R", bound=_Ranked)


def _top(heap: list[tuple[int, int, int, _R]]) -> tuple[_R | None, int]:
    """The least-served registered tenant or flow of ``heap`` and how many stale entries it dropped.

    A heap entry is current while its node is registered and has not been re-ranked since; the
    rest are dropped when they reach the top (lazy invalidation: no search to remove them).
    """
    dropped = 0
    while heap:
        _, _, version, node = heap[0]
        if node.registered and node.version == version:
            return node, dropped
        heapq.heappop(heap)
        dropped += 1
    return None, dropped


def _compact(heap: list[tuple[int, int, int, _R]], live: int) -> None:
    """Rebuild ``heap`` from its current entries once stale ones outnumber them, bounding memory."""
    if len(heap) > 2 * live + 64:
        heap[:] = [entry for entry in heap if entry[3].registered and entry[3].version == entry[2]]
        heapq.heapify(heap)


# length -> tenant -> flow -> its inputs of that length: the input itself when it is the only one
# (no container for the common one-text caller), else a _Run. Insertion-ordered at each level by an
# OrderedDict: O(1) removal anywhere and O(1) access to the oldest. A plain dict's first item costs
# a scan over the slots its deletions left: emptying 100,000 keys from the front took 3.6 s, 0.03 s
# with an OrderedDict.
_Flows = OrderedDict[Flow, QueuedInput | _Run]
_Bucket = OrderedDict[_Tenant, _Flows]


class BatchQueue(Generic[Q]):
    """Queued inputs, by length and by who is owed compute; :meth:`take` plans the next batch.

    Fairness is start-time fair queueing over tokens, across tenants first, then across the flows
    of a tenant. Each tenant and flow has ``served``: the tokens of its inputs taken for compute
    while it had queued work. A newcomer starts at the least-served registered peer's count, so it
    neither jumps ahead of peers that waited nor queues behind all they were already given. A
    tenant or flow is forgotten when its last queued input is taken or withdrawn, so one that comes
    back later starts afresh, never from a stale count; withdrawn inputs were never computed and
    are never counted.

    :meth:`take` builds the batch around the neediest flow's oldest input (length ``L``): first
    more inputs of length ``L``, then of the nearest shorter and longer lengths, taking at each
    step the side that adds less padding, while ``longest * count <= max_batch_tokens`` and
    ``count <= max_batch_size``. Within one length the neediest flow's inputs go first, then its
    tenant's, then other tenants', oldest first. Each batch is thus a run of neighbouring lengths
    padded only to its own longest, as if the whole queue had been sorted, without sorting it.

    Cost: inputs sit in length buckets (a dict by length plus a sorted list of the distinct
    lengths), tenants and flows in heaps keyed by ``served``. :meth:`add` and :meth:`remove` cost
    O(log n) and :meth:`take` O(batch size x log n), however long the queue; :attr:`examined`
    counts the inputs, lengths and heap entries that planning looked at, to check that.

    Inputs are charged when taken, not when their pass ends, so that a caller planning the next
    batch while the current one runs (a pipelined engine) already sees the order it should.

    Shared inputs (the micro-batcher computes identical texts once): an input belongs to one flow,
    charged when it is taken, but other callers may wait for it. :meth:`join` moves it to a joining
    caller's flow when it would start sooner there than where it is, so that joining never makes a
    caller wait longer than its own turn (a query equal to the last text of a bulk ingest is served
    at the query's pace, not the ingest's); :meth:`rehome` moves it to one of the callers still
    waiting when its flow's caller leaves. Both cost O(log n), like :meth:`add`.
    """

    def __init__(self, max_batch_tokens: int, max_batch_size: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.examined = 0
        self._seq = 0
        self._queued = 0
        self._buckets: dict[int, _Bucket] = {}
        self._lengths: list[int] = []  # the keys of _buckets, ascending
        self._tenants: dict[str, _Tenant] = {}
        self._heap: list[tuple[int, int, int, _Tenant]] = []  # (served, seq, version, tenant)

    def __len__(self) -> int:
        """Inputs queued (not yet taken or removed)."""
        return self._queued

    def flow(self, tenant: str = "") -> Flow:
        """A handle for one caller's inputs; it takes part in fairness once it queues one."""
        self._seq += 1
        return Flow(tenant, self._seq)

    def add(self, item: Q, flow: Flow) -> None:
        """Queue ``item`` for ``flow``; O(log n)."""
        tenant = flow.group if flow.group is not None else self._register(flow)
        item.flow = flow
        item.tag = flow.served + flow.tokens
        length = item.length
        bucket = self._buckets.get(length)
        if bucket is None:
            bucket = self._buckets[length] = OrderedDict()
            self._lengths.insert(bisect_left(self._lengths, length), length)
        flows = bucket.get(tenant)
        if flows is None:
            flows = bucket[tenant] = OrderedDict()
        held = flows.get(flow)
        if held is None:
            flows[flow] = item
        elif isinstance(held, _Run):
            held.inputs.append(item)
            held.live += 1
        else:
            flows[flow] = _Run([held, item])
        if flow.first is None and not flow.queued:
            flow.first = item
        elif flow.more is None:
            flow.more = [item]
        else:
            flow.more.append(item)
        flow.queued += 1
        flow.tokens += length
        tenant.queued += 1
        tenant.tokens += length
        self._queued += 1

    def remove(self, item: Q) -> bool:
        """Withdraw ``item`` if it is still queued (True); it was never computed, so never counted."""
        if item.state != _QUEUED:
            return False
        item.state = _REMOVED
        self._detach(item)
        return True

    def move(self, item: Q, flow: Flow) -> bool:
        """Move queued ``item`` to ``flow``, as its newest input (True if it moved); O(log n).

        Its old flow is no longer charged for it nor waits for it (and is forgotten if that was its
        last queued input); ``flow`` is registered if it was not.
        """
        if item.state != _QUEUED or item.flow is flow:
            return False
        self._detach(item)
        self.add(item, flow)
        return True

    def join(self, item: Q, flow: Flow) -> bool:
        """``flow``'s caller waits for queued ``item`` too (an identical input it did not queue
        again): move ``item`` to ``flow`` if it would start sooner there (True); O(log n)."""
        if item.state != _QUEUED or item.flow is flow or self._start_in(flow) >= self._start(item):
            return False
        return self.move(item, flow)

    def rehome(self, item: Q, flows: Sequence[Flow]) -> bool:
        """Move queued ``item`` to whichever of ``flows`` (the callers still waiting for it, once its
        own flow's caller has left) it would start soonest in (True if it moved); O(len(flows) log n).
        """
        if item.state != _QUEUED:
            return False
        best: Flow | None = None
        soonest = 0
        for flow in flows:
            if flow is item.flow:
                continue
            start = self._start_in(flow)
            if best is None or start < soonest:
                best, soonest = flow, start
        return best is not None and self.move(item, best)

    def _start(self, item: QueuedInput) -> int:
        """Estimated tenant-level virtual time at which queued ``item`` starts where it is: its
        tenant's served count plus the tokens of its tenant ahead of it (its flow's, times the
        tenant's flows taking turns with it, at most all the tenant's)."""
        flow = item.flow
        assert flow is not None
        tenant = flow.group
        assert tenant is not None, "a queued input's flow is registered"
        ahead = min(max(0, item.tag - flow.served), flow.tokens - item.length)
        return tenant.served + min(tenant.tokens - item.length, ahead * tenant.flows)

    def _start_in(self, flow: Flow) -> int:
        """The same estimate for an input appended to ``flow`` now (registering it if needed)."""
        tenant = flow.group
        if tenant is not None:
            return tenant.served + min(tenant.tokens, flow.tokens * tenant.flows)
        tenant = self._tenants.get(flow.tenant)
        if tenant is not None:  # a new flow starts as the neediest of its tenant's
            return tenant.served
        least, dropped = _top(self._heap)  # a new tenant starts as the neediest
        self.examined += dropped
        return least.served if least is not None else 0

    def _detach(self, item: QueuedInput) -> None:
        """Take queued ``item`` out of its bucket and its flow's and tenant's counts."""
        flow = item.flow
        assert flow is not None
        tenant = flow.group
        assert tenant is not None, "a queued input's flow is registered"
        bucket = self._buckets[item.length]
        flows = bucket[tenant]
        held = flows[flow]
        if isinstance(held, _Run):
            held.live -= 1
        if held is item or (isinstance(held, _Run) and not held.live):
            del flows[flow]
            if not flows:
                del bucket[tenant]
                if not bucket:
                    del self._buckets[item.length]
                    del self._lengths[bisect_left(self._lengths, item.length)]
        self._unqueue(item)

    def take(self) -> list[Q]:
        """Plan and dequeue the next batch, longest input first ([] when nothing is queued)."""
        tenant, dropped = _top(self._heap)
        self.examined += dropped
        if tenant is None:
            return []
        flow, dropped = _top(tenant.heap)
        self.examined += dropped
        assert flow is not None, "a registered tenant has a registered flow"
        anchor = self._oldest(flow).length
        budget, size = self.max_batch_tokens, self.max_batch_size
        plan = _Plan(flow, tenant)
        # An input longer than the whole budget still gets a batch of its own.
        self._fill(anchor, max(1, min(size, budget // anchor)), plan)
        lengths = self._lengths
        longest = anchor
        index = bisect_left(lengths, anchor)
        shorter, longer = index - 1, index + 1
        while len(plan.batch) < size:
            count = len(plan.batch)
            # The padding each side adds: a shorter input is padded up to the longest; a longer
            # one pads every input already in the batch up to itself.
            down = longest - lengths[shorter] if shorter >= 0 and longest * (count + 1) <= budget else None
            up = None
            if longer < len(lengths) and lengths[longer] * (count + 1) <= budget:
                up = (lengths[longer] - longest) * count
            self.examined += 1
            if down is not None and (up is None or down <= up):
                self._fill(lengths[shorter], min(size, budget // longest) - count, plan)
                shorter -= 1
            elif up is not None:
                longest = lengths[longer]
                self._fill(longest, min(size, budget // longest) - count, plan)
                longer += 1
            else:
                break
        for length in plan.emptied:  # only now: the walk above indexes the list
            del lengths[bisect_left(lengths, length)]
        self._rerank(plan.touched)
        batch = cast("list[Q]", plan.batch)  # every input was added (as a Q) by add()
        batch.sort(key=lambda item: item.length, reverse=True)  # a memory problem shows in the longest
        return batch

    # --- inside -------------------------------------------------------------------------------
    def _oldest(self, flow: Flow) -> QueuedInput:
        """``flow``'s oldest queued input (a registered flow has one)."""
        first = flow.first
        if first is not None:
            if first.state == _QUEUED and first.flow is flow:
                return first
            flow.first = None
        more = flow.more
        assert more is not None, "a registered flow has a queued input"
        cursor = flow.cursor
        # Skip inputs taken into other flows' batches, withdrawn, or moved to another flow.
        while more[cursor].state != _QUEUED or more[cursor].flow is not flow:
            cursor += 1
            self.examined += 1
        flow.cursor = cursor
        return more[cursor]

    def _register(self, flow: Flow) -> _Tenant:
        tenant = self._tenants.get(flow.tenant)
        if tenant is None:
            least, dropped = _top(self._heap)
            self.examined += dropped
            self._seq += 1
            tenant = _Tenant(flow.tenant, self._seq, served=least.served if least is not None else 0)
            self._tenants[flow.tenant] = tenant
            heapq.heappush(self._heap, (tenant.served, tenant.seq, tenant.version, tenant))
        least_flow, dropped = _top(tenant.heap)
        self.examined += dropped
        flow.served = least_flow.served if least_flow is not None else 0
        flow.version += 1
        flow.group = tenant
        tenant.flows += 1
        heapq.heappush(tenant.heap, (flow.served, flow.seq, flow.version, flow))
        return tenant

    def _fill(self, length: int, room: int, plan: _Plan) -> None:
        """Move up to ``room`` queued inputs of ``length`` into the plan's batch: its flow's first,
        then its tenant's, then other tenants' in the order they came."""
        bucket = self._buckets.get(length)
        if bucket is None or room <= 0:
            return
        tenant = plan.tenant
        if (own := bucket.get(tenant)) is not None:
            room = self._fill_flows(own, plan.flow, room, plan)
            if not own:
                del bucket[tenant]
        while room and bucket:
            other, flows = next(iter(bucket.items()))
            room = self._fill_flows(flows, None, room, plan)
            if flows:
                break
            del bucket[other]
        if not bucket:
            del self._buckets[length]
            plan.emptied.append(length)

    def _fill_flows(self, flows: _Flows, first: Flow | None, room: int, plan: _Plan) -> int:
        if first is not None and first in flows:
            room = self._fill_flow(flows, first, room, plan)
        while room and flows:
            room = self._fill_flow(flows, next(iter(flows)), room, plan)
        return room

    def _fill_flow(self, flows: _Flows, flow: Flow, room: int, plan: _Plan) -> int:
        """Take up to ``room`` of ``flow``'s inputs held in ``flows``; drop its entry once empty."""
        held = flows[flow]
        if not isinstance(held, _Run):
            del flows[flow]
            self.examined += 1
            self._taken(held, plan)
            return room - 1
        inputs = held.inputs
        while room and held.live:
            item = inputs[held.cursor]
            held.cursor += 1
            self.examined += 1
            if item.state == _QUEUED and item.flow is flow:
                held.live -= 1
                room -= 1
                self._taken(item, plan)
        if not held.live:
            del flows[flow]
        return room

    def _taken(self, item: QueuedInput, plan: _Plan) -> None:
        item.state = _TAKEN
        plan.batch.append(item)
        flow = item.flow
        assert flow is not None
        tenant = flow.group
        assert tenant is not None
        # Served means taken for compute: charged now, so the next plan already counts it.
        flow.served += item.length
        tenant.served += item.length
        plan.touched[flow] = tenant
        self._unqueue(item)

    def _unqueue(self, item: QueuedInput) -> None:
        """One input fewer queued: a flow or tenant with none left is forgotten."""
        self._queued -= 1
        flow = item.flow
        assert flow is not None
        tenant = flow.group
        assert tenant is not None
        flow.queued -= 1
        flow.tokens -= item.length
        tenant.queued -= 1
        tenant.tokens -= item.length
        if not flow.queued:
            flow.forget()
            tenant.flows -= 1
        if not tenant.queued:
            tenant.registered = False
            del self._tenants[tenant.name]
        if not self._queued:  # nothing queued: every heap entry left is stale
            self._heap.clear()

    def _rerank(self, touched: dict[Flow, _Tenant]) -> None:
        """Push the new ``served`` of every flow and tenant a batch charged that is still registered."""
        tenants: dict[_Tenant, None] = {}
        for flow, tenant in touched.items():
            if tenant.registered:
                tenants[tenant] = None
                if flow.group is tenant:
                    flow.version += 1
                    heapq.heappush(tenant.heap, (flow.served, flow.seq, flow.version, flow))
        for tenant in tenants:
            tenant.version += 1
            heapq.heappush(self._heap, (tenant.served, tenant.seq, tenant.version, tenant))
            _compact(tenant.heap, tenant.flows)
        _compact(self._heap, len(self._tenants))
