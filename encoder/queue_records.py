"""The records a :class:`~encoder.batch_queue.BatchQueue` keeps, and the heaps that rank them.

The micro-batcher's queue is a handful of small, slotted objects kept in a few containers; this
module holds those objects, so that :mod:`encoder.batch_queue` can be read as the algorithm alone:

* :class:`QueuedInput` - one input and its life (queued, taken, removed); callers subclass it;
* :class:`Flow` - one caller's share of the queue, within one tenant;
* ``_Tenant`` - a tenant with queued inputs, and its flows in a heap by tokens served;
* ``_Run`` and ``_Plan`` - a flow's inputs of one length, and one :meth:`BatchQueue.take` in
  progress;
* ``_top`` and ``_compact`` - the lazily invalidated heaps that find the least-served tenant or flow
  without ever searching a heap to remove an entry.

Why objects with ``__slots__`` and no containers for the common case: a long queue is mostly these
records, one or two per queued input, and every one is an allocation and something for the garbage
collector to walk (see the comments below for what each choice saved).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = ["BACKGROUND_COST", "BACKGROUND_TENANT", "Flow", "QueuedInput"]

# The background tenant (OpenAI Batch API work): no API key's name can equal it (key names are
# stripped, so never start with a space). It is charged BACKGROUND_COST tokens of virtual time per
# token computed, so an interactive tenant with queued work gets 16 times its tokens (16/17 of the
# compute against one), and it loses every tie (BatchQueue gives it a tenant seq _BACKGROUND_SEQ
# above any interactive one's). See BatchQueue's docstring.
BACKGROUND_TENANT = " batch"
BACKGROUND_COST = 16
_BACKGROUND_SEQ = 2**40


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
    cost: int = 1  # virtual time charged per token computed: BACKGROUND_COST for the background tenant
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
