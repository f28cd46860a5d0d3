"""Load a model folder and turn texts into vectors: :func:`load_encoder` and :class:`Encoder`.

The encoder is three small steps that the micro-batcher can call separately:

* :meth:`Encoder.tokenize` - token ids without padding (cheap, runs off the forward thread);
* :meth:`Encoder.encode` - one forward pass over a list of id lists, padded only to *its* longest;
* :meth:`Encoder.embed` - both, with length-sorted, token-budgeted batches, for in-process use.

Beside them here: :func:`served_limit` and :func:`quiet_transformers`, shared with the
cross-encoder's loader. The error for an input too long is :mod:`encoder.input_limits`; bge-m3's
sparse and ColBERT heads are loaded and cut to their rows by :mod:`encoder.output_heads`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from encoder.backend import Backend, TorchBackend
from encoder.device import configure_cpu_threads, resolve_device, resolve_dtype
from encoder.input_limits import InputTooLongError
from encoder.int8_gate import GateFloor
from encoder.kinds import HEAD_FILES, OutputKind, Outputs, SparseWeights
from encoder.model_files import ModelSpec, read_model_spec, resolve_model_dir
from encoder.output_heads import _load_heads, _rows
from encoder.packing import default_max_batch_tokens, plan_batches
from encoder.pooling import Pooling, normalize, pool
from encoder.tokenizing import TooManyTokens, template_tokens, tokenize_exact

__all__ = ["Encoder", "InputTooLongError", "load_encoder"]

DENSE, SPARSE, COLBERT = OutputKind.DENSE, OutputKind.SPARSE, OutputKind.COLBERT

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 64


# Characters per token of the limit above which an input is tokenised a growing prefix at a time
# (:mod:`encoder.tokenizing`) rather than whole: prose runs 3-6 characters per token, so nearly
# every input that fits is tokenised in one batched call, and a 30 MB string of prose costs about
# what the first ``max_tokens`` of it do. Never a cut: texts with few tokens per character
# (whitespace runs, [UNK] words, characters the normaliser drops) are tokenised further, exactly.
MAX_CHARS_PER_TOKEN = 32
# Characters of one input read at most to decide its tokens (about a second of tokenising). Only a
# text that long with fewer tokens than the model takes in all of it is refused for it.
MAX_READ_CHARS = 1_000_000


class Encoder:
    """A loaded embedding model. Build it with :func:`load_encoder`.

    Thread-safety: :meth:`tokenize` may run on any thread; :meth:`encode` holds a lock so that one
    forward pass runs at a time (parallel passes only fight over the same cores or GPU).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | None,
        tokenizer: Any,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        max_tokens: int,
        truncate: bool,
        threads: int,
        fingerprint: str,
        heads: dict[OutputKind, torch.nn.Linear] | None = None,
        backend: Backend | None = None,
        numerics: str = "",
    ) -> None:
        if backend is None:
            if model is None:
                raise ValueError("an Encoder needs a torch model or a backend")
            backend = TorchBackend(model, device)
        self.model = model
        self.backend: Backend = backend
        # What computes the vectors ("torch:float32", "onnxruntime:int8:r1"): part of the fingerprint
        # for anything but torch, so int8 vectors never share cache keys with float ones.
        self.numerics = numerics or f"{backend.name}:{str(dtype).removeprefix('torch.')}"
        self.tokenizer = tokenizer
        self.spec = spec
        self.path: Path = spec.path
        self.dim: int = spec.dim
        self.pooling: Pooling = spec.pooling
        self.normalize: bool = spec.normalize
        self.max_tokens = max_tokens
        if max_tokens <= template_tokens(tokenizer):
            raise ValueError(
                f"a limit of {max_tokens} tokens leaves no room for text: the model's template adds "
                f"{template_tokens(tokenizer)} special tokens to every input"
            )
        self.truncate = truncate
        self.threads = threads
        self.fingerprint = fingerprint
        self.torch_device = device
        self.torch_dtype = dtype
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._forward_lock = threading.Lock()
        self.heads = heads or {}
        special = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
        self._unused_ids = np.array([i for i in special if i is not None], dtype=np.int64)

    @property
    def outputs(self) -> frozenset[OutputKind]:
        """What this model can produce: always ``dense``; ``sparse``/``colbert`` with bge-m3's heads."""
        return frozenset({DENSE, *self.heads})

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer itself (offsets, decoding: TEI's /tokenize and /decode)."""
        return self.tokenizer

    def token_names(self, ids: list[int]) -> list[str]:
        """The tokenizer's strings for ``ids`` (for sparse answers that show their tokens)."""
        names: list[str] = self.tokenizer.convert_ids_to_tokens(ids)
        return names

    def output_width(self, kind: OutputKind) -> int:
        """Floats per row of ``kind``: the dense dimension, the ColBERT head's width, 0 for sparse."""
        if kind is OutputKind.COLBERT:
            return self.heads[kind].out_features if kind in self.heads else 0
        return self.dim if kind is OutputKind.DENSE else 0

    @property
    def quantization(self) -> str:
        """``none``, or ``int8`` when the backend runs int8 weights."""
        return "int8" if ":int8" in self.numerics else "none"

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.path)!r}, dim={self.dim}, pooling={self.pooling!r}, normalize={self.normalize}, "
            f"max_tokens={self.max_tokens}, device={self.device!r}, dtype={self.dtype!r}, "
            f"numerics={self.numerics!r}, fingerprint={self.fingerprint!r})"
        )

    def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        """Token ids with the model's special tokens and no padding.

        Texts are stripped (and lower-cased when the model asks) exactly as sentence-transformers
        does, so both give the same vectors. Over-long inputs are cut to :attr:`max_tokens` when
        truncation is on (``truncate``, default: the encoder's own setting), and raise
        :class:`InputTooLongError` when it is off.
        """
        if not texts:
            return []
        truncate = self.truncate if truncate is None else truncate
        prepared = [self._prepare(text) for text in texts]
        ids = tokenize_exact(
            self.tokenizer,
            prepared,
            max_tokens=self.max_tokens,
            truncate=truncate,
            piece_chars=self.max_chars,
            max_read=MAX_READ_CHARS,
        )
        if isinstance(ids, TooManyTokens):
            raise InputTooLongError(
                ids.index,
                ids.tokens,
                self.max_tokens,
                at_least=not ids.exact,
                unread=ids.unread,
                open_word=ids.open_word,
            )
        return ids

    @property
    def max_chars(self) -> int:
        """Characters of one input tokenised in one go (see ``MAX_CHARS_PER_TOKEN``); longer ones a
        growing prefix at a time, exactly."""
        return self.max_tokens * MAX_CHARS_PER_TOKEN

    def _prepare(self, text: str) -> str:
        """Strip (and lower-case when the model asks) exactly as sentence-transformers does."""
        text = text.strip()
        return text.lower() if self.spec.do_lower_case else text

    def forward(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer on ``token_ids`` padded to their own longest: (hidden, mask)."""
        longest = max(len(row) for row in token_ids)
        ids = np.full((len(token_ids), longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        with self._forward_lock:
            hidden = self.backend.forward(ids, mask)
        return hidden, torch.from_numpy(mask).to(hidden.device, non_blocking=True)

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors (float32, ``(n, dim)``) for id lists from :meth:`tokenize`, in one forward pass."""
        if not token_ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        hidden, mask = self.forward(token_ids)
        with torch.inference_mode():
            vectors = pool(hidden, mask, self.pooling)
            if self.normalize:
                vectors = normalize(vectors)
            return vectors.cpu().numpy().astype(np.float32, copy=False)

    def encode_outputs(
        self,
        token_ids: Sequence[Sequence[int]],
        kinds: frozenset[OutputKind] | Sequence[frozenset[OutputKind]],
    ) -> list[Outputs]:
        """Dense, sparse and/or ColBERT outputs from one forward pass, as FlagEmbedding's BGEM3 computes them.

        ``kinds`` is one set for every row, or one set per row (the micro-batcher's batches mix
        callers who asked for different kinds). The transformer runs once over all rows; each head
        runs only over the rows that asked for it, cut to their own longest, and each row's
        :class:`Outputs` holds only its own kinds, so a dense-only caller never pays for, or
        carries, a ColBERT matrix computed for its batch-mate.

        * sparse: ``relu(sparse_linear(H))`` per token; CLS, EOS, PAD and UNK ids dropped, zero
          weights dropped, the largest weight kept per token id; ids ascending.
        * colbert: ``colbert_linear(H[:, 1:])`` over the real tokens after CLS, L2-normalised per row.
        """
        per_row = [kinds] * len(token_ids) if isinstance(kinds, frozenset | set) else list(kinds)
        if len(per_row) != len(token_ids):
            raise ValueError(f"{len(per_row)} sets of kinds for {len(token_ids)} inputs")
        missing = frozenset[OutputKind]().union(*per_row) - self.outputs
        if missing:
            raise ValueError(f"this model has no {sorted(missing)} head ({[HEAD_FILES[k] for k in sorted(missing)]})")
        if not token_ids:
            return []
        hidden, mask = self.forward(token_ids)
        lengths = [len(ids) for ids in token_ids]
        dense: list[np.ndarray | None] = [None] * len(token_ids)
        sparse: list[SparseWeights | None] = [None] * len(token_ids)
        colbert: list[np.ndarray | None] = [None] * len(token_ids)
        with torch.inference_mode():
            rows = [row for row, asked in enumerate(per_row) if DENSE in asked]
            if rows:
                part, part_mask = _rows(hidden, mask, rows, lengths)
                pooled = pool(part, part_mask, self.pooling)
                vectors = (normalize(pooled) if self.normalize else pooled).cpu().numpy().astype(np.float32, copy=False)
                for at, row in enumerate(rows):
                    dense[row] = vectors[at]
            rows = [row for row, asked in enumerate(per_row) if SPARSE in asked]
            if rows:
                part, _ = _rows(hidden, mask, rows, lengths)
                weights = torch.relu(self.heads[SPARSE](part)).squeeze(-1).float().cpu().numpy()
                for at, row in enumerate(rows):
                    ids = np.asarray(token_ids[row], dtype=np.int64)
                    sparse[row] = self._sparse_row(ids, weights[at, : lengths[row]])
            rows = [row for row, asked in enumerate(per_row) if COLBERT in asked]
            if rows:
                part, part_mask = _rows(hidden, mask, rows, lengths)
                matrices = self.heads[COLBERT](part[:, 1:]) * part_mask[:, 1:, None].to(part.dtype)
                matrices = normalize(matrices.float()).cpu().numpy()
                for at, row in enumerate(rows):
                    colbert[row] = np.ascontiguousarray(matrices[at, : lengths[row] - 1])
        return [
            Outputs(tokens=lengths[row], dense=dense[row], sparse=sparse[row], colbert=colbert[row])
            for row in range(len(token_ids))
        ]

    def _sparse_row(self, ids: np.ndarray, weights: np.ndarray) -> SparseWeights:
        keep = ~np.isin(ids, self._unused_ids) & (weights > 0)
        unique, inverse = np.unique(ids[keep], return_inverse=True)
        best = np.zeros(len(unique), dtype=np.float32)
        np.maximum.at(best, inverse, weights[keep].astype(np.float32))
        return SparseWeights(unique.astype(np.int64), best)

    def embed(
        self,
        texts: Sequence[str],
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> np.ndarray:
        """Vectors for ``texts`` in their order, computed in length-sorted micro-batches."""
        token_ids = self.tokenize(texts)
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        budget = max_batch_tokens or default_max_batch_tokens(self.torch_device.type)
        for batch in plan_batches([len(row) for row in token_ids], budget, max_batch_size):
            out[batch] = self.encode([token_ids[i] for i in batch])
        return out

    def warmup(self) -> None:
        """One short and one long pass, so the first real request pays no allocator or kernel set-up."""
        short = self.tokenize(["warm-up"])
        self.encode(short)
        filler = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize("warm")) or [self.pad_token_id]
        long_row = (short[0][:1] + filler * self.max_tokens)[: min(self.max_tokens, 512) - 1] + short[0][-1:]
        self.encode([long_row] * 2)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


def load_encoder(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cpu_threads: int | None = None,
    max_tokens: int | None = None,
    truncate: bool = False,
    revision: str | None = None,
    quantize: str = "none",
    onnx_cache_dir: str | Path | None = None,
    int8_floor: GateFloor | None = None,
) -> Encoder:
    """Load ``model`` (a local folder or a Hugging Face hub id) for inference.

    ``max_tokens`` may lower the model's own limit, never raise it. ``quantize="int8"`` serves the
    transformer through ONNX Runtime with int8 weights on the CPU (:mod:`encoder.onnx_int8`:
    exported and quantised once into ``onnx_cache_dir``, and refused with
    :class:`~encoder.onnx_int8.QualityGateError` when the probe set falls below ``int8_floor``). Raises
    :class:`~encoder.model_files.ModelNotFoundError` for a model that cannot be found and
    :class:`~encoder.device.DeviceNotAvailableError` for a device this machine lacks.
    """
    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize must be none or int8, got {quantize!r}")
    torch_device = resolve_device(device)
    if quantize == "int8" and torch_device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU only; the device is {torch_device} (set the device to cpu)")
    if quantize == "int8":
        from encoder.int8_machine import int8_dtype_problem

        problem = int8_dtype_problem(dtype)
        if problem is not None:
            raise ValueError(f"dtype {dtype!r}: {problem}")
    torch_dtype = resolve_dtype(torch_device, dtype)
    threads = configure_cpu_threads(cpu_threads) if torch_device.type == "cpu" else torch.get_num_threads()
    spec = read_model_spec(resolve_model_dir(model, revision))
    limit = served_limit(spec, max_tokens)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    network: torch.nn.Module | None = None
    backend: Backend | None = None
    numerics = ""
    if quantize == "int8":
        from encoder.int8_prepare import prepare_int8

        int8 = prepare_int8(spec, tokenizer, cache_dir=onnx_cache_dir, threads=threads, floor=int8_floor)
        backend, numerics = int8.backend, int8.numerics
    else:
        network = AutoModel.from_pretrained(str(spec.transformer_path), dtype=torch_dtype)
        network.eval().to(torch_device)
    # bge-m3's heads run on the backend's hidden state: float32 from ONNX Runtime whatever the dtype
    heads = _load_heads(spec.path, torch_device, torch.float32 if backend is not None else torch_dtype)
    # The fingerprint covers the model's contents and the limit actually served; int8 adds its
    # numerics (float32 keeps the fingerprint it always had, so its cached vectors stay valid).
    fingerprint = replace(spec, max_tokens=limit).fingerprint()
    if numerics:
        fingerprint = xxhash.xxh3_128(f"{fingerprint}|{numerics}".encode()).hexdigest()[:16]
    encoder = Encoder(
        model=network,
        tokenizer=tokenizer,
        spec=spec,
        device=torch_device,
        dtype=torch_dtype,
        max_tokens=limit,
        truncate=truncate,
        threads=threads,
        fingerprint=fingerprint,
        heads=heads,
        backend=backend,
        numerics=numerics,
    )
    logger.info("loaded %r", encoder)
    return encoder


def served_limit(spec: ModelSpec, max_tokens: int | None) -> int:
    """The tokens an input may hold: the model's own limit, or a lower ``max_tokens``."""
    if max_tokens is None:
        return spec.max_tokens
    if not 1 <= max_tokens <= spec.max_tokens:
        raise ValueError(f"max_tokens must be 1..{spec.max_tokens} (the model's limit), got {max_tokens}")
    return max_tokens


def quiet_transformers() -> None:
    """transformers' warnings about long inputs and its progress bars off: we report inputs ourselves."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
