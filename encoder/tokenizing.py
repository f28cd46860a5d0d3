"""Token ids of inputs of any length, exactly as the whole text gives them, for bounded work.

Tokenising costs time and memory per *character* (about 420 bytes per token with the Rust
tokenizer), and an input may be 30 MB. Cutting every input to ``max_tokens x 32`` characters first,
as this project once did, changes answers: texts with few tokens per character (whitespace runs,
words of over 100 characters that WordPiece turns into one ``[UNK]``, zero-width or control
characters that the normaliser removes) were embedded as a prefix, or refused, although they fit.

So a long input is tokenised a *prefix* at a time, with the tokenizer's own offsets:

* every token that ends before the last run of spaces in the prefix is *stable*: the tokenizers we
  serve split words at spaces before anything else (WordPiece's basic tokenizer, SentencePiece's
  Metaspace, the byte-level BPE regex), so what follows that run cannot change those tokens;
* once the stable tokens are more than the model takes, the answer is known: the first
  ``max_tokens`` of them when truncating, ``input too long`` when not;
* otherwise the prefix grows four-fold, until it is the whole text (then the count is exact).

The work is therefore about what the answer needs (plus the text itself when it has few tokens),
and a text that fits is always tokenised whole, up to ``max_read`` characters: a text longer than
that which still has too few tokens in them to decide (megabytes of whitespace, one word of
megabytes) is refused as too long, never cut. A prefix with no space at all (one huge word,
or a script written without spaces) counts the tokens that end ``NO_SPACE_MARGIN`` characters before
its end as stable: segmenting within a word looks only a few pieces ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_SPACE_MARGIN", "TooManyTokens", "tokenize_exact"]

NO_SPACE_MARGIN = 256
_GROWTH = 4


@dataclass(frozen=True, slots=True)
class TooManyTokens:
    """Input ``index`` has more than ``limit`` tokens: ``tokens`` of them, or at least that many
    when ``exact`` is false (it was not tokenised to its end). ``unread`` is set when its first
    ``max_read`` characters did not decide it: then ``tokens`` is what they held."""

    index: int
    tokens: int
    exact: bool
    unread: int | None = None


def tokenize_exact(
    tokenizer: Any, texts: Sequence[str], *, max_tokens: int, truncate: bool, piece_chars: int, max_read: int
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
    for i, text in enumerate(texts):
        if ids[i] is None:
            ids[i] = _long(
                tokenizer,
                text,
                max_tokens=max_tokens,
                truncate=truncate,
                piece_chars=piece_chars,
                max_read=max(piece_chars, max_read),
            )
    rows: list[list[int]] = []
    for i, row in enumerate(ids):
        if isinstance(row, TooManyTokens):
            return TooManyTokens(i, row.tokens, row.exact, row.unread)
        assert row is not None, "every text was tokenised above"
        if not truncate and len(row) > max_tokens:
            return TooManyTokens(i, len(row), exact=True)
        rows.append(row)
    return rows


def _long(
    tokenizer: Any, text: str, *, max_tokens: int, truncate: bool, piece_chars: int, max_read: int
) -> list[int] | TooManyTokens:
    size = piece_chars
    while True:
        prefix = text[:size]
        whole = size >= len(text)
        encoded = tokenizer(
            prefix,
            add_special_tokens=True,
            return_offsets_mapping=True,
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
        if whole:
            stable = content
        else:
            end = _stable_end(prefix)
            offsets = encoded["offset_mapping"]
            stable = [k for k in content if offsets[k][1] <= end]
        if whole or len(stable) > room:
            if len(stable) <= room:
                return row
            if truncate:
                return lead + [row[k] for k in stable[:room]] + trail
            return TooManyTokens(0, len(stable) + len(lead) + len(trail), exact=whole)
        if size >= max_read:  # undecided after all it may read: refused, never cut
            return TooManyTokens(0, len(stable) + len(lead) + len(trail), exact=False, unread=size)
        size = min(size * _GROWTH, max_read)


def _stable_end(prefix: str) -> int:
    """Where the tokens that nothing after ``prefix`` can change end: the start of its last run of
    spaces that has text before it (the word the cut may have split lies after that run).

    Only U+0020 counts: every tokenizer splits words there, while some characters Python calls
    whitespace (U+001C..U+001F, control characters) are *removed* by WordPiece's normaliser, joining
    the words around them.
    """
    end = len(prefix)
    while end and prefix[end - 1] != " ":  # the last word, perhaps cut
        end -= 1
    while end and prefix[end - 1] == " ":  # the run before it
        end -= 1
    if end == 0:  # no whitespace: one long word, or a script without spaces
        return max(0, len(prefix) - NO_SPACE_MARGIN)
    return end
