"""Counters for /stats (and, through a collector, /metrics): one set of numbers, two views."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Stats"]

_EMBEDDING_ENDPOINTS = frozenset(
    {"/v1/embeddings", "/embeddings", "/v1/embeddings/sparse", "/v1/embeddings/multivector"}
)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


@dataclass(slots=True)
class Stats:
    """Plain counters, updated on the event loop only (so no locks)."""

    started_at: float = field(default_factory=time.time)
    requests: int = 0  # embedding requests
    request_errors: int = 0
    inputs: int = 0
    tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_errors: int = 0
    cache_writes: int = 0
    by_endpoint: dict[tuple[str, int], int] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        self.by_endpoint[key] = self.by_endpoint.get(key, 0) + 1
        if endpoint in _EMBEDDING_ENDPOINTS:
            self.requests += 1
            self.request_errors += int(status >= 400)
            self.latencies.append(seconds)

    def latency_ms(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {
            name: round(_percentile(ordered, fraction) * 1e3, 3)
            for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
        } | {"window": len(ordered)}

    @property
    def hit_rate(self) -> float:
        looked_up = self.cache_hits + self.cache_misses
        return self.cache_hits / looked_up if looked_up else 0.0
