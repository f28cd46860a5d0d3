"""The int8 model at run time: :class:`OnnxBackend`, an ONNX Runtime CPU session as a ``Backend``.

The encoder computes through a :class:`encoder.backend.Backend` (``forward(ids, mask)`` -> last
hidden state). This is the one for ONNX models, float32 or int8 weights alike: pooling and bge-m3's
heads still run in torch on the hidden state it returns. Its session options are chosen for a
server (no memory arena, no spinning threads; the class docstring says why), and it bounds the
memory of masked attention by running a padded batch whose score matrix would be too large in
parts, longest first (:data:`MASKED_ATTENTION_BYTES`). onnxruntime is imported only when one is
built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MASKED_ATTENTION_BYTES", "OnnxBackend"]

# A padded batch whose attention scores (batch x heads x length^2 float32) would take more than
# this runs in parts under it; a part of one input has no padding and takes the memory-efficient
# kernel. With the CPU's default budget of 512 padded tokens a batch never comes near it.
MASKED_ATTENTION_BYTES = 64 << 20


class OnnxBackend:
    """An ONNX Runtime CPU session over an exported transformer (float32 or int8 weights).

    The CPU memory arena is off: with a new sequence length in nearly every batch the arena only
    grows to the largest batch seen and keeps it, while ``malloc`` gives memory back (README's
    int8 section has the figures). Memory patterns are off too: they only help fixed shapes. The
    intra-op threads do not spin-wait for the next kernel: in the server they share the cores with
    the event loop and the tokenizer, and spinning took those cores (over HTTP, 32-text requests at
    concurrency 4: 44-60 texts/s spinning, 63-66 not; README "int8 on CPU").

    ``heads`` (the model's attention heads; 0: unknown) bounds a padded batch's attention: the
    masked kernel holds batch x heads x length^2 float32 scores, so a padded batch over
    ``attention_bytes`` runs in parts under it, longest first, each cut to its own longest; a part
    of one input has no padding and takes the memory-efficient kernel (:data:`DEFAULT_RECIPE`).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        threads: int,
        *,
        arena: bool = False,
        heads: int = 0,
        attention_bytes: int = MASKED_ATTENTION_BYTES,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = model_path
        self.threads = threads
        self.heads = heads
        self.attention_bytes = attention_bytes
        self.session: Any = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        batch, longest = input_ids.shape
        if batch > 1 and self._scores_bytes(batch, longest) > self.attention_bytes and not attention_mask.all():
            return torch.from_numpy(self._in_parts(input_ids, attention_mask))
        return torch.from_numpy(self._run(input_ids, attention_mask))

    def _scores_bytes(self, batch: int, length: int) -> int:
        return batch * self.heads * length * length * 4

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        outputs = self.session.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(outputs[0], dtype=np.float32)

    def _in_parts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The batch in parts under the score budget, longest rows first; padding rows are zeros."""
        lengths = attention_mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable").tolist()
        parts: list[list[int]] = []
        for row in order:  # a part's longest is its first row: a row fits while the part's scores do
            if parts and self._scores_bytes(len(parts[-1]) + 1, int(lengths[parts[-1][0]])) <= self.attention_bytes:
                parts[-1].append(row)
            else:
                parts.append([row])
        out: np.ndarray | None = None
        for part in parts:
            width = max(1, int(lengths[part[0]]))
            hidden = self._run(
                np.ascontiguousarray(input_ids[part, :width]), np.ascontiguousarray(attention_mask[part, :width])
            )
            if out is None:
                out = np.zeros((len(lengths), input_ids.shape[1], hidden.shape[-1]), dtype=np.float32)
            out[part, :width] = hidden
        assert out is not None  # at least one part: batch > 1
        return out
