"""EmbeddingService: the one place where the cache and the encoder meet.

For a list of texts and an output kind: deduplicate -> one cache lookup -> tokenise and check limits
for the misses -> encode the misses through the shared micro-batcher -> answer -> write the new
outputs back in the background. A cache that fails or is slow only turns hits into misses; it never
fails a request. Nothing here knows HTTP: errors are :mod:`gateway.core.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import xxhash

from encoder import InputTooLongError
from encoder.batcher import InputFailedError, QueueFullError
from encoder.kinds import HEAD_FILES, OutputKind, Outputs
from gateway.core.backend import Batcher, EncoderInfo
from gateway.core.cache import BlobCache, CacheSkippedError, CacheUnavailableError, cache_key
from gateway.core.cache.formats import CacheDtype
from gateway.core.errors import EncoderFailedError, InvalidInputError, OutputNotSupportedError, OverloadedError
from gateway.core.outputs import DENSE, OutputSpec
from gateway.core.ratelimit import over_tokens_limit
from gateway.core.telemetry import ModelTelemetry, Telemetry

__all__ = ["CACHE_GENERATION", "EmbedResult", "EmbeddingService", "Guard", "cache_namespace"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Characters tokenised at a time while a request's token count is checked against its limit: big
# enough that the batcher's tokeniser hop is rare, small enough that a request far past the limit
# is refused after about that much work (and memory: ~100 bytes per character while tokenising).
_TOKENIZE_PIECE_CHARS = 64 * 1024

Guard = Callable[[Awaitable[list[Outputs]]], Awaitable[list[Outputs]]]


# Raised whenever a fix changes which vector some text gets: every entry written by an older version
# is then in another namespace, never read again, and expires with its TTL. 2: texts with few tokens
# per character were cut before tokenising (a prefix's vector, cached under the whole text's key).
# 3: a word without spaces took its tokens 256 characters before a cut as final (a WordPiece word
# of zero-width characters, a Unigram run of one character), so some long texts got a wrong vector.
CACHE_GENERATION = 3


def cache_namespace(
    fingerprint: str,
    numerics: str,
    *,
    truncate: bool,
    share_numerics: bool = False,
    generation: int = CACHE_GENERATION,
    cache_dtype: CacheDtype = "float32",
) -> str:
    """The part of every cache key that says which vectors these are: ``{fingerprint}-{tag}``.

    The fingerprint covers the model's files, pooling, normalisation and max length; the tag covers
    what else changes a vector: the numerics (runtime, dtype, quantisation), truncation (a
    truncated vector is not the vector of the whole text) and this code's ``generation``.
    ``share_numerics`` leaves the numerics out on purpose, for replicas with, say, fp16 GPUs and
    fp32 CPUs that should share one cache. ``cache_dtype`` (the storage type, ``EMBED_CACHE_DTYPE``)
    is in it too, float32 implied: a float16 cache never reads an int8 one's entries, or a float32
    one's (a float32 namespace keeps the keys it had before the setting existed).
    """
    described = f"{'any' if share_numerics else numerics}|truncate={truncate}|generation={generation}"
    if cache_dtype != "float32":
        described += f"|cache_dtype={cache_dtype}"
    return f"{fingerprint}-{xxhash.xxh3_64_hexdigest(described.encode())[:8]}"


@dataclass(frozen=True, slots=True)
class EmbedResult(Generic[T]):
    values: list[T]  # per input, in order
    tokens: list[int]  # per input, as the model's tokenizer counted
    hits: int  # distinct texts served from the cache
    misses: int  # distinct texts computed


class EmbeddingService:
    def __init__(
        self,
        *,
        encoder: EncoderInfo,
        batcher: Batcher,
        cache: BlobCache | None,
        telemetry: Telemetry | ModelTelemetry,
        cache_prefix: str,
        max_request_tokens: int,
        truncate: bool,
        share_numerics: bool = False,
        cache_dtype: CacheDtype = "float32",
    ) -> None:
        self.encoder = encoder
        self.batcher = batcher
        self.cache = cache
        self.telemetry = telemetry
        self.cache_prefix = cache_prefix
        self.max_request_tokens = max_request_tokens
        self.truncate = truncate
        self.share_numerics = share_numerics
        # How outputs are stored (float32, float16, int8): a miss is answered as its later hit will
        # be, rounded through the storage type, so one text never gets two vectors.
        self.cache_dtype = cache_dtype
        self._namespace = ("", "")  # (fingerprint|numerics, namespace): recomputed when the model changes
        self._writes: set[asyncio.Task[None]] = set()
        self.writes_failing = False  # the last cache write failed (health reports the cache degraded)

    @property
    def namespace(self) -> str:
        """The cache namespace of the model that computes the misses *now*.

        Derived on every use, not fixed at start: with ``EMBED_WORKERS > 1`` the engine may restart
        with another fingerprint (its folder changed in place), and its new vectors must never be
        written, or the old ones read, under the old model's keys.
        """
        model = f"{self.encoder.fingerprint}|{self.encoder.numerics}"  # a restart may change either
        if self._namespace[0] != model:
            namespace = cache_namespace(
                self.encoder.fingerprint,
                self.encoder.numerics,
                truncate=self.truncate,
                share_numerics=self.share_numerics,
                cache_dtype=self.cache_dtype,
            )
            self._namespace = (model, namespace)
        return self._namespace[1]

    def key(self, text: str, output: OutputSpec[T, R] | None = None) -> str:
        """The cache key of ``text``'s ``output`` (default: dense): the namespace and the kind are in it."""
        return cache_key(self.cache_prefix, self.namespace + (output or DENSE).namespace, text)

    async def embed(
        self,
        texts: Sequence[str],
        output: OutputSpec[T, R],
        *,
        guard: Guard | None = None,
        tenant: str = "",
        reserve: Callable[[int], Awaitable[None]] | None = None,
        max_tokens: int | None = None,
        untruncated: bool = False,
    ) -> EmbedResult[T]:
        """``output`` values for ``texts``. ``guard`` wraps the wait for the encoder (never the cache
        lookup): the HTTP layer uses it to withdraw the work when the client hangs up. ``tenant``
        (an API key's name) is the unit the encoder queue is fair between. ``reserve`` is awaited
        with the request's whole token count as soon as it is known (hits bring theirs, misses are
        tokenised) and before any encoding: a key's token limit is taken there, and may refuse.
        ``max_tokens`` (the key's tokens per minute) refuses a request of more tokens than that as
        soon as the count passes it (400 ``request_too_large``, naming the key ``tenant``), before
        the rest is tokenised: no bucket would ever hold it. ``untruncated`` (TEI's ``truncate:
        false``) refuses an input over the model's limit even where the server truncates: the
        client asked for the whole text's vector, never a prefix's."""
        results = await self.embed_outputs(
            texts,
            [output],
            guard=guard,
            tenant=tenant,
            reserve=reserve,
            max_tokens=max_tokens,
            untruncated=untruncated,
        )
        return results[0]

    async def embed_outputs(
        self,
        texts: Sequence[str],
        outputs: Sequence[OutputSpec[Any, Any]],
        *,
        guard: Guard | None = None,
        tenant: str = "",
        reserve: Callable[[int], Awaitable[None]] | None = None,
        max_tokens: int | None = None,
        untruncated: bool = False,
    ) -> list[EmbedResult[Any]]:
        """Several outputs of ``texts`` at once (bge-m3's dense, sparse and ColBERT, to rank with):
        one cache lookup for all, one forward pass for a text that misses any of them (each kind is
        cached under its own key), counted once. A text is a hit when every output was cached. The
        arguments are :meth:`embed`'s; one result per output, in order."""
        for output in outputs:
            if output.kind not in self.encoder.outputs:
                raise OutputNotSupportedError(_not_supported(output.kind, self.encoder.outputs), param="model")
        widths = [self.encoder.output_width(output.kind) for output in outputs]
        unique = list(dict.fromkeys(texts))
        if untruncated and self.truncate:
            # Hits too: under a truncating namespace a long text's cached vector is its prefix's.
            await self._tokenize_pieces(texts, unique, truncate=False)
        namespace = self.namespace
        keys = [
            [cache_key(self.cache_prefix, namespace + output.namespace, text) for text in unique] for output in outputs
        ]
        flat = [key for per_output in keys for key in per_output]
        blobs = await self._lookup(flat) if self.cache is not None and flat else [None] * len(flat)
        found: list[list[tuple[int, Any] | None]] = [
            [output.unpack(blob, width, self.cache_dtype) for blob in blobs[o * len(unique) : (o + 1) * len(unique)]]
            for o, (output, width) in enumerate(zip(outputs, widths, strict=True))
        ]
        missing = [i for i in range(len(unique)) if any(per_output[i] is None for per_output in found)]
        hits = len(unique) - len(missing)
        self.telemetry.looked_up(hits, len(missing))

        miss_texts = [unique[i] for i in missing]
        # The hits' token counts. A text that missed any kind is tokenised with the misses: counting
        # its cached count too would count it twice against the request's and the key's limits.
        missed = set(missing)
        per_text = {unique[i]: pair[0] for i, pair in enumerate(found[0]) if pair is not None and i not in missed}
        token_ids = await self._tokenize_within_limit(texts, miss_texts, per_text, max_tokens, tenant)
        per_text.update({text: len(ids) for text, ids in zip(miss_texts, token_ids, strict=True)})
        tokens = [per_text[text] for text in texts]
        if reserve is not None:
            await reserve(sum(tokens))

        if miss_texts:
            kinds = frozenset(output.kind for output in outputs)
            computed = await self._compute(miss_texts, token_ids, kinds, guard, tenant)
            # An engine that restarted with another model meanwhile computed these: its link adopted
            # the new fingerprint before any of its results arrived, so a changed namespace shows it.
            # The answer would mix two models' vectors (hits of one, misses of the other), so nothing
            # is cached and the client retries, under one model.
            if self.namespace != namespace:
                raise OverloadedError("the model changed while this request was computed; retry it", retry_after=1)
            written: list[tuple[str, bytes]] = []
            for o, output in enumerate(outputs):
                for i, result in zip(missing, computed, strict=True):
                    if found[o][i] is None:  # this kind missed (a text's other kinds may have hit)
                        packed = output.pack(result.tokens, output.take(result), self.cache_dtype)
                        found[o][i] = (
                            (result.tokens, output.take(result))
                            if self.cache_dtype == "float32"
                            else output.unpack(packed, widths[o], self.cache_dtype)  # the value its hit will give
                        )
                        written.append((keys[o][i], packed))
            if self.cache is not None:
                self._write_back(written)

        row = {text: i for i, text in enumerate(unique)}
        results = []
        for per_output in found:
            values = []
            for text in texts:
                found_pair = per_output[row[text]]
                assert found_pair is not None, "every miss was computed above"
                values.append(found_pair[1])
            results.append(EmbedResult(values=values, tokens=tokens, hits=hits, misses=len(missing)))
        self.telemetry.embedded(len(texts), sum(tokens))
        return results

    async def _tokenize_within_limit(
        self,
        texts: Sequence[str],
        miss_texts: list[str],
        known: dict[str, int],
        max_tokens: int | None = None,
        tenant: str = "",
    ) -> list[list[int]]:
        """Token ids of ``miss_texts``, refusing the request as soon as it is sure to pass
        ``max_request_tokens`` (or the caller's ``max_tokens``, a key's tokens per minute): every
        input is at least one token, so a request of more inputs than that is refused unread, and
        the misses are tokenised a bounded piece at a time, the running count checked after each. A
        request far over the limit (2,048 inputs of 8,192 characters) so costs about the limit's
        worth of tokenising (or one piece past it), never all of it."""

        def check(counted: int, text: str) -> None:
            if counted > self.max_request_tokens:
                self._too_many_tokens(text)
            if max_tokens is not None and counted > max_tokens:
                raise over_tokens_limit(tenant or None, max_tokens, text)

        check(len(texts), f"at least {len(texts)}")
        repeats = Counter(texts)
        counted = sum(tokens * repeats[text] for text, tokens in known.items())
        token_ids: list[list[int]] = []
        start = 0
        while start < len(miss_texts):
            end, characters = start + 1, len(miss_texts[start])  # one text at least, however long
            while end < len(miss_texts) and characters + len(miss_texts[end]) <= _TOKENIZE_PIECE_CHARS:
                characters += len(miss_texts[end])
                end += 1
            piece = await self._tokenize_pieces(texts, miss_texts[start:end], truncate=self.truncate)
            counted += sum(len(ids) * repeats[text] for text, ids in zip(miss_texts[start:end], piece, strict=True))
            check(counted, str(counted) if end == len(miss_texts) else f"more than {counted}")
            token_ids.extend(piece)
            start = end
        check(counted, str(counted))
        return token_ids

    async def _tokenize_pieces(self, texts: Sequence[str], some: list[str], *, truncate: bool) -> list[list[int]]:
        """Token ids of ``some`` of ``texts``; one too long (truncation off) is a 400 naming its place."""
        try:
            return await self.batcher.tokenize(some, truncate=truncate)
        except InputTooLongError as exc:
            position = texts.index(some[exc.index])
            raise InvalidInputError(
                f"input[{position}] {exc.describe()}; shorten or split it",
                param="input",
                code="context_length_exceeded",
            ) from None

    def _too_many_tokens(self, counted: str) -> None:
        raise InvalidInputError(
            f"the request holds {counted} tokens; this server takes at most {self.max_request_tokens} per request",
            param="input",
        )

    async def _compute(
        self,
        texts: list[str],
        token_ids: list[list[int]],
        kinds: frozenset[OutputKind],
        guard: Guard | None,
        tenant: str,
    ) -> list[Outputs]:
        try:
            pending = self.batcher.embed(texts, token_ids, kinds=kinds, tenant=tenant)
            return await (guard(pending) if guard is not None else pending)
        except QueueFullError as exc:
            raise OverloadedError(str(exc), retry_after=exc.retry_after) from None
        except InputFailedError as exc:
            raise EncoderFailedError(str(exc)) from None

    async def _lookup(self, keys: list[str]) -> list[bytes | None]:
        assert self.cache is not None
        try:
            return await self.cache.get_blobs(keys)
        except CacheUnavailableError as exc:
            self.telemetry.cache_failed()
            # While the breaker is open every request lands here: say it once per failure, not per request.
            level = logging.DEBUG if isinstance(exc, CacheSkippedError) or exc.logged else logging.WARNING
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
        except CacheSkippedError:
            return  # the breaker is open; the lookup that preceded this write was already counted
        except CacheUnavailableError as exc:
            self.telemetry.cache_failed()
            # A read-only replica fails every write while every read succeeds: say so once per
            # streak of failures (health shows it meanwhile), not once per request.
            if not self.writes_failing and not exc.logged:
                logger.warning("cache writes fail (new vectors are not kept until they succeed): %s", exc)
            self.writes_failing = True
            return
        self.telemetry.cache_written(len(items))
        if self.writes_failing:
            logger.info("cache writes succeed again")
        self.writes_failing = False

    @property
    def pending_writes(self) -> int:
        """Background cache writes not yet finished."""
        return len(self._writes)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for background cache writes, e.g. at shutdown or in tests."""
        if self._writes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*self._writes, return_exceptions=True)


def _not_supported(kind: OutputKind, has: frozenset[OutputKind]) -> str:
    if kind == OutputKind.SCORE:
        return "this model is an embedding model, not a reranker (a cross-encoder): it has no scores"
    if OutputKind.SCORE in has:
        return f"this model is a reranker (a cross-encoder) for the rerank routes: it has no {kind} output"
    return f"this model has no {kind} output (its folder has no {HEAD_FILES[kind]})"
