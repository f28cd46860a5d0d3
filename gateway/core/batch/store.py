"""Where batches' state and work queue live: the :class:`JobStore` protocol and what it trades in.

Two stores keep it: :class:`~gateway.core.batch.redis_store.RedisJobs` (Redis Streams with a
consumer group, for replicas) and :class:`~gateway.core.batch.local_store.LocalJobs` (the batch
folder, for one server without Redis). The runner and the routes see only this protocol.

The rules both keep, which make "nothing lost, nothing doubled" hold:

* a chunk's outcome (:class:`ChunkDone`) is recorded by chunk number, so recording it twice (a
  chunk redone after its first holder was thought dead) changes nothing;
* a status changes only from the states a transition names (compare and set), so a cancel and a
  finalisation racing on two replicas cannot both win;
* a claimed chunk whose holder stops renewing its claim for ``claim_idle_s`` is given to another.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import msgspec

from gateway.core.batch.schemas import BatchRecord, RequestCounts

__all__ = ["ChunkDone", "Claim", "JobStore", "add_counts"]


class Claim(msgspec.Struct, frozen=True):
    """One chunk a runner holds: which batch, which chunk, and the store's handle to release it."""

    batch_id: str
    chunk: int
    handle: str  # the stream entry id (Redis), or the chunk's own name (folder)


class ChunkDone(msgspec.Struct, frozen=True, array_like=True):
    """A chunk's outcome: its lines that were answered with a 200, failed, or expired unrun."""

    completed: int = 0
    failed: int = 0
    expired: bool = False
    attempt: str = ""  # names the part files this run wrote: the first recorded run's are joined


def add_counts(total: int, outcomes: Collection[ChunkDone]) -> RequestCounts:
    return RequestCounts(
        total=total,
        completed=sum(one.completed for one in outcomes),
        failed=sum(one.failed for one in outcomes),
    )


class JobStore(Protocol):
    async def start(self) -> None:
        """Connect and create what must exist (the consumer group)."""

    async def close(self) -> None: ...

    async def create(self, record: BatchRecord) -> None:
        """Keep ``record`` and queue its ``record.chunks`` chunks."""

    async def get(self, batch_id: str) -> BatchRecord | None: ...

    async def page(self, owner: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """``owner``'s batches, newest first, after the one named ``after``; and whether more follow."""

    async def transition(self, batch_id: str, to: str, *, allowed: Collection[str], **fields: object) -> bool:
        """Set the status to ``to`` (and its ``{to}_at`` time, and ``fields``) if it is one of ``allowed``."""

    async def claim(self, consumer: str, *, idle_s: float, wait_s: float) -> Claim | None:
        """A chunk to run: one whose holder went silent for ``idle_s`` first, else a new one (waiting up
        to ``wait_s`` for one); None if there is none."""

    async def keep(self, claim: Claim, consumer: str) -> None:
        """Renew the claim (the holder is alive)."""

    async def finish(self, claim: Claim, done: ChunkDone) -> None:
        """Record the chunk's outcome and release it."""

    async def release(self, claim: Claim, consumer: str) -> None:
        """Give an unfinished chunk back at once (this runner stops), for any runner to take;
        nothing if another runner holds it now."""

    async def outcomes(self, batch_id: str) -> dict[int, ChunkDone]:
        """The outcomes recorded so far, by chunk."""

    async def active(self) -> list[str]:
        """Batches not yet in a final state."""

    async def lock(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        """Take the batch's finalisation for ``ttl_s`` (True), unless another holder has it."""

    async def unlock(self, batch_id: str, holder: str) -> None:
        """Free the batch's finalisation, if ``holder`` still has it."""
