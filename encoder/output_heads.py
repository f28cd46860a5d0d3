"""bge-m3's extra output heads: loading them, and the rows of a batch each one runs over.

bge-m3 ships two linear heads beside its transformer, ``sparse_linear.pt`` (a weight per token:
lexical matching) and ``colbert_linear.pt`` (a vector per token: late interaction). They run in
torch on the transformer's last hidden state, whatever computed it (torch or ONNX Runtime).
``_load_heads`` loads whichever the model folder has; ``_rows`` picks out of a padded batch the
rows that asked for a head, cut to their own longest, so a head never runs over, nor pads to, a
batch-mate that did not ask for it (:meth:`encoder.model.Encoder.encode_outputs`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder.kinds import HEAD_FILES, OutputKind

__all__: list[str] = []


def _load_heads(folder: Path, device: torch.device, dtype: torch.dtype) -> dict[OutputKind, torch.nn.Linear]:
    """bge-m3's extra heads, when the folder has them: ``sparse_linear.pt`` and ``colbert_linear.pt``."""
    heads: dict[OutputKind, torch.nn.Linear] = {}
    for kind, name in HEAD_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        out_features, in_features = state["weight"].shape
        head = torch.nn.Linear(in_features, out_features)
        head.load_state_dict(state)
        heads[kind] = head.eval().to(device=device, dtype=dtype)
    return heads


def _rows(
    hidden: torch.Tensor, mask: torch.Tensor, rows: list[int], lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of a padded batch, cut to the longest of them (every row, uncut, without a copy)."""
    if len(rows) == len(lengths):
        return hidden, mask
    longest = max(lengths[row] for row in rows)
    index = torch.tensor(rows, device=hidden.device)
    return hidden[:, :longest].index_select(0, index), mask[:, :longest].index_select(0, index)
