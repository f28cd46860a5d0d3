"""EMBED_WORKERS=2 around engine restarts and stops (issue 26), with a hub model from a local hub cache.

One gateway serves the whole module, in the order of the tests: it is started as a terminal or
systemd starts it (the leader of its own process group), with an API key and a Redis password.

* its children's command lines hold neither secret;
* an engine restarted after the hub's branch moved loads the commit it loaded first;
* an engine restarted after its model folder changed in place: the workers adopt the new model,
  never writing its vectors under the old model's keys;
* SIGINT to the whole process group (Ctrl-C): every accepted request still gets its 200, exit 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.servers import GatewayProcess, RedisServer

pytestmark = pytest.mark.slow

API_KEY = "sk-issue26-" + uuid.uuid4().hex
REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex
REPO = "gw-test/minilm"
FIRST, SECOND = hashlib.sha1(b"first").hexdigest(), hashlib.sha1(b"second").hexdigest()


class GroupLeaderGateway(GatewayProcess):
    """The gateway as a terminal or systemd starts it: the leader of its own process group."""

    def start_when(self, ready: Callable[[], bool], timeout: float = 120.0) -> None:
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


@dataclass
class Setup:
    gateway: GroupLeaderGateway
    redis: Any  # a redis.Redis client
    prefix: str
    repo: Path  # models--gw-test--minilm in the hub cache

    def post(self, texts: list[str], timeout: float = 60) -> httpx.Response:
        return httpx.post(
            f"{self.gateway.url}/v1/embeddings",
            json={"input": texts},
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=timeout,
        )

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.gateway.url}/stats", headers={"authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert response.status_code == 200, response.text
        stats: dict[str, Any] = response.json()
        return stats

    def cached(self) -> dict[str, set[str]]:
        """namespace -> the keys under it"""
        found: dict[str, set[str]] = {}
        for key in self.redis.scan_iter(f"{self.prefix}:*", count=1000):
            text = key.decode()
            found.setdefault(text.split(":")[1], set()).add(text)
        return found


def _children(pid: int) -> dict[int, bytes]:
    """pid -> raw /proc cmdline of ``pid``'s live child processes."""
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


def _engine_pid(setup: Setup) -> int:
    assert setup.gateway.process is not None
    engines = [pid for pid, cmd in _children(setup.gateway.process.pid).items() if b"gateway\0engine" in cmd]
    assert len(engines) == 1, engines
    return engines[0]


def _perturb(weights: Path) -> None:
    """Change every weight a little (another fine-tune of the same model), written atomically."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(26)
    changed = {
        name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
    }
    staging = weights.with_suffix(".tmp")
    save_file(changed, str(staging), metadata={"format": "pt"})
    staging.replace(weights)


def _restart_engine(setup: Setup) -> None:
    """SIGKILL the engine; return once the supervisor's new one answers through the workers."""
    victim = _engine_pid(setup)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline, f"the engine did not come back:\n{setup.gateway.log()[-3000:]}"
        time.sleep(0.2)
        try:
            if _engine_pid(setup) == victim:
                continue
        except AssertionError:
            continue  # between the old engine and the new one
        statuses = {setup.post([f"probe {uuid.uuid4().hex}"], timeout=30).status_code for _ in range(6)}
        if statuses == {200}:
            return


