"""One model's view of the server's telemetry (``EMBED_MODELS_FILE`` serves several).

A served model's service and micro-batcher report to a :class:`ModelTelemetry` instead of the
server's :class:`~gateway.core.telemetry.Telemetry`: it forwards every event to the server's totals
unchanged, and also counts the model's own share under its served id. It is a wrapper, not a second
recorder, so the totals stay one set of counters and nothing has to add models up afterwards.
"""

from __future__ import annotations

from encoder.batcher import BatcherEvent, BatchReport
from gateway.core.telemetry.recorder import Telemetry
from gateway.core.telemetry.state import ModelCounts

__all__ = ["ModelTelemetry"]


class ModelTelemetry:
    """The server's :class:`Telemetry` as one model's service and micro-batcher report to it: every
    count goes to the server's totals as before, and the model's inputs, tokens, cache lookups and
    passes also under its served id (``by_model``: summed over processes like every counter, shown
    as /stats' ``models`` and the ``embedding_model_*`` metrics when a server serves several)."""

    def __init__(self, shared: Telemetry, model: str) -> None:
        self.shared = shared
        self.model = model

    @property
    def counts(self) -> ModelCounts:
        by_model = self.shared.counters.by_model
        found = by_model.get(self.model)
        if found is None:
            found = by_model[self.model] = ModelCounts()
        return found

    def looked_up(self, hits: int, misses: int) -> None:
        counts = self.counts
        counts.cache_hits += hits
        counts.cache_misses += misses
        self.shared.looked_up(hits, misses)

    def embedded(self, inputs: int, tokens: int) -> None:
        counts = self.counts
        counts.inputs += inputs
        counts.tokens += tokens
        self.shared.embedded(inputs, tokens)

    def cache_failed(self) -> None:
        self.shared.cache_failed()

    def cache_written(self, count: int) -> None:
        self.shared.cache_written(count)

    def batch_done(self, report: BatchReport) -> None:
        counts = self.counts
        counts.batches += 1
        counts.forward_seconds += report.seconds
        self.shared.batch_done(report)

    def batcher_event(self, event: BatcherEvent, count: int = 1) -> None:
        self.shared.batcher_event(event, count)
