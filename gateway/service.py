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

import numpy as np

from encoder import Encoder, InputTooLongError
from encoder.batcher import Embedding, InputFailedError, MicroBatcher, QueueFullError
from gateway.cache import CachedVector, CacheSkippedError, CacheUnavailableError, VectorCache, cache_key
from gateway.errors import APIError, InvalidRequestError, OverloadedError
from gateway.stats import Stats

__all__ = ["EmbedResult", "EmbeddingService"]

logger = logging.getLogger(__name__)

Guard = Callable[[Awaitable[list[Embedding]]], Awaitable[list[Embedding]]]


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[np.ndarray]  # float32 (dim,), in input order, as the encoder made them
    tokens: list[int]  # per input, as the model's tokenizer counted
    hits: int
    misses: int


class EncoderFailedError(APIError):
    status_code = 500
    error_type = "server_error"
    code = "encoder_error"


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

    def key(self, text: str) -> str:
        return cache_key(self.cache_prefix, self.encoder.fingerprint, text)

    async def embed(self, texts: Sequence[str], *, guard: Guard | None = None) -> EmbedResult:
        """Vectors for ``texts``. ``guard`` wraps the wait for the encoder (never the cache lookup):
        the HTTP layer uses it to withdraw the work when the client hangs up."""
        unique = list(dict.fromkeys(texts))
        keys = [self.key(text) for text in unique] if self.cache is not None else []
        found: list[CachedVector | None] = await self._lookup(keys) if keys else [None] * len(unique)
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
        per_text = {unique[i]: value.tokens for i, value in enumerate(found) if value is not None}
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
                pending = self.batcher.embed(miss_texts, token_ids)
                computed = await (guard(pending) if guard is not None else pending)
            except QueueFullError as exc:
                raise OverloadedError(str(exc), retry_after=exc.retry_after) from None
            except InputFailedError as exc:
                raise EncoderFailedError(str(exc)) from None
            fresh = [CachedVector(result.vector, result.tokens) for result in computed]
            for i, value in zip(missing, fresh, strict=True):
                found[i] = value
            if self.cache is not None:
                self._write_back([(keys[i], value) for i, value in zip(missing, fresh, strict=True)])

        if len(unique) == len(texts):
            vectors = [value.vector for value in found]  # type: ignore[union-attr]
        else:
            row = {text: i for i, text in enumerate(unique)}
            vectors = [found[row[text]].vector for text in texts]  # type: ignore[union-attr]
        return EmbedResult(vectors=vectors, tokens=tokens, hits=hits, misses=len(missing))

    async def _lookup(self, keys: list[str]) -> list[CachedVector | None]:
        assert self.cache is not None
        try:
            return await self.cache.get_many(keys)
        except CacheUnavailableError as exc:
            self.stats.cache_errors += 1
            # While the breaker is open every request lands here: say it once per failure, not per request.
            level = logging.DEBUG if isinstance(exc, CacheSkippedError) else logging.WARNING
            logger.log(level, "cache lookup failed, computing all %d inputs: %s", len(keys), exc)
            return [None] * len(keys)

    def _write_back(self, items: list[tuple[str, CachedVector]]) -> None:
        task = asyncio.create_task(self._put(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, items: list[tuple[str, CachedVector]]) -> None:
        assert self.cache is not None
        try:
            await self.cache.put_many(items)
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
