"""One batch on its way through the forward thread, and how long such passes take.

The micro-batcher hands each batch to a single forward thread as a ``_Pass``: its items, the
pending result, when the thread began it and how long it took. The thread computes only the items
someone still waits for (a pipelined batch is handed over early, and its callers may leave while it
waits behind the pass before it). ``_PassTimes`` keeps the smoothed duration of a pass by size, so
the next batch may linger for more inputs only until the running pass is about to end.
``_retrieved`` reads every pass's outcome, so an abandoned one never logs "Future exception was
never retrieved".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from encoder.inflight_inputs import _Item

__all__: list[str] = []


def _retrieved(future: asyncio.Future[object]) -> None:
    """Read a pass's outcome, so one nobody awaits any more (the batcher stopped, or crashed and
    failed its callers) never logs "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class _Pass:
    """One batch handed to the forward thread: its items, the pending result and when it ran."""

    __slots__ = ("computed", "future", "items", "padded", "seconds", "started", "tokens")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.computed: list[_Item] | None = None  # those still wanted when the pass began
        self.tokens = sum(item.queued_tokens for item in items)
        self.padded = len(items) * max(item.length for item in items)
        self.future: asyncio.Future[object] = cast("asyncio.Future[object]", None)
        self.started: float | None = None  # set by the forward thread when the pass begins
        self.seconds = 0.0

    def run(self, plan: Callable[[list[_Item]], tuple[Callable[..., object], tuple[object, ...]]]) -> object:
        """In the forward thread: compute the items someone still waits for (``plan`` says how),
        noting when the pass began and how long it took. An item whose callers all left while the
        pass waited behind another is not computed: a pipelined batch is handed over early, but
        what nobody wants never reaches the model."""
        self.started = time.perf_counter()
        try:
            self.computed = [item for item in self.items if item.wanted]
            if not self.computed:
                return None
            work, args = plan(self.computed)
            return work(*args)
        finally:
            self.seconds = time.perf_counter() - self.started


class _PassTimes:
    """Smoothed seconds per pass, by size (padded tokens, in powers of two): a pass of one short
    text and one of a full budget differ many-fold on a GPU, and the linger must end before the
    pass it waits beside."""

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def add(self, padded: int, seconds: float) -> None:
        size = padded.bit_length()
        known = self._seconds.get(size)
        self._seconds[size] = seconds if known is None else 0.8 * known + 0.2 * seconds

    def expect(self, padded: int) -> float:
        """The expected seconds of a pass of ``padded`` tokens: its size's, else the nearest size
        measured, else 0 (nothing measured: no linger)."""
        if not self._seconds:
            return 0.0
        size = padded.bit_length()
        nearest = min(self._seconds, key=lambda known: (abs(known - size), known))
        return self._seconds[nearest]
