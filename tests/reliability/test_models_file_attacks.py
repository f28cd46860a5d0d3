"""Outside review of several models in one server (d9c726a, and 51d6fb4 / a1252b9 after it):
``EMBED_MODELS_FILE``, routing by ``model``, per-model caches, stats and the shared forward thread,
and the TEI route fixes of the same commit. Reproductions: a failing test is a finding; its
docstring says expected vs got.

Everything runs in process (tests.servers.ThreadedGateway over gateway.create_app with loaded
encoders): all-MiniLM-L6-v2 (the default model, truncating) beside a tiny bge-m3-shaped model
(dense, sparse and ColBERT heads, 64 tokens, no truncation), and a tiny decoder embedder. Redis is
the real one of the ``redis_server`` fixture where a cache matters.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from gateway.core.models_file import MAX_MODELS, ModelsFileError, read_models_file
from tests.servers import RedisServer, ThreadedGateway

TEXTS = ["how do vector caches work", "Redis keeps the vectors for a week"]
LONG = " ".join(f"word{i % 40} alpha beta" for i in range(200))  # ~600 tokens: over both models' limits
Serve = Callable[..., ThreadedGateway]


# --------------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _toml(tables: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for table in tables:
        lines.append("[[models]]")
        lines += [f"{name} = {json.dumps(_plain(value))}" for name, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def _refusal(path: Path) -> str | None:
    """The ModelsFileError line for ``path``, or None when the file is taken."""
    try:
        read_models_file(path, Settings())
    except ModelsFileError as exc:
        return str(exc)
    return None


def _write(folder: Path, tables: list[dict[str, Any]]) -> Path:
    path = folder / f"models-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(_toml(tables))
    return path


def _minilm(minilm_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "minilm", "path": minilm_dir, "truncate": True, **extra}


def _tiny(tiny_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "tiny-m3", "path": tiny_dir, "max_input_tokens": 64, **extra}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bge_m3_dir: Path) -> Any:
    from encoder import load_encoder

    return load_encoder(str(tiny_bge_m3_dir), max_tokens=64)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    gateways: list[ThreadedGateway] = []

    def start(tables: list[dict[str, Any]], encoders: list[Any], **overrides: Any) -> ThreadedGateway:
        fields = {"cache_prefix": f"mfa-{uuid.uuid4().hex[:8]}", **overrides}
        settings = Settings(models_file=str(_write(tmp_path, tables)), **fields)
        gateway = ThreadedGateway(create_app(settings, encoders=encoders)).__enter__()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.__exit__(None, None, None)


@pytest.fixture
def pair(serve: Serve, minilm_dir: Path, tiny_bge_m3_dir: Path, minilm_encoder: Any, tiny_encoder: Any) -> Serve:
    """The two-model server: minilm (default, truncating) and tiny-m3; ``tiny`` adds to tiny-m3's table."""

    def start(tiny: dict[str, Any] | None = None, **overrides: Any) -> ThreadedGateway:
        tables = [_minilm(minilm_dir), _tiny(tiny_bge_m3_dir, **(tiny or {}))]
        return serve(tables, [minilm_encoder, tiny_encoder], **overrides)

    return start


def _post(gateway: ThreadedGateway, path: str, body: Any, timeout: float = 30, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=timeout)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float64)


def _is_tei_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"error", "error_type"} and isinstance(body["error"], str)


def _runtime(gateway: ThreadedGateway) -> Any:
    return gateway.server.config.app.state.runtime  # type: ignore[attr-defined]


def _forward_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("encoder-forward-")}


