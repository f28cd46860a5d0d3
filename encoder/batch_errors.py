"""The errors a :class:`~encoder.batcher.MicroBatcher` call can end in, besides its results.

Three outcomes, each with its own answer upstream (the gateway maps them to HTTP statuses):

* :class:`QueueFullError` - refused before anything queued, with a ``retry_after`` in seconds
  (503 with Retry-After): the queue holds more tokens than ``max_queue_tokens``;
* :class:`InputFailedError` - one input could not be encoded even alone (out of memory, a broken
  model); its batch-mates were answered;
* :class:`WorkerCrashedError` - the worker failed outside a forward pass, so the input was never
  computed (a subclass of :class:`InputFailedError`: callers that only care that it failed need no
  new case).

They live apart from the batcher so that code which only catches them (the engine's client and
router, the HTTP layer) reads them without the batcher's machinery.
"""

from __future__ import annotations

__all__ = ["InputFailedError", "QueueFullError", "WorkerCrashedError"]


class QueueFullError(RuntimeError):
    """The queue holds more than ``max_queue_tokens``: try again shortly."""

    def __init__(self, queued: int, limit: int, retry_after: float) -> None:
        self.queued, self.limit, self.retry_after = queued, limit, retry_after
        super().__init__(f"the encoder queue is full ({queued} of {limit} tokens queued); retry shortly")


class InputFailedError(RuntimeError):
    """One input could not be encoded even alone (for example: out of memory)."""


class WorkerCrashedError(InputFailedError):
    """The batcher's worker failed outside a forward pass; the inputs it held were not computed."""
