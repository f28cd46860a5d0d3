"""TEI's ``/tokenize`` and ``/decode``: the served model's tokenizer, behind the same gates.

Neither computes a vector, but both run the tokenizer on what a client sends, so both are bounded
as an embedding request is: the inputs per request and the tokens per request (``EMBED_MAX_INPUTS``,
``EMBED_MAX_REQUEST_TOKENS``), checked before the answer is built, and the tokenizer runs off the
event loop. ``/tokenize`` answers TEI's token shape, with UTF-8 *byte* offsets as TEI's Rust
tokenizer reports them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request

from gateway.core.errors import InvalidInputError
from gateway.core.schemas import decode_with
from gateway.http.middleware import admit
from gateway.http.routes.common import runtime_of
from gateway.http.routes.tei_common import TEI_BODY_OPT, tei_post

__all__ = ["SimpleToken", "TeiDecode", "TeiTokenize", "tei_decode", "tei_tokenize"]


class TeiTokenize(msgspec.Struct, kw_only=True):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None
    model: str | None = None  # ours: which served model's tokenizer (default: the first)


class TeiDecode(msgspec.Struct, kw_only=True):
    ids: list[int | list[int]]  # one list of ids, or a list of them
    skip_special_tokens: bool = True
    model: str | None = None  # ours: which served model's tokenizer (default: the first)


class SimpleToken(msgspec.Struct):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


@tei_post("/tokenize", "TEI: tokenize", "TeiTokenize", TEI_BODY_OPT)
async def tei_tokenize(request: Request[Any, Any, Any]) -> list[list[SimpleToken]]:
    runtime = runtime_of(request)
    body = await request.body()
    admit(request.scope)  # counted in flight once its body is here, as the embedding routes
    data = decode_with(TeiTokenize)(body)
    model = runtime.model_for(data.model)
    texts = [data.inputs] if isinstance(data.inputs, str) else data.inputs
    limit = model.settings.max_inputs
    if not texts or len(texts) > limit:
        raise InvalidInputError(f"send 1 to {limit} inputs", param="inputs", code="too_many_inputs")
    name = model.prompts.name_for(data.prompt_name, None)
    texts = model.prompts.prepend(list(texts), name)
    tokenizer = model.encoder.hf_tokenizer
    max_tokens = model.settings.max_request_tokens

    def tokenize() -> list[list[SimpleToken]]:
        _bound_tokens(tokenizer, texts, max_tokens)
        encoded = tokenizer(
            texts,
            add_special_tokens=data.add_special_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            truncation=False,
        )
        counted = sum(len(ids) for ids in encoded["input_ids"])
        if counted > max_tokens:  # each token is ~50 bytes of answer: bounded as an embedding request is
            raise InvalidInputError(
                f"the request holds {counted} tokens; this server takes at most {max_tokens} per request",
                param="inputs",
                code="request_too_large",
            )
        return [
            _tokens(tokenizer, text, ids, offsets, special)
            for text, ids, offsets, special in zip(
                texts, encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True
            )
        ]

    return await asyncio.to_thread(tokenize)


_PIECE_CHARS = 65_536


def _bound_tokens(tokenizer: Any, texts: list[str], max_tokens: int) -> None:
    """Refuse a request sure to pass ``max_tokens`` after tokenising about that many tokens, not all
    of it: a piece at a time, ids only (offsets come after, for a request that fits). A cut may split
    a word into more tokens than it has whole, so each cut is allowed two."""
    counted = cuts = 0
    for text in texts:
        for start in range(0, len(text), _PIECE_CHARS):
            counted += len(tokenizer(text[start : start + _PIECE_CHARS], add_special_tokens=False)["input_ids"])
            cuts += 1
            if counted > max_tokens + 2 * cuts:
                raise InvalidInputError(
                    f"the request holds more than {max_tokens} tokens; this server takes at most {max_tokens} "
                    "per request",
                    param="inputs",
                    code="request_too_large",
                )


def _tokens(
    tokenizer: Any, text: str, ids: list[int], offsets: list[tuple[int, int]], special: list[int]
) -> list[SimpleToken]:
    """One input's tokens as TEI gives them: ``start`` and ``stop`` are UTF-8 *byte* offsets into
    the (prompted) input, as TEI's Rust tokenizer reports them, so a client slicing the input's
    bytes finds each piece."""
    byte_at = _byte_offsets(text)
    row = []
    for token, (start, stop), is_special in zip(ids, offsets, special, strict=True):
        row.append(
            SimpleToken(
                id=token,
                text=tokenizer.convert_ids_to_tokens(token) if is_special else text[start:stop],
                special=bool(is_special),
                start=None if is_special else byte_at[start],
                stop=None if is_special else byte_at[stop],
            )
        )
    return row


def _byte_offsets(text: str) -> list[int] | range:
    """Character offset -> UTF-8 byte offset, for every offset 0..len(text)."""
    if text.isascii():
        return range(len(text) + 1)
    offsets = [0]
    for character in text:
        offsets.append(offsets[-1] + len(character.encode("utf-8", "surrogatepass")))
    return offsets


@tei_post("/decode", "TEI: decode ids", "TeiDecode", TEI_BODY_OPT)
async def tei_decode(request: Request[Any, Any, Any]) -> list[str]:
    runtime = runtime_of(request)
    body = await request.body()
    admit(request.scope)
    data = decode_with(TeiDecode)(body)
    model = runtime.model_for(data.model)
    nested = [item for item in data.ids if isinstance(item, list)]
    flat = [item for item in data.ids if isinstance(item, int)]
    batches = nested if nested and not flat else [flat]
    if not data.ids or (nested and flat):
        raise InvalidInputError("ids: one list of token ids, or a list of such lists", param="ids")
    if len(batches) > runtime.settings.max_inputs:
        raise InvalidInputError(
            f"send 1 to {runtime.settings.max_inputs} lists of ids", param="ids", code="too_many_inputs"
        )
    counted, limit = sum(len(batch) for batch in batches), runtime.settings.max_request_tokens
    if counted > limit:
        raise InvalidInputError(
            f"the request holds {counted} ids; this server takes at most {limit} per request",
            param="ids",
            code="request_too_large",
        )
    tokenizer = model.encoder.hf_tokenizer

    def decode() -> list[str]:  # off the event loop: 300,000 ids take a while
        vocabulary = len(tokenizer)
        for batch in batches:
            if not batch or any(not 0 <= i < vocabulary for i in batch):
                raise InvalidInputError(f"ids must be non-empty lists of token ids below {vocabulary}", param="ids")
        texts: list[str] = tokenizer.batch_decode(batches, skip_special_tokens=data.skip_special_tokens)
        return texts

    return await asyncio.to_thread(decode)
