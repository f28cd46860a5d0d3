"""The worker-engine link in one process: a real :class:`EngineServer` (real encoder, real micro-batcher)
on a Unix socket, and real :class:`EngineLink` workers (issue 26).

* answers larger than a frame cross the link; a frame over a side's limit fails only its request;
* a worker's queue figures (its ``x-ratelimit-*`` headers) refresh after a burst and reset when the
  engine restarts;
* a worker adopts the model of a restarted engine, so no vector of one model is ever cached under
  another model's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoder import Encoder, load_encoder
from encoder.batcher import InputFailedError
from encoder.kinds import OutputKind
from gateway.core.outputs import DENSE
from gateway.core.service import EmbeddingService
from gateway.core.telemetry import Telemetry
from gateway.engine import client, protocol
from gateway.engine.client import EngineLink, EngineUnavailableError
from gateway.engine.server import EngineServer
from gateway.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Not under tmp_path: a Unix socket's path must stay under 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="engine-"))
    yield folder / "engine.sock"
    shutil.rmtree(folder, ignore_errors=True)


class TicketEncoder:
    """The real encoder, but each forward pass waits for a ticket: the test decides what is queued."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.tickets = threading.Semaphore(0)
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _wait(self) -> None:
        self.entered.set()
        assert self.tickets.acquire(timeout=30), "the test never let this forward pass run"

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self._wait()
        return self.inner.encode(token_ids)

    def encode_outputs(self, token_ids: Sequence[Sequence[int]], kinds: frozenset[OutputKind]) -> Any:
        self._wait()
        return self.inner.encode_outputs(token_ids, kinds)


