"""Adversarial review of EMBED_DEVICES (commit fa48711): several engine processes behind the workers.

Each test runs real processes (``python -m gateway serve`` with ``EMBED_DEVICES=cpu,cpu``), the real
CLI, or the real Supervisor object. A test that fails is a finding (its docstring says what was
expected and what happened); the passing ones are attacks the change withstood. Every test is
bounded (well under a minute of its own) and kills every process it started, stopped ones included
(a SIGSTOPped engine does not notice its supervisor's death).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import GatewayProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers


def _procs() -> Iterator[tuple[int, int, str, str]]:
    """(pid, ppid, state, cmdline) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), int(fields[1]), fields[0], cmdline


def _children(pid: int, role: str) -> list[int]:
    """The live ``python -m gateway <role>`` children of ``pid``."""
    return sorted(
        child
        for child, parent, state, cmdline in _procs()
        if parent == pid and state != "Z" and f"-m gateway {role}" in cmdline
    )


def _engine(gateway: GatewayProcess, index: int) -> int | None:
    """Engine ``index``'s pid (found by its socket's name: engine.sock, engine-1.sock...)."""
    assert gateway.process is not None
    name = "engine.sock" if index == 0 else f"engine-{index}.sock"
    for child, parent, state, cmdline in _procs():
        if (
            parent == gateway.process.pid
            and state != "Z"
            and "-m gateway engine" in cmdline
            and f"/{name} " in f"{cmdline} "
        ):
            return child
    return None


def _gateway_descendants(gateway: GatewayProcess) -> list[int]:
    if gateway.process is None:
        return []
    return [child for child, parent, _, cmd in _procs() if parent == gateway.process.pid and "-m gateway" in cmd]


@contextlib.contextmanager
def _running(env: dict[str, str], log: Path, ready: str = "/readyz", timeout: float = 150) -> Iterator[GatewayProcess]:
    """A gateway; on the way out SIGCONT + SIGKILL every ``-m gateway`` child it has, then itself."""
    gateway = GatewayProcess({"HF_HUB_OFFLINE": "1", **env}, log)
    seen: set[int] = set()
    try:
        gateway.start_when(lambda: httpx.get(f"{gateway.url}{ready}", timeout=2).status_code == 200, timeout)
        yield gateway
    finally:
        seen.update(_gateway_descendants(gateway))
        gateway.stop()
        for pid in seen:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"gateway" in cmd:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        print(gateway.log()[-4000:])


