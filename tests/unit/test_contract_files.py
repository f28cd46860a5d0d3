"""Committed artefacts that must follow the code: the OpenAPI document and the layout rules."""

from __future__ import annotations

import ast
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


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_encoder_imports_nothing_of_the_http_side() -> None:
    assert not _imports("encoder") & {"gateway", "litestar", "redis", "msgspec", "uvicorn"}


def test_only_settings_reads_the_environment() -> None:
    for path in (ROOT / "gateway").rglob("*.py"):
        if path.name != "settings.py":
            assert "os.environ" not in path.read_text(), path
    for path in (ROOT / "encoder").rglob("*.py"):
        text = path.read_text()
        assert "os.environ[" not in text, path
        assert "os.getenv" not in text, path
