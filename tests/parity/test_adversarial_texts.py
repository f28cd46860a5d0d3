"""Texts with few tokens per character, through the server, against sentence-transformers.

Whitespace runs, words of over 100 characters (one ``[UNK]`` each to WordPiece), zero-width and
control characters (removed by its normaliser): each at a token count just under the model's limit
and just over it. A character pre-cut once embedded a prefix of such texts (strict mode too) or
refused ones that fit; both would then be cached for a week under the whole text's key.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from encoder import Encoder

WORD = "cat"  # one WordPiece token
FAMILIES = {
    "whitespace runs": lambda n: (" " * 40).join([WORD] * n),
    "long words": lambda n: " ".join(["A" * 150] * n),  # each word one [UNK]
    "zero-width characters": lambda n: ("\u200b" * 40 + " ").join([WORD] * n),
    "control characters": lambda n: ("\x01" * 40 + " ").join([WORD] * n),
    "one run in the middle": lambda n: " ".join([WORD] * (n // 2)) + " " * 20_000 + " ".join([WORD] * (n - n // 2)),
}
LIMIT = 256  # all-MiniLM-L6-v2's max_seq_length; [CLS] and [SEP] take two of it


def _texts() -> dict[str, str]:
    texts = {}
    for family, build in FAMILIES.items():
        texts[f"{family}, fits"] = build(LIMIT - 2)
        texts[f"{family}, one token over"] = build(LIMIT - 1)
    return texts


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    texts = _texts()
    vectors = model.encode(list(texts.values()), normalize_embeddings=True, convert_to_numpy=True)
    return dict(zip(texts, vectors, strict=True))


def _post(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"input": text, "model": "all-MiniLM-L6-v2"}, timeout=60)


@pytest.mark.parametrize("truncate", [True, False], ids=["truncating", "strict"])
def test_every_adversarial_text_gets_sentence_transformers_vector_or_a_true_refusal(
    gateway_factory, minilm_encoder: Encoder, reference: dict[str, np.ndarray], truncate: bool
) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(truncate=truncate)
    tokenizer = minilm_encoder.tokenizer
    for name, text in _texts().items():
        whole = len(tokenizer(text.strip(), verbose=False)["input_ids"])  # the true count, tokenised whole
        assert whole == (LIMIT if name.endswith("fits") else LIMIT + 1), (name, whole)
        response = _post(live.url, text)
        if not truncate and whole > LIMIT:
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"]["code"] == "context_length_exceeded", name
            continue
        assert response.status_code == 200, (name, response.text)
        got = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
        cosine = float(np.dot(got, reference[name]))
        assert cosine > 0.99999, (name, cosine)
        assert response.json()["usage"]["prompt_tokens"] == min(whole, LIMIT), name
