"""The forward pass on padded id batches: one small contract, so another runtime can slot in.

A :class:`Backend` takes ``input_ids`` and ``attention_mask`` (int64 numpy arrays, ``(batch, seq)``,
padded to the batch's own longest) and returns the transformer's last hidden state as a float
tensor ``(batch, seq, hidden)``. Pooling and bge-m3's sparse and ColBERT heads run on that tensor in
:mod:`encoder.model`, whatever computed it. Two backends exist: :class:`TorchBackend` (the default,
any device and dtype) and :class:`encoder.onnx_int8.OnnxBackend` (int8 on the CPU).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

__all__ = ["Backend", "TorchBackend"]


class Backend(Protocol):
    """What :class:`~encoder.model.Encoder` needs from a runtime; calls come from one thread at a time."""

    name: str  # "torch", "onnxruntime": shown on /stats, /metrics and in the start log

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        """The last hidden state for one padded batch."""
        ...


class TorchBackend:
    """A Hugging Face ``AutoModel`` run by torch on ``device`` (the model is already there)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(attention_mask).to(self.device, non_blocking=True)
        with torch.inference_mode():
            hidden: torch.Tensor = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden
