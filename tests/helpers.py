"""Small HTTP helpers the integration and reliability tests share."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np


def embed(url: str, texts: list[str], **extra: object) -> httpx.Response:
    """POST /v1/embeddings (float vectors by default) and insist on a 200."""
    response = httpx.post(f"{url}/v1/embeddings", json={"input": texts, **extra}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def fetch_stats(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/stats").json()
    return body


def vectors(response: httpx.Response) -> np.ndarray:
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
