"""The ledger of EMBED_WORKERS > 1 (issue 27 #6): every process's counts outlive it.

* a dead process's counts stay, folded by the supervisor into one retired file; a new process with
  the dead one's pid counts on its own;
* a reader never sees a fold half done: sums read while processes die and are folded only grow;
* in one process, a real engine and link: the counters a restarted engine reports (after the
  supervisor's fold) are never below what the first one reported, histograms included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from encoder import Encoder
from encoder.batcher import BatchReport
from gateway.core.telemetry import Telemetry, TelemetryState
from gateway.engine.client import EngineLink, EngineUnavailableError
from gateway.engine.ledger import FOLDER, Ledger
from gateway.engine.server import EngineServer
from gateway.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _state(requests: int, batches: int = 0) -> TelemetryState:
    telemetry = Telemetry()
    for _ in range(requests):
        telemetry.request_done("/v1/embeddings", 200, 0.01, embedding=True)
    for _ in range(batches):
        telemetry.batch_done(BatchReport(size=2, tokens=20, padded_tokens=24, seconds=0.05))
    return telemetry.state()


def _sum(ledger: Ledger) -> Telemetry:
    return Telemetry.combined(list(ledger.read().values()))


def _histogram_count(telemetry: Telemetry) -> int:
    return sum(sum(buckets.counts) for buckets in telemetry.request_seconds.values())


def test_a_dead_process_counts_stay_and_are_folded_into_one_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.write("worker-100", _state(3))
    ledger.write("worker-200", _state(5))
    ledger.write("engine-300", _state(0, batches=4))
    assert _sum(ledger).counters.requests == 8

    supervisor = Ledger(tmp_path)
    supervisor.retire(100)  # reaped: its file folds into the retired sum
    supervisor.retire(300)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["retired.2.state", "worker-200.state"]
    total = _sum(ledger)
    assert (total.counters.requests, total.counters.batches, total.batch_size.counts[1]) == (8, 4, 4)
    assert _histogram_count(total) == 8
    assert not total._latencies or len(total._latencies) == 5  # the dead ones' latencies are gone

    ledger.write("worker-100", _state(2))  # a new worker that got the dead one's pid
    assert _sum(ledger).counters.requests == 10
    supervisor.retire(999)  # never wrote a thing: nothing changes
    assert _sum(ledger).counters.requests == 10


def test_a_leftover_staging_file_is_ignored_and_cleared(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.write("worker-7", _state(1))
    (tmp_path / "worker-7.tmp").write_bytes(b"half a write when it was killed")
    assert _sum(ledger).counters.requests == 1
    Ledger(tmp_path).retire(7)
    assert [path.name for path in tmp_path.iterdir()] == ["retired.1.state"]


def test_sums_read_while_processes_die_and_are_folded_never_go_back(tmp_path: Path) -> None:
    writer, reader = Ledger(tmp_path), Ledger(tmp_path)
    done = threading.Event()
    seen: list[int] = []

    def read() -> None:
        while not done.is_set():
            seen.append(_sum(reader).counters.requests)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        writer.write("worker-1", _state(1))  # one long-lived worker, beside the dying ones
        for pid in range(10, 70):
            for count in range(1, 4):  # a process's counts only grow...
                writer.write(f"worker-{pid}", _state(count))
            writer.retire(pid)  # ...then it dies and the supervisor folds them
    finally:
        done.set()
        thread.join()
    assert _sum(reader).counters.requests == 1 + 60 * 3
    went_back = [(before, after) for before, after in itertools.pairwise(seen) if after < before]
    print(f"{len(seen)} reads during 60 folds; went back: {went_back}")
    assert len(seen) > 10 and not went_back
    assert len(list(tmp_path.iterdir())) == 2  # the live worker's file and one retired file


# --- a real engine and link in this process -----------------------------------------------------------
@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Not under tmp_path: a Unix socket's path must stay under 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="engine-"))
    (folder / FOLDER).mkdir()  # as the supervisor makes it
    yield folder / "engine.sock"
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def _engine(encoder: Encoder, socket_path: Path) -> AsyncIterator[EngineServer]:
    server = EngineServer(Settings(model=str(encoder.path), truncate=True), encoder, socket_path, None)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def _whole(link: EngineLink) -> dict[str, Any]:
    answer = await link.whole_server()
    total = Telemetry.combined([answer.engine, *answer.workers])
    return {
        "requests": total.counters.requests,
        "inputs": total.counters.inputs,
        "batches": total.counters.batches,
        "batch_size_count": sum(total.batch_size.counts),
        "encoder_seconds_count": sum(total.encoder_seconds.counts),
        "request_seconds_count": _histogram_count(total),
    }


@pytest.mark.anyio
async def test_a_restarted_engine_reports_no_less_than_the_first(minilm_encoder: Encoder, socket_path: Path) -> None:
    supervisor = Ledger(socket_path.parent / FOLDER)
    links = [EngineLink(socket_path, truncate=True, telemetry=Telemetry()) for _ in range(2)]
    for index, link in enumerate(links):
        assert link.ledger is not None  # found next to the socket, as in a worker the supervisor started
        link.ledger_name = f"worker-{index}"  # two workers in one process: a file each ("pids" 0 and 1)
    survivor, victim = links
    try:
        async with _engine(minilm_encoder, socket_path):
            for link in links:
                await link.start(timeout_s=30)
            for index, link in enumerate(links):
                texts = [f"ledger text {index} {n}" for n in range(3)]
                await link.embed(texts, await link.tokenize(texts))
                link.telemetry.request_done("/v1/embeddings", 200, 0.2, embedding=True)
                link.telemetry.embedded(3, 30)
            first = await _whole(survivor)
            assert first["requests"] == 2 and first["batches"] >= 1 and first["batch_size_count"] >= 1
            await victim.stop()
            supervisor.retire(1)  # the supervisor reaped that worker: its counts fold
        supervisor.retire(os.getpid())  # and the engine, before it starts the next one
        async with _engine(minilm_encoder, socket_path):
            await _until(lambda: survivor.running and survivor.reconnects == 1)
            again = await _whole(survivor)
        print(f"first engine: {first}; after its restart: {again}")
        assert all(again[name] >= value for name, value in first.items()), (first, again)
    finally:
        for link in links:
            await link.stop()


@pytest.mark.anyio
async def test_counters_that_cannot_be_summed_fail_the_question_never_hang_it(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable() -> dict[str, TelemetryState]:
        raise RuntimeError("the counts kept changing while being read")

    link = EngineLink(socket_path, truncate=True, telemetry=Telemetry())
    try:
        async with _engine(minilm_encoder, socket_path) as engine:
            await link.start(timeout_s=30)
            assert engine.ledger is not None
            monkeypatch.setattr(engine.ledger, "read", unreadable)
            with pytest.raises(EngineUnavailableError):  # /stats and /metrics: 503 + Retry-After
                async with asyncio.timeout(5):
                    await link.whole_server()
            monkeypatch.undo()
            assert (await link.whole_server()).engine is not None  # the link lives on
    finally:
        await link.stop()


@pytest.mark.anyio
async def test_every_engines_passes_count_at_once_not_a_second_later(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines (two models, or two devices) under one router: /stats right after a pass on each
    counts both passes. Each engine's answer holds the other's counts only as its ledger entry last
    had them (written once a second), so the router must use what every engine has just answered."""
    import gateway.engine.server as engine_server
    from gateway.engine.router import EngineRouter

    monkeypatch.setattr(engine_server, "KEEP_INTERVAL_S", 3600.0)  # no entry is fresh by luck
    sockets = [socket_path, socket_path.with_name("second.sock")]
    links = [EngineLink(path, truncate=True, telemetry=Telemetry()) for path in sockets]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for index, path in enumerate(sockets):
                engine = await stack.enter_async_context(_engine(minilm_encoder, path))
                engine.ledger_name = f"engine-{index}"  # two engines in one process: a file each
            for index, link in enumerate(links):
                link.ledger_name = "worker-0"  # one worker holds both links, as in the app
                await link.start(timeout_s=30)
                texts = [f"fresh engine {index} text {n}" for n in range(2)]
                await link.embed(texts, await link.tokenize(texts))
            for _ in range(5):  # whichever engine answers first
                whole = await EngineRouter(links).whole_server()
                answer, engines = whole[0], whole[1]
                total = Telemetry.combined([answer.engine, *answer.workers])
                assert [engine.up for engine in engines] == [True, True]
                assert total.counters.batches == 2, (answer.engine_name, answer.names)
    finally:
        for link in links:
            await link.stop()
