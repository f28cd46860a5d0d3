"""Adversarial review of the issue-27 fixes: probes at the cap, settings, int8 in a pod, metrics with
workers, the manifests.

Each test runs a real server (``python -m gateway serve``), the real CLI or the real files. A test
that fails is a finding (its docstring says what was expected and what happened); the passing ones
are attacks the fixes withstood. Every test is bounded (well under a minute of its own, a few
processes at most) and cleans up its processes and folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/kubernetes"
PROBES = ("/livez", "/readyz", "/health", "/metrics")


# ---------------------------------------------------------------- helpers


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_answers(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple[int, bytes]]:
    """``count`` HTTP/1.1 answers (Content-Length framed) from ``sock``: (status, body) each."""
    sock.settimeout(timeout)
    buffer = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1")
            length = int(re.search(r"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            if len(buffer) >= head_end + 4 + length:
                status = int(head.split()[1])
                answers.append((status, buffer[head_end + 4 : head_end + 4 + length]))
                buffer = buffer[head_end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(answers)} answers: {answers}")
        buffer += chunk
    return answers


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()


def _slow_upload(port: int, length: int = 1 << 20) -> socket.socket:
    """A request whose body arrives slowly but legally: the head and the body's first bytes now;
    :func:`_trickle` keeps it above any idle deadline."""
    sock = _connect(port)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + b"authorization: Bearer the-key\r\n"
        + f"content-length: {length}\r\n\r\n".encode()
        + b'{"input": "'
    )
    return sock


def _trickle(socks: list[socket.socket], seconds: float, rate: int = 4096) -> None:
    """Send each upload ``rate`` bytes a second (4x the default minimum rate) for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            sock.sendall(b"a" * (rate // 10))
        time.sleep(0.1)


def _busy_request(sock: socket.socket, seed: int, texts: int = 48) -> None:
    """Send on ``sock`` (unread) an embedding request that keeps the one-thread encoder busy for a
    few seconds: ``texts`` distinct ~200-token texts, so a second one waits behind the first."""
    inputs = [" ".join(f"s{seed}t{i}w{j}" for j in range(32)) for i in range(texts)]  # ~200 tokens each
    body = json.dumps({"input": inputs}).encode()
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + b"authorization: Bearer the-key\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or dict(sample.labels) == labels):
                return sample.value
    return 0.0


def _children(pid: int, role: str) -> list[int]:
    """The live ``python -m gateway <role>`` children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and f"-m gateway {role}" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


# ---------------------------------------------------------------- 1: probes and the in-flight cap


@pytest.fixture(scope="module")
def capped(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One server, cap 2 requests in flight, short idle deadlines, a key (probes need none)."""
    env = {
        "EMBED_MODEL": str(minilm_dir),
        "EMBED_CACHE": "false",
        "EMBED_MAX_CONNECTIONS": "2",
        "EMBED_HEADER_TIMEOUT_S": "5",
        "EMBED_BODY_TIMEOUT_S": "2",
        "EMBED_API_KEYS": "the-key",
        "EMBED_PUBLIC_METRICS": "true",
        "EMBED_CPU_THREADS": "1",
    }
    gateway = GatewayProcess(env, tmp_path_factory.mktemp("capped") / "gateway.log")
    gateway.start_when(lambda: httpx.get(f"{gateway.url}/livez", timeout=1).status_code == 200)
    yield gateway
    gateway.stop()


def _refused(gateway: GatewayProcess) -> float:
    return _metric(httpx.get(f"{gateway.url}/metrics", timeout=5).text, "embedding_requests_refused_at_cap_total")


def test_probes_answer_at_the_cap_over_keep_alive_pipelining_and_beside_slowloris(capped: GatewayProcess) -> None:
    """Held: with the cap (2) taken by two requests in the encoder, two uploads in progress, 30
    slowloris sockets open and a keep-alive connection opened before the cap was reached, every
    probe and /metrics answers 200 (alone, over keep-alive and pipelined four deep); a pipelined
    embedding request between probes is refused 503 ``overloaded`` and counted once; the connection
    keeps working after it. (Updated with the fix below: uploads no longer hold slots, so two busy
    requests take the cap.)"""
    before = _refused(capped)
    kept = _connect(capped.port)
    kept.sendall(_get("/livez"))
    assert _read_answers(kept, 1)[0][0] == 200
    uploads = [_slow_upload(capped.port) for _ in range(2)]  # before the cap is reached: they upload on
    time.sleep(0.2)
    busy = [_connect(capped.port) for _ in range(2)]
    for seed, sock in enumerate(busy):
        _busy_request(sock, seed)
    slowloris = [_connect(capped.port) for _ in range(30)]
    try:
        for sock in slowloris:
            sock.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\n")  # a head that never ends
        _trickle(uploads, 0.5)
        embed = b'{"input": "at the cap"}'
        post = (
            b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer the-key\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(embed), embed)
        )
        kept.sendall(b"".join(_get(path) for path in PROBES))
        statuses = [status for status, _ in _read_answers(kept, len(PROBES))]
        assert statuses == [200] * len(PROBES), statuses
        kept.sendall(_get("/readyz") + post + _get("/livez"))
        answers = _read_answers(kept, 3)
        assert [status for status, _ in answers] == [200, 503, 200], answers
        assert b"overloaded" in answers[1][1]
        for path in PROBES:  # fresh connections too, as the kubelet makes them
            assert httpx.get(f"{capped.url}{path}", timeout=5).status_code == 200, path
        _trickle(uploads, 0.2)
        assert _refused(capped) == before + 1
    finally:
        for sock in [kept, *busy, *uploads, *slowloris]:
            sock.close()
    time.sleep(3)  # the busy requests' running pass ends; the next test starts below the cap


def test_a_cap_of_slow_uploads_refuses_every_request_while_the_replica_looks_ready(capped: GatewayProcess) -> None:
    """FINDING, fixed (a request counts in flight once its body is complete). ``EMBED_MAX_CONNECTIONS``
    counted a request as in flight from its head on, so a
    request whose body is still arriving - at a legal rate: 4 KiB/s, four times
    ``EMBED_BODY_MIN_BYTES_PER_S``, and a 32 MiB body may take hours at that rate - holds a slot.
    ``cap`` such uploads (1,000 by default: 4 MB/s in all) make the replica answer every embedding
    request 503 ``overloaded``, while ``/readyz`` stays 200, so neither the Service nor nginx routes
    around it. In Kubernetes the Service reaches the pods directly: no buffering proxy in front.

    Expected: a request that is only uploading holds no in-flight slot (count it when its body is
    complete, or cap uploads separately), so the embedding request below is served.
    Got: 503 ``overloaded`` for as long as the uploads trickle. (The uploads need a valid key where
    auth is on: without one they get 401 at once and hold nothing - checked in passing.)"""
    time.sleep(1.0)  # the previous test's uploads, closed, leave their slots
    uploads = [_slow_upload(capped.port) for _ in range(2)]
    try:
        _trickle(uploads, 0.5)
        for sock in uploads:  # both still uploading: neither was answered (refused) yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        ready = httpx.get(f"{capped.url}/readyz", timeout=5).status_code
        answer = httpx.post(
            f"{capped.url}/v1/embeddings",
            json={"input": "a real request"},
            headers={"authorization": "Bearer the-key"},
            timeout=10,
        )
        assert ready == 200
        assert answer.status_code == 200, (
            f"/readyz {ready}, yet the embedding request got {answer.status_code} {answer.text[:120]}"
        )
    finally:
        for sock in uploads:
            sock.close()


# ---------------------------------------------------------------- 2: settings


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


@pytest.mark.parametrize("command", [["serve"], ["check"]])
def test_strict_settings_stop_the_start_with_one_line_before_the_model_loads(
    command: list[str], minilm_dir: Path
) -> None:
    """Held: ``EMBED_STRICT_SETTINGS=true`` with ``EMBED_MAX_CONECTIONS`` exits 2 at once (no model
    load), one line naming the variable and the setting meant; without strict mode ``check`` warns
    with the same names. Also with ``EMBED_WORKERS=2`` (the supervisor reads the environment)."""
    env = {"EMBED_MODEL": str(minilm_dir), "EMBED_MAX_CONECTIONS": "5", "EMBED_WORKERS": "2"}
    started = time.monotonic()
    done = _cli(command, {**env, "EMBED_STRICT_SETTINGS": "true"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "EMBED_MAX_CONECTIONS" in lines[0] and "EMBED_MAX_CONNECTIONS" in lines[0], lines
    assert time.monotonic() - started < 15
    if command == ["check"]:
        warned = _cli(command, env, timeout=120)
        assert "EMBED_MAX_CONECTIONS is not a setting (did you mean EMBED_MAX_CONNECTIONS?)" in warned.stderr


def test_the_int8_build_job_names_a_misspelt_setting(tmp_path: Path) -> None:
    """FINDING, fixed (low). ``embedding-gateway int8 build`` - the command the int8 Job runs, with the
    gateway's ConfigMap - never reads :meth:`Settings.unknown_variables`: a misspelt
    ``EMBED_INT8_MIN_COSIN=0.9`` (meant: ``EMBED_INT8_MIN_COSINE``) or ``EMBED_REVISON`` is ignored
    without a word there (``serve`` and ``check`` warn; ``cache`` does not either). The build then
    gates with the default floor or builds another revision than the one meant.

    Expected: the same warning line as ``serve`` (and the strict mode's exit 2).
    Got: no line at all (here the model is missing, so the command stops early - after the point
    where ``serve`` warns)."""
    done = _cli(
        ["int8", "build", "--onnx-cache-dir", str(tmp_path)],
        {"EMBED_MODEL": str(tmp_path / "no-model"), "EMBED_INT8_MIN_COSIN": "0.9"},
    )
    assert "EMBED_INT8_MIN_COSIN is not a setting" in done.stderr, done.stderr[-1500:]


def test_the_int8_build_job_fails_in_one_line_on_a_missing_model(tmp_path: Path) -> None:
    """FINDING, fixed (low). ``serve`` answers a missing model with one line and exit 2 before anything
    loads (README, Operations); ``int8 build`` - the Job's command - prints a 20-line
    ``ModelNotFoundError`` traceback and exits 1 for the same setting (a wrong ``EMBED_MODEL`` or
    an unfetchable hub id), so the Job's log starts with a traceback.

    Expected: exit 2, one line naming EMBED_MODEL. Got: exit 1 and a traceback."""
    done = _cli(["int8", "build", "--onnx-cache-dir", str(tmp_path)], {"EMBED_MODEL": str(tmp_path / "no-model")})
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    assert done.returncode == 2 and "EMBED_MODEL" in done.stderr


# ---------------------------------------------------------------- 6: metrics with EMBED_WORKERS=2

Sample = tuple[str, tuple[tuple[str, str], ...]]


def _scrape(url: str) -> dict[Sample, float]:
    """The samples of /metrics that may only grow: counters, histogram buckets, counts and sums."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    kept: dict[Sample, float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                kept[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return kept


@pytest.fixture(scope="module")
def workers(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """EMBED_WORKERS=2, one request in flight per worker, no auth (so uploads need no key)."""
    gateway = GatewayProcess(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_WORKERS": "2",
            "EMBED_MAX_CONNECTIONS": "1",
            "EMBED_BODY_TIMEOUT_S": "20",
            "EMBED_CPU_THREADS": "1",
            "EMBED_SHUTDOWN_TIMEOUT_S": "5",
            "EMBED_CACHE_PREFIX": f"i27-{uuid.uuid4().hex[:8]}",
        },
        tmp_path_factory.mktemp("workers") / "gateway.log",
    )
    seen: set[str] = set()

    def both_ready() -> bool:
        response = httpx.get(f"{gateway.url}/health", timeout=1.0)
        seen.add(response.headers.get("x-worker-pid", ""))
        return response.status_code == 200 and len(seen - {""}) == 2

    gateway.start_when(both_ready, timeout=180)
    yield gateway
    gateway.stop()
    assert gateway.process is not None
    for role in ("engine", "worker"):  # children of a killed supervisor stop by themselves; make sure
        for pid in _children(gateway.process.pid, role):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _one_connection_per_worker(port: int, workers: int = 2) -> list[socket.socket]:
    """Keep-alive connections, one held by each worker (SO_REUSEPORT picks; ``x-worker-pid`` tells)."""
    kept: dict[str, socket.socket] = {}
    for _ in range(200):
        sock = _connect(port)
        sock.sendall(_get("/livez"))
        sock.settimeout(10)
        head = sock.recv(65536).decode("latin-1")
        pid = re.search(r"(?im)^x-worker-pid:\s*(\d+)", head)
        if pid is not None and pid.group(1) not in kept:
            kept[pid.group(1)] = sock
            if len(kept) == workers:
                return list(kept.values())
        else:
            sock.close()
    raise AssertionError(f"only {len(kept)} of {workers} workers answered")


def test_refusals_at_the_cap_reach_metrics_in_workers_mode(workers: GatewayProcess) -> None:
    """Held: with both workers at their cap (one busy request in each, the second waiting in the
    engine behind the first), embedding requests get 503 ``overloaded`` from either worker, /metrics
    still answers, and ``embedding_requests_refused_at_cap_total`` on the summed /metrics counts
    every one of them; uploads in progress hold no slot. (Updated with the upload fix: uploads
    filled the cap before.)"""
    before = _metric(httpx.get(f"{workers.url}/metrics", timeout=10).text, "embedding_requests_refused_at_cap_total")
    uploads = [_slow_upload(workers.port) for _ in range(4)]  # below the cap: they upload on, uncounted
    time.sleep(0.2)
    busy = _one_connection_per_worker(workers.port)
    for seed, sock in enumerate(busy):
        _busy_request(sock, 100 + seed)
    try:
        _trickle(uploads, 0.5)
        refused = 0
        for i in range(8):
            answer = httpx.post(f"{workers.url}/v1/embeddings", json={"input": f"refused {i}"}, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "overloaded"
            refused += 1
        _trickle(uploads, 1.5)  # the other worker writes its counts every second
        scraped = httpx.get(f"{workers.url}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert _metric(scraped.text, "embedding_requests_refused_at_cap_total") == before + refused
    finally:
        for sock in [*busy, *uploads]:
            sock.close()
    time.sleep(3)  # the busy requests' running pass ends


def test_metrics_and_livez_answer_while_the_engine_restarts(workers: GatewayProcess) -> None:
    """FINDING, fixed (medium). With ``EMBED_WORKERS>1`` the summed counters live in the ledger files,
    which every worker can read, yet /metrics (and /stats) ask the engine: while it restarts -
    the model's load, minutes for bge-m3 - every scrape is a 503. Prometheus loses the replica's
    series (``embedding_queue_tokens`` included, the HPA's metric) exactly while the replica is in
    trouble, and the dashboard's error panels go blank when they matter. /livez (held) stays 200.

    Expected: /metrics 200 during the restart (from the ledger, queue figures as 0 or last known).
    Got: 503 ``overloaded`` for the whole restart."""
    assert workers.process is not None
    httpx.post(f"{workers.url}/v1/embeddings", json={"input": "before the engine restart"}, timeout=30)
    (engine,) = _children(workers.process.pid, "engine")
    os.kill(engine, signal.SIGKILL)
    time.sleep(0.5)
    statuses: dict[str, list[int]] = {"/livez": [], "/metrics": []}
    for _ in range(6):
        for path, seen in statuses.items():
            with contextlib.suppress(httpx.TransportError):
                seen.append(httpx.get(f"{workers.url}{path}", timeout=5).status_code)
        time.sleep(0.1)
    assert set(statuses["/livez"]) == {200}, statuses
    assert set(statuses["/metrics"]) == {200}, statuses


def test_counters_stay_monotonic_when_a_worker_dies_during_an_engine_restart(workers: GatewayProcess) -> None:
    """Held: the engine is killed, and while it restarts a worker is killed too (both dead at
    once, the other order than tests/integration/test_metrics_workers.py); once both are back, no
    counter, bucket, count or sum of /metrics is below what a scrape saw before, and the four
    histograms have data."""
    assert workers.process is not None
    deadline = time.monotonic() + 120
    while httpx.get(f"{workers.url}/readyz", timeout=5).status_code != 200:  # the previous test's restart
        assert time.monotonic() < deadline
        time.sleep(0.3)
    for i in range(6):
        httpx.post(f"{workers.url}/v1/embeddings", json={"input": [f"monotonic {i} {uuid.uuid4().hex}"]}, timeout=30)
    time.sleep(1.2)
    before = _scrape(workers.url)
    (engine,) = _children(workers.process.pid, "engine")
    os.kill(engine, signal.SIGKILL)
    time.sleep(0.3)
    victim = _children(workers.process.pid, "worker")[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 150
    while True:
        assert time.monotonic() < deadline, workers.log()[-3000:]
        time.sleep(0.3)
        live = _children(workers.process.pid, "worker")
        if len(live) != 2 or victim in live or len(_children(workers.process.pid, "engine")) != 1:
            continue
        with contextlib.suppress(httpx.TransportError):
            answer = httpx.post(f"{workers.url}/v1/embeddings", json={"input": uuid.uuid4().hex}, timeout=10)
            if answer.status_code == 200:
                break
    after = _scrape(workers.url)
    went_back = {
        f"{name}{dict(labels)}": (value, after.get((name, labels), 0.0))
        for (name, labels), value in before.items()
        if after.get((name, labels), 0.0) < value
    }
    assert not went_back, went_back
    for name in ("embedding_request_duration_seconds", "embedding_batch_size", "embedding_encoder_seconds"):
        assert any(n == f"{name}_count" and v > 0 for (n, _), v in after.items()), name


# ---------------------------------------------------------------- 5: int8 in a pod


def _closure(extras: tuple[str, ...]) -> set[str]:
    """The distributions ``pip install 'embedding-gateway[extras]'`` brings (as installed here)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [("embedding-gateway", extras)]
    while stack:
        name, wanted = stack.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *wanted)):
                stack.append((requirement.name, tuple(requirement.extras)))
    return seen


@contextlib.contextmanager
def _image_site(tmp: Path, extras: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """An environment whose importable packages are only what the image's ``pip install`` brings:
    a folder of links to those distributions' files, run with ``python -S``. The variables to run
    ``python -S -m gateway`` with."""
    site = tmp / f"site-{'-'.join(extras) or 'plain'}"
    site.mkdir()
    wanted = _closure(extras)
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name not in wanted or name == "embedding-gateway":  # the project itself: ROOT, on the path
            continue
        base = Path(str(dist.locate_file("")))
        for entry in {Path(str(file)).parts[0] for file in dist.files or [] if not str(file).startswith("..")}:
            source, link = base / entry, site / entry
            if source.exists() and not os.path.lexists(link) and not entry.endswith(".pth"):
                link.symlink_to(source)
    try:
        yield {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    finally:
        shutil.rmtree(site, ignore_errors=True)


def _read_only_prefix(folder: Path) -> list[str]:
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder), "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("cannot mount a folder read-only here (unshare -m)")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder)]


def test_int8_from_the_image_extra_builds_then_serves_a_read_only_cache(minilm_dir: Path, tmp_path: Path) -> None:
    """Held: with only what ``pip install '.[int8]'`` brings importable (the image), the Job's
    ``int8 build`` fills a volume; the volume mounted read-only (a bind mount, refusing root too),
    a server (``EMBED_WORKERS=2``: the engine loads it) starts without writing there and answers;
    without the extra, int8 stops the start with one line and float32 still serves."""
    volume = tmp_path / "onnx"
    base = {"EMBED_MODEL": str(minilm_dir), "EMBED_CPU_THREADS": "1", "EMBED_ONNX_CACHE_DIR": str(volume)}
    with _image_site(tmp_path, ("int8",)) as site:
        clean = {key: value for key, value in os.environ.items() if not key.startswith(("EMBED_", "PYTHONPATH"))}
        env = {**clean, "HF_HUB_OFFLINE": "1", **site, **base}
        built = subprocess.run(
            [sys.executable, "-S", "-m", "gateway", "int8", "build"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
        for lock in volume.glob("*/.lock"):
            lock.unlink()
        listing = sorted(str(p) for p in volume.rglob("*"))
        port = str(_free_port())
        log = (tmp_path / "serve.log").open("wb")
        server = subprocess.Popen(
            [*_read_only_prefix(volume), sys.executable, "-S", "-m", "gateway", "serve"],
            env={**env, "EMBED_QUANTIZE": "int8", "EMBED_WORKERS": "2", "EMBED_PORT": port},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            answer = None
            deadline = time.monotonic() + 120
            while answer is None or answer.status_code != 200:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
                with contextlib.suppress(httpx.TransportError):
                    answer = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "ro"}, timeout=10)
            assert httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).json()["encoder"]["quantization"] == "int8"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
            log.close()
        assert sorted(str(p) for p in volume.rglob("*")) == listing, "the server wrote into the cache"
    with _image_site(tmp_path, ()) as site:
        clean = {key: value for key, value in os.environ.items() if not key.startswith(("EMBED_", "PYTHONPATH"))}
        env = {**clean, "HF_HUB_OFFLINE": "1", **site, **base}
        refused = subprocess.run(
            [sys.executable, "-S", "-m", "gateway", "serve"],
            env={**env, "EMBED_QUANTIZE": "int8"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and "embedding-gateway[int8]" in lines[-1], refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr


def _free_port() -> int:
    from tests.servers import free_port

    return free_port()


# ---------------------------------------------------------------- 9, 10: the manifests


def _render(tmp: Path, *, env_line: str = "", tag: str = "") -> dict[tuple[str, str], dict]:  # type: ignore[type-arg]
    """``kubectl kustomize`` of a copy of deploy/kubernetes with the int8 component on (and one
    more gateway.env line, another image tag: what the next release changes)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    folder = tmp / f"k8s-{uuid.uuid4().hex[:6]}"
    shutil.copytree(K8S, folder)
    (folder / "redis.env").write_text("password=0123456789abcdef\n")
    kustomization = (folder / "kustomization.yaml").read_text() + "components:\n  - int8\n"
    if tag:
        kustomization = re.sub(r'newTag: "[^"]*"', f'newTag: "{tag}"', kustomization)
    (folder / "kustomization.yaml").write_text(kustomization)
    if env_line:
        with (folder / "gateway.env").open("a") as env:
            env.write(env_line + "\n")
    rendered = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(rendered.stdout) if doc}


def test_the_int8_build_job_survives_the_next_release(tmp_path: Path) -> None:
    """FINDING, fixed (medium). A Job's ``spec.template`` is immutable. The int8 component's build Job has
    a fixed name, takes its settings from the hashed ConfigMap and its image from ``images:``, so
    the next release - a new image tag (README: one per build) or any gateway.env change (even
    ``EMBED_LOG_LEVEL``) - renders the same Job with another template, and ``kubectl apply -k``
    fails with ``Job.batch "embedding-gateway-int8-build" is invalid: spec.template: field is
    immutable`` (exit 1) at every rollout, until someone deletes the Job. The component's comment
    says only "a new EMBED_MODEL or EMBED_REVISION needs a new build: delete the Job".

    Expected: the release renders a Job that apply can create or leave alone (a name that changes
    with its template, or a ``ttlSecondsAfterFinished`` plus the documented delete-first step).
    Got: same name, different template."""
    now = _render(tmp_path)
    later = _render(tmp_path, env_line="EMBED_LOG_LEVEL=warning", tag="0.1.1")
    jobs_now = {name: doc for (kind, name), doc in now.items() if kind == "Job"}
    jobs_later = {name: doc for (kind, name), doc in later.items() if kind == "Job"}
    assert jobs_now, "the int8 component renders a build Job"
    for name, job in jobs_now.items():
        if name in jobs_later and "ttlSecondsAfterFinished" not in job["spec"]:
            assert jobs_later[name]["spec"]["template"] == job["spec"]["template"], (
                f"Job {name} keeps its name but its immutable template changes with the release"
            )


def test_rendered_selectors_secrets_probes_and_images_agree(tmp_path: Path) -> None:
    """Held: in the rendered manifests (int8 component on) the Redis NetworkPolicy admits exactly
    the serving pods' labels (not the build Job's), the Service and PDB select the serving pods only,
    the gateway's and Redis' password come from the one generated Secret, the ConfigMap reference
    carries its hash, images are pinned versions, and the probes hit /livez and /readyz on the
    named port."""
    rendered = _render(tmp_path)
    deployment = rendered[("Deployment", "embedding-gateway")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = [doc for (kind, _), doc in rendered.items() if kind == "NetworkPolicy"]
    redis_labels = rendered[("Deployment", "redis")]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (source,) = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert source["podSelector"]["matchLabels"].items() <= pod_labels.items()
    job_labels = next(doc for (kind, _), doc in rendered.items() if kind == "Job")["spec"]["template"]["metadata"][
        "labels"
    ]
    for selector in (
        rendered[("Service", "embedding-gateway")]["spec"]["selector"],
        rendered[("PodDisruptionBudget", "embedding-gateway")]["spec"]["selector"]["matchLabels"],
        source["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items() and not selector.items() <= job_labels.items()
    (secret,) = [name for kind, name in rendered if kind == "Secret"]
    containers = [
        rendered[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        for name in ("embedding-gateway", "redis")
    ]
    refs = {
        var["valueFrom"]["secretKeyRef"]["name"] for c in containers for var in c.get("env", []) if "valueFrom" in var
    }
    assert refs == {secret}
    gateway = containers[0]
    (config,) = [name for kind, name in rendered if kind == "ConfigMap"]
    assert {"configMapRef": {"name": config}} in gateway["envFrom"] and config != "embedding-gateway"
    for container in containers:
        assert re.search(r":\d+\.\d+\.\d+", container["image"]), container["image"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


# ---------------------------------------------------------------- workers mode: an orphaned worker


def test_a_worker_starting_when_the_supervisor_is_killed_does_not_serve_on_alone(
    minilm_dir: Path, tmp_path: Path
) -> None:
    """FINDING, fixed (medium on a bare host; containers kill the whole cgroup). A worker notices a killed
    supervisor by ``os.getppid()`` changing (``cli._watch_parent``), but reads its parent only after
    its imports and app set-up. A supervisor SIGKILLed while a (re)started worker is still starting
    leaves that worker with ``parent == 1`` from the outset: it never stops. Found by this file's
    own clean-up: the orphan kept listening on the port with SO_REUSEPORT (a new server there
    shares its connections with it), with no engine behind it, for minutes.

    Expected: every child gone within a few seconds of the supervisor's SIGKILL (take the parent
    pid before anything slow, pass the supervisor's pid in, or PR_SET_PDEATHSIG).
    Got: the new worker lives on."""
    gateway = GatewayProcess(
        {"EMBED_MODEL": str(minilm_dir), "EMBED_WORKERS": "2", "EMBED_CPU_THREADS": "1", "EMBED_CACHE": "false"},
        tmp_path / "gateway.log",
    )
    gateway.start_when(lambda: httpx.get(f"{gateway.url}/health", timeout=1).status_code == 200, timeout=180)
    assert gateway.process is not None
    supervisor = gateway.process.pid
    (engine,) = _children(supervisor, "engine")
    folder = re.search(
        rb"--socket (\S+)/engine\.sock", Path(f"/proc/{engine}/cmdline").read_bytes().replace(b"\0", b" ")
    )
    assert folder is not None
    marker = folder.group(1)
    try:
        deadline = time.monotonic() + 60
        while len(_children(supervisor, "worker")) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        old = set(_children(supervisor, "worker"))
        os.kill(min(old), signal.SIGKILL)
        while not set(_children(supervisor, "worker")) - old:  # the replacement has been spawned
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # it is importing
        gateway.process.kill()
        gateway.process.wait(10)
        gone_by = time.monotonic() + 8
        while _by_marker(marker) and time.monotonic() < gone_by:
            time.sleep(0.2)
        left = _by_marker(marker)
        assert not left, (
            f"processes of the killed supervisor still running: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
        )
    finally:
        gateway.stop()
        for pid in _by_marker(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _by_marker(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (
                    marker in (entry / "cmdline").read_bytes()
                    and b"Z" not in (entry / "stat").read_bytes().rpartition(b")")[2][:3]
                ):
                    found.append(int(entry.name))
    return found
