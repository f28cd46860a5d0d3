"""Counters and histograms, fed at explicit points; /stats and /metrics render one snapshot.

The package, one responsibility a module:

* :mod:`~gateway.core.telemetry.recorder` - :class:`Telemetry`, which every part of the server
  reports events to (who feeds what is listed there);
* :mod:`~gateway.core.telemetry.by_model` - :class:`ModelTelemetry`, one model's share of it;
* :mod:`~gateway.core.telemetry.state` - the counters and histogram buckets, and
  :class:`TelemetryState`, the shape they travel in between processes;
* :mod:`~gateway.core.telemetry.stats` - the ``/stats`` body (:class:`StatsSnapshot`) and the
  gauges read when it is taken (:class:`LiveState`);
* :mod:`~gateway.core.telemetry.prometheus` - the ``/metrics`` text, rendered from that snapshot.

Gauges (queue depth, breaker state, GPU memory) are state, not events: the app hands
:meth:`Telemetry.snapshot` a :class:`LiveState` read at that moment. :class:`StatsSnapshot` is the
``/stats`` body and the OpenAPI document's schema for it; the Prometheus text is rendered from the
same snapshot, so the two can never disagree. Everything runs on the event loop: no locks.

The histograms are plain bucket counts (:class:`Buckets`) kept here, not prometheus-client
``Histogram`` objects: they travel in :class:`TelemetryState` like every counter, so with
``EMBED_WORKERS > 1`` :meth:`Telemetry.combined` sums them over the processes, and both modes render
them the same way (``HistogramMetricFamily`` at scrape time).

Import from here (``from gateway.core.telemetry import Telemetry``); the modules import each other by
their full names, never this package, so re-exporting them here makes no import cycle.
"""

from __future__ import annotations

from gateway.core.telemetry.by_model import ModelTelemetry
from gateway.core.telemetry.prometheus import PROMETHEUS_CONTENT_TYPE
from gateway.core.telemetry.recorder import Telemetry
from gateway.core.telemetry.state import (
    BATCH_SIZE_BUCKETS,
    BATCH_TOKENS_BUCKETS,
    ENCODER_SECONDS_BUCKETS,
    REQUEST_SECONDS_BUCKETS,
    Buckets,
    KeyStats,
    ModelCounts,
    TelemetryState,
)
from gateway.core.telemetry.stats import (
    BatchStats,
    EngineStats,
    GpuStats,
    LiveState,
    ModelStats,
    StatsSnapshot,
    gpu_stats,
)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "BATCH_TOKENS_BUCKETS",
    "ENCODER_SECONDS_BUCKETS",
    "PROMETHEUS_CONTENT_TYPE",
    "REQUEST_SECONDS_BUCKETS",
    "BatchStats",
    "Buckets",
    "EngineStats",
    "GpuStats",
    "KeyStats",
    "LiveState",
    "ModelCounts",
    "ModelStats",
    "ModelTelemetry",
    "StatsSnapshot",
    "Telemetry",
    "TelemetryState",
    "gpu_stats",
]
