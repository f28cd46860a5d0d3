"""OpenAI's Batch API on two replicas sharing one folder and one Redis (issue 23's acceptance test).

Two ``python -m gateway serve`` processes take chunks of one batch from the Stream
``{prefix:batch}:work`` (group ``runners``). The one that is not serving the client is stopped while
it holds a chunk: with SIGKILL (its claims stay pending until the other reclaims them, once idle for
``EMBED_BATCH_CLAIM_IDLE_S``), or with SIGTERM (a graceful stop gives them back at once). Either way
the batch completes on the other replica, every ``custom_id`` appears once, in input order, each
line's vectors are those ``POST /v1/embeddings`` answers for the same body, bit for bit (through the
replicas' shared Redis cache, as in production: a vector's last bits depend on the micro-batch it
was computed in), and the work queue is left empty with one outcome per chunk.

Replica A (the client's) and a first peer start together for the module; the second test starts
a peer of its own. Every wait is bounded, every process is stopped at teardown.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import openai
import pytest
import redis

from gateway.core.batch.plan import scan
from tests.servers import GatewayProcess, RedisServer

pytestmark = pytest.mark.slow

MODEL = "all-MiniLM-L6-v2"
CHUNK_INPUTS = 16
CLAIM_IDLE_S = 2
GROUP = "runners"
START_TIMEOUT_S = 90.0
FINISH_TIMEOUT_S = 60.0


class Replicas:
    """Replica A (serves the client, outlives the module) and the peers the tests stop.

    All share one Redis, one cache prefix (the batch keys' ``{prefix:batch}`` tag) and one folder."""

    def __init__(self, server: RedisServer, env: dict[str, str], root: Path) -> None:
        self.server, self.env, self.root = server, env, root
        self.folder = Path(env["EMBED_BATCH_DIR"])
        self.tag = "{" + env["EMBED_CACHE_PREFIX"] + ":batch}"
        self.started: list[GatewayProcess] = []
        self.a = self._new("a")
        self._spare: GatewayProcess | None = self._new("b")

    @property
    def stream(self) -> str:
        return f"{self.tag}:work"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port)

    def start(self) -> None:
        """A and the first peer, side by side (a start costs seconds of CPU on two cores)."""
        assert self._spare is not None
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(one.start, START_TIMEOUT_S) for one in (self.a, self._spare)]:
                started.result()

    def peer(self) -> GatewayProcess:
        """A second replica no test has used: the one started with A, else a new one."""
        if self._spare is not None:
            peer, self._spare = self._spare, None
            return peer
        peer = self._new(f"peer-{len(self.started)}")
        peer.start(timeout=START_TIMEOUT_S)
        return peer

    def _new(self, name: str) -> GatewayProcess:
        gateway = GatewayProcess(self.env, self.root / f"{name}.log")
        self.started.append(gateway)
        return gateway

    def stop(self) -> None:
        for gateway in self.started:
            gateway.stop()


