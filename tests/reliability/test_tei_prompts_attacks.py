"""Outside review of instruction prompts (c6bdc0e), TEI's routes (9eab8a7, e6c220b) and decoder
embedders (79cef96): reproductions. A failing test is a finding; its docstring says expected vs got.

Everything runs in process (tests.servers.ThreadedGateway over gateway.create_app) on the shared
all-MiniLM-L6-v2 folder or small copies of it; each test is bounded in time and load.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import Settings, create_app
from tests.servers import ThreadedGateway

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["how do vector caches work", "Redis keeps the vectors for a week"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _with_prompts(source: Path, folder: Path, prompts: dict[str, str], **extra: Any) -> Path:
    shutil.copytree(source, folder)
    config_file = folder / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["prompts"] = prompts
    config.update(extra)
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def prompted_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_prompts(minilm_dir, tmp_path_factory.mktemp("attack-prompted") / "model", PROMPTS)


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
    def start(encoder: Any = None, **overrides: Any) -> Any:
        return serve_app(encoder or prompted_encoder, **{"model_name": "prompted", **overrides})

    return start


def _post(gateway: ThreadedGateway, path: str, body: Any, timeout: float = 30, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=timeout)


def _openai_vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float64)


def _is_tei_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and set(body) == {"error", "error_type"}
        and isinstance(body["error"], str)
        and body["error_type"] in ("Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty")
    )


# --------------------------------------------------------------------------------------------------
# Vectors: prompts against sentence-transformers
# --------------------------------------------------------------------------------------------------


def st_model_path(st_model: Any) -> Path:
    return Path(st_model[0].auto_model.config._name_or_path)


def test_a_truncated_prompted_long_text_equals_sentence_transformers(serve: Any, st_model: Any) -> None:
    """Held attack. Truncation on, a prompt and a text far over 256 tokens: the prompt must be kept
    (right truncation) and the vector equal ST's encode(prompt_name=...) at the same max_seq_length;
    usage counts the 256 tokens actually embedded."""
    gateway = serve(truncate=True)
    long_text = " ".join(f"word{i % 50} alpha beta" for i in range(400))
    answer = _post(gateway, "/v1/embeddings", {"input": [long_text], "prompt_name": "query"})
    ours = _openai_vectors(answer)
    expected = st_model.encode([long_text], prompt_name="query", convert_to_numpy=True).astype(np.float64)
    assert _cosines(ours, expected).min() >= 0.99999
    assert answer.json()["usage"]["prompt_tokens"] == st_model.max_seq_length
    tei = np.array(_post(gateway, "/embed", {"inputs": long_text, "prompt_name": "query"}).json())
    np.testing.assert_allclose(tei, ours, rtol=1e-6, atol=1e-7)
    # a lower EMBED_MAX_INPUT_TOKENS and ST at the same max_seq_length
    from encoder import load_encoder

    encoder = load_encoder(str(st_model_path(st_model)), truncate=True, max_tokens=24)  # what the app loads
    gateway = serve(encoder=encoder, truncate=True, max_input_tokens=24)
    short = _openai_vectors(_post(gateway, "/v1/embeddings", {"input": [long_text], "input_type": "query"}))
    saved = st_model.max_seq_length
    try:
        st_model.max_seq_length = 24
        expected = st_model.encode([long_text], prompt_name="query", convert_to_numpy=True).astype(np.float64)
    finally:
        st_model.max_seq_length = saved
    assert _cosines(short, expected).min() >= 0.99999


def test_a_prompt_that_pushes_an_input_over_the_limit_is_refused_with_truncation_off(serve: Any) -> None:
    """Held attack. 253 'word's give 255 tokens (fits 256); 'query: ' adds 2 tokens (257): with
    truncation off the prompted input must be refused (400 context_length_exceeded / TEI 413)
    naming the prompted count, never silently cut."""
    gateway = serve()
    text = "word " * 253
    assert _post(gateway, "/v1/embeddings", {"input": text}).status_code == 200
    refused = _post(gateway, "/v1/embeddings", {"input": text, "prompt_name": "query"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert "257" in refused.json()["error"]["message"], refused.json()
    tei = _post(gateway, "/embed", {"inputs": text, "prompt_name": "query"})
    assert tei.status_code == 413 and _is_tei_error(tei), tei.text


def test_include_prompt_false_pooling_gives_sentence_transformers_vectors_or_refuses_the_model(
    minilm_dir: Path, tmp_path: Path
) -> None:
    """FINDING (wrong vectors, silently). sentence-transformers' Pooling has ``include_prompt``
    (INSTRUCTOR-style models ship ``"include_prompt": false``): with it false, ST leaves the prompt's
    tokens out of the mean. The gateway never reads it (grep include_prompt: nothing), prepends the
    prompt and pools over it.
    Expected: the vector of ST's encode(prompt_name='query') (cosine >= 0.99999), or the model refused
    at start with a clear message. Got: a 200 with a different vector (and the cache sharing
    'query: x' with prompt 'query' + 'x' is then wrong as well)."""
    from sentence_transformers import SentenceTransformer

    from encoder import load_encoder

    folder = _with_prompts(minilm_dir, tmp_path / "model", PROMPTS)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["include_prompt"] = False
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    from gateway.cli import preflight

    settings = Settings(model=str(folder), model_name="noprompt-pool")
    problem = preflight(settings)  # the start's one-line check (exit 2): a refusal is an acceptable answer
    if problem is not None:
        assert "include_prompt" in problem and "\n" not in problem, problem
        return
    encoder = load_encoder(str(folder), truncate=True)
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        ours = _openai_vectors(_post(gateway, "/v1/embeddings", {"input": TEXTS, "prompt_name": "query"}))
    st = SentenceTransformer(str(folder), device="cpu")
    expected = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True).astype(np.float64)
    cosine = float(_cosines(ours, expected).min())
    assert cosine >= 0.99999, f"include_prompt=false ignored: cosine to ST {cosine:.5f}"


def test_prompted_and_pre_prefixed_texts_share_one_cache_entry_correctly(serve: Any, st_model: Any) -> None:
    """Held attack. 'query: x' sent plain and 'x' with prompt 'query' are the same encoder input
    (include_prompt true): sharing the cache entry is right; both equal ST."""
    gateway = serve()
    plain = _post(gateway, "/v1/embeddings", {"input": [PROMPTS["query"] + t for t in TEXTS]})
    prompted = _post(gateway, "/v1/embeddings", {"input": TEXTS, "prompt_name": "query"})
    assert prompted.headers["x-cache-hits"] == str(len(TEXTS))
    np.testing.assert_array_equal(_openai_vectors(plain), _openai_vectors(prompted))
    assert plain.json()["usage"] == prompted.json()["usage"]
    expected = st_model.encode(TEXTS, prompt_name="query", convert_to_numpy=True).astype(np.float64)
    assert _cosines(_openai_vectors(prompted), expected).min() >= 0.99999


def test_token_id_inputs_get_the_prompt_once_and_count_it(serve: Any, st_model: Any, tiktoken_cache: Path) -> None:
    """Held attack. cl100k ids are decoded to text, then prompted once (not twice, not skipped);
    the vector equals the prompted text's, usage counts the prompt's tokens."""
    import tiktoken

    gateway = serve()
    ids = tiktoken.get_encoding("cl100k_base").encode(TEXTS[0])
    by_ids = _post(gateway, "/v1/embeddings", {"input": [ids], "prompt_name": "query"})
    by_text = _post(gateway, "/v1/embeddings", {"input": [TEXTS[0]], "prompt_name": "query"})
    np.testing.assert_array_equal(_openai_vectors(by_ids), _openai_vectors(by_text))
    counted = len(st_model.tokenizer(PROMPTS["query"] + TEXTS[0])["input_ids"])
    assert by_ids.json()["usage"]["prompt_tokens"] == counted
    one = _post(gateway, "/v1/embeddings", {"input": ids, "prompt_name": "query"})
    np.testing.assert_array_equal(_openai_vectors(one), _openai_vectors(by_text))


def test_cohere_and_voyage_input_types_and_an_empty_prompt(minilm_dir: Path, tmp_path: Path, serve: Any) -> None:
    """Held attack. A model with {'search_query': 'q: ', 'document': ''} (an empty prompt, as
    Qwen3-Embedding and nomic ship): input_type 'query' (Voyage) finds 'search_query'; 'passage'
    and 'search_document' find the empty 'document' prompt, which equals no prompt (same cache entry)."""
    from encoder import load_encoder

    folder = _with_prompts(minilm_dir, tmp_path / "model", {"search_query": "q: ", "document": ""})
    encoder = load_encoder(str(folder), truncate=True)
    gateway = serve(encoder=encoder, model_name="cohere-like")
    plain = _openai_vectors(_post(gateway, "/v1/embeddings", {"input": TEXTS}))
    for kind in ("document", "search_document", "passage"):
        got = _post(gateway, "/v1/embeddings", {"input": TEXTS, "input_type": kind})
        np.testing.assert_array_equal(_openai_vectors(got), plain)
        assert got.headers["x-cache-hits"] == str(len(TEXTS)), kind
    named = _openai_vectors(_post(gateway, "/v1/embeddings", {"input": TEXTS, "prompt_name": "search_query"}))
    voyage = _openai_vectors(_post(gateway, "/v1/embeddings", {"input": TEXTS, "input_type": "query"}))
    np.testing.assert_array_equal(voyage, named)
    tei = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "input_type": "search_query"}).json())
    np.testing.assert_array_equal(tei, named)


def test_prompts_on_sparse_and_multivector_equal_the_pre_prefixed_text(tiny_bge_m3_dir: Path, tmp_path: Path) -> None:
    """Held attack. /v1/embeddings/sparse, /multivector, /embed_sparse and /embed_all with a prompt
    give what the prompted text gives (the prompt applied once, through the same cache entries)."""
    from encoder import load_encoder

    folder = _with_prompts(tiny_bge_m3_dir, tmp_path / "model", {"query": "query: "})
    encoder = load_encoder(str(folder), truncate=True)
    settings = Settings(model=str(folder), model_name="tiny-bge-m3", cache_prefix=f"a-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        prefixed = ["query: " + t for t in TEXTS]
        for path in ("/v1/embeddings/sparse", "/v1/embeddings/multivector"):
            want = _post(gateway, path, {"input": prefixed})
            got = _post(gateway, path, {"input": TEXTS, "prompt_name": "query"})
            assert got.status_code == 200, got.text
            assert got.json()["data"] == want.json()["data"], path
            assert got.json()["usage"] == want.json()["usage"], path
        for path in ("/embed_sparse", "/embed_all"):
            want = _post(gateway, path, {"inputs": prefixed})
            got = _post(gateway, path, {"inputs": TEXTS, "prompt_name": "query"})
            assert got.status_code == 200 and got.json() == want.json(), path


# --------------------------------------------------------------------------------------------------
# TEI: /embed bodies and errors
# --------------------------------------------------------------------------------------------------


def test_tei_bodies_with_unknown_fields_and_teis_own_options_are_served(serve: Any) -> None:
    """Held attack. TEI clients add fields (huggingface_hub sends normalize, prompt_name, truncate,
    truncation_direction 'Right'); unknown ones are ignored as TEI does; normalize false on a
    normalising model stays unit length; dimensions with normalize false are not renormalised."""
    gateway = serve()
    body = {"inputs": TEXTS, "normalize": True, "truncate": False, "truncation_direction": "Right", "extra": [1, {}]}
    answer = _post(gateway, "/embed", body)
    assert answer.status_code == 200, answer.text
    raw = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "normalize": False}).json())
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)


def test_dimensions_with_normalize_false_are_not_renormalised(serve: Any) -> None:
    """FINDING (low, TEI semantics). TEI's /embed ``dimensions`` cuts the vector (Matryoshka) and
    ``normalize`` decides whether it is brought back to unit length; README: 'normalize: false
    returns what the model gives'. Here ``shorten`` always re-normalises (OpenAI's rule for
    text-embedding-3), so normalize false with dimensions still answers unit vectors.
    Expected: the first 8 values of the normalize-false vector. Got: them re-normalised."""
    gateway = serve()
    raw = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "normalize": False}).json())
    cut = np.array(_post(gateway, "/embed", {"inputs": TEXTS, "normalize": False, "dimensions": 8}).json())
    np.testing.assert_allclose(cut, raw[:, :8], rtol=1e-5)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ""},
        {"inputs": []},
        {"inputs": [""]},
        {"inputs": ["x", ""]},
        {"inputs": None},
        {},
        {"inputs": "x", "normalize": "no"},
        {"inputs": "x", "dimensions": 0},
        {"inputs": "x", "dimensions": -1},
        {"inputs": "x", "dimensions": 2**70},
        {"inputs": [[]]},
        {"inputs": [1, "x"]},
        {"inputs": "x", "prompt_name": ""},
        {"inputs": "x", "input_type": ""},
        {"inputs": "x", "truncation_direction": "middle"},
        [],
        "x",
    ],
)
def test_bad_tei_bodies_get_a_4xx_in_teis_shape(serve: Any, body: Any) -> None:
    """Held attack. Empty, null, wrong-typed and out-of-range bodies: a 4xx in TEI's two-field
    shape on /embed, never a 5xx or OpenAI's envelope."""
    gateway = serve()
    answer = _post(gateway, "/embed", body)
    assert 400 <= answer.status_code < 500 and _is_tei_error(answer), (answer.status_code, answer.text)


