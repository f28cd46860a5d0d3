"""The micro-batcher's bookkeeping of inputs in flight: who waits for what.

Concurrent callers often send the same text (a popular query, a retried request). The batcher
computes it once: one ``_Item`` per distinct (output kinds, text) in flight, queued in the
:class:`~encoder.batch_queue.BatchQueue` as a :class:`~encoder.queue_records.QueuedInput`, and
every call that waits for it is one of its waiters. Each ``embed`` call is one ``_Call``: a single
future for all of its distinct inputs, completed when the last of them is answered, or failed by
the first that fails.

Kept small on purpose, because a long queue is mostly these objects: the first waiter is held
inline (almost every item has exactly one), the rest in an insertion-ordered dict, and both
classes use ``__slots__`` (the numbers are in ``_Call``'s docstring).
"""

from __future__ import annotations

import asyncio
from itertools import islice

from encoder.kinds import OutputKind, Outputs
from encoder.queue_records import Flow, QueuedInput

__all__: list[str] = []


class _Call:
    """One ``embed`` call waiting for its distinct inputs: a single future for all of them.

    (Not a future per input shielded per waiter: that, with per-input containers in the queue,
    made 37 objects for the garbage collector to walk per queued one-text caller, now 16; serving
    100,000 queued callers went from about 10 s to about 5 s on 2 cores.)
    """

    __slots__ = ("flow", "future", "missing")

    def __init__(self, future: asyncio.Future[None], flow: Flow) -> None:
        self.future = future
        self.flow = flow  # its share of the queue: where an input it waits for may move
        self.missing = 0  # its distinct inputs not yet answered

    def answered(self) -> None:
        self.missing -= 1
        if not self.missing and not self.future.done():
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _Item(QueuedInput):
    """One distinct input in flight: queued, then in the worker's window, then answered.

    Identical inputs of concurrent calls share one item; each call waiting for it is a waiter
    (the first kept inline: almost every item has exactly one).
    """

    __slots__ = ("error", "first", "kinds", "more", "outputs", "queued_tokens", "text", "token_ids")

    def __init__(self, text: str, token_ids: list[int], kinds: frozenset[OutputKind], call: _Call) -> None:
        super().__init__(len(token_ids))
        self.text = text
        self.token_ids = token_ids
        self.kinds = kinds
        self.first: _Call | None = call
        self.more: dict[_Call, None] | None = None
        call.missing += 1
        self.outputs: Outputs | None = None
        self.error: BaseException | None = None
        self.queued_tokens = len(token_ids)  # its share of ``queue_tokens``, until computed or dropped

    @property
    def key(self) -> tuple[frozenset[OutputKind], str]:
        return (self.kinds, self.text)

    @property
    def done(self) -> bool:
        return self.outputs is not None or self.error is not None

    @property
    def wanted(self) -> bool:
        """Someone still waits for it (an item nobody waits for is not joined, and not computed)."""
        return self.first is not None or bool(self.more)

    def join(self, call: _Call) -> None:
        if call is self.first or (self.more is not None and call in self.more):
            return  # the same text twice in one call: one wait
        call.missing += 1
        if self.first is None:
            self.first = call
        else:
            if self.more is None:
                self.more = {}
            self.more[call] = None

    def leave(self, call: _Call) -> None:
        if call is self.first:
            self.first = None
        elif self.more is not None:
            self.more.pop(call, None)

    def waiters(self) -> list[_Call]:
        calls = [] if self.first is None else [self.first]
        return calls + list(self.more) if self.more else calls

    def some_waiters(self, most: int) -> list[_Call]:
        """Up to ``most`` of its waiters, the earliest first (a bounded look, however many wait)."""
        calls = [] if self.first is None else [self.first]
        if self.more:
            calls.extend(islice(self.more, most - len(calls)))
        return calls
