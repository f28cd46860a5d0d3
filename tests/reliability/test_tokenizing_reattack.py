"""A second adversarial review of exact tokenising (6ebb20f, ``encoder/tokenizing.py``).

The promise under attack: ``tokenize_exact(tokenizer, [text], ...)`` gives exactly what tokenising
the whole text in one call gives (cut to ``max_tokens`` when truncating), or, strict, a
``TooManyTokens`` whose count is a true lower bound above ``max_tokens``, for bounded work. The rule
behind it: a prefix's tokens of every *word* (``word_ids``) before its last word are final, when the
normaliser and pre-tokeniser are all in ``_LOCAL_STEPS``.

Tests named ``test_f*`` are findings (they fail on 6ebb20f); ``test_held_*`` are attacks the code
withstood. Every tokenizer here is built in-process (no hub); each test is bounded (a few seconds,
at most a few hundred kB of text).

Findings:

* f1: an added token with ``lstrip`` (``<mask>`` in RoBERTa and XLM-R/bge-m3 tokenizers) cut by
  the prefix. Added tokens are split out *before* normalising and pre-tokenising, and ``lstrip``
  swallows the whitespace before the token; the prefix sees only ``<ma``, so that whitespace becomes
  words of its own, which are *before* the last word and so taken as final. Wrong ids when
  truncating, and a false refusal when strict (more "final" tokens than the whole text has).
* f2: the same for any added token whose cut-off fragment pre-tokenises into more tokens than the
  added token itself (``</s>`` cut as ``</`` -> ``<``, ``/`` in a byte-level BPE without that merge).
* f3: ``Replace`` with any literal string is allow-listed, but a literal spanning several words (an
  HTML ``<br />``) reaches back over words the prefix took as final.
* f4: ``Split`` with any regex is allow-listed, but a regex whose match of a word takes an optional
  suffix (the o200k/GPT-4o pattern's ``[\\p{Ll}...]+(?i:'s|'t|'re|...)?``) makes the word before the
  prefix's last one depend on what follows the cut.
* f5: a pipeline without a pre-tokeniser (Llama/Mistral-shaped: ``Prepend`` + ``Replace`` normaliser,
  no pre-tokeniser) passes ``words_are_local`` but has one word per text: ordinary prose with
  spaces, truncating, is refused as "one word ... break it with spaces" once past the token budget.
* f6: a pipeline with a step outside ``_LOCAL_STEPS`` (here ``Nmt``, character-local) is, by the
  module docstring, "tokenised whole"; in fact a truncating prose text past the token budget is
  refused as an open word.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from encoder.tokenizing import TooManyTokens, token_budget, tokenize_exact, words_are_local

# --------------------------------------------------------------------------------------------
# helpers


def _whole(tokenizer: Any, text: str, max_tokens: int, truncate: bool) -> list[int] | tuple[str, int]:
    """What tokenising the whole text in one call answers: ids, or ("too long", count)."""
    ids = tokenizer(text, truncation=truncate, max_length=max_tokens if truncate else None, verbose=False)["input_ids"]
    if not truncate and len(ids) > max_tokens:
        return ("too long", len(ids))
    return ids


def _exact(tokenizer: Any, text: str, max_tokens: int, truncate: bool, piece: int, **kw: Any) -> Any:
    got = tokenize_exact(
        tokenizer,
        [text],
        max_tokens=max_tokens,
        truncate=truncate,
        piece_chars=piece,
        max_read=kw.pop("max_read", 10**7),
        **kw,
    )
    return got if isinstance(got, TooManyTokens) else got[0]


def _agrees(tokenizer: Any, text: str, max_tokens: int, truncate: bool, piece: int) -> str | None:
    """None when tokenize_exact keeps its promise on this input, else a description of the break."""
    whole = _whole(tokenizer, text, max_tokens, truncate)
    got = _exact(tokenizer, text, max_tokens, truncate, piece)
    if isinstance(whole, tuple):
        if isinstance(got, TooManyTokens) and max_tokens < got.tokens <= whole[1]:
            return None
    elif got == whole:
        return None

    def show(x: Any) -> Any:
        return x if isinstance(x, (tuple, TooManyTokens)) else tokenizer.convert_ids_to_tokens(x)[-8:]

    return f"max_tokens={max_tokens} truncate={truncate} piece={piece}: whole {show(whole)} vs got {show(got)}"


_BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _roberta_like(*, lstrip: bool) -> PreTrainedTokenizerFast:
    """A RoBERTa-shaped tokenizer (byte-level BPE, <s> ... </s>, <mask> with ``lstrip`` as in
    roberta-base / all-distilroberta-v1 / xlm-roberta), over bytes only (no merges), so that every
    count below is plain to see."""
    vocab = {t: i for i, t in enumerate(_ROBERTA_SPECIALS + _BYTES)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tk.add_special_tokens([AddedToken(t, lstrip=(t == "<mask>" and lstrip)) for t in _ROBERTA_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=lstrip),
    )


def _template(tk: Tokenizer, bos: str, eos: str) -> None:
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tk.token_to_id(bos)), (eos, tk.token_to_id(eos))]
    )


# --------------------------------------------------------------------------------------------
# f1: lstrip added tokens cut by the prefix


def test_f1_lstrip_mask_cut_by_the_prefix_truncating() -> None:
    """``b   <mask>`` with the cut inside ``<mask>``: the prefix ``b   <ma`` pre-tokenises the
    spaces as words ``Ġ Ġ``, ``Ġ<``, before the last word ``ma``, so they are taken as final; the whole
    text has ``<mask>`` there (lstrip swallowed the spaces). Truncating to just past ``b`` gives
    ``... b Ġ`` instead of ``... b <mask>``.

    Fix: never let a prefix end inside (or in the lstrip whitespace before) an added token: move the
    cut back before the start of any added-token content that could straddle it (text[size-L:size+L]
    for L the longest added token), and before the whitespace run preceding it when the token lstrips;
    for ``normalized`` added tokens, do it on the normalised text or treat the words in that window
    as not final."""
    tokenizer = _roberta_like(lstrip=True)
    assert words_are_local(tokenizer)
    text = "a " * 20 + "b   <mask> c" + " d" * 30
    cut = text.index("<mask>") + 3
    broken = [
        why
        for max_tokens in range(40, 48)
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]
    assert not broken, "\n".join(broken)


def test_f1_lstrip_mask_cut_by_the_prefix_strict_false_refusal() -> None:
    """The same cut, strict: the whole text has exactly ``max_tokens`` tokens and fits, but the
    prefix's "final" tokens (the swallowed spaces as words) already outnumber the room: refused,
    with a count that is no lower bound."""
    tokenizer = _roberta_like(lstrip=True)
    text = "a " * 20 + "b   <mask>"
    whole = tokenizer(text)["input_ids"]
    limit = len(whole)
    got = _exact(tokenizer, text, limit, False, len(text) - 2)
    assert got == whole, f"fits in {limit} tokens, got {got}"


def test_f1_bge_m3_shaped_lstrip_mask_cut_by_the_prefix() -> None:
    """bge-m3's own tokenizer shape (NFKC, Metaspace, Unigram) with ``<mask>`` as bge-m3/XLM-R
    declare it (``lstrip=True``): ``word    <mask>`` cut inside ``<mask>`` gives ``▁`` words taken as
    final where the whole text has ``<mask>`` (real bge-m3 also collapses space runs with
    ``Replace(" {2,}", " ")``, which hides this one case; tokenizers without it do not)."""
    from support.factories import build_tokenizer

    base = build_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        if token["content"] == "<mask>":
            token["lstrip"] = True
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True),
    )
    text = "hello world " * 6 + "hello    <mask> world" + " hello" * 20
    cut = text.index("<mask>") + 3
    broken = [
        why
        for max_tokens in range(10, 80)
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]
    assert not broken, "\n".join(broken[:4])


# --------------------------------------------------------------------------------------------
# f2: an added token's fragment that pre-tokenises into several tokens


def test_f2_added_token_fragment_taken_as_final() -> None:
    """``b </s>`` with the cut after ``</s``: the prefix has words `` b``, `` </`` (-> ``Ġ < /``),
    ``s``; `` </`` is before the last word, so final, but the whole text has `` b``, ``Ġ``, ``</s>``.
    Truncated just past ``Ġ`` the answer ends ``<`` instead of ``</s>``; strict, a text that fits is
    refused. Fix: as f1 (no prefix ends inside an added token)."""
    tokenizer = _roberta_like(lstrip=False)
    text = "a " * 20 + "b </s>" + " c" * 30
    cut = text.index("</s>") + 3
    broken = [
        why
        for max_tokens in range(40, 48)
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]
    fits = "a " * 20 + "b </s>"
    limit = len(tokenizer(fits)["input_ids"])
    got = _exact(tokenizer, fits, limit, False, len(fits) - 1)
    if isinstance(got, TooManyTokens):
        broken.append(f"strict: fits in {limit} tokens, refused with {got}")
    assert not broken, "\n".join(broken)


# --------------------------------------------------------------------------------------------
# f3: Replace with a literal spanning several words


def _wordpiece(normalizer: Any, pre_tokenizer: Any, words: list[str]) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    _template(tk, "[CLS]", "[SEP]")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


def test_f3_literal_replace_spanning_words() -> None:
    """``Replace("<br />", " ")`` (any literal passes ``_local_one``) before a BERT pre-tokeniser:
    the prefix ``x <br /`` has words ``x < br /`` with ``<`` and ``br`` final; the whole text has the
    literal replaced by a space. Truncating: ``< br`` instead of the next words; strict: a fitting
    text refused. Fix: allow a literal ``Replace`` only when its pattern is one character (or holds no
    word break the pre-tokeniser could split at), else treat the pipeline as not local."""
    tokenizer = _wordpiece(
        normalizers.Replace("<br />", " "), pre_tokenizers.BertPreTokenizer(), ["x", "y", "<", "/", ">", "br"]
    )
    assert words_are_local(tokenizer)
    text = "x " * 20 + "<br />" + " y" * 30
    cut = text.index("<br />") + 5
    broken = [
        why
        for max_tokens in range(20, 28)
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]
    assert not broken, "\n".join(broken)


# --------------------------------------------------------------------------------------------
# f4: Split with a regex whose match takes an optional suffix

_O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_f4_split_regex_with_optional_suffix() -> None:
    """The o200k (GPT-4o) split pattern with byte-level BPE, as HF ports of it ship: `` we're`` is one
    word (one token with these merges), but the prefix `` we'r`` is `` we`` + ``'r``: `` we``
    (``Ġ w e``, three tokens) is before the last word, so final. Truncating: ``Ġ`` where the whole has
    ``Ġwe're``; strict: a fitting text refused. Fix: allow ``Split`` only for patterns known to be
    local (the GPT-2 / cl100k / Qwen / Llama-3 ones, by exact string), not any regex."""
    merges = [("'", "r"), ("'r", "e"), ("e", "'re"), ("w", "e're"), ("Ġ", "we're")]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + _BYTES + ["".join(m) for m in merges])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_O200K), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    _template(tk, "<s>", "</s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    assert words_are_local(tokenizer)
    text = "x " * 20 + "we're" + " y" * 20
    cut = text.index("we're") + 4
    broken = [
        why
        for max_tokens in range(38, 46)
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]
    fits = "x " * 20 + "we're"
    limit = len(tokenizer(fits)["input_ids"])
    got = _exact(tokenizer, fits, limit, False, len(fits) - 1)
    if isinstance(got, TooManyTokens):
        broken.append(f"strict: fits in {limit} tokens, refused with {got}")
    assert not broken, "\n".join(broken)


# --------------------------------------------------------------------------------------------
# f5, f6: false refusals of prose when truncating


def test_f5_no_pre_tokenizer_prose_is_refused_as_one_word() -> None:
    """Llama/Mistral-shaped (e5-mistral, SFR-Embedding-Mistral): normaliser ``Prepend("▁")`` +
    ``Replace(" ", "▁")``, no pre-tokeniser. ``words_are_local`` says yes (no step is outside the
    list), but every text is one word, so a truncating request of 72 kB of ordinary prose is refused
    as "a run that this model's tokenizer segments as one word (no space or other break) ... break it
    with spaces", though it has spaces and tokenising it whole takes 0.05 s.

    Fix: know when a pipeline has no word breaks at all (no pre-tokeniser, Metaspace(split=False),
    ByteLevel(use_regex=False) alone) and either tokenise such texts whole up to ``max_read`` (the
    docstring's "tokenised whole"), or refuse with a message that does not blame the text."""
    chars = list("abcdefghijklmnopqrstuvwxyz▁.,")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    _template(tk, "<s>", "</s>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = "the cat sat on the mat. " * 3000
    assert len(tokenizer(text)["input_ids"]) > token_budget(64)
    got = _exact(tokenizer, text, 64, True, 64 * 32, max_read=1_000_000)
    assert got == _whole(tokenizer, text, 64, True), f"refused: {got}"


def test_f6_unlisted_character_local_normaliser_prose_is_refused() -> None:
    """BERT-shaped with an ``Nmt`` normaliser (as tokenizers' SentencePieceUnigramTokenizer and some
    converters write it): not in ``_LOCAL_STEPS``, so by the module docstring "tokenised whole". In
    fact a truncating 960 kB prose text (below ``max_read``) is refused as an open word once the
    prefix holds the token budget. Fix: add ``Nmt`` (and the ``ByteLevel`` normaliser), both
    character-local, to ``_LOCAL_STEPS``; for other non-local pipelines, tokenise whole up to
    ``max_read`` as documented, or correct the docstring and the refusal's message."""
    words = ["the", "cat", "sat", "on", "mat", "."]
    tokenizer = _wordpiece(
        normalizers.Sequence([normalizers.Nmt(), normalizers.Lowercase()]), pre_tokenizers.BertPreTokenizer(), words
    )
    assert words_are_local(tokenizer), "Nmt is character-local (fixed: listed)"
    text = "the cat sat on the mat. " * 40_000
    got = _exact(tokenizer, text, 64, True, 64 * 32, max_read=1_000_000)
    assert got == _whole(tokenizer, text, 64, True), f"refused: {got}"
    # A step that is not local (a replacement that may span words): tokenised whole, as documented.
    opaque = _wordpiece(normalizers.Replace(Regex("cat.*?mat"), "cat"), pre_tokenizers.BertPreTokenizer(), words)
    assert not words_are_local(opaque)
    got = _exact(opaque, text, 64, True, 64 * 32, max_read=1_000_000)
    assert got == _whole(opaque, text, 64, True), f"refused: {got}"


# --------------------------------------------------------------------------------------------
# held: attacks the code withstood

_HOSTILE = [
    "a", "b", "x", "hello", "world", " ", "  ", "\n", "\t", ".", "...", "!", "'", "ll", "'ll", "=", "\u0338",
    "e", "\u0301", "\u0323", "İ", "中", "文", "\u1100", "\u1161", "\u11a8", "가", "[SEP]", "[", "SEP", "]",
    "<s>", "</s>", "<mask>", "\u200b", "\u00a0", "\u3000", "1", "23", "ﬁ", "½", "\ufdfa", "¨", "\u0085",
    "\x00", "\ufeff", "α", "テ",
]  # fmt: skip


def _fuzz(tokenizer: Any, alphabet: list[str], *, seed: int, rounds: int) -> list[str]:
    rng = random.Random(seed)
    broken: list[str] = []
    for _ in range(rounds):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 300)))
        why = _agrees(tokenizer, text, rng.randint(3, 40), rng.random() < 0.5, rng.randint(4, 64))
        if why:
            broken.append(f"{text!r}: {why}")
    return broken