@pytest.fixture(scope="module")
def setup(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    import redis

    # A hub cache as huggingface_hub lays it out: the branch "main" names a commit; the second
    # commit (other weights) is there too, for the branch to move to.
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--gw-test--minilm"
    shutil.copytree(minilm_dir, repo / "snapshots" / FIRST)
    shutil.copytree(minilm_dir, repo / "snapshots" / SECOND)
    _perturb(repo / "snapshots" / SECOND / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST)

    redis_server = RedisServer(tmp_path_factory.mktemp("redis-pw"), None, "--requirepass", REDIS_PASSWORD)
    redis_server.start()
    prefix = f"restarts-{uuid.uuid4().hex[:8]}"
    gateway = GroupLeaderGateway(
        {
            "EMBED_MODEL": REPO,
            "EMBED_API_KEYS": API_KEY,
            "EMBED_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0",
            "EMBED_CACHE_PREFIX": prefix,
            "EMBED_TRUNCATE": "true",
            "EMBED_WORKERS": "2",
            "EMBED_SHUTDOWN_TIMEOUT_S": "60",
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
        },
        tmp_path_factory.mktemp("restarts") / "gateway.log",
    )
    seen: set[str] = set()

    def both_ready() -> bool:
        response = httpx.get(f"{gateway.url}/health", timeout=1.0)
        seen.add(response.headers.get("x-worker-pid", ""))
        return response.status_code == 200 and len(seen - {""}) == 2

    try:
        gateway.start_when(both_ready, timeout=180)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port, password=REDIS_PASSWORD)
        yield Setup(gateway, client, prefix, repo)
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            os.killpg(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait(timeout=10)
        redis_server.stop()
        print(gateway.log()[-4000:])


def test_the_children_command_lines_hold_no_secret(setup: Setup) -> None:
    assert setup.gateway.process is not None
    children = _children(setup.gateway.process.pid)
    assert len(children) == 3, children
    for pid, cmdline in children.items():
        assert API_KEY.encode() not in cmdline, f"the API key is in pid {pid}'s command line"
        assert REDIS_PASSWORD.encode() not in cmdline, f"the Redis password is in pid {pid}'s command line"
    # ... and yet the children have both: the key is checked, and Redis (password) caches.
    assert httpx.post(f"{setup.gateway.url}/v1/embeddings", json={"input": ["no key"]}).status_code == 401
    text = f"cached through the password {uuid.uuid4().hex}"
    assert setup.post([text]).headers["x-cache-misses"] == "1"
    deadline = time.monotonic() + 10
    while setup.post([text]).headers["x-cache-hits"] != "1":
        assert time.monotonic() < deadline, "the workers never reached Redis"
        time.sleep(0.1)


def test_a_restarted_engine_loads_the_commit_it_loaded_first(setup: Setup) -> None:
    text = f"the same commit after the restart {uuid.uuid4().hex}"
    before_keys = set().union(*setup.cached().values())
    first = setup.post([text])
    assert first.status_code == 200
    fingerprint = setup.stats()["fingerprint"]
    deadline = time.monotonic() + 10
    while not (written := set().union(*setup.cached().values()) - before_keys):
        assert time.monotonic() < deadline, "the vector was never written"
        time.sleep(0.05)
    setup.redis.delete(*written)  # so the restarted engine computes it again

    (setup.repo / "refs" / "main").write_text(SECOND)  # the hub's branch moves on
    _restart_engine(setup)

    again = setup.post([text])
    assert again.headers["x-cache-misses"] == "1"
    np.testing.assert_allclose(again.json()["data"][0]["embedding"], first.json()["data"][0]["embedding"], atol=1e-6)
    assert setup.stats()["fingerprint"] == fingerprint
    assert f"snapshots/{SECOND}" not in setup.gateway.log()


def test_a_model_changed_in_place_is_never_cached_under_the_old_keys(setup: Setup, minilm_dir: Path) -> None:
    from encoder import load_encoder

    old_namespace = setup.stats()["cache"]["namespace"]
    assert old_namespace in setup.cached()
    old_keys = setup.cached()[old_namespace]
    # The folder the engine loads gets other weights (same file names), then the engine restarts.
    folder = setup.repo / "snapshots" / FIRST
    shutil.copyfile(setup.repo / "snapshots" / SECOND / "model.safetensors", folder / "model.tmp")
    (folder / "model.tmp").replace(folder / "model.safetensors")
    _restart_engine(setup)

    texts: list[str] = []
    answers: list[httpx.Response] = []
    while len(texts) < 8 or len({answer.headers["x-worker-pid"] for answer in answers}) < 2:
        assert len(texts) < 64, "every connection went to one worker"
        texts.append(f"computed by the changed model {len(texts)} {uuid.uuid4().hex}")
        answers.append(setup.post(texts[-1:]))  # one connection each: both workers take some
        assert answers[-1].status_code == 200
    deadline = time.monotonic() + 10
    while sum(len(keys) for keys in setup.cached().values()) < len(old_keys) + len(texts):
        assert time.monotonic() < deadline, "the new vectors were never written"
        time.sleep(0.05)

    keys = setup.cached()
    assert keys[old_namespace] == old_keys, "the changed model's vectors went under the old model's keys"
    new_namespace = setup.stats()["cache"]["namespace"]
    assert new_namespace != old_namespace
    assert len(keys[new_namespace]) >= len(texts)
    changed = load_encoder(str(folder), truncate=True).embed(texts)
    served = np.array([answer.json()["data"][0]["embedding"] for answer in answers])
    np.testing.assert_allclose(served, changed, atol=1e-5)
    assert not np.allclose(served, load_encoder(str(minilm_dir), truncate=True).embed(texts), atol=1e-3)


def test_sigint_to_the_process_group_answers_every_accepted_request(setup: Setup) -> None:
    gateway = setup.gateway
    assert gateway.process is not None
    children = set(_children(gateway.process.pid))
    requests = 4
    texts_each = 32
    before = setup.stats()["encoder"]["batches"]
    results: dict[int, int | str] = {}

    def one(i: int) -> None:
        texts = [
            f"slow {i} {j} {uuid.uuid4().hex} " + "a sentence about engines and workers " * 18
            for j in range(texts_each)
        ]
        try:
            results[i] = setup.post(texts, timeout=120).status_code
        except httpx.HTTPError as exc:
            results[i] = type(exc).__name__

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while True:  # every request reached the engine, which is computing
        stats = setup.stats()
        in_flight = stats["internals"]["inputs_in_flight"]
        if stats["encoder"]["batches"] > before and in_flight >= requests * texts_each - 16:
            break
        assert time.monotonic() < deadline, f"the requests never reached the engine: {stats}"
        time.sleep(0.05)

    started = time.monotonic()
    os.killpg(gateway.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code = gateway.process.wait(timeout=120)
    for thread in threads:
        thread.join(30)
    print(f"SIGINT to the group: exit {code} after {time.monotonic() - started:.1f} s; answers {results}")
    assert results == dict.fromkeys(range(requests), 200)
    assert code == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
