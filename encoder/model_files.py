"""Read what a model folder says about itself: where the weights are, pooling, normalisation, length.

sentence-transformers describes a model as a pipeline in ``modules.json`` (Transformer, Pooling,
Normalize), with ``1_Pooling/config.json`` for the pooling mode and ``sentence_bert_config.json`` for
the maximum sequence length. We read the same files so that a folder gives the same vectors here as
in ``SentenceTransformer(folder)``. A folder without them falls back to what sentence-transformers
itself would do: mean pooling, no normalisation, the tokenizer's or the position table's length.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from encoder.pooling import Pooling

__all__ = [
    "ModelNotFoundError",
    "ModelPrompts",
    "ModelSpec",
    "pinned_revision",
    "read_model_spec",
    "read_prompts",
    "resolve_model_dir",
]

# Roberta-style position tables reserve ``pad_token_id + 1`` slots before the first real position.
_PADDED_POSITION_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer"}
# Files worth fetching from a hub repo; bge-m3 also ships a 2.2 GB ONNX export we never load.
_HUB_IGNORE = ["onnx/*", "*.onnx", "*.msgpack", "*.h5", "*.ot", "imgs/*", "*.png", "*.jpg"]
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
)


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor a hub id that can be fetched (or found offline)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything the encoder needs to know about a model folder before loading weights."""

    path: Path  # the folder sentence-transformers would load
    transformer_path: Path  # the Hugging Face model inside it (often the same folder)
    pooling: Pooling
    normalize: bool
    max_tokens: int  # including special tokens, as sentence-transformers counts
    do_lower_case: bool
    dim: int
    has_st_config: bool

    def weight_files(self) -> list[Path]:
        """The files whose bytes decide the vectors: weights, config, tokenizer, extra heads."""
        folder = self.transformer_path
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        files = [*weights, folder / "config.json"]
        files += [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
        files += sorted(self.path.glob("*_linear.pt"))  # bge-m3's sparse / ColBERT heads
        return files

    def fingerprint(self) -> str:
        """A short id that changes when the weights, tokenizer, pooling, normalisation or length do.

        It hashes file *contents* (not paths or mtimes), so two replicas with copies of the same
        folder share cache keys, while a fine-tuned or re-pooled model never reads another's
        vectors. xxh3 streams about 10 GB/s, so bge-m3's 2.2 GB costs well under a second after the
        load has put the file in the page cache.
        """
        digest = xxhash.xxh3_128()
        digest.update(f"v1|{self.pooling}|{self.normalize}|{self.max_tokens}|{self.do_lower_case}".encode())
        for file in self.weight_files():
            digest.update(b"|" + file.name.encode() + b"|")
            with file.open("rb") as handle:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
        return digest.hexdigest()[:16]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local folder as it is; otherwise a hub id, fetched (or found in the local hub cache)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() and not (local / "modules.json").is_file():
            raise ModelNotFoundError(f"model folder {str(local)!r} has neither config.json nor modules.json")
        return local.resolve()
    if local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model folder {model!r} does not exist; set EMBED_MODEL to a folder or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, ignore_patterns=_HUB_IGNORE))
    except Exception as exc:  # the hub raises many types: offline, 404, auth, network
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else str(exc)
        raise ModelNotFoundError(
            f"model {model!r} is not a local folder and could not be fetched from the hub ({where}); "
            "set EMBED_MODEL to a local model folder, or allow downloads"
        ) from exc


_COMMIT = re.compile(r"[0-9a-f]{40}")


def pinned_revision(model: str, revision: str | None = None) -> str | None:
    """The commit that ``model`` at ``revision`` (a branch, a tag, a commit; None: the default
    branch) names now, fetching it if need be; None for a local folder.

    Loading that commit later (an engine restart) gives the same files even after the branch has
    moved on the hub, so a restart never silently changes the model.
    """
    if Path(model).expanduser().is_dir():
        return None
    folder = resolve_model_dir(model, revision)
    # The hub's cache keeps each revision as <cache>/models--{org}--{name}/snapshots/{commit hash}.
    if folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name):
        return folder.name
    return revision


@dataclass(frozen=True)
class ModelPrompts:
    """sentence-transformers' instruction prompts of a model (``config_sentence_transformers.json``):
    ``prompts`` by name (``{"query": "query: "}``), and the one applied when none is named."""

    prompts: dict[str, str]
    default_name: str | None = None


