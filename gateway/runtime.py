"""The live objects one server process holds, built by :mod:`gateway.app`'s lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from encoder import Encoder
from encoder.batcher import MicroBatcher
from gateway.cache import VectorCache
from gateway.inputs import TokenIdDecoder
from gateway.metrics import Metrics
from gateway.service import EmbeddingService
from gateway.settings import Settings
from gateway.stats import Stats

__all__ = ["Runtime"]


@dataclass(slots=True)
class Runtime:
    settings: Settings
    encoder: Encoder
    batcher: MicroBatcher
    cache: VectorCache | None
    service: EmbeddingService
    stats: Stats
    token_decoder: TokenIdDecoder
    metrics: Metrics
    draining: bool = False
