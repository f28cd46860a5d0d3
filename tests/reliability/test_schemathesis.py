"""Generated requests from openapi/openapi.json against a live server: no 5xx, every error in the
OpenAI envelope. Hypothesis settings bound the run (a few hundred cases in all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")

pytestmark = pytest.mark.slow
TEI_PATHS = {"/", "/embed", "/embed_sparse", "/embed_all", "/tokenize", "/decode", "/info", "/rerank"}


@pytest.fixture(scope="module")
def live_url(minilm_encoder):  # type: ignore[no-untyped-def]
    from gateway import Settings, create_app
    from tests.servers import ThreadedGateway

    settings_ = Settings(model=str(minilm_encoder.path), model_name="all-MiniLM-L6-v2", cache_prefix="schemathesis")
    with ThreadedGateway(create_app(settings_, encoder=minilm_encoder)) as gateway:
        yield gateway.url


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests(case: Any, live_url: str) -> None:
    response = case.call(base_url=live_url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        # TEI's shape on TEI's routes; 401 and 405 (before any route runs) are OpenAI's everywhere
        if case.path in TEI_PATHS and response.status_code not in (401, 405):
            assert set(body) == {"error", "error_type"}, body
            assert "Traceback" not in body["error"]
            return
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in error["message"]
