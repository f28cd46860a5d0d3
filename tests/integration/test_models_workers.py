"""EMBED_MODELS_FILE with EMBED_WORKERS=2 (issue 21): one engine process per model behind two workers.

One supervised gateway serves the module: all-MiniLM-L6-v2 (the default) and a tiny bge-m3-shaped
model, each in an engine of its own, two HTTP workers, Redis as the cache. Each request reaches the
engine of the model it names, and /stats' ``models`` sums every process's counts per model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.servers import GatewayProcess, RedisServer

pytestmark = pytest.mark.slow

TEXTS = ["how do vector caches work", "Redis keeps the vectors for a week", "two models, one port"]


@pytest.fixture(scope="module")
def models_gateway(
    minilm_dir: Path, tiny_bge_m3_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("models-workers")
    models_file = folder / "models.toml"
    models_file.write_text(
        f'[[models]]\nname = "minilm"\npath = {json.dumps(str(minilm_dir))}\ntruncate = true\n\n'
        f'[[models]]\nname = "tiny-m3"\npath = {json.dumps(str(tiny_bge_m3_dir))}\n'
    )
    gateway = GatewayProcess(
        {
            "EMBED_MODELS_FILE": str(models_file),
            "EMBED_WORKERS": "2",
            "EMBED_REDIS_URL": redis_server.url,
            "EMBED_CACHE_PREFIX": "models-workers",
            "EMBED_PUBLIC_METRICS": "true",
            "EMBED_SHUTDOWN_TIMEOUT_S": "10",
        },
        folder / "gateway.log",
    )
    gateway.start_when(lambda: httpx.get(f"{gateway.url}/readyz", timeout=1).status_code == 200, timeout=180)
    yield gateway
    gateway.stop()
    print(gateway.log()[-3000:])


def _vectors(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    return np.array([row["embedding"] for row in answer.json()["data"]], dtype=np.float64)


def test_each_model_is_served_by_its_own_engine(
    models_gateway: GatewayProcess, minilm_encoder: Any, tiny_bge_m3_dir: Path
) -> None:
    from encoder import load_encoder

    tiny = load_encoder(str(tiny_bge_m3_dir))
    url = models_gateway.url
    for _ in range(4):  # new connections: both workers answer
        default = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS}, timeout=60)
        assert default.json()["model"] == "minilm"
        np.testing.assert_allclose(_vectors(default), minilm_encoder.embed(TEXTS), rtol=1e-5, atol=1e-6)
        small = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "model": "tiny-m3"}, timeout=60)
        assert small.json()["model"] == "tiny-m3"
        np.testing.assert_allclose(_vectors(small), tiny.embed(TEXTS), rtol=1e-5, atol=1e-6)
    sparse = httpx.post(f"{url}/v1/embeddings/sparse", json={"input": TEXTS, "model": "tiny-m3"}, timeout=60)
    assert sparse.status_code == 200, sparse.text
    listed = [card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert listed == ["minilm", "tiny-m3"]
    info = httpx.get(f"{url}/info", params={"model": "tiny-m3"}, timeout=10).json()
    assert info["model_id"] == "tiny-m3"


def test_stats_sum_each_models_counts_over_every_process(models_gateway: GatewayProcess) -> None:
    url = models_gateway.url
    before = {entry["model"]: entry for entry in httpx.get(f"{url}/stats", timeout=10).json()["models"]}
    for i in range(6):
        texts = [f"count me {i} for minilm", f"and me {i}"]
        assert httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60).status_code == 200
        tiny = {"input": [f"count me {i} for tiny"], "model": "tiny-m3"}
        assert httpx.post(f"{url}/v1/embeddings", json=tiny, timeout=60).status_code == 200
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    after = {entry["model"]: entry for entry in stats["models"]}
    assert after["minilm"]["inputs"] - before["minilm"]["inputs"] == 12
    assert after["minilm"]["cache_misses"] - before["minilm"]["cache_misses"] == 12
    assert after["tiny-m3"]["inputs"] - before["tiny-m3"]["inputs"] == 6
    assert after["tiny-m3"]["batches"] > before["tiny-m3"]["batches"]  # counted in the engine's process
    assert after["minilm"]["fingerprint"] != after["tiny-m3"]["fingerprint"]
    assert len(stats["engines"]) == 2 and all(engine["up"] for engine in stats["engines"])
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'embedding_model_inputs_total{model="tiny-m3"}' in metrics