def test_over_max_inputs_on_embed_is_teis_413(serve: Any) -> None:
    """FINDING (low, TEI compatibility). TEI answers a batch over max_client_batch_size (which /info
    reports) with 413 Validation ('batch size N > maximum allowed batch size M'), and the module's
    docstring says 413 is for what is too large.
    Expected: 413 in TEI's shape. Got: 422."""
    gateway = serve(max_inputs=4)
    answer = _post(gateway, "/embed", {"inputs": ["a"] * 5})
    assert _is_tei_error(answer), answer.text
    assert answer.status_code == 413, (answer.status_code, answer.text)


def test_an_explicit_truncate_false_on_a_truncating_server_is_not_silently_truncated(serve: Any) -> None:
    """FINDING (medium: silently wrong vector for what the client asked). A TEI client sends
    ``truncate: false`` to get an error rather than the vector of a prefix (TEI: 413 'inputs must
    have less than 256 tokens'). On a server with EMBED_TRUNCATE=true the field is ignored and the
    vector of the first 256 tokens comes back with 200: the client believes it is the whole text's.
    The routes refuse ``dimensions`` on sparse for this very reason ('a client must never get a
    full-width answer it believes was shortened').
    Expected: 413/422 in TEI's shape when truncate is false and the input is over the limit.
    Got: 200 with the truncated vector."""
    gateway = serve(truncate=True)
    answer = _post(gateway, "/embed", {"inputs": "word " * 600, "truncate": False})
    assert answer.status_code in (413, 422) and _is_tei_error(answer), (answer.status_code, answer.text[:200])


