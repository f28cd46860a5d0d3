"""EMBED_CACHE_DTYPE through the server (issue 24): what a client gets is what Redis keeps.

A float16 server answers a miss with the float16-rounded vector its later hit returns, byte for
byte; a float32 server next to it on the same Redis keeps its own namespace and full vectors; the
storage gate refuses to start (exit 2, one line) in one process and under EMBED_WORKERS.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

TEXTS = ["what a client gets is what redis keeps", "a second text", "dritter Text"]


def _vectors(answer: httpx.Response) -> list[bytes]:
    assert answer.status_code == 200, answer.text
    return [base64.b64decode(row["embedding"]) for row in answer.json()["data"]]


def test_a_miss_and_its_hit_are_the_same_bytes_and_each_type_has_its_namespace(
    gateway_factory: Any, redis_server: Any, minilm_encoder: Any
) -> None:
    shared = {"redis_url": redis_server.url, "cache_prefix": "dtype-served"}
    body = {"input": TEXTS, "encoding_format": "base64"}
    exact = minilm_encoder.embed(TEXTS)
    namespaces = set()
    for dtype, floor in (("float16", 0.99999), ("int8", 0.999), ("float32", 1 - 1e-6)):
        gateway = gateway_factory(cache_dtype=dtype, **shared)
        miss = httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=30)
        assert miss.headers["x-cache-misses"] == "3", (dtype, dict(miss.headers))
        for _ in range(50):  # the write-back runs after the answer
            hit = httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=30)
            if hit.headers["x-cache-hits"] == "3":
                break
        assert hit.headers["x-cache-hits"] == "3", dtype
        assert _vectors(miss) == _vectors(hit), f"{dtype}: the hit differs from its miss"
        served = np.stack([np.frombuffer(row, dtype="<f4") for row in _vectors(hit)])
        cosines = np.sum(served * exact, axis=1) / np.linalg.norm(served, axis=1)
        assert cosines.min() >= floor, (dtype, cosines)
        assert (dtype == "float32") == bool(np.array_equal(served, exact.astype(np.float32)))
        namespaces.add(httpx.get(f"{gateway.url}/stats", timeout=10).json()["cache"]["namespace"])
    assert len(namespaces) == 3


def _serve(minilm_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", str(minilm_dir), "--port", "0"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBED_CACHE": "off", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_storage_gate_refuses_to_start_with_one_line(minilm_dir: Path, workers: str) -> None:
    env = {"EMBED_CACHE_DTYPE": "int8", "EMBED_CACHE_DTYPE_MIN_COSINE": "0.9999999", "EMBED_WORKERS": workers}
    done = _serve(minilm_dir, env)
    assert done.returncode == 2, done.stderr[-2000:]
    refusals = [line for line in done.stderr.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1, done.stderr[-2000:]
    assert "cache dtype int8" in refusals[0] and "dense worst cosine" in refusals[0], refusals[0]
    assert "Traceback" not in done.stderr
