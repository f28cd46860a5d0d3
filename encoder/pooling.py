"""Turn a batch of token states into one vector per input.

The strategy is never hard-coded: :mod:`encoder.model` reads it from the model folder's
``1_Pooling/config.json``. bge-m3 uses the CLS token; all-MiniLM-L6-v2 the masked mean; decoder
embedders (e5-mistral, gte-Qwen) the last real token.
"""

from __future__ import annotations

from typing import Literal

import torch

Pooling = Literal["cls", "mean", "lasttoken"]
POOLINGS: tuple[Pooling, ...] = ("cls", "mean", "lasttoken")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool ``hidden`` (batch, seq, dim) over the real tokens of ``attention_mask`` (batch, seq).

    Pooling runs in float32 whatever the forward pass used, so fp16 sums over long inputs do not
    lose precision. Batches are padded on the right, so the last real token sits at ``len - 1``.
    """
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1e-9)
    if pooling == "lasttoken":
        last = attention_mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row (a zero row stays zero instead of becoming NaN)."""
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