def test_held_minilm_prefix_parity_fuzz(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """Real all-MiniLM-L6-v2 (BertNormalizer + BertPreTokenizer + WordPiece): compositions across the
    cut (``=`` + U+0338, Hangul jamo, e + combining marks in any order), U+0130, NFKC expanders,
    removed controls, ``[SEP]`` cut in the middle, pieces of 4-64 characters: whole == exact."""
    broken = _fuzz(minilm_encoder.tokenizer, _HOSTILE, seed=11, rounds=4000)
    assert not broken, "\n".join(broken[:3])


def test_held_bge_m3_shaped_prefix_parity_fuzz(tiny_bge_m3_dir) -> None:  # type: ignore[no-untyped-def]
    """The tiny bge-m3-shaped tokenizer (NFKC + Metaspace + Unigram, <mask> without lstrip)."""
    from transformers import AutoTokenizer

    broken = _fuzz(AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir)), _HOSTILE, seed=12, rounds=4000)
    assert not broken, "\n".join(broken[:3])


_CORPUS = [
    *[
        "the",
        "quick",
        "brown",
        "fox",
        "don't",
        "you'll",
        "we're",
        "12345",
        "67",
        "héllo",
        "wörld",
        "café",
        "naïve",
        "ΑΒΓ",
        "αβγ",
        "中文字符",
        "한국어",
        "テスト",
    ],
    *["a", "b", "c", "x", "y", "z", "...", "!!!", "???", ",", ";", ":", "'", '"', "(", ")", "=", "≠"],
]
_QWEN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _trained(kind: str, normalizer: Any, pre_tokenizer: Any) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [" ".join(random.Random(i).choices(_CORPUS, k=30)) for i in range(100)]
    if kind == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer: Any = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    elif kind == "bytelevel":
        tk = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tk = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=200, special_tokens=specials, unk_token="[UNK]", show_progress=False
        )
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.train_from_iterator(corpus, trainer)
    _template(tk, "[CLS]", "[SEP]")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


