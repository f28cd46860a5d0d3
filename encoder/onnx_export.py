"""Export a transformer to ONNX once: ids and mask in, last hidden state out.

The first step of int8 (and of any ONNX backend): the model is loaded in float32 with eager
attention (:func:`load_float_model`: a plain MatMul/Softmax graph the fusions recognise) and
exported with the TorchScript exporter at opset :data:`OPSET`, batch and sequence dynamic
(:func:`export_onnx`). A model over 2 GB keeps its weights in one ``model.onnx.data`` beside the
graph. :data:`EXPORT_VERSION` names the export in the cache: bump it when the export changes, and
old folders are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder.model_files import ModelSpec

__all__ = ["EXPORT_VERSION", "OPSET", "export_onnx", "load_float_model"]

EXPORT_VERSION = "e1"  # bump when the export changes: old folders are then ignored
OPSET = 17
_MODEL_FILE = "model.onnx"
_DATA_FILE = "model.onnx.data"
_TWO_GB = 2**31 - 1


class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden


def load_float_model(spec: ModelSpec) -> torch.nn.Module:
    """The transformer in float32 with eager attention (a plain MatMul/Softmax graph to export)."""
    from transformers import AutoModel

    model: torch.nn.Module = AutoModel.from_pretrained(
        str(spec.transformer_path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def export_onnx(model: torch.nn.Module, folder: Path, pad_token_id: int) -> Path:
    """Write ``folder/model.onnx``: ids and mask in, last hidden state out, batch and length dynamic."""
    import warnings

    import onnx

    wrapper = _LastHidden(model).eval()  # eval on the wrapper too: the exporter restores its mode after
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [2, 5, 6, 3] + [pad_token_id] * 4], dtype=torch.int64)
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [4]])).to(torch.int64)  # a padded row: trace the mask
    target = folder / _MODEL_FILE
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(target),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model.eval()
    extra = [p for p in folder.iterdir() if p.name != _MODEL_FILE]
    if extra:  # over 2 GB the exporter writes one file per tensor: gather them into one
        proto = onnx.load(str(target))
        for path in extra:
            path.unlink()
        onnx.save_model(proto, str(target), save_as_external_data=True, location=_DATA_FILE)
    return target
