"""The micro-batcher's queue: :class:`BatchQueue`, fair across callers, planning one batch at a time.

Inputs arrive and leave all the time (callers come, are answered, give up), so the whole queue is
never sorted: :meth:`BatchQueue.take` plans just the next batch, around the caller owed the most
compute, from length buckets, at a cost that does not depend on how much is queued. Its docstring
says how; the records it keeps (inputs, flows, tenants and their heaps) live in
:mod:`encoder.queue_records`, and the one-shot planner for a whole known list,
:func:`encoder.packing.plan_batches`, in :mod:`encoder.packing`.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar, cast

from encoder.queue_records import (
    _BACKGROUND_SEQ,
    _QUEUED,
    _REMOVED,
    _TAKEN,
    BACKGROUND_COST,
    BACKGROUND_TENANT,
    Flow,
    QueuedInput,
    _Bucket,
    _compact,
    _Flows,
    _Plan,
    _Run,
    _Tenant,
    _top,
)

__all__ = ["BACKGROUND_COST", "BACKGROUND_TENANT", "BatchQueue"]

Q = TypeVar("Q", bound=QueuedInput)


class BatchQueue(Generic[Q]):
    """Queued inputs, by length and by who is owed compute; :meth:`take` plans the next batch.

    Fairness is start-time fair queueing over tokens, across tenants first, then across the flows
    of a tenant. Each tenant and flow has ``served``: the tokens of its inputs taken for compute
    while it had queued work. A newcomer starts at the least-served registered peer's count, so it
    neither jumps ahead of peers that waited nor queues behind all they were already given. A
    tenant or flow is forgotten when its last queued input is taken or withdrawn, so one that comes
    back later starts afresh, never from a stale count; withdrawn inputs were never computed and
    are never counted.

    The background tenant, :data:`BACKGROUND_TENANT` (Batch API work), runs below interactive
    traffic yet keeps the device busy: not gated (that would starve it), it is charged
    :data:`BACKGROUND_COST` (16) times its tokens, so each interactive tenant with queued work gets
    16 times its share, and it loses ties (its ``seq`` is 2**40 above any other's). Its flows are
    charged plain tokens and share its turns fairly; the same heaps serve it, at the same costs.

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
        return tenant.served + min(tenant.tokens - item.length, ahead * tenant.flows) * tenant.cost

    def _start_in(self, flow: Flow) -> int:
        """The same estimate for an input appended to ``flow`` now (registering it if needed)."""
        tenant = flow.group
        if tenant is not None:
            return tenant.served + min(tenant.tokens, flow.tokens * tenant.flows) * tenant.cost
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
            served = least.served if least is not None else 0
            if flow.tenant == BACKGROUND_TENANT:  # loses ties, pays BACKGROUND_COST per token
                tenant = _Tenant(flow.tenant, self._seq + _BACKGROUND_SEQ, served, cost=BACKGROUND_COST)
            else:
                tenant = _Tenant(flow.tenant, self._seq, served)
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
        flow.served += item.length  # plain tokens: a tenant's flows share its turns fairly
        tenant.served += item.length * tenant.cost
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
