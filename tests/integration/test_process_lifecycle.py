"""The real command line in a subprocess: start-up, SIGTERM, clear failures, JSON logs, ``check``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import GatewayProcess, RedisServer, free_port

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_sigterm_finishes_the_request_in_flight_and_exits_0(
    minilm_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = "confidential-marker-9931"
    gateway = GatewayProcess(
        {
            "EMBED_MODEL": str(minilm_dir),
            "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
            "EMBED_REDIS_URL": redis_server.url,
            "EMBED_CACHE_PREFIX": "sigterm",
            "EMBED_TRUNCATE": "true",
            "EMBED_LOG_FORMAT": "json",
        },
        tmp_path / "gateway.log",
    )
    gateway.start()
    try:
        # The port opened only once the model was loaded: the first answer is already "ok".
        assert httpx.get(f"{gateway.url}/health").json()["status"] == "ok"
        texts = [f"{secret} {i} " + "a long sentence about caches and vectors " * 12 for i in range(160)]
        result: dict[str, Any] = {}

        def call() -> None:
            result["response"] = httpx.post(f"{gateway.url}/v1/embeddings", json={"input": texts}, timeout=120)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{gateway.url}/stats").json()["encoder"]["batches"] < 2:  # warm-up ran none
            assert time.monotonic() < deadline, "the request never reached the encoder"
            time.sleep(0.02)
        started = time.monotonic()
        code = gateway.terminate(timeout=60)
        thread.join(60)
        assert code == 0
        response = result["response"]
        assert response.status_code == 200
        assert len(response.json()["data"]) == 160
        assert time.monotonic() - started < 60
        # The cache writes pending at SIGTERM were finished before Redis was closed.
        assert len(list(redis_server.client().scan_iter("sigterm:*"))) == 160
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    assert any(line.get("message", "").startswith("ready:") for line in lines)
    access = [line for line in lines if line.get("logger") == "gateway.access"]
    assert any(line["path"] == "/v1/embeddings" and line["status"] == 200 and line["inputs"] == 160 for line in access)
    assert secret not in gateway.log(), "input text must never reach the logs"


def test_missing_model_exits_non_zero_with_one_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = _cli("serve", "--model", str(missing), "--port", str(free_port()))
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert "EMBED_MODEL" in done.stderr
    assert "Traceback" not in done.stderr


def test_absent_device_exits_non_zero_naming_what_exists(minilm_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _cli("serve", "--model", str(minilm_dir), "--device", "cuda", "--port", str(free_port()))
    assert done.returncode == 2
    assert "'cuda'" in done.stderr
    assert "found on this machine: cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_setting_exits_2() -> None:
    done = _cli("serve", env={"EMBED_PORT": "eighty"})
    assert done.returncode == 2
    assert "EMBED_PORT" in done.stderr


def test_check_reports_and_fails_where_it_should(minilm_dir: Path, redis_server: RedisServer) -> None:
    good = _cli("check", "--model", str(minilm_dir), "--redis-url", redis_server.url)
    assert good.returncode == 0, good.stdout
    import torch

    assert f"torch      {torch.__version__}" in good.stdout
    assert "cuda " in good.stdout
    assert "dim 384, pooling mean" in good.stdout
    assert "answers" in good.stdout

    dead_redis = _cli("check", "--model", str(minilm_dir), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert dead_redis.returncode == 1
    assert "redis      FAIL" in dead_redis.stdout
    missing = _cli("check", "--model", "/no/such/folder")
    assert missing.returncode == 1
    assert "model      FAIL" in missing.stdout
