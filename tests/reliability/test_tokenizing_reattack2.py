"""A third adversarial review of exact tokenising (5abacbf, ``encoder/tokenizing.py``).

The promise under attack: ``tokenize_exact(tokenizer, [text], ...)`` gives exactly what tokenising
the whole text in one call gives (cut to ``max_tokens`` when truncating), or, strict, a
``TooManyTokens`` whose count is a true lower bound above ``max_tokens``, for bounded work. The rule
behind it: a word (``word_ids``) of a prefix is final when it is not the prefix's last word and
ends ``window`` characters (17 here) before ``len(prefix.rstrip())``.

Tests named ``test_f*`` are findings (they fail on 5abacbf); ``test_held_*`` are attacks the code
withstood. Helpers come from ``test_tokenizing_reattack.py``; every tokenizer is built in-process
(no hub) and each test is bounded (a few seconds, kilobytes of text, single-threaded).

Findings:

* f7: the window does not bound what an added token reaches back over. An ``lstrip`` added token
  (``<mask>`` in XLM-R / bge-m3 / CamemBERT / BigBird / MPNet) swallows *all* the whitespace before
  it; with the cut inside the token and a whitespace run longer than the window before it, Metaspace
  makes the run ``▁`` words that the prefix takes as final. Real bge-m3's ``Replace(" {2,}", " ")``
  does not save it: ``" \\x85"`` runs (U+0085 is whitespace to ``lstrip``, untouched by Nmt/NFKC,
  not collapsed). Strict, the same run gives counts that are no lower bound, both by the window
  (87 "final" tokens for a text of 61) and by the token budget (``open_word`` with 1004 for a text of
  7 tokens).
* f8: the ``Strip`` normaliser strips each *section* (the text between added tokens). Any added
  token (``</s>``, no lstrip needed) after a long whitespace run, cut by the prefix: the whole text
  strips the run, the prefix keeps it as final ``▁`` words. SpmConverter (Barthez/CamemBERT-style,
  ``Strip(right)``) and the DeBERTa-v2/v3 converter (``Strip()``) write exactly such normalisers.
* f9: a ``normalized`` added token (``tokenizer.add_tokens([...])`` makes them so by default) is
  matched on the *normalised* text; when the normaliser deletes characters (BertNormalizer's
  clean_text drops U+200B and other format/control characters) the token's original span is longer
  than the window, and the pre-tokeniser's words of its fragment (``<``, ``|``, ``im``, ...) are taken
  as final. Real all-MiniLM-L6-v2 with ``<|im_start|>`` added.
* f10: Gemma / EmbeddingGemma shape: normaliser ``Replace(" ", "▁")``, pre-tokeniser
  ``Split(" ", "merged_with_previous")`` (transformers' GemmaConverter and GemmaTokenizer). The Split
  counts as word-splitting, but it runs after the normaliser removed every space, so each text is
  one word: ordinary prose, truncating, is refused as an open word (the f5 finding in a new shape).
* f11: ``truncation_side="left"`` (a tokenizer_config setting AutoTokenizer honours): short texts
  go through the tokenizer and keep their *last* tokens, long ones keep their first.
* f12: ``max_tokens`` below the template's special tokens, truncating: the short path returns the
  whole text (transformers logs an error and does not truncate), the long path ``[CLS] [SEP]``;
  both are longer than ``max_tokens``.
* f13: ``Split`` regexes are checked only for look-arounds, but plain backtracking reaches back as
  far: ``(?:[a-z]+-)+[a-z]+:|[a-z]+|-|:`` makes ``a-b-...-b`` many words in a prefix and one word
  once the ``:`` arrives (no shipped tokenizer known to do this; the criterion is still unsound).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from encoder.tokenizing import TooManyTokens, tokenize_exact, words_are_local
from tests.reliability.test_tokenizing_reattack import (
    _BYTES,
    _HOSTILE,
    _QWEN,
    _agrees,
    _exact,
    _fuzz,
    _roberta_like,
    _template,
    _trained,
    _whole,
    _wordpiece,
)

# --------------------------------------------------------------------------------------------
# helpers


def _bge_m3_shaped(*, normalizer: Any = None, lstrip: bool = False) -> PreTrainedTokenizerFast:
    """support.factories.build_tokenizer (Metaspace + Unigram, XLM-R specials), with another
    normaliser and/or ``<mask>`` declared ``lstrip`` as XLM-R / bge-m3 declare it."""
    from support.factories import build_tokenizer

    spec = json.loads(build_tokenizer().backend_tokenizer.to_str())
    if normalizer is not None:
        spec["normalizer"] = json.loads(normalizer.__getstate__())
    for token in spec["added_tokens"]:
        if token["content"] == "<mask>":
            token["lstrip"] = lstrip
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=lstrip),
    )


def _sweep(tokenizer: Any, text: str, cut: int, limits: range) -> list[str]:
    return [
        why
        for max_tokens in limits
        for truncate in (True, False)
        if (why := _agrees(tokenizer, text, max_tokens, truncate, cut))
    ]


def _strict_fits(tokenizer: Any, text: str, piece: int, **kw: Any) -> str | None:
    """Strict, at exactly the whole text's token count: the answer must be the whole text's ids."""
    whole = tokenizer(text)["input_ids"]
    got = _exact(tokenizer, text, len(whole), False, piece, **kw)
    return None if got == whole else f"fits in {len(whole)} tokens, got {got}"


# Real bge-m3 / multilingual-e5 / XLM-R normaliser shape: Precompiled (nmt_nfkc) then collapse.
_XLMR_NORMALISER = normalizers.Sequence(
    [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
)


# --------------------------------------------------------------------------------------------
# f7: lstrip added token after a whitespace run longer than the window


def test_f7_lstrip_mask_after_long_space_run() -> None:
    """``hello`` + 40 spaces + ``<mask>``, the cut inside ``<mask>`` (prefix ``... hello    <ma``):
    the prefix's Metaspace words ``▁`` x 39 end up to 40 characters before the cut, far outside the
    window, so they are final; the whole text has none of them (lstrip swallowed the run). Truncated
    to just past ``hello``: ``▁`` where the whole has ``<mask>``; strict at the exact count: refused
    with 87 "tokens" for a 61-token text (no lower bound).

    Fix: never end a prefix inside a possible added-token match: when ``text[size-k:size]`` is a
    proper prefix of some added token (k < its length), move the cut back to before it. The
    whitespace an ``lstrip`` token swallows is then the prefix's *trailing* whitespace, which
    ``rstrip`` already keeps out of the final words (also fixes f8)."""
    tokenizer = _bge_m3_shaped(lstrip=True)
    assert words_are_local(tokenizer)
    text = "hello world " * 6 + "hello" + " " * 40 + "<mask> world" + " hello" * 20
    broken = _sweep(tokenizer, text, text.index("<mask>") + 3, range(10, 80))
    fits = "hello world " * 6 + "hello" + " " * 40 + "<mask>"
    if why := _strict_fits(tokenizer, fits, len(fits) - 2):
        broken.append("strict: " + why)
    assert not broken, "\n".join(broken[:4])


def test_f7_real_bge_m3_normaliser_does_not_save_it() -> None:
    """The same with bge-m3's normaliser shape (Nmt + NFKC + ``Replace(" {2,}", " ")``): plain
    spaces, newlines and U+3000 are collapsed (held), but ``" \\x85"`` runs are not: NEL is whitespace
    to ``lstrip`` (Rust ``char::is_whitespace``), Nmt and NFKC keep it, and no two spaces are adjacent."""
    tokenizer = _bge_m3_shaped(normalizer=_XLMR_NORMALISER, lstrip=True)
    assert words_are_local(tokenizer)
    broken = []
    for run in (" " * 40, " \n" * 20, "\u3000 " * 20, " \u0085" * 20):
        text = "hello world " * 6 + "hello" + run + "<mask> world" + " hello" * 20
        found = _sweep(tokenizer, text, text.index("<mask>") + 3, range(10, 80))
        broken += [f"{run[:2]!r} run: {why}" for why in found[:1]]
    assert not broken, "\n".join(broken)


def test_f7_open_word_count_is_no_lower_bound() -> None:
    """``hello`` + 3000 spaces + ``<mask>`` is 7 tokens (lstrip swallows the run). Cut inside the
    run, nothing is final (trailing whitespace), but the prefix's ``▁`` tokens pass the token budget
    (1000 here; 65,536 for real limits, i.e. a 66 kB run) and the text is refused, strict *and*
    truncating, as "at least 1004 tokens" with ``open_word``: not a lower bound, and a text that fits
    in 8 tokens is refused.

    Fix: report ``stable`` (what is known final) as the lower bound, not ``len(content)`` of a prefix
    whose tokenisation may shrink; and, with the f7 cut rule, do not count a prefix's trailing
    whitespace tokens towards the budget (or read on while the open "word" is whitespace)."""
    tokenizer = _bge_m3_shaped(lstrip=True)
    text = "hello" + " " * 3000 + "<mask>"
    whole = tokenizer(text)["input_ids"]
    assert len(whole) <= 8
    broken = []
    for truncate in (False, True):
        got = _exact(tokenizer, text, 8, truncate, 64, budget=1000)
        if got != whole:
            broken.append(f"truncate={truncate}: whole has {len(whole)} tokens, got {got}")
    assert not broken, "\n".join(broken)


def test_held_roberta_lstrip_mask_after_long_whitespace_runs() -> None:
    """RoBERTa shape (GPT-2 ByteLevel regex, ``<mask>`` lstrip): the regex keeps a whitespace run one
    word (``\\s+(?!\\S)``) ending next to the cut, so it is never final, for spaces, newlines and
    mixed runs."""
    tokenizer = _roberta_like(lstrip=True)
    broken = []
    for run in (" " * 40, " \n" * 20, "\n" + " " * 40, "\t \u0085" * 15):
        text = "a " * 20 + "b" + run + "<mask> c" + " d" * 30
        broken += _sweep(tokenizer, text, text.index("<mask>") + 3, range(40, 48))[:1]
    assert not broken, "\n".join(broken)


# --------------------------------------------------------------------------------------------
# f8: Strip normaliser per section, any added token


@pytest.mark.parametrize("shape", ["nfkc_strip_right", "deberta_v3_like"])
def test_f8_strip_normaliser_per_section_before_an_added_token(shape: str) -> None:
    """``Strip`` runs per section (the text between added tokens). ``hello`` + a whitespace run +
    ``</s>`` (a plain special token, no lstrip), cut inside ``</s>``: in the whole text the run ends
    its section and is stripped; in the prefix it is inside the section, becomes ``▁`` words, final.
    Shapes: SpmConverter's ``Strip(right=True)`` (plain spaces, no collapse here) and the DeBERTa-v2/v3
    converter's ``Strip(), Precompiled, Replace(" {2,}", " ")`` (``" \\x85"`` runs). Fix: as f7."""
    if shape == "nfkc_strip_right":
        normaliser, run = (
            normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(left=False, right=True)]),
            " " * 40,
        )
    else:
        normaliser = normalizers.Sequence(
            [normalizers.Strip(), normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
        )
        run = " \u0085" * 20
    tokenizer = _bge_m3_shaped(normalizer=normaliser)
    assert words_are_local(tokenizer)
    text = "hello world " * 6 + "hello" + run + "</s> world" + " hello" * 20
    broken = _sweep(tokenizer, text, text.index("</s>") + 2, range(10, 80))
    fits = "hello world " * 6 + "hello" + run + "</s>"
    if why := _strict_fits(tokenizer, fits, len(fits) - 2):
        broken.append("strict: " + why)
    assert not broken, "\n".join(broken[:4])


# --------------------------------------------------------------------------------------------
# f9: normalized added token whose original span outgrows the window


def test_f9_normalized_added_token_spanning_removed_characters(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """Real all-MiniLM-L6-v2 (a copy) with ``<|im_start|>`` added by ``add_tokens`` (normalized=True,
    the default for non-special tokens). Written with two U+200B between its characters it is 34
    characters, which BertNormalizer's clean_text turns into ``<|im_start|>``: one token in the whole
    text. The prefix cut 4 characters before its end sees ``< | im _ sta`` -- words, the first ones
    over 17 characters back, so final. Truncating: ``<`` where the whole has ``<|im_start|>``; strict
    at the exact count: refused.

    Fix: for added tokens with ``normalized=True``, measure the window on the normalised text (or
    refuse a cut whose normalised tail is a proper prefix of such a token); or treat a pipeline
    whose normaliser deletes characters (BertNormalizer clean_text, StripAccents, Nmt, Precompiled,
    Replace with "") and has normalized added tokens as not local."""
    import copy

    tokenizer = copy.deepcopy(minilm_encoder.tokenizer)
    tokenizer.add_tokens(["<|im_start|>"])
    assert not words_are_local(tokenizer), (
        "fixed: a normalised added token and a normaliser that deletes characters: tokenised whole"
    )
    tag = "\u200b\u200b".join("<|im_start|>")
    head = "hello world " * 10
    text = head + tag + " again" * 30
    assert "<|im_start|>" in tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    broken = _sweep(tokenizer, text, len(head) + len(tag) - 4, range(18, 30))
    fits = head + tag
    if why := _strict_fits(tokenizer, fits, len(fits) - 4):
        broken.append("strict: " + why)
    assert not broken, "\n".join(broken[:4])


def test_held_contraction_across_stripped_accents() -> None:
    """``we'`` + 30 combining accents + ``re`` with NFD + StripAccents + GPT-2 ByteLevel (``'re`` a
    token): the removed marks are aligned to the apostrophe, so its word ends next to the cut and is
    not final."""
    merges = [("'", "r"), ("'r", "e")]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_BYTES, "'r", "'re"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    _template(tk, "<s>", "</s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    assert words_are_local(tokenizer)
    marks = "\u0301" * 30
    text = "x " * 20 + "we'" + marks + "re" + " y" * 20
    broken = _sweep(tokenizer, text, text.index("re") + 1, range(36, 50))
    fits = "x " * 20 + "we'" + marks + "re"
    if why := _strict_fits(tokenizer, fits, len(fits) - 1):
        broken.append("strict: " + why)
    assert not broken, "\n".join(broken)


# --------------------------------------------------------------------------------------------
# f10: Gemma's Split after Replace never splits


def test_f10_gemma_shaped_prose_refused_as_one_word() -> None:
    """EmbeddingGemma's tokenizer shape (transformers' GemmaTokenizer / GemmaConverter): normaliser
    ``Replace(" ", "▁")``, pre-tokeniser ``Split(" ", "merged_with_previous")``. The Split is counted
    as word-splitting, but it runs on the normalised text, where no space is left: every text is one
    word. 96 kB of prose, truncating to 64 tokens (tokenising it whole: 0.05 s) is refused as an open
    word; with EmbeddingGemma's 2048 tokens, any prose past about half a megabyte is.

    Fix: decide "splits words" by asking the tokenizer: pre-tokenise (``backend.pre_tokenizer
    .pre_tokenize_str(backend.normalizer.normalize_str("a b. c\\nd"))``) and require several words;
    otherwise tokenise whole up to ``max_read`` as for f5."""
    chars = list("abcdefghijklmnopqrstuvwxyz▁.,")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *chars])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    _template(tk, "<bos>", "<eos>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    text = "the cat sat on the mat. " * 4000
    got = _exact(tokenizer, text, 64, True, 64 * 32, max_read=1_000_000)
    assert got == _whole(tokenizer, text, 64, True), f"refused: {got}"


# --------------------------------------------------------------------------------------------
# f11, f12: truncation parity with the tokenizer's own truncation


def test_f11_truncation_side_left(minilm_dir) -> None:  # type: ignore[no-untyped-def]
    """``truncation_side="left"`` (tokenizer_config.json; AutoTokenizer honours it): the same text
    truncated to 8 tokens is ``gamma delta alpha beta gamma delta`` through the short path (one
    tokenizer call) and ``alpha beta gamma delta alpha beta`` through the prefix path. Fix: read
    ``tokenizer.truncation_side`` and, when left, keep the last ``room`` content tokens (tokenise
    whole up to ``max_read``, or grow suffixes), or force ``truncation_side="right"`` at load and say
    so."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir), truncation_side="left")
    text = "alpha beta gamma delta " * 10
    short = _exact(tokenizer, text, 8, True, 10_000)
    long = _exact(tokenizer, text, 8, True, 40)
    assert short == _whole(tokenizer, text, 8, True)
    assert long == short, f"{tokenizer.convert_ids_to_tokens(long)} vs {tokenizer.convert_ids_to_tokens(short)}"


def test_f12_max_tokens_below_the_template_specials(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """Truncating to 1 token with ``[CLS] $A [SEP]``: the short path returns all 42 tokens
    (transformers cannot truncate, logs an error and gives the text whole), the long path
    ``[CLS] [SEP]``; both exceed ``max_tokens`` and they differ from each other. Fix: reject
    ``max_tokens < lead + trail + 1`` up front (ValueError), or define one answer for both paths."""
    tokenizer = minilm_encoder.tokenizer
    text = "alpha beta gamma delta " * 10
    for piece in (10_000, 40):  # fixed: refused up front on both paths, one answer
        with pytest.raises(ValueError, match="leaves no room for text"):
            _exact(tokenizer, text, 1, True, piece)
    assert len(_exact(tokenizer, text, 3, True, 40)) == 3, "the smallest limit with room for text"


# --------------------------------------------------------------------------------------------
# f13: Split regex that reaches back by backtracking, without any look-around


def test_f13_split_regex_backtracking_without_lookaround() -> None:
    """``_bounded_lookarounds`` only vets look-arounds, but an alternation reaches back as far:
    with ``(?:[a-z]+-)+[a-z]+:|[a-z]+|-|:`` the run ``a-b-...-b`` (45 characters) is 43 words until
    the ``:`` arrives, then one. Cut just before the ``:``, the early ``a``/``-`` words are final.
    Fix: allow-list ``Split`` regexes by exact string (GPT-2, cl100k, o200k, Qwen, Llama-3,
    DeepSeek), treating any other regex as not local."""
    long_word = "-".join(["a", "b"] * 11) + ":"
    tokenizer = _wordpiece(
        None,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Split(Regex(r"(?:[a-z]+-)+[a-z]+:|[a-z]+|-|:"), "isolated"),
            ]
        ),
        ["a", "b", "-", ":", long_word],
    )
    assert not words_are_local(tokenizer), "fixed: a Split regex that repeats a group: tokenised whole"
    text = "a " * 10 + long_word + " b" * 20
    assert long_word in tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    broken = _sweep(tokenizer, text, text.index(":"), range(10, 40))
    assert not broken, "\n".join(broken[:4])


# --------------------------------------------------------------------------------------------
# held: other pre-tokeniser behaviours and template shapes

_P = pre_tokenizers
_SHAPES = {
    "punctuation_merged_with_previous": lambda: _trained(
        "wordpiece", normalizers.NFKC(), _P.Sequence([_P.WhitespaceSplit(), _P.Punctuation("merged_with_previous")])
    ),
    "punctuation_merged_with_next": lambda: _trained(
        "wordpiece", normalizers.NFKC(), _P.Sequence([_P.WhitespaceSplit(), _P.Punctuation("merged_with_next")])
    ),
    "punctuation_contiguous_metaspace": lambda: _trained(
        "unigram", normalizers.NFKC(), _P.Sequence([_P.Punctuation("contiguous"), _P.Metaspace()])
    ),
    "char_delimiter": lambda: _trained("wordpiece", normalizers.Lowercase(), _P.CharDelimiterSplit(" ")),
    "digits_runs_metaspace_first": lambda: _trained(
        "unigram",
        normalizers.NFKC(),
        _P.Sequence([_P.Digits(individual_digits=False), _P.Metaspace(prepend_scheme="first")]),
    ),
    "unicode_scripts_metaspace": lambda: _trained(
        "unigram", normalizers.NFKC(), _P.Sequence([_P.UnicodeScripts(), _P.Metaspace(prepend_scheme="always")])
    ),
    "split_merged_with_next": lambda: _trained(
        "bytelevel",
        None,
        _P.Sequence(
            [_P.Split(Regex(r"\s+"), "merged_with_next"), _P.ByteLevel(add_prefix_space=False, use_regex=False)]
        ),
    ),
    "split_contiguous_bytelevel_prefix_space": lambda: _trained(
        "bytelevel", None, _P.Sequence([_P.Split(Regex(r"[^\w\s]"), "contiguous"), _P.ByteLevel(add_prefix_space=True)])
    ),
    "strip_both_metaspace_first": lambda: _trained(
        "unigram", normalizers.Sequence([normalizers.Strip(), normalizers.NFKC()]), _P.Metaspace(prepend_scheme="first")
    ),
}


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_held_pre_tokeniser_behaviours_fuzz(shape: str) -> None:
    """Punctuation/Split behaviours, CharDelimiterSplit, Digits runs, UnicodeScripts, Metaspace
    prepend schemes, Strip: random texts of hostile pieces (with ``[SEP]`` inside, short whitespace
    runs), pieces of 4-64 characters, limits of 3-40: whole == exact."""
    tokenizer = _SHAPES[shape]()
    assert words_are_local(tokenizer)
    broken = _fuzz(tokenizer, _HOSTILE, seed=sum(map(ord, shape)), rounds=300)
    assert not broken, "\n".join(broken[:3])


@pytest.mark.parametrize("single", ["$A [SEP]", "[CLS] $A", "$A"])
def test_held_eos_only_bos_only_and_bare_templates(single: str) -> None:
    """Qwen3-Embedding-like (EOS appended only), Llama-3-like (BOS only) and no specials, with the
    Qwen split regex and byte-level BPE: lead/trail found from ``a``, whole == exact."""
    tokenizer = _trained(
        "bytelevel",
        normalizers.NFC(),
        _P.Sequence([_P.Split(Regex(_QWEN), "isolated"), _P.ByteLevel(add_prefix_space=False, use_regex=False)]),
    )
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]"
    )
    rng = random.Random(len(single))
    broken = _fuzz(tokenizer, _HOSTILE, seed=rng.randint(0, 1000), rounds=300)
    assert not broken, "\n".join(broken[:3])


def test_held_tokenize_exact_batch_reports_the_right_index(minilm_encoder) -> None:  # type: ignore[no-untyped-def]
    """A batch of short and long texts, strict: the refusal names the first over-long input, long or
    short, with its exact count when it was read whole."""
    tokenizer = minilm_encoder.tokenizer
    texts = ["short one", "word " * 100, "tiny", "word " * 5]
    got = tokenize_exact(tokenizer, texts, max_tokens=50, truncate=False, piece_chars=64, max_read=10**6)
    assert isinstance(got, TooManyTokens) and got.index == 1 and got.tokens > 50, got
