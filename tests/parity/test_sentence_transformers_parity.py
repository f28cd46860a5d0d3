"""Our vectors equal sentence-transformers' on the same folder (the reference implementation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from encoder import Encoder, load_encoder
from support.factories import mixed_texts


def test_minilm_matches_sentence_transformers(minilm_dir: Path, minilm_encoder: Encoder) -> None:
    from sentence_transformers import SentenceTransformer

    texts = mixed_texts(200, seed=7)
    lengths = [len(ids) for ids in minilm_encoder.tokenize(texts)]
    assert max(lengths) == 256 and min(lengths) < 32, "the corpus must mix short and truncated inputs"
    assert sum(length == 256 for length in lengths) >= 10

    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=32, convert_to_numpy=True
    )
    ours = minilm_encoder.embed(texts)
    cosines = np.sum(ours * reference, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    print(f"worst cosine vs sentence-transformers over {len(texts)} texts: {cosines.min():.8f}")
    assert cosines.min() >= 0.99999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_vector(minilm_encoder: Encoder) -> None:
    short = "cache hit rate"
    long_text = " ".join(["Embeddings turn text into points in space."] * 40)
    ids = minilm_encoder.tokenize([short, long_text])
    assert len(ids[1]) >= 250
    alone = minilm_encoder.encode([ids[0]])[0]
    batched = minilm_encoder.encode(ids)[0]
    assert float(np.dot(alone, batched)) >= 0.99999
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_tiny_bge_m3_is_cls_normalised_8192(tiny_bge_m3_dir: Path) -> None:
    encoder = load_encoder(str(tiny_bge_m3_dir))
    assert (encoder.pooling, encoder.normalize, encoder.max_tokens, encoder.dim) == ("cls", True, 8192, 32)

    texts = ["hello world", "Быстрая коричневая лиса", "敏捷的棕色狐狸跳过了懒狗。" * 5]
    ours = encoder.embed(texts)

    raw = AutoModel.from_pretrained(str(tiny_bge_m3_dir)).eval()
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        cls = raw(**batch).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "lasttoken"])
def test_pooling_follows_the_folder(tiny_bge_m3_dir: Path, tmp_path: Path, pooling: str) -> None:
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_bge_m3_dir, tmp_path / "model"))
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config["pooling_mode_cls_token"] = False
    config[{"mean": "pooling_mode_mean_tokens", "lasttoken": "pooling_mode_lasttoken"}[pooling]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))

    encoder = load_encoder(str(folder))
    assert encoder.pooling == pooling
    ids = encoder.tokenize(["a short one", "a somewhat longer input text for pooling"])
    raw = AutoModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        hidden = [raw(input_ids=torch.tensor([row])).last_hidden_state[0] for row in ids]
    pooled = [h.mean(0) if pooling == "mean" else h[-1] for h in hidden]
    expected = torch.nn.functional.normalize(torch.stack(pooled), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode(ids), expected, atol=1e-5)
