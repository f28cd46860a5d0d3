"""Cross-encoders (rerankers): a query and a document in, a relevance score out.

A sequence-classification folder (``BertForSequenceClassification``, ``XLMRobertaForSequenceClassification``:
bge-reranker, ms-marco MiniLM) scored as sentence-transformers' ``CrossEncoder.predict`` scores it:
the pair tokenised together (``[CLS] query [SEP] document [SEP]``, token type 1 for the document
where the model has token types), the classifier's logits, then the model's activation (the
``activation_fn`` sentence-transformers saved: config_sentence_transformers.json for 6.x, config.json
for 4/5; else sigmoid for one label, none for more). A folder sentence-transformers 6 saved as a
``CrossEncoder`` (a modules.json naming the classifier) is a reranker too.

It is an :class:`~encoder.model.Encoder` with one output, :attr:`OutputKind.SCORE`, so pairs take
the embedding path unchanged: each pair is one text (:mod:`encoder.pairs`), the micro-batcher packs
them by tokens, the service caches each score by (model, query, document). Truncation cuts the
document only; a query that alone fills the limit is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from encoder.device import configure_cpu_threads, resolve_device, resolve_dtype
from encoder.kinds import OutputKind, Outputs
from encoder.model import Encoder, InputTooLongError, quiet_transformers, served_limit
from encoder.model_files import read_model_spec, resolve_model_dir
from encoder.pairs import join_pair, split_pair

__all__ = ["CrossEncoderModel", "activate", "is_cross_encoder", "load_cross_encoder"]

logger = logging.getLogger(__name__)

SCORE = OutputKind.SCORE

# sentence-transformers stores the activation as a dotted torch path; the ones served (see activate).
_ACTIVATIONS = ("Sigmoid", "Identity", "Tanh")


def activate(activation: str, logits: np.ndarray) -> np.ndarray:
    """The model's activation over raw ``logits`` (kept raw in the cache: TEI's ``raw_scores`` asks
    for them), in float64 for the sigmoid's tails."""
    values = np.asarray(logits, dtype=np.float64)
    if activation == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    if activation == "Tanh":
        return np.tanh(values)
    return values


class PairIds(list[int]):
    """A pair's token ids, and where its document starts (its token type 1): kept with the ids as
    they travel the micro-batcher, so the forward pass needs no guess from the separators."""

    document_start: int

    def __init__(self, ids: list[int], document_start: int) -> None:
        super().__init__(ids)
        self.document_start = document_start


def _document_start(tokens: Sequence[int], sep_token_id: int | None) -> int:
    start = getattr(tokens, "document_start", None)
    if isinstance(start, int):
        return start
    # ids from elsewhere (a copy): just after the first separator, as [CLS] query [SEP] document [SEP]
    return next((i + 1 for i, token in enumerate(tokens) if token == sep_token_id), len(tokens))


