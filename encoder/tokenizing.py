"""Token ids of inputs of any length, exactly as the whole text gives them, for bounded work.

Tokenising costs time and memory per *token* (about 420-800 bytes each with the Rust tokenizer),
and an input may be 30 MB. Cutting every input to ``max_tokens x 32`` characters first, as this
project once did, changes answers: texts with few tokens per character (whitespace runs, words of
over 100 characters that WordPiece turns into one ``[UNK]``, zero-width or control characters that
the normaliser removes) were embedded as a prefix, or refused, although they fit.

So a long input is tokenised a *prefix* at a time, and the tokenizer itself says which of the
prefix's tokens are final: every token of a *word* (the pre-tokeniser's unit, ``word_ids``) before
the prefix's last word. The pipelines we serve normalise character by character (or one combining
sequence at a time) and split words at characters they see (WordPiece's basic tokenizer at
whitespace, punctuation and CJK characters; SentencePiece's Metaspace at spaces; the byte-level BPE
regex with at most one character of look-ahead), so what follows the last word cannot reach back
into the words before it; within one word no rule is sound (Unigram's Viterbi path may hinge on a
word's last character), so the last word is never taken as final. A tokenizer whose normaliser or
pre-tokeniser is not one of those (``_LOCAL_STEPS``) is tokenised whole.

* once the final tokens are more than the model takes, the answer is known: the first
  ``max_tokens`` of them when truncating, ``input too long`` when not;
* otherwise the prefix grows (four-fold at most, less when that would pass the token budget),
  until it is the whole text, when the count is exact.

The work is about what the answer needs, and a text that fits is tokenised whole, within two
bounds, past which the input is refused, never cut: ``max_read`` characters (megabytes of
whitespace say nothing), and ``token_budget`` tokens for one word still open (a run that the
tokenizer segments as one word, like Chinese text without spaces for SentencePiece, or characters
that NFKC expands eighteen-fold, is tokenised to its end to decide its first token).
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TOKEN_BUDGET_PER_LIMIT", "TooManyTokens", "token_budget", "tokenize_exact", "words_are_local"]

_GROWTH = 4
# Tokens of one input tokenised at most to decide it, per token the model takes (bge-m3: 524,288,
# ~400 MB and ~2 s of tokenising), and at least _MIN_BUDGET.
TOKEN_BUDGET_PER_LIMIT = 64
_MIN_BUDGET = 1 << 16

# Normalisers and pre-tokenisers that only look at a character and its neighbours (see the module
# docstring). ``Replace`` counts only for a literal string or a regex of spaces (" {2,}").
_LOCAL_STEPS = frozenset(
    {
        "BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents",
        "Precompiled", "Prepend", "Replace", "Sequence", "BertPreTokenizer", "Metaspace", "ByteLevel",
        "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "Split", "CharDelimiterSplit",
        "UnicodeScripts",
    }
)  # fmt: skip
_SPACES_PATTERN = re.compile(r"[ \\s{},0-9+*?]+")
_LOCAL: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


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
    words_final = words_are_local(tokenizer)
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
                words_final=words_final,
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
    words_final: bool,
) -> list[int] | TooManyTokens:
    size = piece_chars
    while True:
        whole = size >= len(text)
        encoded = tokenizer(
            text[:size],
            add_special_tokens=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        row: list[int] = encoded["input_ids"]
        special: list[int] = encoded["special_tokens_mask"]
        content = [k for k, flag in enumerate(special) if not flag]
        lead = row[: content[0]] if content else row[: len(row)]
        trail = row[content[-1] + 1 :] if content else []
        room = max_tokens - len(lead) - len(trail)  # content tokens the model takes
        stable = content if whole else _before_last_word(encoded.word_ids(), content) if words_final else []
        if whole or len(stable) > room:
            if len(stable) <= room:
                return row
            if truncate:
                return lead + [row[k] for k in stable[:room]] + trail
            return TooManyTokens(0, len(stable) + len(lead) + len(trail), exact=whole)
        if len(content) >= budget:  # one word still open holds the rest: refused, never cut
            return TooManyTokens(0, len(content) + len(lead) + len(trail), exact=False, unread=size, open_word=True)
        if size >= max_read:  # undecided after all it may read: refused, never cut
            return TooManyTokens(0, len(stable) + len(lead) + len(trail), exact=False, unread=size)
        # Grow four-fold, or to about the budget when tokens come denser than that allows.
        size = min(size * _GROWTH, max_read, max(2 * size, size * budget // max(len(content), 1)))


def _before_last_word(word_ids: list[int | None], content: list[int]) -> list[int]:
    """The content tokens of every word before the last one (word ids never decrease)."""
    if not content:
        return []
    last = word_ids[content[-1]]
    return [k for k in content if word_ids[k] != last]


def words_are_local(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s normaliser and pre-tokeniser are all steps that make a word's tokens
    independent of the text after that word (``_LOCAL_STEPS``); remembered per tokenizer."""
    try:
        return _LOCAL[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    local = backend is not None and all(
        _local(json.loads(step.__getstate__())) for step in (backend.normalizer, backend.pre_tokenizer) if step
    )
    with contextlib.suppress(TypeError):  # not weakly referable: asked again next time, which only costs time
        _LOCAL[tokenizer] = local
    return local


def _local(step: dict[str, Any]) -> bool:
    return all(_local_one(part) for part in _steps(step))


def _steps(step: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield step
    for key in ("normalizers", "pretokenizers"):
        for part in step.get(key) or []:
            yield from _steps(part)


def _local_one(step: dict[str, Any]) -> bool:
    kind = step.get("type")
    if kind not in _LOCAL_STEPS:
        return False
    if kind == "Replace":
        pattern = step.get("pattern", {})
        return "String" in pattern or bool(_SPACES_PATTERN.fullmatch(str(pattern.get("Regex", "?"))))
    return True
