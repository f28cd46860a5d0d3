"""Instruction prompts (issue 21): ``prompt_name``, ``input_type`` and the default prompt, against
sentence-transformers' own ``encode(prompt_name=...)`` on the same folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.servers import ThreadedGateway

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["how do vector caches work", "Redis keeps the vectors for a week", "a third, longer sentence about ANN"]


@pytest.fixture(scope="module")
def prompted_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 with sentence-transformers prompts in its config (no default)."""
    folder = tmp_path_factory.mktemp("prompted") / "model"
    shutil.copytree(minilm_dir, folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config["prompts"] = PROMPTS
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def prompted_encoder(prompted_dir: Path) -> Any:
    from encoder import load_encoder

    return load_encoder(str(prompted_dir), truncate=True)


@pytest.fixture(scope="module")
def st_model(prompted_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(prompted_dir), device="cpu")


@pytest.fixture
def serve(serve_app: Any, prompted_encoder: Any) -> Any:
    def start(**overrides: Any) -> Any:
        return serve_app(prompted_encoder, **{"model_name": "prompted", **overrides})

    return start


def _embed(gateway: ThreadedGateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/embeddings", json={"input": TEXTS, **body}, timeout=30)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("body", "st_prompt"),
    [
        ({"prompt_name": "query"}, "query"),
        ({"prompt_name": "passage"}, "passage"),
        ({"input_type": "search_query"}, "query"),  # Cohere's name
        ({"input_type": "document"}, "passage"),  # no "document" prompt: the passage one serves it
        ({}, None),
    ],
)
def test_vectors_equal_sentence_transformers_with_the_same_prompt(
    serve: Any, st_model: Any, body: dict[str, str], st_prompt: str | None
) -> None:
    answer = _embed(serve(), **body)
    expected = st_model.encode(TEXTS, prompt_name=st_prompt, convert_to_numpy=True).astype(np.float64)
    assert _cosines(_vectors(answer), expected).min() >= 0.99999
    # the prompt's tokens are counted, as the encoder sees prompt + text
    counted = sum(
        len(ids) for ids in st_model.tokenizer([PROMPTS.get(st_prompt or "", "") + t for t in TEXTS])["input_ids"]
    )
    assert answer.json()["usage"]["prompt_tokens"] == counted


def test_the_prompt_is_part_of_the_cache_key(serve: Any) -> None:
    gateway = serve()
    plain = _embed(gateway)
    prompted = _embed(gateway, prompt_name="query")
    assert prompted.headers["x-cache-misses"] == str(len(TEXTS)), "a prompted text must not hit the plain one"
    assert _cosines(_vectors(plain), _vectors(prompted)).max() < 0.9999
    again = _embed(gateway, prompt_name="query")
    assert again.headers["x-cache-hits"] == str(len(TEXTS))
    np.testing.assert_array_equal(_vectors(again), _vectors(prompted))


def test_an_unknown_prompt_name_or_input_type_is_a_400_listing_the_known_ones(serve: Any) -> None:
    gateway = serve()
    answer = _embed(gateway, prompt_name="instruction")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "prompt_name" and "'passage', 'query'" in error["message"], error
    answer = _embed(gateway, input_type="questions")
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "input_type"
    assert "search_query" in answer.json()["error"]["message"]


def test_the_default_prompt_applies_when_a_request_names_none(serve: Any) -> None:
    gateway = serve(default_prompt_name="query")
    named = _vectors(_embed(gateway, prompt_name="query"))
    np.testing.assert_array_equal(_vectors(_embed(gateway)), named)
    # a request's own choice wins over the default: "document" maps to the passage prompt
    passage = _vectors(_embed(gateway, input_type="document"))
    np.testing.assert_array_equal(passage, _vectors(_embed(gateway, prompt_name="passage")))
    assert _cosines(passage, named).max() < 0.9999


def test_models_list_the_prompts_and_the_default(serve: Any) -> None:
    gateway = serve(default_prompt_name="passage")
    card = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"][0]
    assert card["prompts"] == PROMPTS and card["default_prompt_name"] == "passage"
    one = httpx.get(f"{gateway.url}/v1/models/prompted", timeout=10).json()
    assert one["prompts"] == PROMPTS


def test_the_openai_client_passes_prompt_name_in_extra_body(serve: Any, st_model: Any) -> None:
    from openai import OpenAI

    gateway = serve()
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    answer = client.embeddings.create(model="prompted", input=TEXTS, extra_body={"prompt_name": "query"})
    got = np.array([row.embedding for row in answer.data])
    expected = st_model.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    assert _cosines(got, expected).min() >= 0.99999


def test_a_default_prompt_the_model_lacks_stops_the_start_in_one_line(prompted_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBED_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={**env, "EMBED_MODEL": str(prompted_dir), "EMBED_DEFAULT_PROMPT_NAME": "instruct", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "EMBED_DEFAULT_PROMPT_NAME" in lines[0] and "passage, query" in lines[0], lines
