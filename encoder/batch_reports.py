"""What the micro-batcher tells the rest of the server: pass reports, queue events, a log line.

The batcher keeps no statistics of its own beyond what it needs to run (its queue, its token count,
a smoothed rate for Retry-After). Everything else is reported as it happens, to a
:class:`BatchObserver` (the gateway's telemetry turns the reports into metrics):

* :class:`BatchReport` - what one forward pass did: inputs, real and padded tokens, seconds;
* :class:`BatcherEvent` - what the queue did besides running batches (deduplicated, dropped,
  rejected, failed, split on out-of-memory, worker restarted), each counted;
* ``_Unobserved`` - the observer used when none is given: it ignores everything;
* ``_Summary`` - one INFO line per interval on the ``encoder.batcher`` logger, the logs' view of
  batching (batches, inputs per batch, padding, queue).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BatchObserver", "BatchReport", "BatcherEvent"]

logger = logging.getLogger("encoder.batcher")  # the batcher's logger: its summary lines are the batcher's


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one forward pass did, for stats, metrics and logs."""

    size: int
    tokens: int  # real tokens
    padded_tokens: int  # size * longest: the work actually done
    seconds: float


class BatcherEvent(enum.StrEnum):
    """Things the queue did besides running batches, each counted by the observer."""

    DEDUPLICATED = "deduplicated"  # an input joined an identical one already in flight
    DROPPED = "dropped"  # an input whose callers all left, skipped before compute
    REJECTED = "rejected"  # a call refused because the queue was full
    FAILED = "failed"  # an input that failed even alone
    OOM_SPLIT = "oom_split"  # a batch split in halves after running out of memory
    WORKER_RESTARTED = "worker_restarted"  # the worker crashed and was replaced


class BatchObserver(Protocol):
    """Where the batcher reports what it did. Called on the event loop; must be quick."""

    def batch_done(self, report: BatchReport) -> None: ...

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None: ...


class _Unobserved:
    def batch_done(self, report: BatchReport) -> None:
        pass

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        pass


@dataclass(slots=True)
class _Summary:
    """One INFO line per interval while batches run: the logs' view of batching."""

    started: float = 0.0
    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    padded: int = 0

    def add(self, report: BatchReport, queue_tokens: int, interval_s: float) -> None:
        logger.debug(
            "batch size=%d tokens=%d padded=%d ms=%.1f",
            report.size,
            report.tokens,
            report.padded_tokens,
            report.seconds * 1e3,
        )
        now = time.monotonic()
        if not self.started:
            self.started = now
        self.batches += 1
        self.inputs += report.size
        self.tokens += report.tokens
        self.padded += report.padded_tokens
        if now - self.started < interval_s:
            return
        logger.info(
            "encoder: %d batches, avg %.1f inputs and %.0f padded tokens each, padding %.1f%%, queue %d tokens",
            self.batches,
            self.inputs / self.batches,
            self.padded / self.batches,
            100 * (1 - self.tokens / max(1, self.padded)),
            queue_tokens,
        )
        self.started, self.batches, self.inputs, self.tokens, self.padded = now, 0, 0, 0, 0
