"""Turn OpenAI's four ``input`` shapes into a list of texts, checking limits before any work.

``str`` and ``list[str]`` are texts. ``list[int]`` (one input) and ``list[list[int]]`` (many) are
OpenAI ``cl100k_base`` token ids: what LangChain's ``OpenAIEmbeddings`` sends by default after
splitting long texts with tiktoken. Our model has its own tokenizer, so ids are decoded back to
text with tiktoken and that text is embedded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Protocol

from gateway.core.errors import InvalidInputError

__all__ = ["TokenIdDecoder", "normalise_input"]

logger = logging.getLogger(__name__)

_TIKTOKEN_HINT = (
    "Token-id input (what LangChain's OpenAIEmbeddings sends by default) needs OpenAI's cl100k_base "
    "encoding, which this server could not load ({reason}). Send text instead: with LangChain, pass "
    "check_embedding_ctx_length=False to OpenAIEmbeddings; or give the server a tiktoken cache "
    "(TIKTOKEN_CACHE_DIR holding cl100k_base.tiktoken)."
)


class _Encoding(Protocol):
    """The part of ``tiktoken.Encoding`` we use."""

    @property
    def n_vocab(self) -> int: ...

    def decode(self, tokens: list[int]) -> str: ...


class TokenIdDecoder:
    """Decodes cl100k_base ids to text. The encoding is loaded on first use, off the event loop;
    a failed load is remembered for ``retry_after_s`` so clients get a quick, clear 400."""

    def __init__(self, encoding: str = "cl100k_base", retry_after_s: float = 60.0) -> None:
        self.encoding_name = encoding
        self.retry_after_s = retry_after_s
        self._encoding: _Encoding | None = None
        self._failure: tuple[float, str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> _Encoding:
        with self._lock:
            if self._encoding is not None:
                return self._encoding
            if self._failure is not None and time.monotonic() - self._failure[0] < self.retry_after_s:
                raise InvalidInputError(_TIKTOKEN_HINT.format(reason=self._failure[1]), param="input")
            try:
                import tiktoken

                encoding: _Encoding = tiktoken.get_encoding(self.encoding_name)
            except Exception as exc:  # network, missing file, hash mismatch: all mean "not here"
                reason = f"{type(exc).__name__}: {str(exc)[:160]}"
                self._failure = (time.monotonic(), reason)
                logger.warning("could not load tiktoken %s: %s", self.encoding_name, reason)
                raise InvalidInputError(_TIKTOKEN_HINT.format(reason=reason), param="input") from None
            self._encoding = encoding
            return encoding

    def decode_sync(self, batches: list[list[int]]) -> list[str]:
        encoding = self._load()
        vocabulary = encoding.n_vocab
        for position, ids in enumerate(batches):
            for token in ids:
                if not 0 <= token < vocabulary:
                    raise InvalidInputError(
                        f"input[{position}] holds token id {token}, outside cl100k_base's range 0..{vocabulary - 1}",
                        param="input",
                    )
        try:
            return [encoding.decode(ids) for ids in batches]
        except Exception as exc:  # ids inside the range that are not tokens (gaps in the table)
            raise InvalidInputError(f"token ids could not be decoded: {exc}", param="input") from None

    async def decode(self, batches: list[list[int]]) -> list[str]:
        return await asyncio.to_thread(self.decode_sync, batches)


def _check_text(text: str, position: str) -> None:
    if not text:
        raise InvalidInputError(f"{position} is an empty string; every input must hold text", param="input")


async def normalise_input(
    value: str | list[str | int | list[int]], *, max_inputs: int, decoder: TokenIdDecoder
) -> list[str]:
    """Texts for ``value``, or :class:`InvalidInputError` naming what is wrong and where."""
    if isinstance(value, str):
        _check_text(value, "'input'")
        return [value]
    if not value:
        raise InvalidInputError("'input' is an empty list; send at least one input", param="input")
    first = value[0]
    if isinstance(first, int):  # one input given as token ids
        ids = [token for token in value if isinstance(token, int)]
        if len(ids) != len(value):
            raise InvalidInputError("'input' mixes token ids with other types", param="input")
        return await decoder.decode([ids])
    if len(value) > max_inputs:
        raise InvalidInputError(
            f"'input' holds {len(value)} inputs; this server takes at most {max_inputs} per request",
            param="input",
            code="too_many_inputs",  # TEI's routes answer it 413, as TEI does for its batch size
        )
    if isinstance(first, str):
        texts: list[str] = []
        for position, text in enumerate(value):
            if not isinstance(text, str):
                raise InvalidInputError(f"input[{position}] is not a string like input[0]", param="input")
            _check_text(text, f"input[{position}]")
            texts.append(text)
        return texts
    batches: list[list[int]] = []
    for position, entry in enumerate(value):
        if not isinstance(entry, list):
            raise InvalidInputError(f"input[{position}] is not a list of token ids like input[0]", param="input")
        if not entry:
            raise InvalidInputError(f"input[{position}] is an empty list of token ids", param="input")
        batches.append(entry)
    return await decoder.decode(batches)