def _post(gateway: GatewayProcess, texts: list[str], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/embeddings", json={"input": texts}, timeout=timeout)


def _stats(gateway: GatewayProcess, timeout: float = 10) -> dict:  # type: ignore[type-arg]
    response = httpx.get(f"{gateway.url}/stats", timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _samples(gateway: GatewayProcess, timeout: float = 10) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=timeout).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, AssertionError, KeyError, IndexError):
            if predicate():
                return
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("EMBED_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**clean, "HF_HUB_OFFLINE": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("device", "ok", "not ok"))]


PAIR = {"EMBED_DEVICES": "cpu,cpu", "EMBED_CACHE": "false", "EMBED_SHUTDOWN_TIMEOUT_S": "10"}


# ---------------------------------------------------------------- 1: settings and `check`


def test_check_judges_the_devices_serve_will_use_not_embed_device(minilm_dir: Path) -> None:
    """FINDING, fixed. ``gateway check`` ignores ``EMBED_DEVICES``: it resolves ``EMBED_DEVICE`` alone.

    Expected: ``check`` with ``EMBED_DEVICES=cuda:0,cuda:1`` on this CPU-only machine fails (serve
    refuses it: ``EMBED_DEVICES (--devices): device 'cuda:0' ... not available``), and ``check``
    with ``EMBED_DEVICES=cpu,cpu`` plus a stale ``EMBED_DEVICE=cuda`` passes (serve runs it: every
    engine gets its own device, EMBED_DEVICE is unused).
    Got: the first prints ``device cpu (asked: auto)`` / ``ok: the configured server can run here``
    (exit 0), the second ``device FAIL: device 'cuda' ...`` / ``not ok`` (exit 1): the verdict is
    about a device serve will not use."""
    model = {"EMBED_MODEL": str(minilm_dir)}
    gpus = _cli(["check"], {**model, "EMBED_DEVICES": "cuda:0,cuda:1"})
    serve = _cli(["serve"], {**model, "EMBED_DEVICES": "cuda:0,cuda:1", "EMBED_PORT": "0"})
    assert serve.returncode == 2 and "EMBED_DEVICES" in serve.stderr, serve.stderr  # serve refuses it...
    cpus = _cli(["check"], {**model, "EMBED_DEVICES": "cpu,cpu", "EMBED_DEVICE": "cuda"})
    problems = []
    if gpus.returncode == 0:
        problems.append(f"check passes cuda:0,cuda:1 on a CPU-only machine: {_lines(gpus.stdout)}")
    if cpus.returncode != 0:
        problems.append(f"check fails cpu,cpu because of the unused EMBED_DEVICE=cuda: {_lines(cpus.stdout)}")
    assert not problems, "\n".join(problems)


def test_a_one_entry_devices_list_is_the_device_serve_uses(minilm_dir: Path, tmp_path: Path) -> None:
    """FINDING, fixed. ``EMBED_DEVICES`` with one entry (``EMBED_WORKERS=1``) runs in process, and the in-process
    path loads the model on ``EMBED_DEVICE``, not on the one entry: preflight checks the entry
    (``engine_devices``), the load ignores it.

    Expected: ``EMBED_DEVICES=cpu`` serves on the CPU whatever ``EMBED_DEVICE`` says (the README:
    "one engine process per entry"; empty means "one engine on EMBED_DEVICE"), or preflight
    refuses the pair in one line.
    Got: preflight passes, then the load raises ``DeviceNotAvailableError: device 'cuda' ...`` with a
    traceback, exit 1. On a GPU host the same code silently serves ``EMBED_DEVICES=cuda:1`` on
    ``EMBED_DEVICE`` (auto: cuda:0), and /stats ``engines[0].device`` names cuda:0."""
    env = {"EMBED_MODEL": str(minilm_dir), "EMBED_DEVICES": "cpu", "EMBED_DEVICE": "cuda", "EMBED_CACHE": "false"}
    try:
        with _running(env, tmp_path / "gateway.log", ready="/readyz", timeout=90) as gateway:
            stats = _stats(gateway)
            assert [engine["device"] for engine in stats["engines"]] == ["cpu"], stats["engines"]
    except RuntimeError as exc:  # exited during start
        pytest.fail(f"EMBED_DEVICES=cpu EMBED_DEVICE=cuda did not serve on the CPU: {str(exc)[-500:]}")


def test_cpu_thread_share_follows_the_cores_this_process_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FINDING, fixed. With ``EMBED_CPU_THREADS=0`` the supervisor gives each CPU engine
    ``os.cpu_count() // N`` threads: the host's cores, not the ones this process may use. A single
    engine (``configure_cpu_threads``) uses ``len(os.sched_getaffinity(0))``. In a container pinned to 4
    of a host's 16 cores (Kubernetes' static CPU manager, ``docker --cpuset-cpus``, ``taskset``),
    ``cpu,cpu`` starts two engines of 8 threads each on 4 cores: 4x oversubscribed, where one engine
    alone would have taken 4.

    Expected: 2 threads each (4 allowed cores / 2 engines). Got: 8 each.
    (Reproduced on the Supervisor with os.cpu_count and os.sched_getaffinity patched: this machine
    has 2 cores, too few to show it with a real taskset.)"""
    from gateway.engine.supervisor import Supervisor
    from gateway.settings import Settings

    settings = Settings(model="unused", devices=("cpu", "cpu"), cpu_threads=0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)), raising=False)
    supervisor = Supervisor(settings)
    try:
        supervisor._settings_lines(settings)
        threads = [msgspec.json.decode(line)["cpu_threads"] for line in supervisor._engine_lines]
    finally:
        shutil.rmtree(supervisor.folder, ignore_errors=True)
    assert threads == [2, 2], f"engine threads on 4 allowed cores of 16: {threads}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" cpu , cpu ", ("cpu", "cpu")), ("cpu,,cpu,", ("cpu", "cpu")), ("cpu", ("cpu",)), (" , ", ())],
)
def test_devices_list_whitespace_and_empty_entries(value: str, expected: tuple[str, ...]) -> None:
    """Held: whitespace and empty entries are dropped; an all-empty list is the default."""
    from gateway.settings import Settings

    assert Settings.load({"EMBED_DEVICES": value}).devices == expected


# ---------------------------------------------------------------- 2: one pair of engines, several attacks


@pytest.fixture(scope="module")
def pair(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory, tiktoken_cache: Path) -> Iterator[GatewayProcess]:
    env = {**PAIR, "EMBED_MODEL": str(minilm_dir), "EMBED_ENGINE_START_TIMEOUT_S": "120"}
    with _running(env, tmp_path_factory.mktemp("pair") / "gateway.log") as gateway:
        yield gateway


def test_each_cpu_engine_reports_its_share_of_the_cores(pair: GatewayProcess) -> None:
    """Held: with EMBED_CPU_THREADS=0 on this machine, the engine /stats describes runs
    ``max(1, cores // 2)`` threads (2 cores: 1), and both engines are listed up on cpu."""
    stats = _stats(pair)
    assert stats["encoder"]["threads"] == max(1, (os.cpu_count() or 1) // 2), stats["encoder"]
    assert [(e["index"], e["device"], e["up"]) for e in stats["engines"]] == [(0, "cpu", True), (1, "cpu", True)]


def test_a_batch_cut_across_both_engines_keeps_order_and_vectors(pair: GatewayProcess) -> None:
    """Held: a request over SPLIT_TOKENS (16,384) is cut into one part per engine; the answer keeps
    the input order and every vector equals the one the text gets alone."""
    texts = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(110)]  # ~ 110 x 200 tokens
    whole = _post(pair, texts, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.json()["usage"]["prompt_tokens"] > 16_384
    got = np.array([row["embedding"] for row in whole.json()["data"]])
    for index in (0, 54, 55, 56, 109):
        alone = np.array(_post(pair, [texts[index]]).json()["data"][0]["embedding"])
        np.testing.assert_allclose(got[index], alone, atol=1e-5)


def test_engine_down_reporting_and_monotonic_totals(pair: GatewayProcess) -> None:
    """Held: while engine 1 is away /stats still answers with both engines listed (1: up false),
    /metrics has embedding_engine_up{engine="1"} 0 and still answers; the summed request and
    batch counters never go down across its restart, and engine_restarts counts it."""
    for i in range(4):
        assert _post(pair, [f"before kill {i} {j}" for j in range(8)]).status_code == 200
    before = _samples(pair)
    restarts = _stats(pair).get("engine_restarts", 0)
    victim = _engine(pair, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    seen_down = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not seen_down:
        engines = _stats(pair)["engines"]
        assert [e["index"] for e in engines] == [0, 1]
        for engine in engines:
            assert set(engine) >= {"index", "device", "up", "batches", "busy_fraction", "queue_tokens"}
        if not engines[1]["up"]:
            seen_down = True
            metrics = _samples(pair)
            assert metrics[("embedding_engine_up", (("device", "cpu"), ("engine", "1")))] == 0.0
            assert metrics[("embedding_engine_up", (("device", "cpu"), ("engine", "0")))] == 1.0
        time.sleep(0.05)
    assert seen_down, "engine 1 never showed up false in /stats after its SIGKILL"
    _wait(lambda: all(e["up"] for e in _stats(pair)["engines"]), 90, "engine 1 did not come back")
    after = _samples(pair)
    for key, value in before.items():
        if key[0].endswith("_total") and not key[0].startswith("embedding_engine_"):
            assert after.get(key, 0.0) >= value, f"{key} went from {value} to {after.get(key)}"
    assert _stats(pair)["engine_restarts"] == restarts + 1


def test_token_id_inputs_across_two_engines(pair: GatewayProcess) -> None:
    """Held: token-id inputs (cl100k ids, as LangChain sends) embed through the router the same as
    their text, on whichever engine."""
    import tiktoken

    text = "token ids through the router"
    ids = tiktoken.get_encoding("cl100k_base").encode(text)
    by_text = np.array(_post(pair, [text]).json()["data"][0]["embedding"])
    answer = httpx.post(f"{pair.url}/v1/embeddings", json={"input": [ids]}, timeout=30)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(np.array(answer.json()["data"][0]["embedding"]), by_text, atol=1e-5)


def test_a_hung_engine_does_not_swallow_requests_or_stats(pair: GatewayProcess) -> None:
    """FINDING, fixed. An engine that hangs (SIGSTOP here; a wedged driver or a deadlock in production)
    keeps its connection open, so the router still counts it as running and keeps routing to it:
    ties go to engine 0, and a client that gives up takes its tokens off ``sent_tokens``, so the
    next request goes to the hung engine again. Nothing times the engine call out, and /stats and
    /metrics ask every engine for its counters with no deadline.

    Expected (README: "Failover: an engine that is gone ... passes the batch to the next";
    "a client sees 503 only when no engine can take it"): with engine 1 serving, every request is
    answered (200, or at worst a prompt 503) and /stats and /metrics answer.
    Got: requests hang until the client's own timeout (8 s here), one after another, and /stats
    and /metrics hang too (the scrape fails exactly while one engine is sick); /readyz stays 200."""
    victim = _engine(pair, 0)
    assert victim is not None
    outcomes: list[str] = []
    os.kill(victim, signal.SIGSTOP)
    try:
        for i in range(3):
            started = time.monotonic()
            try:
                status = _post(pair, [f"to a hung engine {i}"], timeout=8).status_code
                outcomes.append(f"request {i}: {status} in {time.monotonic() - started:.1f}s")
            except httpx.TimeoutException:
                outcomes.append(f"request {i}: no answer in 8 s")
        for path in ("/stats", "/metrics"):
            try:
                outcomes.append(f"{path}: {httpx.get(f'{pair.url}{path}', timeout=8).status_code}")
            except httpx.TimeoutException:
                outcomes.append(f"{path}: no answer in 8 s")
        ready = httpx.get(f"{pair.url}/readyz", timeout=5).status_code
    finally:
        os.kill(victim, signal.SIGCONT)
    bad = [line for line in outcomes if "no answer" in line]
    assert not bad, f"engine 0 SIGSTOPped, engine 1 serving, /readyz {ready}: " + "; ".join(outcomes)


# ---------------------------------------------------------------- 3: the supervisor under a stuck restart


def test_a_stuck_engine_restart_does_not_stop_the_supervisor_restarting_the_rest(
    minilm_dir: Path, tmp_path: Path
) -> None:
    """FINDING, fixed. The supervisor's watch loop restarts a dead engine *synchronously*:
    ``_restart_engine`` -> ``_start_engines([i])`` waits up to ``EMBED_ENGINE_START_TIMEOUT_S``
    (600 s by default; a GPU model load takes minutes) for its socket, and only then looks at the
    other engines and the workers again. While engine 1 (re)loads, a worker that dies is not
    restarted, nor is engine 0: with ``EMBED_WORKERS=1`` the port goes dead though engine 0 could
    serve everything, which is the whole point of several engines.

    Here engine 1 is SIGKILLed, its replacement SIGSTOPped while it loads (a slow or hung load),
    then the one worker is SIGKILLed.
    Expected: a new worker within ~10 s, serving through engine 0.
    Got: no worker (connection refused) until engine 1's start times out (120 s here)."""
    env = {**PAIR, "EMBED_MODEL": str(minilm_dir), "EMBED_ENGINE_START_TIMEOUT_S": "120"}
    with _running(env, tmp_path / "gateway.log") as gateway:
        assert gateway.process is not None
        old = _engine(gateway, 1)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        replacement = None
        deadline = time.monotonic() + 10
        while replacement is None and time.monotonic() < deadline:
            found = _engine(gateway, 1)
            if found is not None and found != old:
                replacement = found
                os.kill(found, signal.SIGSTOP)
            time.sleep(0.01)
        assert replacement is not None, "engine 1 was not restarted"
        workers = _children(gateway.process.pid, "worker")
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        served = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                served = _post(gateway, ["served by engine 0"], timeout=5).status_code
                if served == 200:
                    break
            time.sleep(0.5)
        new_workers = _children(gateway.process.pid, "worker")
        assert served == 200, (
            f"15 s after the worker's death, with engine 1's restart stuck: workers {new_workers}, last answer {served}"
        )


# ---------------------------------------------------------------- 4: a restarted engine with another model


def _model_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for entry in source.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        elif entry.name.endswith(".safetensors"):
            (target / entry.name).symlink_to(entry)
        else:
            shutil.copy2(entry, target / entry.name)
    return target


def test_engines_serving_different_models_after_a_restart_are_not_mixed(minilm_dir: Path, tmp_path: Path) -> None:
    """FINDING, fixed. The router refuses engines that disagree on the model only at start
    (``EnginesDisagreeError``). The model folder changes in place (the case ``EngineLink._adopt``
    exists for), engine 0 restarts and loads the new model while engine 1 keeps the old one: each
    link adopts its own engine's model, the router describes ``links[0]`` (the new fingerprint: the
    cache namespace) and keeps routing misses to both. ``EngineLink.embed``'s stale-tokenizer
    check compares the ids' generation with *that link's* generation (0 on engine 1), so it never
    fires.

    Expected: one model's vectors per answer - the router stops using (or restarts) the engine that
    disagrees, or answers 503 - never two models under one fingerprint/cache namespace.
    Got: identical requests get mean-pooled vectors (engine 1, old model) or CLS-pooled ones
    (engine 0, new model), both labelled with the new model's fingerprint; with the cache on, the
    old model's vectors are stored under the new namespace."""
    folder = _model_copy(minilm_dir, tmp_path / "model")
    env = {**PAIR, "EMBED_MODEL": str(folder)}
    with _running(env, tmp_path / "gateway.log") as gateway:
        texts = [f"which model made this {i}" for i in range(4)]
        assert _post(gateway, texts).status_code == 200
        pooling = folder / "1_Pooling" / "config.json"
        config = json.loads(pooling.read_text())
        config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
        pooling.write_text(json.dumps(config))
        victim = _engine(gateway, 0)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _engine(gateway, 0) not in (None, victim), 10, "engine 0 was not restarted")
        _wait(lambda: all(e["up"] for e in _stats(gateway)["engines"]), 90, "engine 0 did not come back")
        time.sleep(1.5)  # a push round: both links fresh
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _post(gateway, texts), range(16)))
        statuses = {answer.status_code for answer in answers}
        vectors = [np.array([row["embedding"] for row in a.json()["data"]]) for a in answers if a.status_code == 200]
        distinct: list[np.ndarray] = []
        for vector in vectors:
            if not any(np.allclose(vector, seen, atol=1e-4) for seen in distinct):
                distinct.append(vector)
        assert len(distinct) <= 1, (
            f"{len(vectors)} answers (statuses {statuses}) to one request carry {len(distinct)} different "
            f"sets of vectors (max cosine gap {1 - float(np.min(np.sum(distinct[0] * distinct[1], axis=1))):.3f})"
        )


