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
import logging
from collections.abc import Sequence

from encoder.batcher import DENSE_ONLY, QueueFullError
from encoder.kinds import OutputKind, Outputs
from gateway.core.telemetry import EngineStats, TelemetryState
from gateway.engine.client import EngineLink, EngineUnavailableError, RemoteEncoder
from gateway.engine.protocol import StatsAnswer

__all__ = ["SPLIT_TOKENS", "EngineRouter", "EnginesDisagreeError"]

logger = logging.getLogger("gateway.worker")

# Above this many tokens a batch is shared out: each part still fills whole passes (a GPU's budget
# is 16,384 tokens), and below it the second round trip would cost more than it saves.
SPLIT_TOKENS = 16_384
STATS_TIMEOUT_S = 2.0  # an engine that has not answered for its counters by then is reported down


class EnginesDisagreeError(RuntimeError):
    """The engines serve different models or numerics: one cache namespace cannot hold them."""


class EngineRouter:
    """One worker's links to every engine, as one batcher (see the module's docstring)."""

    def __init__(self, links: Sequence[EngineLink]) -> None:
        if not links:
            raise ValueError("an EngineRouter needs at least one engine link")
        self.links = list(links)
        self._turn = 0  # ties go round the engines, never always to engine 0
        self._reference = 0  # the engine whose model the service keys the cache by: the first connected
        self._starting: list[asyncio.Task[None]] = []
        self._mismatched: set[int] = set()  # engines serving another model (each logged once)

    # --- what the app reads ------------------------------------------------------------------
    @property
    def encoder(self) -> RemoteEncoder | None:
        """The model the engines serve (as the first engine that connected describes it)."""
        return self.links[self._reference].encoder

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
        """Connect to the engines; return once one has (its model is this worker's), while the
        others go on connecting (one still loading, or hung, must not keep this worker from
        serving through the rest). Engines connected by then must agree on the model."""
        self._starting = [
            asyncio.create_task(link.start(timeout_s=timeout_s), name=f"engine-{i}-start")
            for i, link in enumerate(self.links)
        ]
        failures: list[BaseException] = []
        for finished in asyncio.as_completed(self._starting):
            try:
                await finished
                break
            except (TimeoutError, OSError) as exc:
                failures.append(exc)
        else:
            raise failures[0]
        self._reference = next(i for i, link in enumerate(self.links) if link.encoder is not None)
        first = self.links[self._reference].encoder
        assert first is not None
        for index, link in enumerate(self.links):
            other = link.encoder
            if other is not None and (other.fingerprint, other.numerics) != (first.fingerprint, first.numerics):
                raise EnginesDisagreeError(
                    f"engine {index} serves {other.fingerprint} as {other.numerics}, engine {self._reference} "
                    f"{first.fingerprint} as {first.numerics}: every engine must compute the same vectors"
                )

    async def stop(self) -> None:
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        await asyncio.gather(*(link.stop() for link in self.links))

    # --- the batcher's face ------------------------------------------------------------------
    async def tokenize(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[list[int]]:
        # Tokenising is local (each link holds the model's tokenizer): the reference model's, always.
        return await self.links[self._reference].tokenize(texts, truncate=truncate)

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
        # No engine is connected: the reference engine's own error (503 with Retry-After).
        return await self.links[self._reference].embed(texts, token_ids, kinds=kinds, tenant=tenant)

    def _least_loaded(self, tried: set[int]) -> int | None:
        candidates = [i for i, link in enumerate(self.links) if i not in tried and link.running and self._agrees(i)]
        if not candidates:
            return None
        self._turn += 1
        count = len(self.links)
        return min(
            candidates,
            key=lambda i: (self.links[i].queue_tokens + self.links[i].sent_tokens, (i - self._turn) % count),
        )

    def _agrees(self, index: int) -> bool:
        """Whether engine ``index`` serves the model the service keys the cache by (engine 0's, as
        this worker last adopted it). An engine restarted onto another model (its folder changed in
        place) must not answer under this one's namespace: it takes no work until they agree."""
        reference, other = self.encoder, self.links[index].encoder
        if index == self._reference or reference is None or other is None:
            return True
        agrees = (other.fingerprint, other.numerics) == (reference.fingerprint, reference.numerics)
        if not agrees and index not in self._mismatched:
            logger.error(
                "engine %d serves %s as %s, engine %d %s as %s: it takes no work until both serve one model "
                "(restart it, or the gateway)",
                index,
                other.fingerprint,
                other.numerics,
                self._reference,
                reference.fingerprint,
                reference.numerics,
            )
        (self._mismatched.add if not agrees else self._mismatched.discard)(index)
        return agrees

    @staticmethod
    async def _counters(link: EngineLink) -> StatsAnswer:
        """One engine's answer, or :class:`EngineUnavailableError` when it does not answer in
        :data:`STATS_TIMEOUT_S` (a hung engine must not hang every scrape)."""
        try:
            async with asyncio.timeout(STATS_TIMEOUT_S):
                return await link.whole_server()
        except TimeoutError:
            raise EngineUnavailableError("it did not answer for its counters in time") from None

    # --- /stats --------------------------------------------------------------------------------
    async def whole_server(self) -> tuple[StatsAnswer, list[EngineStats], dict[str, TelemetryState]]:
        """The whole server's counters (any engine's answer holds every process's, from the
        ledger, with each engine's as it has just answered), the queues summed over the engines,
        each engine's own figures, and the counters each engine answered by its ledger name."""
        answers = await asyncio.gather(*(self._counters(link) for link in self.links), return_exceptions=True)
        engines: list[EngineStats] = []
        whole: StatsAnswer | None = None
        fresh: dict[str, TelemetryState] = {}
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
                fresh[answer.engine_name] = answer.engine
                engines.append(EngineStats.of(index, device, answer.engine, answer.queue_tokens))
                queued += answer.queue_tokens
                in_flight += answer.in_flight
            else:
                engines.append(EngineStats(index=index, device=device, up=False))
        if whole is None:  # no engine answered in time: the counters from the ledger, queues empty
            whole = self.links[self._reference].from_ledger()
        whole.queue_tokens, whole.in_flight = queued, in_flight
        with_fresh_engines(whole, fresh)
        return whole, engines, fresh


def with_fresh_engines(whole: StatsAnswer, fresh: dict[str, TelemetryState]) -> None:
    """Put in ``whole`` each engine's counters as that engine has just answered them (``fresh``, by
    ledger name) instead of what the ledger held of it: an engine writes its ledger entry only
    once a second, so the entry of an engine other than the one that answered lags behind the
    passes it has run (a /stats right after a request would miss them)."""
    if len(whole.names) != len(whole.workers):  # an answer that does not name its entries
        return
    kept = dict(zip(whole.names, whole.workers, strict=True))
    kept.update((name, state) for name, state in fresh.items() if name and name != whole.engine_name)
    whole.names, whole.workers = list(kept), list(kept.values())


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