# --------------------------------------------------------------------------------------------------
# Routing: which model a name reaches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["aliases", "name"])
def test_an_id_that_is_another_models_path_reaches_the_model_that_declares_it(
    serve: Serve,
    minilm_dir: Path,
    tiny_bge_m3_dir: Path,
    minilm_encoder: Any,
    tiny_encoder: Any,
    tmp_path: Path,
    field: str,
) -> None:
    """FINDING (medium, wrong model served). read_models_file refuses an alias or name that another
    table already declares, but never checks them against the other models' paths, and
    runtime.names_of registers each model's path (implicitly) before the next model's explicit
    name and aliases, with setdefault. So tiny-m3 declaring ``aliases = ["<minilm's path>"]`` (or
    a model *named* like another's path) is accepted, /v1/models lists that id as tiny-m3's, and
    every request naming it is silently served by minilm.
    Expected: the file refused (one line: the id already names minilm by its path), or the
    explicit declaration wins. Got: accepted, and the id is served by minilm (384-d vectors
    answered with "model": "minilm")."""
    owner = "tiny-m3" if field == "aliases" else str(minilm_dir)
    tiny = _tiny(tiny_bge_m3_dir, aliases=[minilm_dir]) if field == "aliases" else _tiny(tiny_bge_m3_dir)
    if field == "name":
        tiny["name"] = str(minilm_dir)
    tables = [_minilm(minilm_dir), tiny]
    refusal = _refusal(_write(tmp_path, tables))
    if refusal is not None:
        assert "\n" not in refusal
        return  # refused at start: the fix
    gateway = serve(tables, [minilm_encoder, tiny_encoder])
    listed = [card["id"] for card in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]]
    assert str(minilm_dir) in listed
    answer = _post(gateway, "/v1/embeddings", {"input": TEXTS, "model": str(minilm_dir)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == owner, (
        f"/v1/models lists {str(minilm_dir)!r} as {owner!r}'s, but the request was served by "
        f"{answer.json()['model']!r} ({_vectors(answer).shape[1]}-d)"
    )


def test_a_model_named_star_is_refused(
    serve: Serve, minilm_dir: Path, tiny_bge_m3_dir: Path, minilm_encoder: Any, tiny_encoder: Any, tmp_path: Path
) -> None:
    """FINDING (low, routing/listing). "*" is the catch-all *alias* (README: 'An alias "*" on one
    model takes every unknown name'), but nothing stops a table *named* "*": names_of puts the
    served id in the same map, so the model silently becomes the catch-all, /v1/models leaves it
    out (it skips ANY_MODEL), and every answer it gives says "model": "*".
    Expected: a file with name = "*" refused with one line. Got: accepted; the model is a hidden
    catch-all."""
    tables = [_minilm(minilm_dir), {**_tiny(tiny_bge_m3_dir), "name": "*"}]
    refusal = _refusal(_write(tmp_path, tables))
    if refusal is not None:
        assert "'*'" in refusal and "\n" not in refusal, refusal
        return
    gateway = serve(tables, [minilm_encoder, tiny_encoder])
    listed = [card["id"] for card in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]]
    answer = _post(gateway, "/v1/embeddings", {"input": "x", "model": "text-embedding-ada-002"})
    pytest.fail(
        f"name '*' accepted: /v1/models lists {listed}; an unknown name got {answer.status_code} "
        f"answered by model {answer.json().get('model')!r}"
    )


def test_server_model_aliases_are_kept_or_refused_with_a_models_file(
    serve: Serve, minilm_dir: Path, tiny_bge_m3_dir: Path, minilm_encoder: Any, tiny_encoder: Any
) -> None:
    """FINDING (low, docs vs behaviour). README (Several models): "aliases, revision, device, ...
    are optional and take the EMBED_* setting when left out". ModelEntry.settings always replaces
    EMBED_MODEL_ALIASES with the table's aliases (() when left out), so an operator who moves from
    EMBED_MODEL_ALIASES=text-embedding-3-small to a models file silently loses the alias: clients
    that send it get 404.
    Expected: the alias kept on the default model as README says (or the start refused, naming the
    setting that is ignored). Got: 404 model_not_found."""
    from gateway.core.models_file import ModelsFileError

    with pytest.raises(ModelsFileError, match="EMBED_MODEL_ALIASES") as refused:  # the start is refused
        serve(
            [_minilm(minilm_dir), _tiny(tiny_bge_m3_dir)],
            [minilm_encoder, tiny_encoder],
            model_aliases=("text-embedding-3-small",),
        )
    assert "\n" not in str(refused.value)


def test_a_star_alias_on_the_second_model_takes_unknown_names_only(pair: Serve) -> None:
    """Held attack. With aliases = ["*"] on tiny-m3 (the second table): no model is still the
    default (minilm), a known name still its own model, any other name tiny-m3 (answers say so),
    TEI's /info?model= too; /v1/models never lists "*"."""
    gateway = pair({"aliases": ["*"]})
    assert _post(gateway, "/v1/embeddings", {"input": "x"}).json()["model"] == "minilm"
    assert _post(gateway, "/v1/embeddings", {"input": "x", "model": "minilm"}).json()["model"] == "minilm"
    other = _post(gateway, "/v1/embeddings", {"input": "x", "model": "text-embedding-ada-002"})
    assert other.json()["model"] == "tiny-m3"
    info = httpx.get(f"{gateway.url}/info", params={"model": "whatever"}, timeout=10).json()
    assert info["model_id"] == "tiny-m3"
    listed = [card["id"] for card in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]]
    assert "*" not in listed and listed[:2] == ["minilm", "tiny-m3"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/embed", {"inputs": "x", "model": "nope"}),
        ("post", "/", {"inputs": "x", "model": "nope"}),
        ("post", "/embed_sparse", {"inputs": "x", "model": "nope"}),
        ("post", "/embed_all", {"inputs": "x", "model": "nope"}),
        ("post", "/tokenize", {"inputs": "x", "model": "nope"}),
        ("post", "/decode", {"ids": [5], "model": "nope"}),
        ("get", "/info?model=nope", None),
    ],
)
def test_an_unknown_model_on_each_tei_route_is_a_404_in_teis_shape(
    pair: Serve, method: str, path: str, body: Any
) -> None:
    """Held attack. An unknown ``model`` on every TEI route (and /info?model=) is a 404 in TEI's
    shape naming the served models, never the default model's answer or a 5xx."""
    gateway = pair()
    answer = httpx.get(f"{gateway.url}{path}", timeout=10) if method == "get" else _post(gateway, path, body)
    assert answer.status_code == 404, answer.text
    assert _is_tei_error(answer) and "'tiny-m3'" in answer.json()["error"], answer.text


