"""EngineRouter (EMBED_DEVICES): which engine gets a batch, and what happens when one fails."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from encoder.batcher import QueueFullError, WorkerCrashedError
from gateway.engine.client import EngineLink, EngineUnavailableError
from gateway.engine.router import SPLIT_TOKENS, EngineRouter


class FakeLink:
    """What the router reads of an EngineLink: load figures and an embed that answers or fails."""

    def __init__(self, name: str, *, queued: int = 0, running: bool = True, fails: Exception | None = None) -> None:
        self.name = name
        self.queue_tokens = queued
        self.sent_tokens = 0
        self.running = running
        self.fails = fails
        self.calls = 0
        self.encoder = None  # what the router compares engines' models by (None: not compared)

    async def embed(self, texts: Sequence[str], token_ids: Sequence[list[int]], **_: Any) -> list[str]:
        self.calls += 1
        if self.fails is not None:
            raise self.fails
        self.sent_tokens += sum(map(len, token_ids))
        await asyncio.sleep(0.01)
        self.sent_tokens -= sum(map(len, token_ids))
        return [self.name] * len(texts)


def _router(*links: FakeLink) -> EngineRouter:
    return EngineRouter(cast(list[EngineLink], list(links)))


async def _embed(router: EngineRouter, tokens: int = 3) -> list[str]:
    return cast(list[str], await router.embed(["t"], [[1] * tokens]))


def test_a_batch_goes_to_the_engine_with_the_fewest_tokens_waiting() -> None:
    busy, idle = FakeLink("busy", queued=5000), FakeLink("idle", queued=10)
    assert asyncio.run(_embed(_router(busy, idle))) == ["idle"]
    assert (busy.calls, idle.calls) == (0, 1)


def test_a_burst_between_two_reports_is_spread_by_what_this_worker_sent() -> None:
    """Both engines last reported an empty queue; without counting the calls in flight every one
    of a burst would go to the first engine."""
    a, b = FakeLink("a"), FakeLink("b")
    router = _router(a, b)

    async def burst() -> list[list[str]]:
        return await asyncio.gather(*(_embed(router, tokens=100) for _ in range(10)))

    answers = [name for answer in asyncio.run(burst()) for name in answer]
    assert answers.count("a") == answers.count("b") == 5


def test_an_engine_that_is_gone_or_full_passes_the_batch_to_the_next() -> None:
    gone = FakeLink("gone", fails=EngineUnavailableError("the engine process went away"))
    full = FakeLink("full", queued=1, fails=QueueFullError(10, 10, 1.0))
    live = FakeLink("live", queued=50)
    assert asyncio.run(_embed(_router(gone, full, live))) == ["live"]
    assert (gone.calls, full.calls, live.calls) == (1, 1, 1)


def test_an_engine_not_connected_is_skipped_without_a_try() -> None:
    away, live = FakeLink("away", running=False), FakeLink("live", queued=10_000)
    assert asyncio.run(_embed(_router(away, live))) == ["live"]
    assert away.calls == 0


def test_a_batch_that_crashed_its_engine_is_not_sent_to_another() -> None:
    """The input may be what crashes engines: one crash, not one per engine."""
    crashed = FakeLink("crashed", fails=WorkerCrashedError("the batch worker crashed"))
    other = FakeLink("other", queued=10)
    with pytest.raises(WorkerCrashedError):
        asyncio.run(_embed(_router(crashed, other)))
    assert other.calls == 0


def test_with_every_engine_away_the_caller_gets_the_first_engines_503() -> None:
    first = FakeLink("first", running=False, fails=EngineUnavailableError("no connection to the engine process"))
    second = FakeLink("second", running=False, fails=EngineUnavailableError("no connection"))
    with pytest.raises(EngineUnavailableError, match="no connection to the engine process"):
        asyncio.run(_embed(_router(first, second)))
    assert second.calls == 0


def test_when_every_engine_fails_the_last_failure_is_raised_after_one_try_each() -> None:
    a = FakeLink("a", fails=QueueFullError(5, 5, 2.0))
    b = FakeLink("b", queued=1, fails=QueueFullError(7, 7, 3.0))
    with pytest.raises(QueueFullError) as raised:
        asyncio.run(_embed(_router(a, b)))
    assert raised.value.retry_after == 3.0
    assert (a.calls, b.calls) == (1, 1)


def test_a_big_batch_is_shared_out_over_every_connected_engine_in_order() -> None:
    a, b, away = FakeLink("a"), FakeLink("b"), FakeLink("away", running=False)
    router = _router(a, away, b)
    texts = [f"t{i}" for i in range(40)]
    ids = [[1] * (SPLIT_TOKENS // 20)] * 40  # twice the threshold
    answer = asyncio.run(router.embed(texts, ids))
    assert answer == ["a"] * 20 + ["b"] * 20 or answer == ["b"] * 20 + ["a"] * 20
    assert (a.calls, b.calls, away.calls) == (1, 1, 0)


def test_a_batch_under_the_threshold_goes_to_one_engine() -> None:
    a, b = FakeLink("a"), FakeLink("b", queued=1)
    ids = [[1] * (SPLIT_TOKENS // 40)] * 40
    assert set(asyncio.run(cast(Any, _router(a, b).embed([str(i) for i in range(40)], ids)))) == {"a"}
    assert b.calls == 0


@pytest.mark.parametrize("engines", [2, 3, 4])
def test_the_parts_cover_the_batch_once_with_tokens_about_equal(engines: int) -> None:
    from gateway.engine.router import _parts

    lengths = [(i * 37) % 500 + 1 for i in range(300)]
    parts = _parts([[0] * n for n in lengths], engines)
    assert [start for start, _ in parts] == [0, *(end for _, end in parts[:-1])] and parts[-1][1] == 300
    sizes = [sum(lengths[a:b]) for a, b in parts]
    assert len(parts) == engines and max(sizes) - min(sizes) <= 2 * max(lengths), sizes
