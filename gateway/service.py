"""EmbeddingService: the one place where the cache and the encoder meet.

For a list of texts: deduplicate -> one cache lookup -> tokenise and check limits for the misses ->
encode the misses through the shared micro-batcher -> answer -> write the new vectors back in the
background. A cache that fails or is slow only turns hits into misses; it never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from encoder import Encoder, InputTooLongError
from encoder.batcher import Embedding, InputFailedError, MicroBatcher, QueueFullError
from encoder.model import COLBERT, DENSE, HEAD_FILES, SPARSE
from gateway.cache import (
    CachedVector,
    CacheSkippedError,
    CacheUnavailableError,
    VectorCache,
    cache_key,
    pack,
    pack_colbert,
    pack_sparse,
    unpack,
    unpack_colbert,
    unpack_sparse,
)
from gateway.errors import APIError, InvalidRequestError, OverloadedError
from gateway.stats import Stats

__all__ = ["EmbedResult", "EmbeddingService"]

logger = logging.getLogger(__name__)

Guard = Callable[[Awaitable[list[Embedding]]], Awaitable[list[Embedding]]]


@dataclass(frozen=True, slots=True)
class EmbedResult:
    values: list[Any]  # per input, in order: a float32 vector (dense), (ids, weights) (sparse), a matrix (colbert)
    tokens: list[int]  # per input, as the model's tokenizer counted
    hits: int
    misses: int


class EncoderFailedError(APIError):
    status_code = 500
    error_type = "server_error"
    code = "encoder_error"


@dataclass(frozen=True, slots=True)
class _Codec:
    """How one output kind is cached: its key namespace and its sealed byte format."""

    kind: str
    decode: Callable[[bytes | None], tuple[int, Any] | None]  # -> (tokens, value) or a miss
    encode: Callable[[Embedding], bytes]
    value: Callable[[Embedding], Any]


def _codecs(encoder: Encoder) -> dict[str, _Codec]:
    dim = encoder.dim
    colbert_head = encoder.heads.get(COLBERT)
    colbert_dim = colbert_head.out_features if colbert_head is not None else 0

    def dense(blob: bytes | None) -> tuple[int, Any] | None:
        found = unpack(blob, dim)
        return None if found is None else (found.tokens, found.vector)

    def sparse(blob: bytes | None) -> tuple[int, Any] | None:
        found = unpack_sparse(blob)
        return None if found is None else (found[0], (found[1], found[2]))

    def colbert(blob: bytes | None) -> tuple[int, Any] | None:
        return unpack_colbert(blob, colbert_dim)

    return {
        DENSE: _Codec(DENSE, dense, lambda e: pack(CachedVector(e.vector, e.tokens)), lambda e: e.vector),
        SPARSE: _Codec(SPARSE, sparse, lambda e: pack_sparse(e.tokens, *e.sparse), lambda e: e.sparse),  # type: ignore[misc]
        COLBERT: _Codec(COLBERT, colbert, lambda e: pack_colbert(e.tokens, e.colbert), lambda e: e.colbert),  # type: ignore[arg-type]
    }


class EmbeddingService:
    def __init__(
        self,
        *,
        encoder: Encoder,
        batcher: MicroBatcher,
        cache: VectorCache | None,
        stats: Stats,
        cache_prefix: str,
        max_request_tokens: int,
        truncate: bool,
    ) -> None:
        self.encoder = encoder
        self.batcher = batcher
        self.cache = cache
        self.stats = stats
        self.cache_prefix = cache_prefix
        self.max_request_tokens = max_request_tokens
        self.truncate = truncate
        self._writes: set[asyncio.Task[None]] = set()
        self._codecs = _codecs(encoder)

    def key(self, text: str, kind: str = DENSE) -> str:
        namespace = self.encoder.fingerprint if kind == DENSE else f"{self.encoder.fingerprint}:{kind}"
        return cache_key(self.cache_prefix, namespace, text)

    async def embed(self, texts: Sequence[str], *, kind: str = DENSE, guard: Guard | None = None) -> EmbedResult:
        """``kind`` outputs for ``texts``. ``guard`` wraps the wait for the encoder (never the cache
        lookup): the HTTP layer uses it to withdraw the work when the client hangs up."""
        if kind not in self.encoder.outputs:
            raise InvalidRequestError(
                f"this model has no {kind} output: {HEAD_FILES[kind]} is missing from its folder ({self.encoder.path})",
                param="model",
                code="output_not_supported",
            )
        codec = self._codecs[kind]
        unique = list(dict.fromkeys(texts))
        keys = [self.key(text, kind) for text in unique] if self.cache is not None else []
        blobs = await self._lookup(keys) if keys else [None] * len(unique)
        found = [codec.decode(blob) for blob in blobs]
        missing = [i for i, value in enumerate(found) if value is None]
        hits = len(unique) - len(missing)
        self.stats.cache_hits += hits
        self.stats.cache_misses += len(missing)

        miss_texts = [unique[i] for i in missing]
        try:
            token_ids = await self.batcher.tokenize(miss_texts, truncate=self.truncate)
        except InputTooLongError as exc:
            position = texts.index(miss_texts[exc.index])
            raise InvalidRequestError(
                f"input[{position}] has {exc.tokens} tokens, more than this model's limit of {exc.limit}; "
                "shorten or split it (or ask the operator to set EMBED_TRUNCATE=true)",
                param="input",
                code="context_length_exceeded",
            ) from None
        per_text = {unique[i]: value[0] for i, value in enumerate(found) if value is not None}
        per_text.update({text: len(ids) for text, ids in zip(miss_texts, token_ids, strict=True)})
        tokens = [per_text[text] for text in texts]
        if sum(tokens) > self.max_request_tokens:
            raise InvalidRequestError(
                f"the request holds {sum(tokens)} tokens; this server takes at most "
                f"{self.max_request_tokens} per request (EMBED_MAX_REQUEST_TOKENS)",
                param="input",
            )

        if miss_texts:
            try:
                pending = self.batcher.embed(miss_texts, token_ids, kinds=frozenset({kind}))
                computed = await (guard(pending) if guard is not None else pending)
            except QueueFullError as exc:
                raise OverloadedError(str(exc), retry_after=exc.retry_after) from None
            except InputFailedError as exc:
                raise EncoderFailedError(str(exc)) from None
            for i, result in zip(missing, computed, strict=True):
                found[i] = (result.tokens, codec.value(result))
            if self.cache is not None:
                self._write_back([(keys[i], codec.encode(r)) for i, r in zip(missing, computed, strict=True)])

        if len(unique) == len(texts):
            values = [value[1] for value in found]  # type: ignore[index]
        else:
            row = {text: i for i, text in enumerate(unique)}
            values = [found[row[text]][1] for text in texts]  # type: ignore[index]
        return EmbedResult(values=values, tokens=tokens, hits=hits, misses=len(missing))

    async def _lookup(self, keys: list[str]) -> list[bytes | None]:
        assert self.cache is not None
        try:
            return await self.cache.get_blobs(keys)
        except CacheUnavailableError as exc:
            self.stats.cache_errors += 1
            # While the breaker is open every request lands here: say it once per failure, not per request.
            level = logging.DEBUG if isinstance(exc, CacheSkippedError) else logging.WARNING
            logger.log(level, "cache lookup failed, computing all %d inputs: %s", len(keys), exc)
            return [None] * len(keys)

    def _write_back(self, items: list[tuple[str, bytes]]) -> None:
        task = asyncio.create_task(self._put(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, items: list[tuple[str, bytes]]) -> None:
        assert self.cache is not None
        try:
            await self.cache.put_blobs(items)
            self.stats.cache_writes += len(items)
        except CacheSkippedError:
            pass  # the breaker is open; the lookup that preceded this write was already counted
        except CacheUnavailableError as exc:
            self.stats.cache_errors += 1
            logger.warning("cache write of %d vectors failed: %s", len(items), exc)

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for background cache writes, e.g. at shutdown or in tests."""
        if self._writes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*self._writes, return_exceptions=True)