# --------------------------------------------------------------------------------------------------
# Each model's vectors, limits and tokenizer on the TEI routes
# --------------------------------------------------------------------------------------------------


def test_tei_dimensions_and_decode_use_the_named_models_limits(pair: Serve, tiny_encoder: Any) -> None:
    """Held attack. /embed's dimensions bound is the named model's width (tiny-m3's is smaller than
    minilm's 384), and /decode checks ids against the named model's vocabulary (an id valid for
    minilm's 30,522 but past tiny-m3's small one is a 422 for tiny-m3 only)."""
    gateway = pair()
    wide = tiny_encoder.dim + 1
    refused = _post(gateway, "/embed", {"inputs": "x", "dimensions": wide, "model": "tiny-m3"})
    assert refused.status_code == 422 and _is_tei_error(refused), refused.text
    served = _post(gateway, "/embed", {"inputs": "x", "dimensions": wide, "model": "minilm"})
    assert served.status_code == 200 and len(served.json()[0]) == wide, served.text
    past = len(tiny_encoder.hf_tokenizer) + 5
    assert past < 30000
    bad = _post(gateway, "/decode", {"ids": [past], "model": "tiny-m3"})
    assert bad.status_code == 422 and _is_tei_error(bad), bad.text
    good = _post(gateway, "/decode", {"ids": [past], "model": "minilm"})
    assert good.status_code == 200, good.text
    ids = _post(gateway, "/tokenize", {"inputs": TEXTS[0], "model": "tiny-m3", "add_special_tokens": False}).json()
    decoded = _post(gateway, "/decode", {"ids": [token["id"] for token in ids[0]], "model": "tiny-m3"}).json()
    assert decoded[0].strip() == TEXTS[0]