_NO_ADDED = [s for s in _HOSTILE if s not in {"[SEP]", "<s>", "</s>", "<mask>"}]


@pytest.mark.parametrize(
    "name",
    [
        "bert_strip_accents",
        "nfkd_sequence_digits",
        "unicode_scripts",
        "metaspace_first",
        "qwen_split",
        "gpt2_bytelevel",
    ],
)
def test_held_local_pipelines_without_added_tokens_in_the_text(name: str) -> None:
    """Pipelines from the allow-list, texts with no added token in them: whole == exact."""
    pipelines = {
        "bert_strip_accents": lambda: _trained(
            "wordpiece",
            normalizers.BertNormalizer(strip_accents=True, lowercase=True),
            pre_tokenizers.BertPreTokenizer(),
        ),
        "nfkd_sequence_digits": lambda: _trained(
            "wordpiece",
            normalizers.Sequence(
                [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase(), normalizers.NFC()]
            ),
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.WhitespaceSplit(),
                    pre_tokenizers.Punctuation(),
                    pre_tokenizers.Digits(individual_digits=False),
                ]
            ),
        ),
        "unicode_scripts": lambda: _trained(
            "wordpiece",
            normalizers.NFKC(),
            pre_tokenizers.Sequence([pre_tokenizers.UnicodeScripts(), pre_tokenizers.Whitespace()]),
        ),
        "metaspace_first": lambda: _trained(
            "unigram", normalizers.NFKC(), pre_tokenizers.Metaspace(prepend_scheme="first")
        ),
        "qwen_split": lambda: _trained(
            "bytelevel",
            normalizers.NFC(),
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_QWEN), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            ),
        ),
        "gpt2_bytelevel": lambda: _trained("bytelevel", None, pre_tokenizers.ByteLevel(add_prefix_space=False)),
    }
    tokenizer = pipelines[name]()
    assert words_are_local(tokenizer)
    broken = _fuzz(tokenizer, _NO_ADDED, seed=sum(map(ord, name)), rounds=600)
    assert not broken, "\n".join(broken[:3])