def test_a_body_over_the_byte_limit_on_a_tei_route_is_teis_413(serve: Any) -> None:
    """FINDING (low, shape). A body over EMBED_MAX_BODY_BYTES on /embed: TEI's clients read
    {"error", "error_type"} and the OpenAPI document promises TeiError for 413 on this route.
    Expected: 413 in TEI's shape. Got: see the assertion (OpenAI's envelope if it fails)."""
    gateway = serve(max_body_bytes=2048)
    answer = _post(gateway, "/embed", {"inputs": ["x" * 100] * 50})
    assert answer.status_code == 413, answer.text
    assert _is_tei_error(answer), answer.text


def test_overload_on_embed_is_429_with_retry_after_in_teis_shape(serve: Any) -> None:
    """Held attack. EMBED_MAX_QUEUE_TOKENS tiny: an embed that cannot be queued is 429 Overloaded
    with Retry-After, TEI's shape; never a 5xx."""
    gateway = serve(max_queue_tokens=8)
    answer = _post(gateway, "/embed", {"inputs": ["word " * 100] * 4})
    assert answer.status_code in (200, 429), answer.text
    if answer.status_code == 429:
        assert _is_tei_error(answer) and answer.json()["error_type"] == "Overloaded", answer.text
        assert int(answer.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------------------------------
# TEI: auth and key limits
# --------------------------------------------------------------------------------------------------


def _keys_file(tmp_path: Path, **limits: int) -> str:
    lines = ["[[keys]]", 'name = "limited"', 'key = "sk-limited"']
    lines += [f"{field} = {value}" for field, value in limits.items()]
    path = tmp_path / "keys.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("path", ["/embed", "/tokenize", "/decode", "/info"])
def test_a_missing_key_on_a_tei_route_is_answered_in_the_documented_shape(serve: Any, path: str) -> None:
    """FINDING (low, contract). The OpenAPI document gives TEI's routes a 401 response with schema
    TeiError (its description says "OpenAI's envelope"; the document contradicts itself). The
    ApiKeyMiddleware answers before the TEI router's handler, in OpenAI's envelope.
    Expected: the body the document's schema describes ({"error": str, "error_type": ...}).
    Got: {"error": {"message", "type", "param", "code"}}."""
    gateway = serve(api_keys="sk-tei")
    body = {"/embed": {"inputs": "x"}, "/tokenize": {"inputs": "x"}, "/decode": {"ids": [2023]}}.get(path)
    answer = httpx.get(f"{gateway.url}{path}", timeout=10) if body is None else _post(gateway, path, body)
    assert answer.status_code == 401
    assert _is_tei_error(answer), answer.text


def test_requests_per_minute_on_embed_is_429_in_teis_shape(serve: Any, tmp_path: Path) -> None:
    """FINDING (low-medium, shape). Over a key's requests_per_minute on /embed the middleware answers
    429 in OpenAI's envelope while over its tokens_per_minute the route answers TEI's shape: a TEI
    client sees two shapes for one status, and the OpenAPI document promises TeiError for 429.
    Expected: 429 + Retry-After in TEI's shape (error_type Overloaded). Got: OpenAI's envelope."""
    gateway = serve(api_keys_file=_keys_file(tmp_path, requests_per_minute=2))
    auth = {"authorization": "Bearer sk-limited"}
    answers = [_post(gateway, "/embed", {"inputs": f"t{i}"}, **auth) for i in range(5)]
    refused = [a for a in answers if a.status_code == 429]
    assert refused, [a.status_code for a in answers]
    assert "retry-after" in refused[0].headers
    assert _is_tei_error(refused[0]), refused[0].text


def test_tokens_per_minute_is_charged_on_embed_with_the_prompt(serve: Any, tmp_path: Path) -> None:
    """Held attack. tokens_per_minute charges the prompted tokens on /embed: 'word ' * 40 is 42
    tokens, 44 with 'query: '; a 43-token limit lets the plain text in and refuses the prompted
    one (more than the whole limit: 4xx, not a wait)."""
    gateway = serve(api_keys_file=_keys_file(tmp_path, tokens_per_minute=43))
    auth = {"authorization": "Bearer sk-limited"}
    prompted = _post(gateway, "/embed", {"inputs": "word " * 40, "prompt_name": "query"}, **auth)
    assert 400 <= prompted.status_code < 500 and _is_tei_error(prompted), prompted.text
    plain = _post(gateway, "/embed", {"inputs": "word " * 40}, **auth)
    assert plain.status_code == 200, plain.text


def test_a_limited_key_cannot_use_tokenize_without_limit(serve: Any, tmp_path: Path) -> None:
    """FINDING (medium, abuse). /tokenize and /decode are not 'embedding' routes, so a key's
    requests_per_minute never applies: a key limited to 2 requests a minute tokenises (up to 32 MiB
    a request, no token bound) as often as it likes; README says the TEI routes go 'through the
    same ... auth, limits'.
    Expected: a 429 once the key's 2 requests a minute are spent. Got: 200 every time."""
    gateway = serve(api_keys_file=_keys_file(tmp_path, requests_per_minute=2))
    auth = {"authorization": "Bearer sk-limited"}
    codes = [_post(gateway, "/tokenize", {"inputs": f"text {i}"}, **auth).status_code for i in range(6)]
    assert 429 in codes, codes


# --------------------------------------------------------------------------------------------------
# TEI: /tokenize, /decode, /info
# --------------------------------------------------------------------------------------------------


def test_tokenize_with_a_prompt_has_pieces_that_match_their_offsets(serve: Any) -> None:
    """Held attack. /tokenize with prompt_name tokenises the prompted text; each piece's text is the
    prompted text's bytes [start:stop] and the ids equal what the encoder embeds."""
    gateway = serve()
    text = "café ☕ naïve Ünïcödé"
    tokens = _post(gateway, "/tokenize", {"inputs": [text], "prompt_name": "query"}).json()[0]
    prompted = (PROMPTS["query"] + text).encode()  # TEI's offsets are UTF-8 byte offsets
    for token in tokens:
        if not token["special"]:
            assert token["text"] == prompted[token["start"] : token["stop"]].decode(), token
    assert tokens[1]["text"] == "query", "the prompt is tokenised in front"


def test_tokenize_offsets_are_teis_utf8_byte_offsets(serve: Any) -> None:
    """FINDING (low, TEI compatibility). TEI's /tokenize answers start/stop as UTF-8 *byte* offsets
    of the (prompted) input (router: ``input.bytes().skip(start).take(stop - start)``, offsets of
    the Rust tokenizer's encode). We answer Python *character* offsets, so a TEI client slicing the
    input's bytes (for highlighting, chunk boundaries) is off after the first non-ASCII character.
    Expected: prompted.encode()[start:stop].decode() == text. Got: character offsets."""
    gateway = serve()
    text = "café ☕ naïve"
    tokens = _post(gateway, "/tokenize", {"inputs": text}).json()[0]
    raw = text.encode()
    wrong = [
        t for t in tokens if not t["special"] and raw[t["start"] : t["stop"]].decode(errors="replace") != t["text"]
    ]
    assert not wrong, wrong


def test_tokenize_is_bounded_by_the_request_token_limit(serve: Any) -> None:
    """FINDING (medium, resource). /tokenize tokenises without truncation and without any token
    bound: EMBED_MAX_REQUEST_TOKENS ('tokens per request, all inputs together') is not applied, and
    TEI itself refuses inputs over max_input_length x 250 characters. Each token becomes ~55 bytes
    of JSON (and a Python object), so a 32 MiB body of 'a ' answers ~900 MB.
    Expected (with EMBED_MAX_REQUEST_TOKENS=1000): a 413/422 for 3,000 tokens. Got: 200."""
    gateway = serve(max_request_tokens=1000)
    answer = _post(gateway, "/tokenize", {"inputs": "a " * 3000})
    assert answer.status_code in (413, 422) and _is_tei_error(answer), (answer.status_code, len(answer.content))


@pytest.mark.parametrize(
    "body",
    [
        {"ids": []},
        {"ids": [[]]},
        {"ids": [[], [2023]]},
        {"ids": [-1]},
        {"ids": [2**64]},
        {"ids": [2**31]},
        {"ids": [1.5]},
        {"ids": [True]},
        {"ids": [[2023], 2023]},
        {"ids": [[[2023]]]},
        {"ids": "2023"},
        {},
    ],
)
def test_decode_edge_cases_are_4xx_in_teis_shape(serve: Any, body: dict[str, Any]) -> None:
    """Held attack. Empty, nested-empty, negative, huge, float, bool, mixed and deeper ids: a 4xx in
    TEI's shape, never a 5xx."""
    gateway = serve()
    answer = _post(gateway, "/decode", body)
    assert 400 <= answer.status_code < 500 and _is_tei_error(answer), (answer.status_code, answer.text)


def test_a_huge_decode_does_not_stall_the_event_loop(serve: Any) -> None:
    """FINDING (medium, availability). /decode runs its range check and ``tokenizer.batch_decode`` on
    the event loop (no to_thread, unlike /tokenize), with no bound on one list's length: one 32 MiB
    body of ids (~6M) blocks every other request of the worker, probes included, for seconds.
    Expected: /health answers within 1 s while a 2.5M-id /decode runs. Got: it waits for the decode."""
    gateway = serve()
    body = ('{"ids": [' + ",".join(["2023"] * 2_500_000) + "]}").encode()
    result: dict[str, Any] = {}

    def decode() -> None:
        result["answer"] = httpx.post(
            f"{gateway.url}/decode", content=body, headers={"content-type": "application/json"}, timeout=60
        )

    worker = threading.Thread(target=decode)
    worker.start()
    time.sleep(0.4)  # the body is on its way, then decoded
    worst = 0.0
    deadline = time.monotonic() + 10
    while worker.is_alive() and time.monotonic() < deadline:
        started = time.monotonic()
        httpx.get(f"{gateway.url}/health", timeout=30)
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    worker.join(60)
    assert result["answer"].status_code in (200, 413, 422)
    assert worst < 1.0, f"/health waited {worst:.2f} s behind one /decode"


def test_info_follows_teis_schema(serve: Any) -> None:
    """Held attack. /info: TEI's required fields with TEI's types; dtype as TEI names it."""
    info = httpx.get(f"{serve().url}/info", timeout=10).json()
    required = {
        "model_id": str,
        "model_dtype": str,
        "model_type": dict,
        "max_concurrent_requests": int,
        "max_input_length": int,
        "max_batch_tokens": int,
        "max_client_batch_size": int,
        "auto_truncate": bool,
        "tokenization_workers": int,
        "version": str,
    }
    for field, kind in required.items():
        assert isinstance(info.get(field), kind), (field, info.get(field))
    assert info["model_dtype"] in ("float32", "float16", "bfloat16"), info["model_dtype"]
    assert info["max_batch_requests"] is None or isinstance(info["max_batch_requests"], int)
    assert info["model_sha"] is None or isinstance(info["model_sha"], str)


def test_info_names_last_token_pooling_as_tei_does(tmp_path: Path) -> None:
    """FINDING (low, TEI compatibility). TEI's /info names the pooling 'cls', 'mean', 'splade' or
    'last_token' (its Pool's Display and serde name); a decoder embedder here reports 'lasttoken'
    (our internal name), which TEI clients that switch on the pooling (or validate the schema's enum)
    do not know.
    Expected: model_type.embedding.pooling == 'last_token'. Got: 'lasttoken'."""
    from encoder import load_encoder
    from support.factories import build_decoder_embedder

    folder = build_decoder_embedder(tmp_path / "model")
    encoder = load_encoder(str(folder), device="cpu")
    settings = Settings(model=str(folder), model_name="qwen3-like", cache_prefix=f"dec-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        info = httpx.get(f"{gateway.url}/info", timeout=10).json()
    assert info["model_type"]["embedding"]["pooling"] == "last_token", info["model_type"]


def test_a_truncated_decoder_embedder_keeps_the_eos_and_equals_sentence_transformers(tmp_path: Path) -> None:
    """Held attack. Last-token pooling reads the EOS the tokenizer appends; with truncation on and a
    long prompted text, the gateway must keep the EOS as the last token (as HF truncation does) and
    give ST's vector at the same max_seq_length."""
    from sentence_transformers import SentenceTransformer

    from encoder import load_encoder
    from support.factories import SAMPLE_LINES, build_decoder_embedder

    folder = build_decoder_embedder(tmp_path / "model")
    encoder = load_encoder(str(folder), device="cpu", truncate=True, max_tokens=48)  # as the app loads it
    long_text = " ".join(SAMPLE_LINES * 3)
    settings = Settings(
        model=str(folder), model_name="qwen3-like", truncate=True, max_input_tokens=48,
        cache_prefix=f"dec-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    with ThreadedGateway(create_app(settings, encoder=encoder)) as gateway:
        answer = _post(gateway, "/v1/embeddings", {"input": [long_text, "short"], "prompt_name": "query"}, timeout=60)
        ours = _openai_vectors(answer)
    st = SentenceTransformer(str(folder), device="cpu")
    st.max_seq_length = 48
    expected = st.encode([long_text, "short"], prompt_name="query", convert_to_numpy=True).astype(np.float64)
    assert _cosines(ours, expected).min() >= 0.99999


# --------------------------------------------------------------------------------------------------
# OpenAPI and routing
# --------------------------------------------------------------------------------------------------


def test_the_served_openapi_document_is_valid_and_matches_the_stored_one(serve: Any) -> None:
    """Held attack (openapi_spec_validator is not in .venv: structure only). The TEI paths, their
    bodies' component schemas resolve; the live document holds the same TEI paths as openapi.json."""
    gateway = serve()
    live = httpx.get(f"{gateway.url}/docs/openapi.json", timeout=10)
    assert live.status_code == 200, live.status_code
    document = live.json()
    stored = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
    for path in ("/embed", "/", "/embed_sparse", "/embed_all", "/tokenize", "/decode", "/info"):
        assert path in document["paths"], path
        assert document["paths"][path].keys() == stored["paths"][path].keys(), path
    schemas = document["components"]["schemas"]
    for name in ("TeiEmbed", "TeiEmbedOther", "TeiTokenize", "TeiDecode"):
        assert name in schemas, name
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(document)


def test_get_root_is_not_an_embedding_and_post_root_is(serve: Any) -> None:
    """Held attack. POST / is /embed; GET / is no embedding (404/405 or a page), never a 5xx."""
    gateway = serve()
    assert _post(gateway, "/", {"inputs": "x"}).status_code == 200
    got = httpx.get(f"{gateway.url}/", timeout=10)
    assert got.status_code < 500


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": ""},
        {"inputs": [""]},
        {"inputs": "x", "prompt_name": "nope"},
        {"inputs": "x", "add_special_tokens": "yes"},
        {"inputs": [1, 2]},
        {"inputs": ["x"] * 3000},
        {},
    ],
)
def test_tokenize_bad_bodies_are_4xx_in_teis_shape(serve: Any, body: dict[str, Any]) -> None:
    """Held attack unless it fails. Bad /tokenize bodies: a 4xx in TEI's shape, never a 5xx (an empty
    string is TEI's 'Empty' 4xx, or an empty token list; not a 5xx)."""
    gateway = serve()
    answer = _post(gateway, "/tokenize", body)
    if body in ({"inputs": ""}, {"inputs": [""]}):
        assert answer.status_code < 500, answer.text
        return
    assert 400 <= answer.status_code < 500 and _is_tei_error(answer), (answer.status_code, answer.text[:300])


@pytest.mark.parametrize("path", ["/embed", "/tokenize", "/v1/embeddings"])
def test_a_lone_surrogate_is_never_a_5xx(serve: Any, path: str) -> None:
    """Held attack unless it fails. JSON may carry an escaped lone surrogate ("\\ud800"), which no
    UTF-8 tokenizer takes: a 4xx (or a served vector), never a 5xx."""
    gateway = serve()
    field = "input" if path.startswith("/v1") else "inputs"
    body = (f'{{"{field}": ["ok \\ud800 text"], "prompt_name": "query"}}').encode()
    answer = httpx.post(f"{gateway.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code < 500, answer.text[:300]
