"""Dense, sparse and ColBERT outputs against FlagEmbedding's BGEM3 recipe, on a tiny bge-m3 folder.

FlagEmbedding 1.4.2 installs here but does not import against transformers 5 (it imports
``transformers.modeling_attn_mask_utils``, which is gone), so the reference below is its published
recipe, written out: ``BGEM3FlagModel.encode`` with ``_dense_embedding`` (CLS, normalised),
``_sparse_embedding`` + ``_process_token_weights`` and ``_colbert_embedding`` +
``_process_colbert_vecs``, run one text at a time (no padding at all), so batching and padding on
our side are tested too.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from encoder import load_encoder
from support.factories import SAMPLE_LINES


def _linear(path: Path) -> torch.nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    out_features, in_features = state["weight"].shape
    layer = torch.nn.Linear(in_features, out_features)
    layer.load_state_dict(state)
    return layer.eval()


def _reference(folder: Path, text: str) -> tuple[np.ndarray, dict[int, float], np.ndarray]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    sparse_linear, colbert_linear = _linear(folder / "sparse_linear.pt"), _linear(folder / "colbert_linear.pt")
    batch = tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1)[0].numpy()
        token_weights = torch.relu(sparse_linear(hidden)).squeeze(-1)[0].numpy()
        colbert = colbert_linear(hidden[:, 1:]) * batch["attention_mask"][:, 1:][:, :, None].float()
        colbert = torch.nn.functional.normalize(colbert, dim=-1)[0].numpy()
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    lexical: dict[int, float] = defaultdict(int)
    for weight, idx in zip(token_weights, batch["input_ids"][0].tolist(), strict=True):
        if idx not in unused and weight > 0 and weight > lexical[idx]:
            lexical[idx] = float(weight)
    tokens = int(batch["attention_mask"].sum())
    return dense, dict(lexical), colbert[: tokens - 1]


def test_all_three_outputs_match_the_recipe(tiny_bge_m3_dir: Path) -> None:
    encoder = load_encoder(str(tiny_bge_m3_dir))
    assert encoder.outputs == {"dense", "sparse", "colbert"}
    texts = [SAMPLE_LINES[0], SAMPLE_LINES[5] * 3, "short", SAMPLE_LINES[4] + " " + SAMPLE_LINES[11]]
    ours = encoder.encode_outputs(encoder.tokenize(texts), frozenset({"dense", "sparse", "colbert"}))
    worst = 0.0
    for text, got in zip(texts, ours, strict=True):
        dense, lexical, colbert = _reference(tiny_bge_m3_dir, text)
        assert got.dense is not None
        assert got.sparse is not None
        assert got.colbert is not None
        np.testing.assert_allclose(got.dense, dense, atol=1e-4)
        ids, weights = got.sparse.indices, got.sparse.values
        assert ids.tolist() == sorted(lexical), "same token ids, ascending"
        np.testing.assert_allclose(weights, [lexical[i] for i in ids.tolist()], atol=1e-4)
        assert got.colbert.shape == colbert.shape
        np.testing.assert_allclose(got.colbert, colbert, atol=1e-4)
        worst = max(worst, float(np.abs(got.colbert - colbert).max()), float(np.abs(got.dense - dense).max()))
    print(f"largest difference to the recipe: {worst:.2e}")
    # dense from encode_outputs is the same vector the dense endpoint serves
    np.testing.assert_allclose(encoder.embed(texts), np.stack([o.dense for o in ours]), atol=1e-5)