def test_held_boundaries_exact_piece_and_exact_limit(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """Texts of piece_chars - 1, piece_chars, piece_chars + 1 characters, each at limits of exactly
    its token count, one less and one more, truncating and strict."""
    tokenizer = minilm_encoder.tokenizer
    rng = random.Random(5)
    for piece in (16, 33, 64):
        for length in (piece - 1, piece, piece + 1, 4 * piece, 4 * piece + 1):
            for _ in range(20):
                text = "".join(rng.choice(["ab", " ", "c", ".", "  ", "[SEP]", "é"]) for _ in range(length))[:length]
                count = len(tokenizer(text)["input_ids"])
                for limit in (count - 1, count, count + 1):
                    for truncate in (True, False):
                        why = _agrees(tokenizer, text, max(limit, 3), truncate, piece)
                        assert why is None, f"{text!r}: {why}"


class _Counting:
    """The tokenizer, counting the characters each call is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        self.chars += sum(map(len, text)) if isinstance(text, list) else len(text)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("kind", ["prose", "cjk", "base64"])
def test_held_truncating_work_is_about_the_answer(minilm_encoder, kind: str) -> None:  # type: ignore[no-untyped-def]
    """3 MB texts, truncating to 256 tokens with pieces of 256 x 32 characters: prose and CJK are
    decided by the first piece; base64 (one word, [UNK] past 100 characters) is refused at
    ``max_read`` as documented; the work stays under ~4/3 of ``max_read`` either way."""
    rng = random.Random(3)
    if kind == "prose":
        text = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(600_000))
    elif kind == "cjk":
        text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(3_000_000))
    else:
        text = "".join(
            rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(3_000_000)
        )
    counting = _Counting(minilm_encoder.tokenizer)
    got = tokenize_exact(counting, [text], max_tokens=256, truncate=True, piece_chars=256 * 32, max_read=1_000_000)
    assert not isinstance(got, TooManyTokens) or kind == "base64", got
    assert counting.chars <= 1_400_000, f"{counting.chars} characters tokenised for a {len(text)}-character text"
    if not isinstance(got, TooManyTokens):
        head = text[:20_000]  # WordPiece words end at spaces/CJK characters: the head decides the first 256
        assert got[0] == minilm_encoder.tokenizer(head, truncation=True, max_length=256)["input_ids"]


def test_held_whitespace_run_then_words_strict_is_exact(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """900 k spaces then 300 words: strict, the count is exact (the text was read to its end) and the
    work is under twice the text (prefixes grow four-fold: 8 k, 32 k, 128 k, 512 k, then the whole)."""
    text = " " * 900_000 + " ".join(["word"] * 300)
    counting = _Counting(minilm_encoder.tokenizer)
    got = tokenize_exact(counting, [text], max_tokens=256, truncate=False, piece_chars=256 * 32, max_read=1_000_000)
    assert isinstance(got, TooManyTokens) and got.tokens == 302, got
    assert counting.chars <= 2 * len(text)
