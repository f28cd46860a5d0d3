"""``embedding-gateway batch run IN OUT``: the Batch API's file format without a server (issue 23)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest


def _request(custom_id: str, text: str | list[str]) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-MiniLM-L6-v2", "input": text},
    }


def _env(minilm_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBED_MODEL": str(minilm_dir),
        "EMBED_MODEL_NAME": "all-MiniLM-L6-v2",
        "EMBED_DEVICE": "cpu",
        "EMBED_CPU_THREADS": "1",
        **extra,
    }


def _batch_run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "batch", "run", *args, "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _outputs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_run_answers_every_line_in_order_as_the_server_does(
    minilm_dir: Path, gateway_factory: Any, fresh_redis: Any, tmp_path: Path
) -> None:
    """Sharing the servers' Redis, the run's misses are written back: the server then answers the
    same texts from the cache with the run's very vectors (and usage)."""
    requests = [_request(f"r{i}", f"offline text number {i}") for i in range(20)]
    requests.insert(5, {**_request("bad", "x"), "body": {"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 0}})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(one) + "\n" for one in requests) + "{broken\n")
    out = tmp_path / "out.jsonl"
    shared = {"EMBED_REDIS_URL": fresh_redis.url, "EMBED_CACHE_PREFIX": "offline"}
    done = _batch_run([str(source), str(out)], _env(minilm_dir, EMBED_BATCH_CHUNK_INPUTS="4", **shared))
    assert done.returncode == 0, done.stderr
    lines = _outputs(out)
    assert [line["custom_id"] for line in lines] == [one["custom_id"] for one in requests] + [None]
    assert lines[5]["response"]["status_code"] == 400 and lines[5]["error"]["line"] == 6
    assert lines[-1]["response"] is None and lines[-1]["error"]["code"] == "invalid_json_line"
    server = gateway_factory(redis_url=fresh_redis.url, cache_prefix="offline")
    for line, request in zip(lines, requests, strict=False):
        if request["custom_id"] == "bad":
            continue
        direct = httpx.post(f"{server.url}/v1/embeddings", json=request["body"]).json()
        assert line["response"]["body"] == direct  # the same vectors, bit for bit, and usage
    hits = httpx.get(f"{server.url}/stats").json()["cache"]["hits"]
    assert hits == 20  # every text came from the run's write-backs
    assert "21 completed" not in done.stderr and "20 completed, 2 failed" in done.stderr


def test_batch_run_resumes_after_a_kill_without_losing_or_doubling_a_line(minilm_dir: Path, tmp_path: Path) -> None:
    requests = [_request(f"r{i}", f"resumable text {i} " + "word " * (i % 7)) for i in range(400)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(one) + "\n" for one in requests))
    out = tmp_path / "out.jsonl"
    env = _env(minilm_dir, EMBED_BATCH_CHUNK_INPUTS="8")
    command = [sys.executable, "-m", "gateway", "batch", "run", str(source), str(out), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (out.exists() and out.stat().st_size > 20_000):  # some windows written, far from all
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    with open(out, "ab") as torn:  # as if the kill had come mid-write
        torn.write(b'{"id": "batch_req_x", "custom_id": "r')
    first = len(_outputs_whole(out))
    assert 0 < first < 400
    again = _batch_run([str(source), str(out)], env)
    assert again.returncode == 0, again.stderr
    lines = _outputs(out)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(400)]  # each once, in order
    assert all(line["response"]["status_code"] == 200 for line in lines)
    vectors = [np.array(line["response"]["body"]["data"][0]["embedding"], dtype=np.float32) for line in lines]
    assert all(vector.shape == (384,) for vector in vectors)


def _outputs_whole(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n")[:-1] if line]


def test_batch_run_refuses_an_output_of_another_file(minilm_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(_request("a", "one")) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "zzz", "response": None, "error": None}) + "\n")
    refused = _batch_run([str(source), str(out)], _env(minilm_dir))
    assert refused.returncode == 2 and "--restart" in refused.stderr and "Traceback" not in refused.stderr
    restarted = _batch_run([str(source), str(out), "--restart"], _env(minilm_dir))
    assert restarted.returncode == 0, restarted.stderr
    assert [line["custom_id"] for line in _outputs(out)] == ["a"]


@pytest.mark.parametrize("args", [["missing.jsonl", "out.jsonl"]])
def test_batch_run_with_no_input_is_one_line(minilm_dir: Path, tmp_path: Path, args: list[str]) -> None:
    refused = _batch_run([str(tmp_path / name) for name in args], _env(minilm_dir))
    assert refused.returncode == 2 and "no such file" in refused.stderr and "Traceback" not in refused.stderr
