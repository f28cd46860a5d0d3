"""Several models in one server (issue 21): ``EMBED_MODELS_FILE``'s ``[[models]]`` tables.

Two real models share one app: all-MiniLM-L6-v2 with prompts (the default, first in the file) and a
tiny bge-m3-shaped model (dense, sparse and ColBERT heads). Each request goes to the model it names
(its id, an alias, its path), gets that model's vectors, prompts, limits and cache namespace, and
is counted under it in /stats and /metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from gateway.cli import preflight
from gateway.core.models_file import ModelsFileError, read_models_file
from tests.servers import ThreadedGateway

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["how do vector caches work", "Redis keeps the vectors for a week"]


@pytest.fixture(scope="module")
def prompted_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models-file") / "minilm"
    shutil.copytree(minilm_dir, folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config["prompts"] = PROMPTS
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    return folder


def _models_file(folder: Path, minilm: Path, tiny: Path, **minilm_fields: Any) -> Path:
    extra = "".join(f"{name} = {json.dumps(value)}\n" for name, value in minilm_fields.items())
    path = folder / "models.toml"
    path.write_text(
        "[[models]]\n"
        'name = "minilm"\n'
        f"path = {json.dumps(str(minilm))}\n"
        'aliases = ["text-embedding-3-small"]\n'
        "truncate = true\n"
        f"{extra}\n"
        "[[models]]\n"
        'name = "tiny-m3"\n'
        f"path = {json.dumps(str(tiny))}\n"
        "max_input_tokens = 64\n"
    )
    return path


@pytest.fixture(scope="module")
def encoders(prompted_dir: Path, tiny_bge_m3_dir: Path) -> tuple[Any, Any]:
    from encoder import load_encoder

    return load_encoder(str(prompted_dir), truncate=True), load_encoder(str(tiny_bge_m3_dir), max_tokens=64)


@pytest.fixture
def serve(encoders: tuple[Any, Any], prompted_dir: Path, tiny_bge_m3_dir: Path, tmp_path: Path) -> Iterator[Any]:
    gateways: list[ThreadedGateway] = []

    def start(**minilm_fields: Any) -> ThreadedGateway:
        models_file = _models_file(tmp_path, prompted_dir, tiny_bge_m3_dir, **minilm_fields)
        settings = Settings(models_file=str(models_file), cache_prefix=f"models-{uuid.uuid4().hex[:8]}")
        gateway = ThreadedGateway(create_app(settings, encoders=encoders)).__enter__()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.__exit__(None, None, None)


def _post(gateway: ThreadedGateway, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float64)


def test_each_request_gets_the_vectors_of_the_model_it_names(serve: Any, encoders: tuple[Any, Any]) -> None:
    minilm, tiny = encoders
    gateway = serve()
    by_default = _post(gateway, "/v1/embeddings", {"input": TEXTS})
    assert by_default.json()["model"] == "minilm"
    np.testing.assert_allclose(_vectors(by_default), minilm.embed(TEXTS), rtol=1e-5, atol=1e-6)
    for name in ("minilm", "text-embedding-3-small", str(minilm.path)):
        answer = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": name})
        assert answer.json()["model"] == "minilm", name
    small = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "tiny-m3"})
    assert small.json()["model"] == "tiny-m3"
    assert _vectors(small).shape == (len(TEXTS), tiny.dim) and tiny.dim != minilm.dim
    np.testing.assert_allclose(_vectors(small), tiny.embed(TEXTS), rtol=1e-5, atol=1e-6)
    # TEI's routes too: the `model` field, and /info?model=
    tei = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "model": "tiny-m3"}).json())
    np.testing.assert_allclose(tei, _vectors(small), rtol=1e-6, atol=1e-7)
    info = httpx.get(f"{gateway.url}/info", params={"model": "tiny-m3"}, timeout=10).json()
    assert info["model_id"] == "tiny-m3" and info["max_input_length"] == 64
    assert httpx.get(f"{gateway.url}/info", timeout=10).json()["model_id"] == "minilm"
    for name, encoder in (("tiny-m3", tiny), ("minilm", minilm), (None, minilm)):
        body = {"inputs": TEXTS[0], "add_special_tokens": True} | ({"model": name} if name else {})
        tokens = _post(gateway, "/tokenize", body).json()[0]
        assert [token["id"] for token in tokens] == encoder.tokenize([TEXTS[0]])[0], name


def test_an_unknown_model_is_a_404_naming_every_served_one(serve: Any) -> None:
    answer = _post(serve(), "/v1/embeddings", {"input": "x", "model": "bge-large"})
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and "'minilm'" in error["message"] and "'tiny-m3'" in error["message"]


def test_outputs_limits_and_truncation_are_each_models_own(serve: Any) -> None:
    gateway = serve()
    sparse = _post(gateway, "/v1/embeddings/sparse", {"input": TEXTS, "model": "tiny-m3"})
    assert sparse.status_code == 200, sparse.text
    refused = _post(gateway, "/v1/embeddings/sparse", {"input": TEXTS, "model": "minilm"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "output_not_supported"
    long_text = "word " * 300
    assert _post(gateway, "/v1/embeddings", {"input": long_text, "model": "minilm"}).status_code == 200  # truncates
    too_long = _post(gateway, "/v1/embeddings", {"input": long_text, "model": "tiny-m3"})  # 64 tokens, no truncation
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_prompts_are_per_model_and_v1_models_lists_every_model(serve: Any) -> None:
    gateway = serve(default_prompt_name="query")
    listed = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]
    cards = {card["id"]: card for card in listed}
    assert list(cards) == ["minilm", "text-embedding-3-small", "tiny-m3"]
    assert cards["minilm"]["prompts"] == PROMPTS and cards["minilm"]["default_prompt_name"] == "query"
    assert cards["tiny-m3"]["prompts"] == {} and cards["tiny-m3"]["default_prompt_name"] is None
    # the table's default prompt applies to minilm: a plain request is its 'query' request
    plain = _post(gateway, "/v1/embeddings", {"input": TEXTS})
    named = _post(gateway, "/v1/embeddings", {"input": TEXTS, "prompt_name": "query"})
    passage = _post(gateway, "/v1/embeddings", {"input": TEXTS, "prompt_name": "passage"})
    np.testing.assert_array_equal(_vectors(plain), _vectors(named))
    assert named.headers["x-cache-hits"] == str(len(TEXTS))
    assert not np.allclose(_vectors(plain), _vectors(passage))
    unknown = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "tiny-m3", "prompt_name": "query"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "prompt_name"
    assert httpx.get(f"{gateway.url}/v1/models/tiny-m3", timeout=10).json()["id"] == "tiny-m3"
    assert httpx.get(f"{gateway.url}/v1/models/nope", timeout=10).status_code == 404


def test_one_text_is_cached_apart_for_each_model(serve: Any) -> None:
    gateway = serve()
    first = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "minilm"})
    assert first.headers["x-cache-misses"] == str(len(TEXTS))
    other = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "tiny-m3"})
    assert other.headers["x-cache-misses"] == str(len(TEXTS)), "another model's vectors must never be served"
    again = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "tiny-m3"})
    assert again.headers["x-cache-hits"] == str(len(TEXTS))
    np.testing.assert_array_equal(_vectors(other), _vectors(again))


def test_stats_and_metrics_count_each_model_apart(serve: Any) -> None:
    gateway = serve()
    _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": "minilm"})
    _post(gateway, "/v1/embeddings", {"input": TEXTS[:1], "model": "tiny-m3"})
    _post(gateway, "/v1/embeddings", {"input": TEXTS[:1], "model": "tiny-m3"})
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    models = {entry["model"]: entry for entry in stats["models"]}
    assert models["minilm"]["inputs"] == 2 and models["minilm"]["cache_misses"] == 2
    assert models["tiny-m3"]["inputs"] == 2 and models["tiny-m3"]["cache_hits"] == 1
    assert models["tiny-m3"]["batches"] >= 1 and models["tiny-m3"]["fingerprint"] != models["minilm"]["fingerprint"]
    assert stats["inputs"] == 4  # the server's totals hold both
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'embedding_model_inputs_total{model="minilm"} 2.0' in metrics
    assert 'embedding_model_cache_hits_total{model="tiny-m3"} 1.0' in metrics


def test_models_on_one_device_share_one_forward_thread(serve: Any) -> None:
    """On one device the models' passes take turns on one thread (one libgomp team on the CPU)."""
    gateway = serve()
    runtime = gateway.server.config.app.state.runtime  # type: ignore[attr-defined]
    first, second = runtime.models
    assert first.batcher._forward._owner is second.batcher._forward._owner  # two lanes, one thread


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no [[models]] tables"),
        ("[[models]]\nname = 'a'\n", "'path'"),
        ("[[models]]\nname = 'a'\npath = 'x'\ncolour = 1\n", "unknown field 'colour'"),
        ("[[models]]\nname = 'a'\npath = 'x'\n[[models]]\nname = 'b'\npath = 'y'\naliases = ['a']\n", "already names"),
        ("[[models]]\nname = 'a'\npath = 'x'\ndevice = 'tpu'\n", "'device'"),
        ("[[models]]\nname = 'a'\npath = 'x'\nkind = 'classifier'\n", "'kind'"),
        ("[[models]]\nname = ' '\npath = 'x'\n", "'name' must be a non-empty string"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_a_bad_models_file_is_one_line_naming_the_table_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelsFileError) as caught:
        read_models_file(path, Settings())
    message = str(caught.value)
    assert expected in message and "\n" not in message and "EMBED_MODELS_FILE" in message, message


