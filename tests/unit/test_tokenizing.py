"""Exact token ids for inputs of any length: a growing prefix gives what the whole text gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from encoder import Encoder
from encoder.model import InputTooLongError
from encoder.tokenizing import TooManyTokens, tokenize_exact


def _adversarial(seed: int) -> list[str]:
    """Texts with few (or many) tokens per character, mixed, at many lengths."""
    rng = random.Random(seed)
    pieces = ["cat", "dog ran", " " * 50, "A" * 150, "\u200b" * 30, "\x01" * 20, "\t\n", "敏捷的棕色狐狸", "don't", "—"]
    texts = []
    for _ in range(60):
        text = "".join(rng.choice(pieces) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 400)))
        texts.append(text.strip() or "x")
    return texts


@pytest.fixture(scope="module", params=["minilm", "tiny-bge-m3"])
def tokenizer(request: pytest.FixtureRequest, minilm_dir: Path, tiny_bge_m3_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(minilm_dir if request.param == "minilm" else tiny_bge_m3_dir))


@pytest.mark.parametrize("truncate", [True, False])
def test_prefixes_give_exactly_the_whole_texts_tokens(tokenizer, truncate: bool) -> None:  # type: ignore[no-untyped-def]
    limit = 64
    for text in _adversarial(seed=3):
        whole = tokenizer(text, truncation=truncate, max_length=limit if truncate else None, verbose=False)
        got = tokenize_exact(tokenizer, [text], max_tokens=limit, truncate=truncate, piece_chars=40, max_read=10**7)
        if not truncate and len(whole["input_ids"]) > limit:
            assert isinstance(got, TooManyTokens), text[:80]
            assert got.tokens > limit
            assert got.tokens <= len(whole["input_ids"]), "a lower bound, never more than the truth"
        else:
            assert got == [whole["input_ids"]], text[:80]


def test_an_input_undecided_after_the_read_limit_is_refused_not_cut(minilm_encoder: Encoder) -> None:
    from encoder import model

    text = "hello" + " " * (model.MAX_READ_CHARS + 10) + "world"
    for truncate in (True, False):
        with pytest.raises(InputTooLongError) as info:
            minilm_encoder.tokenize([text], truncate=truncate)
        assert info.value.unread is not None
        assert "the most this server reads of one input" in info.value.describe()
    fits = "hello" + " " * 20_000 + "world"  # 2 tokens in 20,010 characters: tokenised whole, exactly
    assert minilm_encoder.tokenize([fits], truncate=False) == [minilm_encoder.tokenizer(fits)["input_ids"]]
