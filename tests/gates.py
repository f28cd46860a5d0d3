"""Fault injection around the *real* encoder: hold its forward thread, or make chosen inputs fail."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from encoder import Encoder


class GatedEncoder:
    """Delegates to a real encoder; ``encode`` waits for ``gate`` and may raise for chosen inputs."""

    def __init__(self, encoder: Encoder, poison_length: int | None = None) -> None:
        self.inner = encoder
        self.torch_device = encoder.torch_device
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[int]] = []
        self.poison_length = poison_length

    def tokenize(self, texts: Any, **kwargs: Any) -> list[list[int]]:
        return self.inner.tokenize(texts, **kwargs)

    def encode(self, token_ids: list[list[int]]) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.calls.append([len(ids) for ids in token_ids])
        if self.poison_length is not None and any(len(ids) == self.poison_length for ids in token_ids):
            raise MemoryError("simulated out of memory")
        return self.inner.encode(token_ids)