def test_truncate_false_is_honoured_per_model_and_on_hits(pair: Serve) -> None:
    """Held attack. minilm truncates, tiny-m3 does not: TEI's truncate:false is a 413 for an input
    over either model's limit, on /embed, /embed_sparse and /embed_all, even once minilm's
    truncated vector for that text is cached; without it minilm serves the prefix's vector."""
    gateway = pair()
    assert _post(gateway, "/embed", {"inputs": LONG, "model": "minilm"}).status_code == 200  # cached now
    for path, model in (("/embed", "minilm"), ("/embed", "tiny-m3"), ("/embed_sparse", "tiny-m3")):
        answer = _post(gateway, path, {"inputs": LONG, "truncate": False, "model": model})
        assert answer.status_code == 413 and _is_tei_error(answer), (path, model, answer.text)
    answer = _post(gateway, "/embed_all", {"inputs": [LONG], "truncate": False, "model": "tiny-m3"})
    assert answer.status_code == 413, answer.text
    short = _post(gateway, "/embed", {"inputs": TEXTS, "truncate": False, "model": "tiny-m3"})
    assert short.status_code == 200, short.text


def test_tokenize_refuses_an_over_limit_request_before_tokenising_all_of_it(
    pair: Serve, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FINDING (medium, resource use). /tokenize is 'bounded by EMBED_MAX_REQUEST_TOKENS', but the
    route (tei.py tei_tokenize) tokenises every input whole, with offsets and special-token masks,
    and only then counts: the answer is bounded, the work and memory are not. Measured here: 2 MB
    of text take 1.3 s and 325 MiB of RSS before the refusal, so one 32 MiB body (the default
    EMBED_MAX_BODY_BYTES) costs ~20 s of CPU and ~5 GB. The embedding routes tokenise in 64K-char
    pieces and stop once the count passes the limit (service._tokenize_within_limit).
    Expected: with EMBED_MAX_REQUEST_TOKENS=1000, a 1 MB input refused (413) after tokenising a
    bounded share of it (here: under 200,000 characters). Got: all 1,000,000 characters tokenised."""
    gateway = pair(max_request_tokens=1000)
    real = tiny_encoder.tokenizer
    seen: list[int] = []

    class Recorder:
        def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
            items = [texts] if isinstance(texts, str) else list(texts)
            seen.append(sum(len(text) for text in items if isinstance(text, str)))
            return real(texts, *args, **kwargs)

        def __len__(self) -> int:
            return len(real)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(tiny_encoder, "tokenizer", Recorder())
    text = "word " * 200_000
    answer = _post(gateway, "/tokenize", {"inputs": text, "model": "tiny-m3"}, timeout=60)
    assert answer.status_code == 413 and _is_tei_error(answer), answer.text[:300]
    assert sum(seen) <= 200_000, f"{sum(seen):,} characters tokenised to refuse a request over 1,000 tokens"


def test_a_limited_key_pays_for_tokenize_and_decode_of_any_model_and_tei_401s(pair: Serve, tmp_path: Path) -> None:
    """Held attack. A key limited to 3 requests a minute cannot dodge the limit through another
    model's /tokenize or /decode (429 in TEI's shape, Retry-After); /info?model= without a key is
    TEI's 401."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "limited"\nkey = "sk-limited"\nrequests_per_minute = 3\n')
    gateway = pair(api_keys_file=str(keys))
    auth = {"authorization": "Bearer sk-limited"}
    answers = [
        _post(gateway, "/tokenize", {"inputs": "x", "model": "tiny-m3"}, **auth),
        _post(gateway, "/decode", {"ids": [5], "model": "minilm"}, **auth),
        _post(gateway, "/tokenize", {"inputs": "x", "model": "minilm"}, **auth),
        _post(gateway, "/decode", {"ids": [5], "model": "tiny-m3"}, **auth),
        _post(gateway, "/tokenize", {"inputs": "y", "model": "tiny-m3"}, **auth),
    ]
    codes = [answer.status_code for answer in answers]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert refused, codes
    assert _is_tei_error(refused[0]) and "retry-after" in refused[0].headers, refused[0].text
    anonymous = httpx.get(f"{gateway.url}/info", params={"model": "tiny-m3"}, timeout=10)
    assert anonymous.status_code == 401 and _is_tei_error(anonymous), anonymous.text