# ---------------------------------------------------------------- 5: drain with two engines and two workers


def test_sigterm_with_two_engines_and_two_workers_answers_every_accepted_request(
    minilm_dir: Path, tmp_path: Path
) -> None:
    """Held: EMBED_WORKERS=2 with EMBED_DEVICES=cpu,cpu: 12 requests in flight over both workers
    and both engines, SIGTERM to the supervisor: every request gets 200, the supervisor exits 0,
    and no ``-m gateway`` child outlives it."""
    env = {**PAIR, "EMBED_MODEL": str(minilm_dir), "EMBED_WORKERS": "2"}
    with _running(env, tmp_path / "gateway.log") as gateway:
        assert gateway.process is not None
        children = _gateway_descendants(gateway)
        assert len(children) == 4, children  # two engines, two workers
        results: list[object] = []

        def one(i: int) -> None:
            try:
                results.append(_post(gateway, [f"drain {i} {j} " * 8 for j in range(24)], timeout=40).status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        code = gateway.terminate(timeout=45)
        for thread in threads:
            thread.join(45)
        time.sleep(0.5)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        assert results == [200] * 12 or sorted(map(str, results)) == ["200"] * 12, results
        assert code == 0, code
        assert not alive, f"children left after the drain: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


# ---------------------------------------------------------------- 6: sparse and colbert outputs over two engines


def test_sparse_and_multivector_outputs_over_two_engines(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    """Held: a bge-m3-shaped model on cpu,cpu: /v1/embeddings/sparse and /v1/embeddings/multivector,
    sent concurrently (so both engines answer some), give one answer per input, the same from
    either engine (sparse: the same indices and values; multivector: the same shapes)."""
    env = {**PAIR, "EMBED_MODEL": str(tiny_bge_m3_dir), "EMBED_MODEL_NAME": "bge-m3"}
    texts = ["hybrid search wants all three", "Быстрая коричневая лиса", "短い"]
    with _running(env, tmp_path / "gateway.log") as gateway:
        for path in ("/v1/embeddings/sparse", "/v1/embeddings/multivector"):
            with ThreadPoolExecutor(6) as pool:
                answers = list(
                    pool.map(
                        lambda _, p=path: httpx.post(
                            f"{gateway.url}{p}", json={"model": "bge-m3", "input": texts}, timeout=30
                        ),
                        range(12),
                    )
                )
            assert {a.status_code for a in answers} == {200}, [a.text[:200] for a in answers]
            bodies = [json.dumps([row["embedding"] for row in a.json()["data"]], sort_keys=True) for a in answers]
            assert all(len(a.json()["data"]) == len(texts) for a in answers)
            first = json.loads(bodies[0])
            for body in bodies[1:]:
                other = json.loads(body)
                if isinstance(first[0], dict):  # sparse: {indices, values}
                    for a, b in zip(first, other, strict=True):
                        assert a["indices"] == b["indices"]
                        np.testing.assert_allclose(a["values"], b["values"], atol=1e-4)
                else:
                    np.testing.assert_allclose(np.array(first, dtype=object).shape, np.array(other, dtype=object).shape)
        engines = _stats(gateway)["engines"]
        assert all(e["batches"] > 0 for e in engines), engines
