"""The engine's model as a worker sees it: its description, its tokenizer, and ids marked by model.

With ``EMBED_WORKERS > 1`` the model's weights live in the engine process only. A worker still
tokenises (only token ids cross the socket, and the tokenizer is cheap next to a forward pass), so
it loads the model's tokenizer from the model folder, with no weights (:func:`load_tokenizer_only`),
and describes the engine's model to the service and the routes with :class:`RemoteEncoder`: the
fingerprint, widths, limits and device the engine reported in its hello.

A restarted engine may serve another model (its folder changed in place). :meth:`RemoteEncoder.adopt`
changes the description in place, so everything holding it follows at once, and :class:`FirstRow`
marks each batch of ids with the model whose tokenizer made them, so ids made for the old model are
never sent to the new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from encoder import Encoder
from encoder.kinds import OutputKind
from encoder.model_files import read_model_spec
from gateway.engine.protocol import EngineInfo

__all__ = ["FirstRow", "RemoteEncoder", "load_tokenizer_only"]


def load_tokenizer_only(info: EngineInfo, truncate: bool) -> Encoder:
    """An :class:`~encoder.Encoder` with the engine's tokenizer and limits and no weights: only its
    :meth:`~encoder.Encoder.tokenize` and :meth:`~encoder.Encoder.token_names` are used."""
    from transformers import AutoTokenizer

    spec = read_model_spec(Path(info.path))
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    return Encoder(
        model=torch.nn.Module(),
        tokenizer=tokenizer,
        spec=spec,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_tokens=info.max_tokens,
        truncate=truncate,
        threads=1,
        fingerprint=info.fingerprint,
    )


class RemoteEncoder:
    """The engine's encoder as the service and routes see it (see :class:`gateway.core.backend.EncoderInfo`)."""

    def __init__(self, info: EngineInfo, tokenizer: Encoder) -> None:
        self.torch_device = torch.device("cpu")  # no GPU memory here: the engine reports its own
        self.adopt(info, tokenizer)

    def adopt(self, info: EngineInfo, tokenizer: Encoder) -> None:
        """Describe the model ``info`` names from now on: the service, routes and /stats hold this
        object, so they all follow at once."""
        self.info = info
        self.tokenizer = tokenizer
        self.fingerprint = info.fingerprint
        self.numerics = info.numerics
        self.dim = info.dim
        self.max_tokens = info.max_tokens
        self.device = info.device
        self.dtype = info.dtype
        self.threads = info.threads
        self.path = Path(info.path)
        self.outputs = frozenset(OutputKind(kind) for kind in info.widths)

    def output_width(self, kind: OutputKind) -> int:
        return self.info.widths.get(str(kind), 0)

    def token_names(self, ids: list[int]) -> list[str]:
        return self.tokenizer.token_names(ids)

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer.hf_tokenizer


class FirstRow(list[int]):
    """The first row of ids :meth:`EngineLink.tokenize` returns, marked with the model whose
    tokenizer made it (its ``fingerprint``): the service may cut and join the answers of several
    calls, but keeps the rows, so :meth:`EngineLink.embed` (on this link or another engine's) can
    tell ids made for a model the engine no longer serves."""

    __slots__ = ("fingerprint",)

    def __init__(self, ids: list[int], fingerprint: str) -> None:
        super().__init__(ids)
        self.fingerprint = fingerprint