@contextlib.asynccontextmanager
async def _engine(encoder: Any, socket_path: Path, **kwargs: Any) -> AsyncIterator[EngineServer]:
    settings = Settings(model=str(encoder.path), truncate=True)
    server = EngineServer(settings, encoder, socket_path, None, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def _link(socket_path: Path, **kwargs: Any) -> AsyncIterator[EngineLink]:
    link = EngineLink(socket_path, truncate=True, telemetry=Telemetry(), **kwargs)
    await link.start(timeout_s=30)
    try:
        yield link
    finally:
        await link.stop()


async def _until(condition: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(0.01)


async def _dense(link: EngineLink, texts: list[str]) -> np.ndarray:
    outputs = await link.embed(texts, await link.tokenize(texts))
    return np.stack([np.asarray(item.dense) for item in outputs])


def _texts(n: int, tag: str, words: int = 60) -> list[str]:
    return [f"{tag} {i} " + "vectors cross a socket between processes " * (words // 6) for i in range(n)]


# --- 10a: answers over a frame --------------------------------------------------------------------
@pytest.mark.anyio
async def test_an_answer_larger_than_a_frame_crosses_the_link(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small limit stands for the real 1 GiB: 64 MiniLM vectors (98 KB) are an answer a dozen frames long.
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", 8192)
    texts = _texts(64, "large answer", words=12)
    async with _engine(minilm_encoder, socket_path), _link(socket_path) as link:
        large, small = await asyncio.gather(_dense(link, texts), _dense(link, ["a small request beside it"]))
        assert link.reconnects == 0
    np.testing.assert_allclose(large, minilm_encoder.embed(texts), atol=1e-5)
    np.testing.assert_allclose(small, minilm_encoder.embed(["a small request beside it"]), atol=1e-5)


@pytest.mark.anyio
async def test_a_frame_over_the_limit_fails_only_its_request(minilm_encoder: Encoder, socket_path: Path) -> None:
    # The engine sends frames up to 1 MiB; this worker refuses any over 8 KiB. The large answer is
    # such a frame: it must fail alone, while a request beside it and the connection live on.
    texts = _texts(64, "refused answer", words=12)
    gated = TicketEncoder(minilm_encoder)
    async with _engine(gated, socket_path, max_frame_bytes=1 << 20), _link(socket_path, max_frame_bytes=8192) as link:
        large = asyncio.create_task(_dense(link, texts))
        await asyncio.to_thread(gated.entered.wait, 10)
        small = asyncio.create_task(_dense(link, ["a small request beside it"]))
        await _until(lambda: link.in_flight == 2, what="both requests in flight")
        gated.tickets.release(1000)
        with pytest.raises(InputFailedError, match="over the link's limit"):
            await large
        np.testing.assert_allclose(await small, minilm_encoder.embed(["a small request beside it"]), atol=1e-5)
        assert link.reconnects == 0 and link.running
        np.testing.assert_allclose(await _dense(link, ["after"]), minilm_encoder.embed(["after"]), atol=1e-5)


# --- 15: queue figures ----------------------------------------------------------------------------
async def _stale_queue_figure(engine: EngineServer, gated: TicketEncoder, a: EngineLink, b: EngineLink) -> None:
    """Leave worker ``a`` with a figure of a burst (worker ``b``'s) that has since been computed."""
    held = asyncio.create_task(_dense(a, ["held in the forward pass"]))
    await asyncio.to_thread(gated.entered.wait, 10)
    burst = asyncio.create_task(_dense(b, _texts(16, "burst")))
    await _until(lambda: engine.batcher.queue_tokens > 500, what="the burst queued")
    gated.tickets.release(1)  # only a's pass runs: its answer reports the burst still queued
    await held
    assert a.queue_tokens > 500
    gated.tickets.release(1000)
    await burst
    assert engine.batcher.queue_tokens == 0


@pytest.mark.anyio
async def test_queue_figures_refresh_after_a_burst(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "PUSH_INTERVAL_S", 0.05)
    gated = TicketEncoder(minilm_encoder)
    async with _engine(gated, socket_path) as engine, _link(socket_path) as a, _link(socket_path) as b:
        await _stale_queue_figure(engine, gated, a, b)
        # No request of a's own since: the figure must still come down to the engine's (empty) queue.
        await _until(lambda: a.queue_tokens == 0, within=2.0, what="a's queue figure to refresh")


@pytest.mark.anyio
async def test_queue_figures_reset_when_the_engine_restarts(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "PUSH_INTERVAL_S", 3600.0)  # no refresh: only the restart may reset it
    gated = TicketEncoder(minilm_encoder)
    a = EngineLink(socket_path, truncate=True, telemetry=Telemetry())
    b = EngineLink(socket_path, truncate=True, telemetry=Telemetry())
    try:
        async with _engine(gated, socket_path) as engine:
            await a.start(timeout_s=30)
            await b.start(timeout_s=30)
            await _stale_queue_figure(engine, gated, a, b)
        async with _engine(minilm_encoder, socket_path):  # a new engine: an empty queue
            await _until(lambda: a.running and a.reconnects == 1, what="a to reconnect")
            assert a.queue_tokens == 0
    finally:
        await a.stop()
        await b.stop()


# --- 2: a restarted engine with another model -------------------------------------------------------
class RecordingCache:
    """An in-process cache that keeps what was written, to see under which keys."""

    backend = "memory"

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.items.get(key) for key in keys]

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.items.update(items)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    def namespaces(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for key in self.items:
            namespace = key.split(":")[1]
            found[namespace] = found.get(namespace, 0) + 1
        return found


@pytest.mark.anyio
async def test_a_worker_adopts_the_model_of_a_restarted_engine(
    minilm_encoder: Encoder, tiny_bge_m3_dir: Path, socket_path: Path
) -> None:
    other = load_encoder(str(tiny_bge_m3_dir), truncate=True)
    assert other.fingerprint != minilm_encoder.fingerprint
    cache = RecordingCache()
    link = EngineLink(socket_path, truncate=True, telemetry=Telemetry())
    async with _engine(minilm_encoder, socket_path):
        await link.start(timeout_s=30)
        assert link.encoder is not None
        service = EmbeddingService(
            encoder=link.encoder,
            batcher=link,
            cache=cache,
            telemetry=Telemetry(),
            cache_prefix="adopt",
            max_request_tokens=100_000,
            truncate=True,
        )
        await service.embed(["computed by the first model"], DENSE)
        await service.drain(5)
        old_namespace = service.namespace
        tokenized_before = await link.tokenize(["tokenised by the first model's tokenizer"])
    assert cache.namespaces() == {old_namespace: 1}
    try:
        async with _engine(other, socket_path):
            await _until(lambda: link.running, what="the link to reconnect")
            assert link.encoder.fingerprint == other.fingerprint
            assert link.encoder.dim == other.dim
            assert service.namespace != old_namespace
            texts = ["computed by the second model", "and another text"]
            result = await service.embed(texts, DENSE)
            await service.drain(5)
            np.testing.assert_allclose(np.stack(result.values), other.embed(texts), atol=1e-5)
            # Ids from the first model's tokenizer never reach the second model.
            with pytest.raises(EngineUnavailableError):
                await link.embed(["tokenised by the first model's tokenizer"], tokenized_before)
    finally:
        await link.stop()
    assert cache.namespaces() == {old_namespace: 1, service.namespace: 2}


# --- 14: the engine's back-off after a crash reaches every worker's readiness ----------------------
@pytest.mark.anyio
async def test_a_worker_is_not_ready_while_the_engines_batcher_backs_off(
    minilm_encoder: Encoder, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "PUSH_INTERVAL_S", 0.05)
    async with _engine(minilm_encoder, socket_path) as engine, _link(socket_path) as link:
        assert link.running
        batcher = engine.batcher
        planner = batcher._next_batch
        failing = True

        def broken() -> Any:
            if failing:
                raise RuntimeError("a planning bug")
            return planner()

        monkeypatch.setattr(batcher, "_next_batch", broken)
        with pytest.raises(InputFailedError):
            await _dense(link, ["a text the planner fails on"])
        await _until(lambda: not link.running, within=2.0, what="the worker to see the engine back off")
        failing = False
        await _until(lambda: link.running, within=15.0, what="the worker to see the engine serve again")
        assert (await _dense(link, ["served again"])).shape == (1, 384)
