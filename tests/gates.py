"""Fault injection around the *real* encoder: hold its forward thread, or make chosen inputs fail.

``GatedEncoder`` is handed to ``MicroBatcher`` or ``create_app`` in place of the encoder (the public
way in); everything it does not override goes to the real encoder. ``Recorder`` is a
``BatchObserver`` that counts what the batcher reports.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import numpy as np

from encoder import Encoder
from encoder.batcher import BatcherEvent, BatchReport, MicroBatcher


class GatedEncoder:
    """Delegates to a real encoder; ``encode`` waits for ``gate`` and may raise for chosen inputs."""

    def __init__(self, encoder: Encoder, poison_length: int | None = None) -> None:
        self.inner = encoder
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[int]] = []
        self.poison_length = poison_length

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, token_ids: list[list[int]]) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.calls.append([len(ids) for ids in token_ids])
        if self.poison_length is not None and any(len(ids) == self.poison_length for ids in token_ids):
            raise MemoryError("simulated out of memory")
        return self.inner.encode(token_ids)


class Recorder:
    """A BatchObserver that remembers every report and counts every event."""

    def __init__(self) -> None:
        self.reports: list[BatchReport] = []
        self.events: Counter[BatcherEvent] = Counter()

    def batch_done(self, report: BatchReport) -> None:
        self.reports.append(report)

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        self.events[event] += count

    @property
    def batches(self) -> int:
        return len(self.reports)

    @property
    def inputs(self) -> int:
        return sum(report.size for report in self.reports)


async def embed_dense(batcher: MicroBatcher, texts: list[str]) -> np.ndarray:
    """Tokenise and embed ``texts`` through ``batcher``: their dense vectors, stacked."""
    results = await batcher.embed(texts, await batcher.tokenize(texts))
    return np.stack([result.dense for result in results])


async def hold_forward_thread(
    batcher: MicroBatcher, gated: GatedEncoder, text: str = "hold the thread"
) -> asyncio.Task[np.ndarray]:
    """Close the gate and start one request of ``text``, returning once the forward thread is stuck
    in it: everything submitted from now on queues behind that pass."""
    gated.gate.clear()
    blocker = asyncio.create_task(embed_dense(batcher, [text]))
    await asyncio.to_thread(gated.entered.wait, 10)
    return blocker