def test_preflight_checks_every_model(tmp_path: Path, prompted_dir: Path) -> None:
    missing = tmp_path / "missing-model"
    path = tmp_path / "models.toml"
    path.write_text(
        f"[[models]]\nname = 'a'\npath = {json.dumps(str(prompted_dir))}\n[[models]]\nname = 'b'\npath = {json.dumps(str(missing))}\n"
    )
    problem = preflight(Settings(models_file=str(path)))
    assert problem is not None and "model 'b'" in problem and "\n" not in problem, problem
    path.write_text(f"[[models]]\nname = 'a'\npath = {json.dumps(str(prompted_dir))}\ndefault_prompt_name = 'nope'\n")
    problem = preflight(Settings(models_file=str(path)))
    assert problem is not None and "'nope'" in problem, problem
    path.write_text(f"[[models]]\nname = 'a'\npath = {json.dumps(str(prompted_dir))}\n")
    assert preflight(Settings(models_file=str(path))) is None
    assert preflight(Settings(models_file=str(path), workers=2)) is None  # one engine per model


def test_serve_with_a_bad_models_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[[models]]\nname = 'a'\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBED_MODELS_FILE": str(path), "EMBED_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "[[models]] #1" in lines[0] and "'path'" in lines[0], done.stderr


def test_a_model_that_does_not_fit_stops_the_start_with_one_line(
    tmp_path: Path, prompted_dir: Path, tiny_bge_m3_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The second model runs out of memory while it loads: serve names it, prints one line, exits 2."""
    import torch

    import gateway.http.app
    from gateway.cli import _serve

    loaded: list[str] = []

    def load_model(settings: Settings) -> Any:
        if settings.served_model == "tiny-m3":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        loaded.append(settings.served_model)
        from encoder import load_encoder

        return load_encoder(settings.model)

    monkeypatch.setattr(gateway.http.app, "load_model", load_model)
    path = _models_file(tmp_path, prompted_dir, tiny_bge_m3_dir)
    assert _serve(Settings(models_file=str(path), port=0)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedding-gateway:")]
    assert loaded == ["minilm"]
    assert len(lines) == 1 and "'tiny-m3' does not fit" in lines[0] and "2.00 GiB" in lines[0], lines
