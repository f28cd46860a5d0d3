"""Several engines behind one HTTP worker (``EMBED_DEVICES``): route each miss batch, fail over.

An HTTP worker holds one :class:`~gateway.engine.client.EngineLink` per engine process. The
:class:`EngineRouter` is what the service sees as its batcher (and ``/stats`` as its engine):

* **routing**: a miss batch goes to the connected engine with the fewest tokens waiting: what it
  last reported queued, plus what this worker has sent it and not had back (a burst between two
  reports would otherwise all go to one engine). A batch of more than :data:`SPLIT_TOKENS` is cut
  into one contiguous part per connected engine (equal in tokens), so one big request uses every
  engine (``cuda:0,cuda:1``) rather than one;
* **failover**: an engine that is gone (its connection lost, or restarting) or whose queue is
  full: the batch goes to the next engine, each tried once. A batch whose engine crashed *on it*
  (:class:`~encoder.batcher.WorkerCrashedError`) is not retried elsewhere: the input may be what
  crashes engines;
* **what holds across engines**: a worker's own in-flight dedupe (the service's) and the cache do;
  the engines' queue dedupe and tenant fairness hold within each engine, not across them (two
  workers may send one text to two engines at once: it is computed twice, and cached once more).
  Sharing one queue across processes would put a lock on every batch's critical path, for a case
  the cache already bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from encoder.batcher import DENSE_ONLY, QueueFullError
from encoder.kinds import OutputKind, Outputs
from gateway.core.telemetry import EngineStats
from gateway.engine.client import EngineLink, EngineUnavailableError, RemoteEncoder
from gateway.engine.protocol import StatsAnswer

__all__ = ["SPLIT_TOKENS", "EngineRouter", "EnginesDisagreeError"]

# Above this many tokens a batch is shared out: each part still fills whole passes (a GPU's budget
# is 16,384 tokens), and below it the second round trip would cost more than it saves.
SPLIT_TOKENS = 16_384


class EnginesDisagreeError(RuntimeError):
    """The engines serve different models or numerics: one cache namespace cannot hold them."""


class EngineRouter:
    """One worker's links to every engine, as one batcher (see the module's docstring)."""

    def __init__(self, links: Sequence[EngineLink]) -> None:
        if not links:
            raise ValueError("an EngineRouter needs at least one engine link")
        self.links = list(links)

    # --- what the app reads ------------------------------------------------------------------
    @property
    def encoder(self) -> RemoteEncoder | None:
        """The model every engine serves (the first engine's description)."""
        return self.links[0].encoder

    @property
    def running(self) -> bool:
        return any(link.running for link in self.links)

    @property
    def queue_tokens(self) -> int:
        return sum(link.queue_tokens for link in self.links)

    @property
    def in_flight(self) -> int:
        return sum(link.in_flight for link in self.links)

    @property
    def tokens_per_second(self) -> float:
        running = [link.tokens_per_second for link in self.links if link.running]
        return sum(running) if running else self.links[0].tokens_per_second

    @property
    def max_queue_tokens(self) -> int:
        return sum(link.max_queue_tokens for link in self.links)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout_s: float = 60.0) -> None:
        """Connect to every engine; refuse engines that disagree on the model or its numerics."""
        await asyncio.gather(*(link.start(timeout_s=timeout_s) for link in self.links))
        first = self.links[0].encoder
        assert first is not None
        for index, link in enumerate(self.links[1:], start=1):
            other = link.encoder
            assert other is not None
            if (other.fingerprint, other.numerics) != (first.fingerprint, first.numerics):
                raise EnginesDisagreeError(
                    f"engine {index} serves {other.fingerprint} as {other.numerics}, engine 0 "
                    f"{first.fingerprint} as {first.numerics}: every engine must compute the same vectors"
                )

    async def stop(self) -> None:
        await asyncio.gather(*(link.stop() for link in self.links))

    # --- the batcher's face ------------------------------------------------------------------
    async def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        return await self._first_running().tokenize(texts, truncate=truncate)

    async def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[list[int]],
        *,
        kinds: frozenset[OutputKind] = DENSE_ONLY,
        tenant: str = "",
    ) -> list[Outputs]:
        parts = _parts(token_ids, sum(link.running for link in self.links))
        if len(parts) > 1:
            answers = await asyncio.gather(
                *(self._embed_part(texts[a:b], token_ids[a:b], kinds=kinds, tenant=tenant) for a, b in parts)
            )
            return [outputs for answer in answers for outputs in answer]
        return await self._embed_part(texts, token_ids, kinds=kinds, tenant=tenant)

    async def _embed_part(
        self,
        texts: Sequence[str],
        token_ids: Sequence[list[int]],
        *,
        kinds: frozenset[OutputKind],
        tenant: str,
    ) -> list[Outputs]:
        tried: set[int] = set()
        failure: QueueFullError | None = None
        while len(tried) < len(self.links):
            index = self._least_loaded(tried)
            if index is None:
                break
            tried.add(index)
            try:
                return await self.links[index].embed(texts, token_ids, kinds=kinds, tenant=tenant)
            except QueueFullError as exc:  # gone, restarting or full: the next engine, once each
                failure = exc
        if failure is not None:
            raise failure
        # No engine is connected: the first one's own error (503 with Retry-After).
        return await self.links[0].embed(texts, token_ids, kinds=kinds, tenant=tenant)

    def _least_loaded(self, tried: set[int]) -> int | None:
        candidates = [i for i, link in enumerate(self.links) if i not in tried and link.running]
        if not candidates:
            return None
        return min(candidates, key=lambda i: self.links[i].queue_tokens + self.links[i].sent_tokens)

    def _first_running(self) -> EngineLink:
        return next((link for link in self.links if link.running), self.links[0])

    # --- /stats --------------------------------------------------------------------------------
    async def whole_server(self) -> tuple[StatsAnswer, list[EngineStats]]:
        """The whole server's counters (any engine's answer holds every process's, from the
        ledger), the queues summed over the engines, and each engine's own figures."""
        answers = await asyncio.gather(*(link.whole_server() for link in self.links), return_exceptions=True)
        engines: list[EngineStats] = []
        whole: StatsAnswer | None = None
        queued = in_flight = 0
        for index, (link, answer) in enumerate(zip(self.links, answers, strict=True)):
            device = link.encoder.device if link.encoder is not None else "?"
            if isinstance(answer, BaseException):
                if not isinstance(answer, QueueFullError):
                    raise answer
                engines.append(EngineStats(index=index, device=device, up=False))
                continue
            if whole is None or (answer.from_engine and not whole.from_engine):
                whole = answer
            if answer.from_engine:
                engines.append(EngineStats.of(index, device, answer.engine, answer.queue_tokens))
                queued += answer.queue_tokens
                in_flight += answer.in_flight
            else:
                engines.append(EngineStats(index=index, device=device, up=False))
        if whole is None:
            raise EngineUnavailableError("no engine answered for its counters")
        whole.queue_tokens, whole.in_flight = queued, in_flight
        return whole, engines


def _parts(token_ids: Sequence[list[int]], engines: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges cutting a batch into ``engines`` parts of about equal tokens, or one
    range when it is under :data:`SPLIT_TOKENS` (or there is one engine)."""
    total = sum(len(ids) for ids in token_ids)
    count = min(engines, len(token_ids))
    if count < 2 or total <= SPLIT_TOKENS:
        return [(0, len(token_ids))]
    bounds: list[tuple[int, int]] = []
    running = start = 0
    for index, ids in enumerate(token_ids):
        running += len(ids)
        if running >= total * (len(bounds) + 1) / count and len(bounds) < count - 1 and index + 1 < len(token_ids):
            bounds.append((start, index + 1))
            start = index + 1
    bounds.append((start, len(token_ids)))
    return bounds
