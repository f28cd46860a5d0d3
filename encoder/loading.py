"""``load_encoder``: an embedding model or a reranker, told apart by the folder itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encoder.cross_encoder import is_cross_encoder, load_cross_encoder
from encoder.model import Encoder
from encoder.model import load_encoder as load_embedder
from encoder.model_files import resolve_model_dir

__all__ = ["load_encoder"]


def load_encoder(model: str, *, revision: str | None = None, quantize: str = "none", **options: Any) -> Encoder:
    """Load ``model`` (a folder or a hub id): a sequence classifier as a reranker
    (:func:`~encoder.cross_encoder.load_cross_encoder`: scores of query-document pairs), anything
    else as an embedding model (:func:`encoder.model.load_encoder`, whose options these are)."""
    if quantize != "none":
        # int8's own checks (the device, the dtype) come before anything is fetched
        if Path(model).expanduser().is_dir() and is_cross_encoder(Path(model).expanduser()):
            raise ValueError("int8 serves embedding models only; this model is a cross-encoder (a reranker)")
        return load_embedder(model, revision=revision, quantize=quantize, **options)
    folder = resolve_model_dir(model, revision)
    if not is_cross_encoder(folder):
        return load_embedder(model, revision=revision, quantize=quantize, **options)
    options.pop("onnx_cache_dir", None)
    options.pop("int8_floor", None)
    return load_cross_encoder(str(folder), **options)
