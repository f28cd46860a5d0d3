r"""Token ids of inputs of any length, exactly as the whole text gives them, for bounded work.

Tokenising costs time and memory per *token* (about 420-800 bytes each with the Rust tokenizer),
and an input may be 30 MB. Cutting every input to ``max_tokens x 32`` characters first, as this
project once did, changes answers: texts with few tokens per character (whitespace runs, words of
over 100 characters that WordPiece turns into one ``[UNK]``, zero-width or control characters that
the normaliser removes) were embedded as a prefix, or refused, although they fit.

So a long input is tokenised a *prefix* at a time, and the tokenizer itself says which of the
prefix's tokens are final: every token of a *word* (the pre-tokeniser's unit, ``word_ids``) that
ends at least ``window`` characters before the prefix's end (its trailing whitespace not counted),
and is not its last word. The pipelines we serve normalise character by character (or one combining
sequence at a time) and split words at characters they see (WordPiece's basic tokenizer at
whitespace, punctuation and CJK characters; SentencePiece's Metaspace at spaces; byte-level BPE
regexes, whose look-ahead across a word's end is a few characters: ``'re``, ``\s+(?!\S)``), so what
follows the cut reaches back only that far. The window (16 characters, or the longest added token or
literal replacement when longer) covers what else reaches back: an added token such as ``</s>`` or
``<mask>`` cut by the prefix (added tokens are split out before anything else, and an ``lstrip`` one
swallows the whitespace before it, which the trailing-whitespace rule covers), or a ``Replace`` of
several characters; and a prefix never ends inside an added token's text. Within one word no rule
is sound (Unigram's Viterbi path may hinge on a word's last character), so the last word is never
final. A tokenizer with another step (``_LOCAL_STEPS``), a ``Split`` regex with a quantified
look-around or a group repeated without bound, an added token matched after a normaliser (which
may delete characters inside it), or no step that splits words at all (Llama's SentencePiece BPE,
Gemma's ``Replace(" ", "▁")`` before its split: probed with ``_PROBE``) is tokenised whole, up to
``max_read`` characters; so is a truncating tokenizer that keeps a text's *last* tokens.

* once the final tokens are more than the model takes, the answer is known: the first
  ``max_tokens`` of them when truncating, ``input too long`` when not;
* otherwise the prefix grows (four-fold at most, less when that would pass the token budget),
  until it is the whole text, when the count is exact.

The work is about what the answer needs, and a text that fits is tokenised whole, within two
bounds, past which the input is refused, never cut: ``max_read`` characters (megabytes of
whitespace say nothing), and, where words are final, ``token_budget`` tokens for one word still
open (a run that the tokenizer segments as one word, like Chinese text without spaces for
SentencePiece, or characters that NFKC expands many-fold, is tokenised to its end to decide its first
token).
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TOKEN_BUDGET_PER_LIMIT",
    "TooManyTokens",
    "template_tokens",
    "token_budget",
    "tokenize_exact",
    "words_are_local",
]

_GROWTH = 4
# Tokens of one input tokenised at most to decide it, per token the model takes (bge-m3: 524,288,
# ~400 MB and ~2 s of tokenising), and at least _MIN_BUDGET.
TOKEN_BUDGET_PER_LIMIT = 64
_MIN_BUDGET = 1 << 16

# Normalisers and pre-tokenisers that only look at a character and a few around it (see the module
# docstring). ``Replace`` counts only for a literal string or a regex of spaces (" {2,}"), ``Split``
# for a literal or a regex whose look-arounds hold no quantifier.
_LOCAL_STEPS = frozenset(
    {
        "BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Nmt", "Lowercase", "Strip", "StripAccents",
        "Precompiled", "Prepend", "Replace", "Sequence", "BertPreTokenizer", "Metaspace", "ByteLevel",
        "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "Split", "CharDelimiterSplit",
        "UnicodeScripts",
    }
)  # fmt: skip
# A regex of whitespace runs only (" {2,}", "\\s+"): what a space-collapsing Replace may match.
_SPACES_PATTERN = re.compile(r"(?:(?: |\\s|\\t|\\n|\\r)(?:[+*?]|\{\d+(?:,\d*)?\})?)+")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")
# A group repeated without bound ("(?:[a-z]+-)+"): a match that may span many words and be undone
# by a character far past the cut (backtracking), unlike the GPT-2, cl100k, o200k and Llama-3 patterns.
_REPEATED_GROUP = re.compile(r"\)(?:[*+]|\{\d+,\})")
# Normalised and pre-tokenised, a text with word breaks of every kind must come out as several words:
# a pipeline that lets it through as one (no pre-tokeniser, or Gemma's Replace(" ", "▁") before a
# Split(" ")) has no final words at all.
_PROBE = "a b. c\nd,e"
_MIN_WINDOW = 16
_PIPELINES: weakref.WeakKeyDictionary[Any, _Pipeline] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class _Pipeline:
    """What :func:`tokenize_exact` needs to know of a tokenizer, worked out once."""

    words: bool  # words ending ``window`` characters before a prefix's end are final
    window: int
    lead: int  # special tokens the post-processor puts before a text's own, and after it
    trail: int
    added: tuple[str, ...] = ()  # the added tokens' texts: a prefix never ends inside one
    left: bool = False  # truncation keeps a text's last tokens


@dataclass(frozen=True, slots=True)
class TooManyTokens:
    """Input ``index`` has more than ``limit`` tokens: ``tokens`` of them, or at least that many
    when ``exact`` is false (it was not tokenised to its end). ``unread`` is set when its first
    ``unread`` characters did not decide it: then ``tokens`` is what they held, and ``open_word``
    says it was the token budget (one word still open), not ``max_read``, that stopped it."""

    index: int
    tokens: int
    exact: bool
    unread: int | None = None
    open_word: bool = False


def token_budget(max_tokens: int) -> int:
    """Tokens of one input tokenised at most to decide its first ``max_tokens``."""
    return max(TOKEN_BUDGET_PER_LIMIT * max_tokens, _MIN_BUDGET)


def tokenize_exact(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int,
    truncate: bool,
    piece_chars: int,
    max_read: int,
    budget: int | None = None,
) -> list[list[int]] | TooManyTokens:
    """Ids (with the model's special tokens) of ``texts``, each exactly what tokenising it whole gives,
    cut to ``max_tokens`` when ``truncate``; else the first input with more than ``max_tokens``.

    Texts of at most ``piece_chars`` characters (nearly all) go through one batched call; longer
    ones are tokenised a growing prefix at a time (module docstring).
    """
    pipeline = _pipeline(tokenizer)
    if max_tokens < pipeline.lead + pipeline.trail + 1:
        raise ValueError(
            f"a limit of {max_tokens} tokens leaves no room for text: the template adds "
            f"{pipeline.lead + pipeline.trail} special tokens"
        )
    ids: list[list[int] | TooManyTokens | None] = [None] * len(texts)
    short = [i for i, text in enumerate(texts) if len(text) <= piece_chars]
    if short:
        encoded = tokenizer(
            [texts[i] for i in short],
            add_special_tokens=True,
            truncation=truncate,
            max_length=max_tokens if truncate else None,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        for i, row in zip(short, encoded, strict=True):
            ids[i] = row
    for i, text in enumerate(texts):
        if ids[i] is None:
            ids[i] = _long(
                tokenizer,
                text,
                max_tokens=max_tokens,
                truncate=truncate,
                piece_chars=piece_chars,
                max_read=max(piece_chars, max_read),
                budget=token_budget(max_tokens) if budget is None else budget,
                pipeline=pipeline,
            )
    rows: list[list[int]] = []
    for i, row in enumerate(ids):
        if isinstance(row, TooManyTokens):
            return TooManyTokens(i, row.tokens, row.exact, row.unread, row.open_word)
        assert row is not None, "every text was tokenised above"
        if not truncate and len(row) > max_tokens:
            return TooManyTokens(i, len(row), exact=True)
        rows.append(row)
    return rows


def _long(
    tokenizer: Any,
    text: str,
    *,
    max_tokens: int,
    truncate: bool,
    piece_chars: int,
    max_read: int,
    budget: int,
    pipeline: _Pipeline,
) -> list[int] | TooManyTokens:
    if truncate and pipeline.left:  # the last tokens are the answer: the whole text, within max_read
        if len(text) > max_read:
            held = len(tokenizer(text[:max_read], add_special_tokens=True, verbose=False)["input_ids"])
            return TooManyTokens(0, held, exact=False, unread=max_read)
        row: list[int] = tokenizer(text, truncation=True, max_length=max_tokens, verbose=False)["input_ids"]
        return row
    size = piece_chars
    while True:
        whole = size >= len(text)
        prefix = text if whole else text[: _safe_cut(text, size, pipeline)]
        encoded = tokenizer(
            prefix,
            add_special_tokens=True,
            return_offsets_mapping=pipeline.words and not whole,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        row = encoded["input_ids"]
        lead, trail = row[: pipeline.lead], row[len(row) - pipeline.trail :] if pipeline.trail else []
        content = range(pipeline.lead, len(row) - pipeline.trail)
        room = max(0, max_tokens - len(lead) - len(trail))  # content tokens the model takes
        counted = len(content)  # tokens that will still be there once the text goes on
        if whole:
            stable = len(content)
        elif pipeline.words:
            end = len(prefix.rstrip())  # trailing whitespace may yet be swallowed (an lstrip token)
            stable = _final(encoded, content, end - pipeline.window)
            counted = sum(1 for k in content if encoded["offset_mapping"][k][1] <= end)
        else:
            stable = 0
        if whole or stable > room:
            if stable <= room:
                return row
            if truncate:
                return lead + row[content.start : content.start + room] + trail
            return TooManyTokens(0, stable + len(lead) + len(trail), exact=whole)
        if pipeline.words and counted - stable >= budget:  # one word still open holds them: refused, never cut
            return TooManyTokens(0, counted + len(lead) + len(trail), exact=False, unread=size, open_word=True)
        if size >= max_read:  # undecided after all it may read: refused, never cut
            return TooManyTokens(0, stable + len(lead) + len(trail), exact=False, unread=size)
        # Grow four-fold, or to about the budget when tokens come denser than that allows.
        size = min(size * _GROWTH, max_read, max(2 * size, size * budget // max(len(content), 1)))


def _safe_cut(text: str, size: int, pipeline: _Pipeline) -> int:
    """``size``, moved back before the start of any added token's text that could straddle it (added
    tokens are split out of the whole text before anything else; the whitespace an ``lstrip`` one
    swallows then trails the prefix, where it is never final)."""
    cut = size
    moved = True
    while moved and pipeline.added:
        moved = False
        for token in pipeline.added:
            for k in range(min(len(token) - 1, cut), 0, -1):
                if text[cut - k : cut] == token[:k]:
                    cut -= k
                    moved = True
                    break
    return cut


def _final(encoded: Any, content: range, limit: int) -> int:
    """How many of the content tokens are final: those of every word before the first word that is
    the prefix's last or has a token ending past ``limit`` (an added token inside the text, which has
    no word, is a word of its own)."""
    word_ids: list[int | None] = encoded.word_ids()
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    if not content:
        return 0
    last = content.stop - 1
    starts = content.start  # where the word being looked at starts
    for k in content:
        if k > content.start and (word_ids[k] is None or word_ids[k] != word_ids[k - 1]):
            starts = k
        if offsets[k][1] > limit or (word_ids[k] == word_ids[last] and word_ids[k] is not None):
            return starts - content.start
    return len(content)


def template_tokens(tokenizer: Any) -> int:
    """The special tokens ``tokenizer``'s template adds to every text ([CLS] and [SEP]: 2)."""
    pipeline = _pipeline(tokenizer)
    return pipeline.lead + pipeline.trail


