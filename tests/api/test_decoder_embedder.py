"""Decoder embedders (issue 21, part 3): a Qwen3-Embedding-shaped folder (a causal decoder, the EOS
appended by its tokenizer, last-token pooling, a query instruction) gives sentence-transformers'
vectors through the gateway, whichever side its tokenizer pads on."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from support.factories import SAMPLE_LINES, build_decoder_embedder
from tests.servers import ThreadedGateway

TEXTS = [*SAMPLE_LINES[:6], "short", "a b"]  # lengths from 2 to ~40 tokens: every batch is padded


@pytest.fixture(scope="module", params=["left", "right"])
def decoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoder_embedder(
        tmp_path_factory.mktemp(f"decoder-{request.param}") / "model", padding_side=request.param
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("body", "prompt"), [({}, None), ({"prompt_name": "query"}, "query"), ({"input_type": "query"}, "query")]
)
def test_vectors_equal_sentence_transformers(decoder_dir: Path, body: dict[str, str], prompt: str | None) -> None:
    from sentence_transformers import SentenceTransformer

    from encoder import load_encoder

    encoder = load_encoder(str(decoder_dir), device="cpu")
    assert encoder.pooling == "lasttoken"
    eos = encoder.hf_tokenizer.eos_token_id
    assert all(ids[-1] == eos for ids in encoder.tokenize(TEXTS)), "the EOS the tokenizer appends is kept"
    settings = Settings(model=str(decoder_dir), model_name="qwen3-like", cache_prefix=f"dec-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        answer = httpx.post(f"{gateway.url}/v1/embeddings", json={"input": TEXTS, **body}, timeout=60)
        assert answer.status_code == 200, answer.text
        ours = np.array([row["embedding"] for row in answer.json()["data"]])
        tei = np.array(httpx.post(f"{gateway.url}/embed", json={"inputs": TEXTS, **body}, timeout=60).json())
    st = SentenceTransformer(str(decoder_dir), device="cpu")
    expected: Any = st.encode(TEXTS, prompt_name=prompt, convert_to_numpy=True, batch_size=8)
    assert _cosines(ours, expected).min() >= 0.99999
    np.testing.assert_array_equal(tei, ours)