@pytest.fixture(scope="module")
def replicas(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("batch-replicas")
    server = RedisServer(root / "redis")
    server.start()
    env = {
        "HF_HUB_OFFLINE": "1",
        "EMBED_MODEL": str(minilm_dir),
        "EMBED_MODEL_NAME": MODEL,
        "EMBED_DEVICE": "cpu",
        "EMBED_CPU_THREADS": "1",  # two replicas on two cores
        "EMBED_REDIS_URL": server.url,
        "EMBED_CACHE_PREFIX": f"replicas-{uuid.uuid4().hex[:8]}",
        "EMBED_BATCH_DIR": str(root / "shared"),
        "EMBED_BATCH_CHUNK_INPUTS": str(CHUNK_INPUTS),
        "EMBED_BATCH_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
        "EMBED_SHUTDOWN_TIMEOUT_S": "10",
    }
    group = Replicas(server, env, root)
    try:
        group.start()
        yield group
    finally:
        group.stop()
        server.stop()


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def _requests(tag: str) -> list[dict[str, Any]]:
    """800 one-text lines of distinct texts, and every 100th line with several texts."""
    requests = []
    for i in range(800):
        text = f"{tag} document {i}: notes on replicas, queues and the vectors they return ({i * 7919 % 1000})"
        texts: str | list[str] = [text, f"{text}, second part", f"{text}, third part"] if i % 100 == 50 else text
        body = {"model": MODEL, "input": texts}
        requests.append({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/embeddings", "body": body})
    return requests


def _tail(gateway: GatewayProcess, lines: int = 30) -> str:
    """The end of a replica's log, without the access lines (for a failure's message)."""
    kept = [line for line in gateway.log().splitlines() if "gateway.access" not in line]
    return "\n".join(kept[-lines:])


def _consumers(client: redis.Redis, stream: str) -> dict[str, int]:
    summary: Any = client.xpending(stream, GROUP)
    return {one["name"].decode(): int(one["pending"]) for one in summary["consumers"] or []}


def _held_by(client: redis.Redis, stream: str, pid: int) -> int:
    """Chunks (pending entries) held by a consumer of the process ``pid`` (``{host}-{pid}-{hex}``)."""
    return sum(count for name, count in _consumers(client, stream).items() if f"-{pid}-" in name)


def _run_and_stop_peer(replicas: Replicas, tag: str, stop: signal.Signals) -> None:
    peer = replicas.peer()
    with _openai(replicas.a.url) as client, replicas.client() as store:
        _batch_survives_the_stop(replicas, client, store, peer, tag, stop)


def _batch_survives_the_stop(
    replicas: Replicas, client: openai.OpenAI, store: redis.Redis, peer: GatewayProcess, tag: str, stop: signal.Signals
) -> None:
    assert peer.process is not None
    pid = peer.process.pid
    requests = _requests(tag)
    content = b"".join(json.dumps(one).encode() + b"\n" for one in requests)
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    total = len(requests)
    assert batch.request_counts is not None and batch.request_counts.total == total

    # Mid-batch: a few chunks done, most not, and the peer holding a chunk.
    deadline = time.monotonic() + 30
    while True:
        counts = client.batches.retrieve(batch.id).request_counts
        assert counts is not None
        held = _held_by(store, replicas.stream, pid)
        if counts.completed >= 4 * CHUNK_INPUTS and held:
            break
        assert counts.completed < total // 2, f"the batch ran to {counts.completed}/{total} before the peer held one"
        assert time.monotonic() < deadline, f"no chunk was ever held by the peer: {counts}"
        time.sleep(0.02)
    assert counts.completed < total // 2, f"stopped too late to be mid-batch: {counts}"
    if stop == signal.SIGKILL:
        peer.process.kill()
        assert peer.process.wait(timeout=10) == -signal.SIGKILL
        # Dead, it still holds what it had claimed (its renewals stopped): only a reclaim frees it.
        assert _held_by(store, replicas.stream, pid) > 0
    else:
        assert peer.terminate(timeout=30) == 0, _tail(peer)
        # A graceful stop gives its chunks back at once: nothing waits out the claim's idle time.
        assert _held_by(store, replicas.stream, pid) == 0

    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {done.status}: {done.request_counts}\n{_tail(replicas.a)}"
        time.sleep(0.1)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (total, total, 0)
    assert done.error_file_id is None and done.output_file_id is not None

    out = [json.loads(line) for line in client.files.content(done.output_file_id).content.splitlines()]
    assert [line["custom_id"] for line in out] == [one["custom_id"] for one in requests]  # each once, in order
    with httpx.Client(base_url=replicas.a.url, timeout=30) as http, ThreadPoolExecutor(4) as pool:

        def direct(request: dict[str, Any]) -> Any:
            response = http.post("/v1/embeddings", json={**request["body"], "encoding_format": "float"})
            assert response.status_code == 200, response.text
            return response.json()

        for line, request, answer in zip(out, requests, pool.map(direct, requests), strict=True):
            assert line["error"] is None and line["response"]["status_code"] == 200, line
            body = line["response"]["body"]
            ours = np.array([one["embedding"] for one in body["data"]], dtype=np.float32)
            theirs = np.array([one["embedding"] for one in answer["data"]], dtype=np.float32)
            assert ours.shape == (len(answer["data"]), 384)
            assert ours.tobytes() == theirs.tobytes(), request["custom_id"]  # bit for bit
            for one in (body, answer):
                for item in one["data"]:
                    item.pop("embedding")
            assert body == answer  # object, index, model, usage

    # Nothing left claimed; one outcome per chunk (a chunk redone is still recorded once).
    assert store.xpending(replicas.stream, GROUP)["pending"] == 0, _consumers(store, replicas.stream)
    plan = scan(
        replicas.folder / "files" / uploaded.id, endpoint="/v1/embeddings", max_lines=50_000, chunk_inputs=CHUNK_INPUTS
    )
    record = msgspec.json.decode(store.hget(f"{replicas.tag}:job:{batch.id}", "record") or b"{}")
    assert record["chunks"] == len(plan.chunks) > 40
    assert store.hlen(f"{replicas.tag}:done:{batch.id}") == len(plan.chunks)


def test_a_replica_killed_mid_batch_loses_nothing(replicas: Replicas) -> None:
    _run_and_stop_peer(replicas, "kill", signal.SIGKILL)


def test_a_replica_stopped_gracefully_mid_batch_loses_nothing(replicas: Replicas) -> None:
    _run_and_stop_peer(replicas, "term", signal.SIGTERM)