# --------------------------------------------------------------------------------------------------
# The cache: entries per model
# --------------------------------------------------------------------------------------------------


def test_one_folder_served_with_two_limits_never_shares_cache_entries(
    serve: Serve, minilm_dir: Path, minilm_encoder: Any, redis_server: RedisServer
) -> None:
    """Held attack (real Redis). The same folder twice, truncating at 16 and at 256 tokens, plus a
    twin of the 256 one: a long text's vector is each model's own (the 16-token one is never read
    for the 256-token model, nor the reverse), while the true twin shares the 256-token entry."""
    from encoder import load_encoder

    short = load_encoder(str(minilm_dir), truncate=True, max_tokens=16)
    tables = [
        _minilm(minilm_dir, name="short", max_input_tokens=16),
        _minilm(minilm_dir, name="long"),
        _minilm(minilm_dir, name="twin"),
    ]
    gateway = serve(tables, [short, minilm_encoder, minilm_encoder], redis_url=redis_server.url)
    first = _post(gateway, "/v1/embeddings", {"input": [LONG], "model": "short"})
    assert first.headers["x-cache-misses"] == "1"
    long = _post(gateway, "/v1/embeddings", {"input": [LONG], "model": "long"})
    assert long.headers["x-cache-misses"] == "1", "the 16-token model's vector must not be served as 256's"
    np.testing.assert_allclose(_vectors(first), short.embed([LONG]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_vectors(long), minilm_encoder.embed([LONG]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(_vectors(first), _vectors(long), atol=1e-3)
    deadline = time.monotonic() + 5
    while True:
        twin = _post(gateway, "/v1/embeddings", {"input": [LONG], "model": "twin"})
        if twin.headers["x-cache-hits"] == "1" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert twin.headers["x-cache-hits"] == "1", "the twin (same files, same limit) shares the entry"
    np.testing.assert_array_equal(_vectors(twin), _vectors(long))


def test_health_is_degraded_when_a_second_models_cache_writes_fail(
    pair: Serve, redis_server: RedisServer, tmp_path: Path
) -> None:
    """FINDING (low-medium, health lies). Runtime.cache_status reads writes_failing of the default
    model's service only (runtime.service), and live_state's pending_cache_writes counts only its
    writes too. Against a read-only replica, traffic that goes to the second model fails every
    write (counted in /stats cache errors) while /health keeps saying "ok" until the breaker's write
    circuit opens (3 failures); the README promises "degraded" while writes fail (issue 14 row 9).
    Expected: /health cache status "degraded" once tiny-m3's write failed. Got: "ok"."""
    replica = RedisServer(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(redis_server.port))
    replica.start()
    try:
        gateway = pair(redis_url=replica.url)
        answer = _post(gateway, "/v1/embeddings", {"input": [f"replica {uuid.uuid4().hex}"], "model": "tiny-m3"})
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 5
        while httpx.get(f"{gateway.url}/stats", timeout=10).json()["cache"]["errors"] < 1:
            assert time.monotonic() < deadline, "the refused write never showed in /stats"
            time.sleep(0.05)
        assert _runtime(gateway).models[1].service.writes_failing
        health = httpx.get(f"{gateway.url}/health", timeout=10).json()
        assert health["cache"]["status"] == "degraded", health
    finally:
        replica.stop()


# --------------------------------------------------------------------------------------------------
# Concurrency, stats and the shared forward thread
# --------------------------------------------------------------------------------------------------


def test_mixed_concurrent_traffic_gets_each_models_vectors_and_stats_add_up(
    pair: Serve, minilm_encoder: Any, tiny_encoder: Any
) -> None:
    """Held attack. Six clients at once, alternating models over a small pool of texts (so hits and
    misses mix, and passes of both models queue on the shared thread): every answer is its model's
    vectors; /stats' models add up to the server's inputs, tokens and cache lookups; the metrics
    agree with /stats; every model's queue is back at 0."""
    gateway = pair()
    pool = [f"pooled text number {i} about caches" for i in range(6)]
    expected = {"minilm": minilm_encoder.embed(pool), "tiny-m3": tiny_encoder.embed(pool)}
    failures: list[str] = []

    def client(number: int) -> None:
        for step in range(4):
            model = ("minilm", "tiny-m3")[(number + step) % 2]
            chosen = [(number + step + k) % len(pool) for k in range(3)]
            answer = _post(gateway, "/v1/embeddings", {"input": [pool[i] for i in chosen], "model": model})
            if answer.status_code != 200 or answer.json()["model"] != model:
                failures.append(f"{model}: {answer.status_code} {answer.text[:200]}")
                continue
            if not np.allclose(_vectors(answer), expected[model][chosen], rtol=1e-4, atol=1e-5):
                failures.append(f"{model}: wrong vectors for {chosen}")

    threads = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    models = {entry["model"]: entry for entry in stats["models"]}
    assert set(models) == {"minilm", "tiny-m3"}
    assert sum(entry["inputs"] for entry in models.values()) == stats["inputs"] == 6 * 4 * 3
    assert sum(entry["tokens"] for entry in models.values()) == stats["tokens"]
    assert sum(entry["cache_hits"] for entry in models.values()) == stats["cache"]["hits"]
    assert sum(entry["cache_misses"] for entry in models.values()) == stats["cache"]["misses"]
    assert all(entry["queue_tokens"] == 0 for entry in models.values()), models
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for name, entry in models.items():
        assert f'embedding_model_inputs_total{{model="{name}"}} {float(entry["inputs"])}' in metrics
        assert f'embedding_model_cache_misses_total{{model="{name}"}} {float(entry["cache_misses"])}' in metrics


def test_a_stop_with_passes_queued_for_both_models_ends_the_shared_thread(
    minilm_dir: Path, tiny_bge_m3_dir: Path, minilm_encoder: Any, tiny_encoder: Any, tmp_path: Path
) -> None:
    """Held attack. Bulk requests for both models in flight, then the server stops: it stops within
    its bound, no client gets a 5xx other than 503, and the shared forward thread has ended."""
    tables = [_minilm(minilm_dir), _tiny(tiny_bge_m3_dir)]
    settings = Settings(models_file=str(_write(tmp_path, tables)), cache=False, shutdown_timeout_s=5)
    gateway = ThreadedGateway(create_app(settings, encoders=[minilm_encoder, tiny_encoder])).__enter__()
    shared = _runtime(gateway).models[0].batcher._forward._owner._thread
    assert shared.is_alive()
    codes: list[object] = []
    bulk = [f"{i} " + "alpha beta gamma delta " * 12 for i in range(48)]

    def client(model: str) -> None:
        try:
            codes.append(_post(gateway, "/v1/embeddings", {"input": bulk, "model": model}, timeout=20).status_code)
        except httpx.HTTPError as exc:
            codes.append(type(exc).__name__)

    clients = [threading.Thread(target=client, args=(m,)) for m in ("minilm", "tiny-m3", "minilm", "tiny-m3")]
    for thread in clients:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    gateway.__exit__(None, None, None)
    for thread in clients:
        thread.join(timeout=20)
    assert not gateway.thread.is_alive() and time.monotonic() - started < 20
    assert not any(isinstance(code, int) and code >= 500 and code != 503 for code in codes), codes
    shared.join(timeout=5)
    assert not shared.is_alive(), "the shared forward thread outlived the server"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's SystemExit(3)
def test_a_start_that_fails_on_the_second_model_leaves_no_forward_thread(
    minilm_dir: Path, minilm_encoder: Any, tmp_path: Path
) -> None:
    """FINDING (low, leak). app.py lifespan: _local_models starts model 1's micro-batcher and the
    device's SharedForward thread, then loads model 2 (create_app given fewer encoders than
    tables, as any embedder of create_app does); when that load fails, the exception leaves the
    lifespan before its try/finally, so nothing stops the batcher or the forward thread: a daemon
    thread parked on its condition forever, per failed start (a retry loop piles them up).
    Expected: no encoder-forward thread left once the failed start has returned. Got: one leaked."""
    broken = tmp_path / "broken-model"
    broken.mkdir()  # no config.json: load_model fails at once
    tables = [_minilm(minilm_dir), {"name": "broken", "path": broken}]
    settings = Settings(models_file=str(_write(tmp_path, tables)), cache=False)
    before = _forward_threads()
    gateway = ThreadedGateway(create_app(settings, encoders=[minilm_encoder]))
    with pytest.raises(RuntimeError, match="failed to start"):
        gateway.__enter__()
    gateway.thread.join(timeout=10)
    time.sleep(0.2)
    left = [thread for thread in _forward_threads() - before if thread.is_alive()]
    for thread in left:  # stop what leaked, so that the rest of the session does not carry it
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if owner is not None:
            owner.shutdown()
    assert not left, f"leaked after a failed start: {[thread.name for thread in left]}"


def test_a_decoder_embedder_beside_an_encoder_gets_its_own_vectors_and_pooling(
    serve: Serve, minilm_dir: Path, minilm_encoder: Any, tmp_path: Path
) -> None:
    """Held attack. A last-token decoder (left padding) and MiniLM (mean pooling) on one shared
    forward thread: each request gets its own model's vectors, /info?model= names each pooling."""
    from encoder import load_encoder
    from support.factories import build_decoder_embedder

    folder = build_decoder_embedder(tmp_path / "decoder")
    decoder = load_encoder(str(folder), device="cpu")
    gateway = serve([_minilm(minilm_dir), {"name": "qwen3-like", "path": folder}], [minilm_encoder, decoder])
    batch = [*TEXTS, "a much longer third text so that the batch needs padding on one side"]
    ours = _vectors(_post(gateway, "/v1/embeddings", {"input": batch, "model": "qwen3-like"}))
    np.testing.assert_allclose(ours, decoder.embed(batch), rtol=1e-4, atol=1e-5)
    mine = _vectors(_post(gateway, "/v1/embeddings", {"input": batch}))
    np.testing.assert_allclose(mine, minilm_encoder.embed(batch), rtol=1e-4, atol=1e-5)
    info = httpx.get(f"{gateway.url}/info", params={"model": "qwen3-like"}, timeout=10).json()
    assert info["model_type"]["embedding"]["pooling"] == "last_token"
    assert httpx.get(f"{gateway.url}/info", timeout=10).json()["model_type"]["embedding"]["pooling"] == "mean"


def test_a_model_name_with_quotes_and_backslashes_is_escaped_in_metrics(
    serve: Serve, minilm_dir: Path, tiny_bge_m3_dir: Path, minilm_encoder: Any, tiny_encoder: Any
) -> None:
    """Held attack. A served id with a quote, a backslash and a newline-like escape is a valid
    Prometheus label value in /metrics (the exposition parses, the value round-trips)."""
    from prometheus_client.parser import text_string_to_metric_families

    odd = 'team "a"\\tiny'
    gateway = serve([_minilm(minilm_dir), {**_tiny(tiny_bge_m3_dir), "name": odd}], [minilm_encoder, tiny_encoder])
    assert _post(gateway, "/v1/embeddings", {"input": "x", "model": odd}).json()["model"] == odd
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    labels = {
        sample.labels.get("model")
        for family in text_string_to_metric_families(text)
        if family.name == "embedding_model_inputs"
        for sample in family.samples
    }
    assert odd in labels, labels


# --------------------------------------------------------------------------------------------------
# The models file and the commands that read it
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[models]]\nname = 'a'\npath = 'x'\naliases = 'b'\n", "'aliases'"),
        ("[[models]]\nname = 'a'\npath = 'x'\nmax_input_tokens = -1\n", "'max_input_tokens'"),
        ("[[models]]\nname = 5\npath = 'x'\n", "'name'"),
        ("models = [1]\n", "is not a table"),
        ("[models]\nname = 'a'\npath = 'x'\n", "no [[models]] tables"),
        ("[[models]]\nname = 'a'\npath = 'x'\ntruncate = 'yes'\n", "'truncate'"),
        ("[[models]]\nname = 'a'\npath = 'x'\ndtype = 'int4'\n", "'dtype'"),
        ("[[models]]\nname = 'a'\npath = 'x'\naliases = ['b', 'b']\n", "'b'"),
        ("[[models]]\nname = 'a'\npath = 'x'\naliases = ['a']\n", "'a'"),
        ("[[models]]\nname = 'a'\npath = 'x'\nrevision = 2024-01-01\n", "'revision'"),
        ("".join(f"[[models]]\nname = 'm{i}'\npath = 'x'\n" for i in range(MAX_MODELS + 1)), "at most"),
    ],
)
def test_bad_models_files_are_one_line_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    """Held attack. Wrong types, a non-table entry, a single [models] table, duplicate or
    self-naming aliases, a TOML date, too many tables: each one ModelsFileError line, never a
    traceback or a start."""
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelsFileError) as caught:
        read_models_file(path, Settings())
    message = str(caught.value)
    assert expected in message and "\n" not in message and "EMBED_MODELS_FILE" in message, message


