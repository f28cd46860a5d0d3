"""An adversarial review of the issue 26 fixes (b557e08..): attacks on the cache keys, the limits,
the batcher and the engine link, each against real processes (redis-server, uvicorn, the engine).

A test that fails here is a finding that still holds; one that passes is an attack that the fixes
withstood (kept so that they keep withstanding it). Each test is bounded in time and load (the
machine is shared): a handful of requests, a zero-cost encoder where compute is beside the point.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from encoder import Encoder
from encoder.batcher import InputFailedError, MicroBatcher, QueueFullError, WorkerCrashedError
from encoder.kinds import OutputKind, Outputs, SparseWeights
from gateway.core.cache.base import cache_key
from tests.servers import RedisServer

KEYS = """
[[keys]]
name = "rpm"
key = "sk-rpm"
requests_per_minute = 20

[[keys]]
name = "tpm"
key = "sk-tpm"
tokens_per_minute = 1000

[[keys]]
name = "wide"
key = "sk-wide"
tokens_per_minute = 4000

[[keys]]
name = "free"
key = "sk-free"
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return path


def _post(url: str, texts: list[str], key: str, timeout: float = 60, route: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(
        f"{url}{route}", json={"input": texts}, headers={"authorization": f"Bearer {key}"}, timeout=timeout
    )


def _pause(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def _resume(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGCONT)


# --------------------------------------------------------------------------------------------------
# 1. Cache keys
# --------------------------------------------------------------------------------------------------


def test_cache_keys_are_injective_over_odd_unicode() -> None:
    """Held: BLAKE2b over UTF-8 with ``surrogatepass`` is injective on Python strings, so texts that
    differ only by a lone surrogate, a surrogate pair written as two code points, NFC/NFD forms, a
    BOM or a NUL never share a key; and a namespace never bleeds into the text's part of the key."""
    texts = [
        "\U0001f600",
        "\ud83d\ude00",  # the same emoji as a surrogate pair (what a JSON "\\ud83d\\ude00" may become)
        "\ud83d",
        "\ude00",
        "caf\u00e9",
        "cafe\u0301",
        "\ufeffcafe",
        "cafe",
        "cafe\x00",
        "",
    ]
    keys = {cache_key("emb", "ns", text) for text in texts}
    assert len(keys) == len(texts)
    # ':' in the text cannot move bytes between the namespace and the digest: the text is hashed.
    assert cache_key("emb", "a:b", "c") != cache_key("emb", "a", "b:c")


# --------------------------------------------------------------------------------------------------
# 2. Limits
# --------------------------------------------------------------------------------------------------


def _until_refused(url: str, key: str, text: str, most: int = 80) -> tuple[int, list[int]]:
    served, statuses = 0, []
    for _ in range(most):
        answer = _post(url, [text], key, timeout=30)
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            break
        assert answer.status_code == 200, answer.text[:300]
        served += 1
    return served, statuses


def test_a_redis_pause_does_not_double_a_keys_requests_per_minute(
    gateway_factory: Any,
    fresh_redis: RedisServer,
    keys_file: Path,
) -> None:
    """FINDING: a 0.4 s pause of Redis gives every limited key a second allowance.

    While Redis fails, each process decides from its own buckets (seeded from its last view) for
    ``retry_s`` (5 s); what it admits meanwhile is never sent to Redis ("Usage taken locally
    meanwhile is not sent to Redis later"). So when Redis is back its buckets still hold what they
    held before the pause, and the key is served its limit twice in a few seconds (N + 1 times with
    N replicas). Expected: within the limit, plus what refilled, plus one request.
    """
    live = gateway_factory(api_keys_file=str(keys_file), redis_url=fresh_redis.url, cache_prefix="pause")
    started = time.monotonic()
    assert _post(live.url, ["one text, a cache hit after the first"], "sk-rpm").status_code == 200
    time.sleep(0.35)  # the replica's view of the key is stale now: its next admission asks Redis
    _pause(fresh_redis)
    try:
        during = _post(live.url, ["one text, a cache hit after the first"], "sk-rpm")  # Redis times out
    finally:
        time.sleep(0.4)
        _resume(fresh_redis)
    assert during.status_code == 200
    fallback, first = _until_refused(live.url, "sk-rpm", "one text, a cache hit after the first")
    time.sleep(max(0.0, started + 6.5 - time.monotonic()))  # the 5 s fallback is over: Redis decides again
    back, second = _until_refused(live.url, "sk-rpm", "one text, a cache hit after the first")
    elapsed = time.monotonic() - started
    served = 2 + fallback + back
    allowed = 20 + elapsed * 20 / 60 + 1
    print(f"served {served} in {elapsed:.1f} s (limit 20 per minute): {first} then {second}")
    assert served <= allowed, f"{served} requests served in {elapsed:.1f} s on a key of 20 per minute"


def test_a_redis_restart_does_not_refill_every_bucket(
    gateway_factory: Any,
    fresh_redis: RedisServer,
    keys_file: Path,
) -> None:
    """FINDING (low): a Redis restart (no persistence, as deploy/ ships it) refills every key's buckets
    at once, though each replica's view still holds the levels: a key that spent its minute gets a
    whole new one. Expected: the replicas' last known levels carry over (as they do through a pause)."""
    live = gateway_factory(
        api_keys_file=str(keys_file), redis_url=fresh_redis.url, cache_prefix="restart", cache_timeout_ms=1000
    )
    started = time.monotonic()
    spent, _ = _until_refused(live.url, "sk-rpm", "spent before the restart")
    assert 18 <= spent <= 21, spent
    fresh_redis.stop()
    fresh_redis.start()
    again, statuses = _until_refused(live.url, "sk-rpm", "spent before the restart")
    elapsed = time.monotonic() - started
    print(f"{spent} served before the restart, {again} right after it: {statuses}")
    assert spent + again <= 20 + elapsed * 20 / 60 + 1, f"{spent} + {again} served in {elapsed:.1f} s"


class _CountingEncoder:
    """Delegates to the real encoder; counts the characters it was asked to tokenise."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.characters = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def tokenize(self, texts: Sequence[str], **kwargs: Any) -> list[list[int]]:
        self.characters += sum(len(text) for text in texts)
        return self.inner.tokenize(texts, **kwargs)


def test_a_request_over_the_keys_limit_is_refused_before_all_of_it_is_tokenised(
    gateway_factory: Any,
    minilm_encoder: Encoder,
    keys_file: Path,
) -> None:
    """FINDING (low): a key of 1,000 tokens per minute makes the server tokenise up to
    ``max_request_tokens`` (300,000 tokens) per request, then gets a 400 that costs it nothing
    (and a 429 likewise once the bucket is low): uncharged work without end for a key with no
    requests limit. The service already tokenises a bounded piece at a time against the server's
    request limit; the key's own limit (what its bucket holds) could bound it the same way.
    Expected: refused after about one 64k-character piece past the key's limit."""
    counting = _CountingEncoder(minilm_encoder)
    live = gateway_factory(encoder=counting, api_keys_file=str(keys_file))
    # ~200 tokens each: 1,000 of them are ~200,000 tokens, under the server's 300,000 per request
    texts = [f"{index} " + " ".join(f"w{index}x{word}" for word in range(40)) for index in range(1000)]
    lengths = [len(ids) for ids in minilm_encoder.tokenize(texts)]
    assert max(lengths) <= 256 and 100_000 < sum(lengths) < 300_000, (max(lengths), sum(lengths))
    timings = []
    for _ in range(3):
        counting.characters = 0
        began = time.monotonic()
        answer = _post(live.url, texts, "sk-tpm")
        timings.append(time.monotonic() - began)
        assert answer.status_code == 400, answer.text[:300]
        assert "tokens per min" in answer.json()["error"]["message"]
    probe = _post(live.url, ["a short probe"], "sk-tpm")
    assert probe.status_code == 200
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 20, "the refusals were not charged"
    characters = counting.characters
    print(f"each refusal tokenised {characters:,} characters, took {[round(t, 2) for t in timings]} s")
    assert characters <= 2 * 65536, f"{characters:,} characters tokenised for a key of 1,000 tokens per minute"


@pytest.mark.parametrize("local_share", [0.05, 0.0])
def test_two_replicas_with_many_small_hits_stay_within_the_documented_bound(
    gateway_factory: Any, fresh_redis: RedisServer, keys_file: Path, local_share: float
) -> None:
    """Held: two replicas sharing Redis, 240 concurrent all-hit requests of a few tokens each
    (well under 5% of the limit, so admitted locally far from the limit): served tokens stay within
    the limit plus 5% per replica plus what refilled; with ``EMBED_RATE_LIMIT_LOCAL_SHARE=0``, within
    the limit plus one request per replica (the issue's own target) plus what refilled."""
    shared = {
        "redis_url": fresh_redis.url,
        "cache_prefix": "small-hits",
        "cache_timeout_ms": 2000,
        "rate_limit_local_share": local_share,
    }
    lives = [gateway_factory(api_keys_file=str(keys_file), **shared) for _ in range(2)]
    # ~40 tokens each: 1% of the limit (admitted locally while far from it), 240 of them ~2.4x the limit
    texts = [f"hit {index} " + " ".join(f"w{index}x{word}" for word in range(10)) for index in range(240)]
    for live in lives:  # cached, and the cache is shared: every later request is a hit
        assert _post(live.url, texts[:120], "sk-free").status_code == 200
        assert _post(live.url, texts[120:], "sk-free").status_code == 200
    answers: list[Any] = [None] * len(texts)
    clients = [httpx.Client(timeout=60, headers={"authorization": "Bearer sk-wide"}) for _ in range(24)]

    def run(worker: int) -> None:
        for index in range(worker, len(texts), len(clients)):
            try:
                answers[index] = clients[worker].post(
                    f"{lives[index % 2].url}/v1/embeddings", json={"input": [texts[index]]}
                )
            except httpx.HTTPError as exc:
                answers[index] = exc

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for client in clients:
        client.close()
    elapsed = time.monotonic() - started
    statuses = [getattr(answer, "status_code", repr(answer)) for answer in answers]
    assert set(statuses) <= {200, 429}, statuses
    served = sum(answer.json()["usage"]["total_tokens"] for answer in answers if answer.status_code == 200)
    largest = max(answer.json()["usage"]["total_tokens"] for answer in answers if answer.status_code == 200)
    bound = 4000 + 2 * (local_share * 4000 or largest) + elapsed * 4000 / 60
    print(f"served {served} tokens in {elapsed:.1f} s ({statuses.count(429)} refused); bound {bound:.0f}")
    assert 429 in statuses
    assert served <= bound


# --------------------------------------------------------------------------------------------------
# 3. The batcher
# --------------------------------------------------------------------------------------------------


class _SleepyEncoder:
    """Encoder-like: a pass sleeps a little (GIL free) and counts itself; zero vectors."""

    torch_device = torch.device("cpu")
    dim = 4

    def __init__(self) -> None:
        self.passes = 0

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        time.sleep(0.003)
        self.passes += 1
        return np.zeros((len(token_ids), self.dim), dtype=np.float32)


async def _passes_waited(shared_text: bool) -> int:
    encoder = _SleepyEncoder()
    batcher = MicroBatcher(encoder, max_batch_size=2)  # type: ignore[arg-type]
    await batcher.start()
    try:
        common = "what is the capital of france"
        bulk_texts = [f"ingested chunk {index}" for index in range(40)] + [common]
        bulk = asyncio.create_task(batcher.embed(bulk_texts, [[1, 5, 5]] * len(bulk_texts), tenant="bulk"))
        await asyncio.sleep(0.02)
        before = encoder.passes
        query = common if shared_text else "a question of its own"
        await asyncio.wait_for(batcher.embed([query], [[2, 5, 5]], tenant="searcher"), 30)
        waited = encoder.passes - before
        await asyncio.wait_for(bulk, 30)
        return waited
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_a_query_deduplicated_into_a_bulk_tenants_input_is_not_served_at_the_bulk_tenants_pace() -> None:
    """FINDING: a text joined to an identical input already queued waits at the turn of the tenant
    that queued it first. A one-text query of tenant "searcher" that happens to equal the last text
    of tenant "bulk"'s ingest waits for the whole ingest (15 to 17 passes here) instead of about one
    pass (3 with a text of its own): the joiner gets no flow, so fairness never sees it. Anyone who
    can guess a popular query can put it at the end of a large request and so hold every other
    tenant's copy of it for as long as that request takes. Expected: joining never makes a caller
    wait longer than its own fair turn (e.g. the input moves to the neediest waiter's flow)."""
    alone = await _passes_waited(shared_text=False)
    joined = await _passes_waited(shared_text=True)
    print(f"passes waited: {alone} with a text of its own, {joined} when the text was also in the bulk")
    assert alone <= 4, alone
    assert joined <= alone + 2, f"the deduplicated query waited {joined} passes, {alone} when alone"


_POOL = [f"pooled text {index}" for index in range(60)]


def _ids_of(text: str) -> list[int]:
    digest = zlib.crc32(text.encode())
    return [100 + (digest >> (position % 24)) % 97 for position in range(2 + digest % 30)]


def _truth(ids: Sequence[int]) -> np.ndarray:
    return np.array([sum(ids), len(ids), ids[0], ids[-1]], dtype=np.float32)


class _RandomEncoder:
    """Zero-cost or briefly sleeping passes whose outputs are functions of the token ids (so an
    answer can be checked against its own text); inputs of one poisoned length run out of memory
    even alone; per-row kinds honoured as the real encoder's ``encode_outputs`` does."""

    torch_device = torch.device("cpu")
    dim = 4

    def __init__(self, rng: random.Random, poison: int) -> None:
        self.rng, self.poison = rng, poison

    def _pass(self, token_ids: Sequence[Sequence[int]]) -> None:
        time.sleep(self.rng.choice([0.0, 0.0, 0.0005, 0.002]))
        if any(len(ids) == self.poison for ids in token_ids):
            raise MemoryError("injected out of memory")

    def encode(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self._pass(token_ids)
        return np.stack([_truth(ids) for ids in token_ids])

    def encode_outputs(
        self, token_ids: Sequence[Sequence[int]], kinds: Sequence[frozenset[OutputKind]]
    ) -> list[Outputs]:
        self._pass(token_ids)
        out = []
        for ids, asked in zip(token_ids, kinds, strict=True):
            distinct = np.array(sorted(set(ids)))
            out.append(
                Outputs(
                    len(ids),
                    dense=_truth(ids) if OutputKind.DENSE in asked else None,
                    sparse=SparseWeights(distinct, np.ones(len(distinct), np.float32))
                    if OutputKind.SPARSE in asked
                    else None,
                    colbert=np.full((len(ids) - 1, 2), sum(ids), np.float32) if OutputKind.COLBERT in asked else None,
                )
            )
        return out


class _SometimesCrashes:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def batch_done(self, report: Any) -> None:
        if self.rng.random() < 0.01:
            raise RuntimeError("injected crash after a pass")

    def batcher_event(self, event: Any, count: int = 1) -> None:
        pass


_KIND_CHOICES = [
    frozenset({OutputKind.DENSE}),
    frozenset({OutputKind.DENSE}),
    frozenset({OutputKind.SPARSE}),
    frozenset({OutputKind.COLBERT}),
    frozenset({OutputKind.SPARSE, OutputKind.COLBERT}),
]


async def _random_call(batcher: MicroBatcher, rng: random.Random, poison: int, seen: dict[str, int]) -> None:
    texts = [rng.choice(_POOL) for _ in range(rng.choice([1, 1, 1, 2, 5, 20]))]
    kinds = rng.choice(_KIND_CHOICES)
    ids = [_ids_of(text) for text in texts]
    task = asyncio.ensure_future(batcher.embed(texts, ids, kinds=kinds | {OutputKind.DENSE}, tenant=rng.choice("abcd")))
    if rng.random() < 0.25:
        await asyncio.sleep(rng.choice([0.0, 0.0, 0.0002, 0.001, 0.003]))
        task.cancel()
    try:
        results = await asyncio.wait_for(task, 30)
    except asyncio.CancelledError:
        seen["cancelled"] += 1
        return
    except QueueFullError:
        seen["full"] += 1
        return
    except WorkerCrashedError:
        seen["crashed"] += 1
        return
    except InputFailedError:
        assert any(len(row) == poison for row in ids), "an input failed that was not the poisoned one"
        seen["failed"] += 1
        return
    assert len(results) == len(texts)
    for row, result in zip(ids, results, strict=True):
        assert result.tokens == len(row)
        assert result.dense is not None and np.array_equal(result.dense, _truth(row)), "another input's vector"
        assert (result.sparse is not None) == (OutputKind.SPARSE in kinds), (kinds, result)
        assert (result.colbert is not None) == (OutputKind.COLBERT in kinds), (kinds, result)
    seen["ok"] += 1


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(6))
async def test_a_random_mix_loses_nothing_mixes_nothing_and_drains(seed: int) -> None:
    """Held: 600 calls over 4 tenants and 60 texts (so many duplicates), random kinds, a quarter
    cancelled at random moments (queued or in a running pass), one token length that runs out of
    memory even alone, and a worker crash after about 1% of passes: every call ends within its
    deadline with its own outputs in order and only its kinds (or its own error), and afterwards
    nothing is queued or in flight."""
    rng = random.Random(seed)
    poison = len(_ids_of(_POOL[seed % len(_POOL)]))
    batcher = MicroBatcher(
        _RandomEncoder(rng, poison),  # type: ignore[arg-type]
        max_batch_size=rng.choice([1, 3, 8]),
        max_batch_tokens=rng.choice([40, 100, 512]),
        max_queue_tokens=3000,
        observer=_SometimesCrashes(rng),
    )
    await batcher.start()
    seen = dict.fromkeys(["ok", "cancelled", "full", "crashed", "failed"], 0)
    try:
        calls = []
        for _ in range(600):
            calls.append(asyncio.ensure_future(_random_call(batcher, rng, poison, seen)))
            if rng.random() < 0.3:
                await asyncio.sleep(rng.choice([0.0, 0.0005, 0.002]))
        await asyncio.wait_for(asyncio.gather(*calls), 60)
        deadline = time.monotonic() + 5  # a pass of cancelled inputs may still be running
        while batcher.queue_tokens or batcher.in_flight:
            assert time.monotonic() < deadline, (batcher.queue_tokens, batcher.in_flight)
            await asyncio.sleep(0.005)
        assert seen["ok"] > 30, seen
    finally:
        await batcher.stop()


# --------------------------------------------------------------------------------------------------
# 4. The engine link (EMBED_WORKERS=2, real processes)
# --------------------------------------------------------------------------------------------------


def _children_of(pid: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def workers_gateway(minilm_dir: Path, tmp_path: Path) -> Iterator[tuple[Any, RedisServer]]:
    import subprocess
    import sys

    from tests.servers import GatewayProcess

    class GroupLeader(GatewayProcess):
        def start_when(self, ready: Any, timeout: float = 120.0) -> None:
            log = self.log_path.open("wb")
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if ready():
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            raise TimeoutError(f"gateway did not become ready:\n{self.log()}")

    password = "pw-" + uuid.uuid4().hex
    redis_server = RedisServer(tmp_path / "redis", None, "--requirepass", password)
    redis_server.start()
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    gateway = GroupLeader(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
            "EMBED_API_KEYS_FILE": str(keys),
            "EMBED_REDIS_URL": f"redis://:{password}@127.0.0.1:{redis_server.port}/0",
            "EMBED_CACHE_PREFIX": f"attacks-{uuid.uuid4().hex[:8]}",
            "EMBED_CACHE_TIMEOUT_MS": "2000",
            "EMBED_TRUNCATE": "true",
            "EMBED_WORKERS": "2",
            "EMBED_SHUTDOWN_TIMEOUT_S": "60",
            "HF_HUB_OFFLINE": "1",
        },
        tmp_path / "gateway.log",
    )
    seen: set[str] = set()

    def both_ready() -> bool:
        response = httpx.get(f"{gateway.url}/readyz", timeout=1.0)
        seen.add(response.headers.get("x-worker-pid", ""))
        return response.status_code == 200 and len(seen - {""}) == 2

    try:
        gateway.start_when(both_ready, timeout=240)
        yield gateway, redis_server
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            os.killpg(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait(timeout=10)
        redis_server.stop()
        print(gateway.log()[-3000:])


def _burst(url: str, bodies: list[list[str]], key: str, results: dict[int, Any]) -> list[threading.Thread]:
    clients = [httpx.Client(timeout=120, headers={"authorization": f"Bearer {key}"}) for _ in bodies]

    def one(index: int) -> None:
        try:
            with clients[index] as client:
                results[index] = client.post(f"{url}/v1/embeddings", json={"input": bodies[index]})
        except httpx.HTTPError as exc:
            results[index] = type(exc).__name__

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.slow
def test_workers_engine_kill_readiness_limits_and_ctrl_c(workers_gateway: tuple[Any, RedisServer]) -> None:
    """Held (each step): with two workers, an engine SIGKILLed under a burst of a limited key gives
    only 200, 429 or 503 with Retry-After (never a hang, never a 500); each worker's /readyz is 503
    while the engine is away and 200 once it is back; the key's served tokens stay within its limit
    plus one request per worker; then Ctrl-C (SIGINT to the process group) under a burst answers
    every accepted request with 200 and exits 0."""
    gateway, _ = workers_gateway
    url = gateway.url
    assert gateway.process is not None
    children = _children_of(gateway.process.pid)
    engines = [pid for pid, cmd in children.items() if b"gateway\0engine" in cmd]
    assert len(children) == 3 and len(engines) == 1, children

    # --- the engine dies under a burst of a limited key (1,000 tokens per minute) ---
    long_words = " ".join(f"attack{word}" for word in range(60))
    sentence = "a sentence about engines and workers and signals " * 12
    busy = [[f"busy {index} {j} {uuid.uuid4().hex} {sentence}" for j in range(16)] for index in range(3)]
    busy_results: dict[int, Any] = {}
    busy_threads = _burst(url, busy, "sk-free", busy_results)  # keeps the engine computing
    while (
        httpx.get(f"{url}/stats", headers={"authorization": "Bearer sk-free"}, timeout=10).json()["internals"][
            "inputs_in_flight"
        ]
        < 24
    ):
        time.sleep(0.02)
    bodies = [[f"{index} {uuid.uuid4().hex} {long_words}"] for index in range(16)]
    results: dict[int, Any] = {}
    started = time.monotonic()
    threads = _burst(url, bodies, "sk-tpm", results)
    time.sleep(0.5)
    os.kill(engines[0], signal.SIGKILL)
    readiness: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            readiness.append(httpx.get(f"{url}/readyz", timeout=5).status_code)
        except httpx.HTTPError:
            readiness.append(-1)
        if 503 in readiness and readiness[-3:] == [200, 200, 200]:
            break
        time.sleep(0.1)
    for thread in threads + busy_threads:
        thread.join(120)
    elapsed = time.monotonic() - started
    busy_statuses = [getattr(answer, "status_code", answer) for answer in busy_results.values()]
    print(f"kill: the busy requests got {busy_statuses}")
    assert set(busy_statuses) <= {200, 503}, busy_statuses
    statuses = [getattr(answer, "status_code", answer) for answer in results.values()]
    print(f"kill: statuses {statuses}; readiness {readiness[:5]}..{readiness[-5:]}")
    assert len(results) == len(bodies)
    assert set(statuses) <= {200, 429, 503}, statuses
    for answer in results.values():
        if answer.status_code in (429, 503):
            assert int(answer.headers["retry-after"]) >= 1
    assert 503 in readiness and readiness[-3:] == [200, 200, 200], readiness
    served = sum(answer.json()["usage"]["total_tokens"] for answer in results.values() if answer.status_code == 200)
    largest = (
        max(answer.json()["usage"]["total_tokens"] for answer in results.values() if answer.status_code == 200)
        if 200 in statuses
        else 0
    )
    assert served <= 1000 + 2 * largest + elapsed * 1000 / 60, (served, statuses)

    # --- Ctrl-C under a burst: every accepted request gets its 200 ---
    children = _children_of(gateway.process.pid)
    bulk = [[f"ctrl-c {index} {j} {uuid.uuid4().hex} {sentence}" for j in range(16)] for index in range(3)]
    small = [[f"ctrl-c small {index} {uuid.uuid4().hex}"] for index in range(9)]
    results = {}
    threads = _burst(url, bulk + small, "sk-free", results)
    stats_deadline = time.monotonic() + 60
    while True:
        stats = httpx.get(f"{url}/stats", headers={"authorization": "Bearer sk-free"}, timeout=10).json()
        if stats["internals"]["inputs_in_flight"] >= 24:
            break
        assert time.monotonic() < stats_deadline, stats["internals"]
        time.sleep(0.02)
    os.killpg(gateway.process.pid, signal.SIGINT)
    code = gateway.process.wait(timeout=120)
    for thread in threads:
        thread.join(60)
    statuses = [getattr(answer, "status_code", answer) for answer in results.values()]
    print(f"ctrl-c: exit {code}; statuses {statuses}")
    assert statuses == [200] * len(bulk + small), statuses
    assert code == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