def words_are_local(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s words (but its last few characters') are final in a prefix: its
    normaliser and pre-tokeniser steps are all ``_LOCAL_STEPS`` and some step splits words."""
    return _pipeline(tokenizer).words


def _pipeline(tokenizer: Any) -> _Pipeline:
    """``tokenizer``'s :class:`_Pipeline`, remembered per tokenizer."""
    with contextlib.suppress(KeyError, TypeError):
        return _PIPELINES[tokenizer]
    with_specials = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    lead = next(
        (at for at in range(len(with_specials) - len(bare) + 1) if with_specials[at : at + len(bare)] == bare), 0
    )
    trail = len(with_specials) - lead - len(bare)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    words, window, added = False, _MIN_WINDOW, ()
    if backend is not None:
        normaliser = list(_steps(json.loads(backend.normalizer.__getstate__()))) if backend.normalizer else []
        splitter = list(_steps(json.loads(backend.pre_tokenizer.__getstate__()))) if backend.pre_tokenizer else []
        steps = normaliser + splitter
        tokens = list(backend.get_added_tokens_decoder().values())
        added = tuple(token.content for token in tokens)
        # An added token matched after normalising may span characters the normaliser deletes,
        # further back than any window: such pipelines are tokenised whole.
        normalised_added = bool(normaliser) and any(token.normalized and len(token.content) > 1 for token in tokens)
        words = all(_local_one(part) for part in steps) and not normalised_added and _splits(backend)
        literals = [len(part.get("pattern", {}).get("String", "")) for part in steps]
        window = max(_MIN_WINDOW, *literals, *map(len, added)) + 1
    found = _Pipeline(words, window, lead, trail, added, getattr(tokenizer, "truncation_side", "right") == "left")
    with contextlib.suppress(TypeError):  # not weakly referable: worked out again next time
        _PIPELINES[tokenizer] = found
    return found


def _splits(backend: Any) -> bool:
    """Whether the pipeline splits :data:`_PROBE` into several words (so texts have words at all)."""
    if backend.pre_tokenizer is None:
        return False
    text = backend.normalizer.normalize_str(_PROBE) if backend.normalizer else _PROBE
    return len(backend.pre_tokenizer.pre_tokenize_str(text)) >= 3


def _steps(step: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield step
    for key in ("normalizers", "pretokenizers"):
        for part in step.get(key) or []:
            yield from _steps(part)


def _local_one(step: dict[str, Any]) -> bool:
    kind = step.get("type")
    if kind not in _LOCAL_STEPS:
        return False
    pattern = step.get("pattern", {})
    if kind == "Replace":
        return "String" in pattern or bool(_SPACES_PATTERN.fullmatch(str(pattern.get("Regex", "?"))))
    if kind == "Split" and "Regex" in pattern:
        regex = str(pattern["Regex"])
        return _bounded_lookarounds(regex) and not _REPEATED_GROUP.search(regex)
    return True


def _bounded_lookarounds(regex: str) -> bool:
    """Every look-around in ``regex`` holds no quantifier and no group (``(?!\\S)``, not ``(?=.*x)``):
    a match then depends on at most a character or two past its end."""
    for found in _LOOKAROUND.finditer(regex):
        depth, at = 1, found.end()
        while at < len(regex) and depth:
            char = regex[at]
            if char == "\\":
                at += 2
                continue
            if char == "(":
                return False
            if char == ")":
                depth -= 1
            elif char in "*+{?":
                return False
            at += 1
    return True