def test_device_and_dtype_in_any_case_are_taken(tmp_path: Path) -> None:
    """Held attack. 'CPU' and 'Float32' are what the EMBED_* settings take in lower case."""
    path = tmp_path / "models.toml"
    path.write_text("[[models]]\nname = 'a'\npath = 'x'\ndevice = 'CPU'\ndtype = 'Float32'\n")
    (model,) = read_models_file(path, Settings())
    assert (model.device, model.dtype, model.models_file) == ("cpu", "float32", "")


def test_a_models_file_under_an_unknown_home_is_one_line_not_a_traceback() -> None:
    """FINDING (low, start-up). model_settings() does Path(...).expanduser() outside the try that
    turns OSError into ModelsFileError; '~someone/models.toml' for a user this machine does not know
    raises RuntimeError('Could not determine home directory.'), which preflight (it catches only
    ModelsFileError) lets through: `serve` dies with a traceback instead of one line and exit 2.
    Expected: preflight returns one line naming EMBED_MODELS_FILE. Got: RuntimeError."""
    from gateway.cli import preflight

    problem = preflight(Settings(models_file="~no-such-user-for-review/models.toml"))
    assert problem is not None and "EMBED_MODELS_FILE" in problem and "\n" not in problem, problem


def test_check_checks_the_models_of_the_models_file(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """FINDING (low-medium, operator tooling). README: `embedding-gateway check` (same flags as
    `serve`) "exits 0 when the configured server can run here". cli._check only resolves
    EMBED_MODEL and ignores EMBED_MODELS_FILE: with a file whose second model's folder is missing
    (serve: exit 2, "model 'broken'"), check prints EMBED_MODEL's line and exits 0 (and with
    EMBED_MODEL left at its default it reports BAAI/bge-m3, a model the server would not load).
    Expected: a FAIL line for model 'broken' and a non-zero exit. Got: exit 0."""
    from gateway.cli import main, preflight

    tables = [_minilm(minilm_dir), {"name": "broken", "path": tmp_path / "missing-model"}]
    path = _write(tmp_path, tables)
    assert preflight(Settings(models_file=str(path))) is not None  # serve refuses this file
    monkeypatch.setenv("EMBED_MODELS_FILE", str(path))
    monkeypatch.setenv("EMBED_MODEL", str(minilm_dir))
    monkeypatch.setenv("EMBED_REDIS_URL", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["check"])
    out = capsys.readouterr().out
    assert code != 0 and "broken" in out, f"exit {code}:\n{out}"