def _saved_by_sentence_transformers(folder: Path) -> dict[str, Any]:
    """``config_sentence_transformers.json`` (sentence-transformers 6 writes a CrossEncoder's type
    and activation there), or nothing."""
    found = folder / "config_sentence_transformers.json"
    if not found.is_file():
        return {}
    loaded = json.loads(found.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def is_cross_encoder(folder: Path) -> bool:
    """Whether the resolved model folder holds a sequence classifier (a reranker), not an embedder:
    a bare transformers folder, or one sentence-transformers 6 saved as a ``CrossEncoder`` (its
    modules.json then names the classifier itself, not an embedding pipeline)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return False
    saved_as = _saved_by_sentence_transformers(folder).get("model_type")
    if (folder / "modules.json").is_file() and saved_as != "CrossEncoder":
        return False
    architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def _default_prompt(saved: dict[str, Any]) -> str:
    """The prompt sentence-transformers 6 puts before each pair's first text (its query) when the
    model was saved with a ``default_prompt_name``; none otherwise."""
    name = saved.get("default_prompt_name")
    if not name:
        return ""
    prompts = saved.get("prompts") or {}
    if not isinstance(prompts, dict) or not isinstance(prompts.get(name), str):
        raise ValueError(f"default_prompt_name {name!r} names no prompt in config_sentence_transformers.json")
    return str(prompts[name])


def _activation(config: Any, saved: dict[str, Any]) -> str:
    """The activation ``CrossEncoder`` applies, found where it looks: sentence-transformers 6's
    config_sentence_transformers.json first, then config.json (4/5, then the legacy key)."""
    st_config = getattr(config, "sentence_transformers", None) or {}
    path = (
        saved.get("activation_fn")
        or st_config.get("activation_fn")
        or getattr(config, "sbert_ce_default_activation_function", None)
    )
    if path is None:
        name = "Sigmoid" if config.num_labels == 1 else "Identity"
    else:
        name = str(path).rsplit(".", 1)[-1]
        if name not in _ACTIVATIONS or not str(path).startswith("torch."):
            raise ValueError(f"activation {path!r} is not served (only torch's {', '.join(sorted(_ACTIVATIONS))})")
    return name


class CrossEncoderModel(Encoder):
    """A loaded reranker (see the module's docstring). Build it with :func:`load_cross_encoder`."""

    def __init__(self, *, activation: str, query_prompt: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert self.model is not None
        self.activation = activation
        # sentence-transformers 6's default prompt, put before each pair's query as predict() does
        self.query_prompt = query_prompt
        config: Any = self.model.config
        self.num_labels = int(config.num_labels)
        self.id2label = {int(index): str(label) for index, label in (config.id2label or {}).items()}
        self.sep_token_id: int | None = self.tokenizer.sep_token_id
        self._token_types = int(getattr(config, "type_vocab_size", 1) or 1) > 1

    @property
    def outputs(self) -> frozenset[OutputKind]:
        return frozenset({SCORE})

    def output_width(self, kind: OutputKind) -> int:
        return self.num_labels if kind == SCORE else 0

    def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        """Token ids of each pair text (:func:`~encoder.pairs.join_pair`), as the model reads a pair.

        Truncating, only the document is cut; a pair whose query alone (with the special tokens)
        passes the limit raises :class:`InputTooLongError`, as any pair over it does without truncation.
        """
        if not texts:
            return []
        truncate = self.truncate if truncate is None else truncate
        pairs = [(self.query_prompt + query, document) for query, document in map(split_pair, texts)]
        try:
            encoded = self._encode_pairs(pairs, truncate)
        except Exception:  # the fast tokenizer's: a query that leaves the document too little room to cut
            for index, (query, _) in enumerate(pairs):
                try:
                    self._encode_pairs(pairs[index : index + 1], truncate)
                except Exception:
                    raise InputTooLongError(index, len(self.tokenizer(query)["input_ids"]), self.max_tokens) from None
            raise
        ids: list[list[int]] = []
        types = encoded.get("token_type_ids") or [None] * len(pairs)
        for index, (row, kinds) in enumerate(zip(encoded["input_ids"], types, strict=True)):
            if len(row) > self.max_tokens:
                raise InputTooLongError(index, len(row), self.max_tokens)
            # Where the document starts, from the tokenizer itself: a query holding the text "[SEP]"
            # becomes a separator token, so the first one is not always the query's end.
            ids.append(PairIds(row, kinds.index(1) if kinds is not None and 1 in kinds else len(row)))
        return ids

    def _encode_pairs(self, pairs: list[tuple[str, str]], truncate: bool) -> Any:
        return self.tokenizer(
            [query for query, _ in pairs],
            [document for _, document in pairs],
            truncation="only_second" if truncate else False,
            max_length=self.max_tokens if truncate else None,
        )

    def encode_outputs(
        self,
        token_ids: Sequence[Sequence[int]],
        kinds: frozenset[OutputKind] | Sequence[frozenset[OutputKind]],
    ) -> list[Outputs]:
        """Logits of pairs from :meth:`tokenize`, in one forward pass (the cache keeps them raw)."""
        if not token_ids:
            return []
        scores = self.scores(token_ids)
        return [Outputs(tokens=len(ids), score=scores[row]) for row, ids in enumerate(token_ids)]

    def scores(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """``(pairs, labels)`` float32 logits, before the model's activation (:func:`activate`)."""
        longest = max(len(row) for row in token_ids)
        ids = np.full((len(token_ids), longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        device = self.torch_device
        inputs = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        if self._token_types:
            # Token type 1 over the document (PairIds says where it starts), 0 before it and on padding.
            types = np.zeros_like(ids)
            for row, tokens in enumerate(token_ids):
                types[row, _document_start(tokens, self.sep_token_id) : len(tokens)] = 1
            inputs["token_type_ids"] = torch.from_numpy(types).to(device)
        assert self.model is not None
        with self._forward_lock, torch.inference_mode():
            logits: torch.Tensor = self.model(**inputs).logits.float()
            return logits.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self.scores(token_ids) if token_ids else np.zeros((0, self.num_labels), dtype=np.float32)

    def warmup(self) -> None:
        self.scores(self.tokenize([join_pair("warm-up", "a short document")]))
        self.scores(self.tokenize([join_pair("warm-up", "warm " * min(self.max_tokens, 512))], truncate=True) * 2)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


def load_cross_encoder(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cpu_threads: int | None = None,
    max_tokens: int | None = None,
    truncate: bool = False,
    revision: str | None = None,
) -> CrossEncoderModel:
    """Load the reranker ``model`` (a folder or a hub id) for inference (see :func:`~encoder.load_encoder`)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(torch_device, dtype)
    threads = configure_cpu_threads(cpu_threads) if torch_device.type == "cpu" else torch.get_num_threads()
    spec = read_model_spec(resolve_model_dir(model, revision))
    limit = served_limit(spec, max_tokens)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(spec.transformer_path))
    network = AutoModelForSequenceClassification.from_pretrained(str(spec.transformer_path), dtype=torch_dtype)
    network.eval().to(torch_device)
    saved = _saved_by_sentence_transformers(spec.path)
    activation = _activation(network.config, saved)
    query_prompt = _default_prompt(saved)
    spec = replace(spec, pooling="cls", normalize=False, dim=int(network.config.num_labels))
    # "v2": token types come from the tokenizer (scores cached before, for a query holding "[SEP]", were wrong).
    digest = f"{replace(spec, max_tokens=limit).fingerprint()}|cross-encoder-v2|{activation}|{query_prompt!r}"
    encoder = CrossEncoderModel(
        activation=activation,
        query_prompt=query_prompt,
        model=network,
        tokenizer=tokenizer,
        spec=spec,
        device=torch_device,
        dtype=torch_dtype,
        max_tokens=limit,
        truncate=truncate,
        threads=threads,
        fingerprint=xxhash.xxh3_128(digest.encode()).hexdigest()[:16],
    )
    logger.info("loaded %r (a cross-encoder, %s over %d label(s))", encoder, activation, encoder.num_labels)
    return encoder
