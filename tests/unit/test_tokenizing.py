"""Exact token ids for inputs of any length: a growing prefix gives what the whole text gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from encoder import Encoder
from encoder.model import InputTooLongError
from encoder.tokenizing import TooManyTokens, tokenize_exact, words_are_local


def _adversarial(seed: int) -> list[str]:
    """Texts with few (or many) tokens per character, mixed, at many lengths."""
    rng = random.Random(seed)
    pieces = ["cat", "dog ran", " " * 50, "A" * 150, "\u200b" * 30, "\x01" * 20, "\t\n", "敏捷的棕色狐狸", "don't", "—"]
    texts = []
    for _ in range(60):
        text = "".join(rng.choice(pieces) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 400)))
        texts.append(text.strip() or "x")
    return texts


def _byte_level_bpe(*, opaque: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer (byte-level BPE, the regex pre-tokeniser with one character of
    look-ahead) trained here on the adversarial texts; ``opaque`` adds a normaliser step whose
    reach is unbounded (a regex that may span words), so words cannot be taken as final."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if opaque:
        tokenizer.normalizer = normalizers.Replace(Regex("cat.*dog"), "pet")
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_adversarial(seed=7) * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module", params=["minilm", "tiny-bge-m3", "byte-level-bpe", "opaque-normaliser"])
def tokenizer(request: pytest.FixtureRequest, minilm_dir: Path, tiny_bge_m3_dir: Path):  # type: ignore[no-untyped-def]
    if request.param in ("byte-level-bpe", "opaque-normaliser"):
        return _byte_level_bpe(opaque=request.param == "opaque-normaliser")
    return AutoTokenizer.from_pretrained(str(minilm_dir if request.param == "minilm" else tiny_bge_m3_dir))


def test_words_are_taken_as_final_only_for_pipelines_that_cannot_reach_back(tokenizer) -> None:  # type: ignore[no-untyped-def]
    opaque = isinstance(tokenizer.backend_tokenizer.normalizer, object) and "cat.*dog" in str(
        tokenizer.backend_tokenizer.normalizer.__getstate__()
    )
    assert words_are_local(tokenizer) is not opaque
    text = "cat " + "x " * 400 + "dog"  # the opaque normaliser turns all of it into "pet"
    whole = tokenizer(text, truncation=True, max_length=16)["input_ids"]
    assert tokenize_exact(tokenizer, [text], max_tokens=16, truncate=True, piece_chars=40, max_read=10**7) == [whole]


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


def test_one_open_word_is_tokenised_to_its_end_within_a_token_budget(tiny_bge_m3_dir: Path) -> None:
    """SentencePiece segments a run without spaces as one word, and no cut inside it is sound, so it
    is read to its end: exactly, while it fits the token budget; refused, never cut, past it (a run of
    characters that NFKC expands, like U+FDFA eighteen-fold, once cost 6.5 GB for a 3 MB input)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir))
    calls: list[int] = []

    class Counting:
        def __call__(self, text: str, **kwargs: object) -> object:
            calls.append(len(text))
            return tokenizer(text, **kwargs)

        def __getattr__(self, name: str) -> object:
            return getattr(tokenizer, name)

    run = "a " + "\u72d0\u72f8" * 3_000  # Chinese without spaces: one Metaspace word
    whole = tokenizer(run, truncation=True, max_length=32)["input_ids"]
    exact = tokenize_exact(
        Counting(), [run], max_tokens=32, truncate=True, piece_chars=64, max_read=10**6, budget=10**5
    )
    assert exact == [whole]

    calls.clear()
    expanding = "a " + "\u33af" * 200_000  # NFKC makes "rad\u2215s" + "2" of each, no space
    got = tokenize_exact(
        Counting(), [expanding], max_tokens=32, truncate=True, piece_chars=64, max_read=10**6, budget=4_096
    )
    assert isinstance(got, TooManyTokens) and got.open_word and got.unread is not None
    assert got.tokens >= 4_096
    assert max(calls) < 2_000, f"read {calls} characters, far past the budget's worth"


def test_special_tokens_written_in_the_text_keep_their_place(minilm_dir: Path) -> None:
    """``[SEP]`` typed into a text is the special token (the tokenizer splits it out first); in a
    long truncated text it stays where it is, not dropped with the template's own specials."""
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    text = "see [SEP] here " * 10 + "word " * 3_000
    whole = tokenizer(text, truncation=True, max_length=64)["input_ids"]
    assert whole.count(tokenizer.sep_token_id) > 2
    assert tokenize_exact(tokenizer, [text], max_tokens=64, truncate=True, piece_chars=256, max_read=10**6) == [whole]


def test_a_contraction_cut_by_the_prefix_is_not_taken_as_final() -> None:
    """GPT-2's regex makes ``'re`` one word after ``we``; a prefix ending in ``we'r`` has ``'`` and
    ``r``: the characters just before the cut are never final."""
    tokenizer = _byte_level_bpe()
    for cut in range(3, 8):
        text = "ok " * 30 + "we're" + " fine" * 40
        size = text.index("we're") + cut
        for limit in range(30, 40):
            whole = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
            got = tokenize_exact(tokenizer, [text], max_tokens=limit, truncate=True, piece_chars=size, max_read=10**6)
            assert got == [whole], (cut, limit)


def test_a_limit_with_no_room_for_text_is_refused_when_the_model_loads(minilm_dir: Path) -> None:
    from encoder import load_encoder

    with pytest.raises(ValueError, match="leaves no room for text"):
        load_encoder(str(minilm_dir), max_tokens=2)  # [CLS] and [SEP] only
    assert load_encoder(str(minilm_dir), max_tokens=3).tokenize(["hello world"], truncate=True)[0][1:-1] != []