def read_prompts(path: Path) -> ModelPrompts:
    """The prompts of the sentence-transformers folder ``path`` (none where it has no such config)."""
    config_file = path / "config_sentence_transformers.json"
    if not config_file.is_file():
        return ModelPrompts({})
    config = _read_json(config_file)
    raw = config.get("prompts") or {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ValueError(f"{config_file}: 'prompts' must map names to strings")
    default = config.get("default_prompt_name") or None
    if default is not None and default not in raw:
        raise ValueError(f"{config_file}: default_prompt_name {default!r} is not one of its prompts {sorted(raw)}")
    pooling_file = _pooling_config_file(path)
    if raw and pooling_file is not None and _read_json(pooling_file).get("include_prompt") is False:
        # sentence-transformers then leaves the prompt's tokens out of the pooled mean; we pool over
        # the whole input, so serving the prompts would give other vectors than the model's.
        raise ValueError(
            f"{pooling_file}: include_prompt is false (the prompt's tokens are left out of pooling), which this "
            "server does not do; remove the model's prompts to serve it without them"
        )
    return ModelPrompts(dict(raw), default)


def _pooling_config_file(path: Path) -> Path | None:
    """The Pooling module's config.json of the sentence-transformers folder ``path``, if it has one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        if str(module.get("type", "")).rsplit(".", 1)[-1] == "Pooling":
            found = path / module.get("path", "1_Pooling") / "config.json"
            return found if found.is_file() else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _pooling_from_config(config: dict[str, Any], where: Path) -> Pooling:
    modes: dict[str, Pooling] = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_lasttoken": "lasttoken",
    }
    chosen = [mode for key, mode in modes.items() if config.get(key)]
    unsupported = [
        key
        for key in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
        if config.get(key)
    ]
    if unsupported or len(chosen) != 1:
        raise ValueError(
            f"{where}: pooling must be exactly one of cls, mean or lasttoken; found {chosen + unsupported or 'none'}"
        )
    return chosen[0]


def _position_limit(config: dict[str, Any]) -> int | None:
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if config.get("model_type") in _PADDED_POSITION_MODELS:
        return positions - int(config.get("pad_token_id", 1)) - 1
    return positions


def read_model_spec(path: Path) -> ModelSpec:
    """Read pooling, normalisation, max length and dimension from a resolved model folder."""
    modules_file = path / "modules.json"
    transformer_path, pooling_dir, normalize = path, None, False
    has_st = modules_file.is_file()
    if has_st:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _KNOWN_MODULES:
                raise ValueError(f"{modules_file}: module {kind!r} is not supported (only {sorted(_KNOWN_MODULES)})")
            if kind == "Transformer":
                transformer_path = path / module.get("path", "")
            elif kind == "Pooling":
                pooling_dir = path / module.get("path", "1_Pooling")
            else:
                normalize = True
    config = _read_json(transformer_path / "config.json")
    st_config_file = transformer_path / "sentence_bert_config.json"
    if not st_config_file.is_file():
        st_config_file = path / "sentence_bert_config.json"
    st_config = _read_json(st_config_file) if st_config_file.is_file() else {}

    pooling: Pooling = "mean"
    dim = int(config.get("hidden_size") or config.get("d_model") or 0)
    if pooling_dir is not None and (pooling_dir / "config.json").is_file():
        pooling_config = _read_json(pooling_dir / "config.json")
        pooling = _pooling_from_config(pooling_config, pooling_dir / "config.json")
        dim = int(pooling_config.get("word_embedding_dimension", dim))
    if dim <= 0:
        raise ValueError(f"{transformer_path / 'config.json'}: cannot tell the hidden size")

    max_tokens = st_config.get("max_seq_length")
    if not isinstance(max_tokens, int):
        tokenizer_config = transformer_path / "tokenizer_config.json"
        limit = _read_json(tokenizer_config).get("model_max_length") if tokenizer_config.is_file() else None
        max_tokens = limit if isinstance(limit, int) and limit < 1_000_000 else None
    positions = _position_limit(config)
    if positions is not None:
        max_tokens = positions if max_tokens is None else min(max_tokens, positions)
    if max_tokens is None:
        raise ValueError(f"{path}: cannot tell the maximum sequence length; pass max_tokens")
    return ModelSpec(
        path=path,
        transformer_path=transformer_path,
        pooling=pooling,
        normalize=normalize,
        max_tokens=int(max_tokens),
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        dim=dim,
        has_st_config=has_st,
    )
