"""Committed artefacts that must follow the code: the OpenAPI document and the layout rules."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.cli import openapi_document

ROOT = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_app() -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "openapi/openapi.json drifted from the app: run `embedding-gateway openapi -o openapi/openapi.json`"
    )
    body = committed["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/EmbeddingRequest"}
    assert "input" in committed["components"]["schemas"]["EmbeddingRequest"]["required"]
