"""The error for an input the model cannot take: :class:`InputTooLongError`, and what it says.

An input is refused, never silently cut, when truncation is off and it has more tokens than the
model takes, or when its tokens could not be decided within the bounds on tokenising one input
(:data:`encoder.model.MAX_READ_CHARS` characters, or a token budget's worth of one open word that
no cut may split). The error carries what the HTTP layer needs to explain it (the input's index,
its tokens - exact or a lower bound - and the limit) and :meth:`InputTooLongError.describe` words
it once, for every route that reports it.
"""

from __future__ import annotations

__all__ = ["InputTooLongError"]


class InputTooLongError(ValueError):
    """An input has more tokens than the model takes and truncation is off, or its tokens could not
    be decided within the bounds on tokenising one input (truncating or not).

    ``at_least`` is set when the input was not tokenised to its end (it was known to be too long
    before): then ``tokens`` counts only what was read, a lower bound. ``unread`` is set when its
    first ``unread`` characters did not decide its tokens: they were :data:`MAX_READ_CHARS`, or
    (``open_word``) they held the token budget in one word still open, which no cut may split.
    """

    def __init__(
        self,
        index: int,
        tokens: int,
        limit: int,
        *,
        at_least: bool = False,
        unread: int | None = None,
        open_word: bool = False,
    ) -> None:
        self.index, self.tokens, self.limit, self.at_least = index, tokens, limit, at_least
        self.unread, self.open_word = unread, open_word
        super().__init__(f"input {index} {self.describe()}; shorten it, split it, or enable truncation")

    def describe(self) -> str:
        """What is too long, for messages: '... has 300 tokens, more than ... 256 tokens'."""
        if self.unread is not None and self.open_word:
            return (
                f"holds a run that this model's tokenizer segments as one word (no space or other break) "
                f"too long to decide: its first {self.unread} characters hold {self.tokens} tokens, the most "
                f"this server tokenises of one input, and the run goes on (this model takes {self.limit}); "
                f"break it with spaces"
            )
        if self.unread is not None:
            return (
                f"is longer than {self.unread} characters, the most this server reads of one input, and those "
                f"hold only {self.tokens} tokens (this model takes {self.limit})"
            )
        counted = f"at least {self.tokens} tokens" if self.at_least else f"{self.tokens} tokens"
        return f"has {counted}, more than this model's limit of {self.limit} tokens"
