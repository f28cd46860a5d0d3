"""What the service and the HTTP layer need of an encoder and its batcher, as protocols.

In one process these are :class:`encoder.Encoder` and :class:`encoder.batcher.MicroBatcher`; with
``EMBED_WORKERS > 1`` each HTTP worker holds :mod:`gateway.engine.client`'s stand-ins, which
tokenise locally and send the forward passes to the one engine process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from encoder.kinds import OutputKind, Outputs

__all__ = ["Batcher", "EncoderInfo"]


class EncoderInfo(Protocol):
    """The encoder's description: what the cache keys, limits, responses and /stats read."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def numerics(self) -> str: ...

    @property
    def outputs(self) -> frozenset[OutputKind]: ...

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def threads(self) -> int: ...

    @property
    def torch_device(self) -> torch.device: ...

    @property
    def path(self) -> Path: ...

    @property
    def hf_tokenizer(self) -> Any: ...  # the Hugging Face tokenizer (TEI's /tokenize and /decode)

    def output_width(self, kind: OutputKind) -> int: ...

    def token_names(self, ids: list[int]) -> list[str]: ...


class Batcher(Protocol):
    """Tokenise and embed through the shared queue (in process, or in the engine process)."""

    @property
    def running(self) -> bool: ...

    @property
    def queue_tokens(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def tokens_per_second(self) -> float: ...

    @property
    def max_queue_tokens(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]: ...

    async def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[list[int]],
        *,
        kinds: frozenset[OutputKind] = ...,
        tenant: str = "",
    ) -> list[Outputs]: ...
