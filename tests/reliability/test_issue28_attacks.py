"""An adversarial review of the issue 28 fixes (b557e08..): exact tokenising on the tokenizer's
offsets, the request token limit, sparse/multivector options, /health, the cache generation.

A test that fails here is a finding that still holds; one that passes is an attack that the fixes
withstood (kept so that they keep withstanding it). Every test is bounded in time and memory (the
machine is shared): no test tokenises more than a few megabytes of text.

Findings (each has one failing test):

* F1 ``NO_SPACE_MARGIN`` is unsound for WordPiece: characters the normaliser removes (zero-width,
  combining marks, controls, soft hyphens) let a word of at most 100 normalised characters span more
  than 256 original ones, so its word-pieces are taken as final although the whole word is one
  ``[UNK]``. Truncating: a wrong vector (cached under the whole text's key). Strict: a 400 for a text
  that fits.
* F1b The same rule is unsound for Unigram (bge-m3's model): a run of one repeated character has
  many equally good segmentations and the Viterbi tie-break puts the odd piece *first*, so the
  parity of the run's full length decides its first token.
* F2 In truncating mode, a text with a space near its start followed by > 1M characters without a
  U+0020 (CJK, base64-ish, punctuation-separated data) is refused (400, with a false "those hold only
  4 tokens") although the whole text's first ``max_tokens`` tokens are its answer. Before the fix it
  got that answer.
* F3 The same texts are tokenised whole (up to 1M characters per input) to answer with their first
  256 tokens: ~1 GB of memory per MB of input and 63 s for one 32 MiB request, where b557e08 took
  1.7 s.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import xxhash
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from encoder import Encoder, load_encoder
from encoder.kinds import OutputKind
from encoder.model import MAX_READ_CHARS
from encoder.tokenizing import TooManyTokens, tokenize_exact
from gateway.core.outputs import DENSE
from gateway.core.service import cache_namespace
from tests.servers import RedisServer

DENSE_ONLY = frozenset({OutputKind.DENSE})


def _post(
    url: str, texts: list[str], route: str = "/v1/embeddings", timeout: float = 120, **extra: Any
) -> httpx.Response:
    return httpx.post(f"{url}{route}", json={"input": texts, **extra}, timeout=timeout)


def _whole_vector(encoder: Encoder, text: str) -> np.ndarray:
    """The vector of the whole text tokenised in one call, truncated to the model's limit, as
    sentence-transformers computes it (``tests/parity`` shows the encoder's forward pass is ST's)."""
    ids = encoder.tokenizer(text.strip(), truncation=True, max_length=encoder.max_tokens)["input_ids"]
    dense = encoder.encode_outputs([ids], DENSE_ONLY)[0].dense
    assert dense is not None
    return dense


# --------------------------------------------------------------------------------------------------
# F1: NO_SPACE_MARGIN with characters the WordPiece normaliser removes
# --------------------------------------------------------------------------------------------------


def _margin_text(piece_chars: int, *, strict: bool) -> str:
    """No U+0020 anywhere. 240 one-token pieces, then a word of 40 letters, zero-width spaces up to
    42 characters before the first cut (``piece_chars``), and 70 more letters: its normalised form is
    110 characters, one ``[UNK]`` in the whole text, but the first prefix holds 82 of them (word
    pieces ending more than 256 characters before the cut, so taken as final)."""
    filler = ",a" * 120
    head = "qz" * 20
    gap = "\u200b" * (piece_chars - 42 - len(filler) - len(head))
    return filler + head + gap + "qz" * 35 + ("" if strict else ",a" * 400)


def test_f1_truncating_vector_of_a_no_space_text_is_the_whole_texts(gateway_factory, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    text = _margin_text(minilm_encoder.max_chars, strict=False)
    whole = minilm_encoder.tokenizer(text, truncation=True, max_length=minilm_encoder.max_tokens)["input_ids"]
    assert minilm_encoder.tokenizer.unk_token_id in whole, "the whole text holds the [UNK] word"
    live = gateway_factory(truncate=True)
    answer = _post(live.url, [text])
    assert answer.status_code == 200, answer.text
    vector = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
    cosine = float(vector @ _whole_vector(minilm_encoder, text))
    assert cosine > 0.9999, f"cosine {cosine:.4f} to the whole text's vector (observed: 0.983)"
    assert minilm_encoder.tokenize([text], truncate=True) == [whole]


def test_f1_strict_accepts_a_no_space_text_that_fits(gateway_factory, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    text = _margin_text(minilm_encoder.max_chars, strict=True)
    tokens = len(minilm_encoder.tokenizer(text)["input_ids"])
    assert tokens <= minilm_encoder.max_tokens, f"{tokens} tokens: the whole text fits"
    live = gateway_factory(truncate=False)
    answer = _post(live.url, [text])
    # observed: 400 "input[0] has at least 282 tokens, more than this model's limit of 256 tokens"
    assert answer.status_code == 200, f"{tokens} tokens, yet: {answer.text}"
    vector = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
    assert float(vector @ _whole_vector(minilm_encoder, text)) > 0.9999


def _unigram(vocab: list[tuple[str, float]]) -> PreTrainedTokenizerFast:
    """An XLM-R-style tokenizer (NFKC, Metaspace, Unigram, <s> ... </s>) over ``vocab``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    tokenizer = Tokenizer(models.Unigram(specials + vocab, unk_id=3))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def test_f1b_unigram_run_of_one_character_keeps_its_first_token() -> None:
    """A constructed XLM-R-style vocabulary (NFKC, Metaspace, Unigram) with pieces of one repeated
    character, '=' and '=='; SentencePiece vocabularies commonly hold such runs (not checked against
    the real bge-m3 here: no copy offline). Every segmentation of an odd run into '==' and one '='
    scores the same; the Viterbi tie-break puts the '=' first, so the first token depends on the
    run's last character, however far away."""
    tokenizer = _unigram([("\u2581", -2.0), ("=", -5.0), ("==", -6.0)])
    text = "=" * 2001  # no space at all: the margin rule decides it from the first 512 characters
    whole = tokenizer(text, truncation=True, max_length=64)["input_ids"]
    got = tokenize_exact(tokenizer, [text], max_tokens=64, truncate=True, piece_chars=512, max_read=10**6)
    assert isinstance(got, list)
    assert got == [whole], (
        f"{tokenizer.convert_ids_to_tokens(whole)[:4]} vs {tokenizer.convert_ids_to_tokens(got[0])[:4]}"
    )


# --------------------------------------------------------------------------------------------------
# F2 / F3: an early space, then over a million characters without one
# --------------------------------------------------------------------------------------------------


def test_f2_truncating_embeds_a_long_text_whose_only_space_is_early(gateway_factory, minilm_encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    """1.2M characters, ~1.2M tokens: truncated, its first 256 tokens are its answer (b557e08: 200)."""
    text = "Attachment: " + "x," * 600_000
    live = gateway_factory(truncate=True)
    answer = _post(live.url, [text])
    # observed: 400 "input[0] is longer than 1000000 characters, the most this server reads of one
    # input, and those hold only 4 tokens (this model takes 256)" -- they hold ~1M tokens.
    assert answer.status_code == 200, answer.text
    vector = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
    assert float(vector @ _whole_vector(minilm_encoder, text)) > 0.9999


class _Counting:
    """The tokenizer, refusing any one call over ``most`` characters (keeps the test bounded)."""

    def __init__(self, tokenizer: Any, most: int) -> None:
        self.tokenizer, self.most = tokenizer, most
        self.calls: list[int] = []

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        size = len(text) if isinstance(text, str) else sum(map(len, text))
        self.calls.append(size)
        assert size <= self.most, f"asked to tokenise {size} characters at once (calls so far: {self.calls})"
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the tokenizer's own attributes (its pipeline)
        return getattr(self.tokenizer, name)


def test_f3_truncating_work_follows_the_answer_not_the_text(minilm_encoder: Encoder) -> None:
    """A chapter title, then a million characters of Chinese: its first 8,192 characters hold 8,000+
    tokens, each a CJK character WordPiece always splits at: the answer is known there. Observed:
    calls of 8,192, 32,768, 131,072, 524,288 and 999,982 characters (1.7M characters and tokens,
    ~750 MB, 4.7 s) for this one 3 MB input. With "a " + "x," * 499,990 (1 MB, 2.8 s, ~800 MB each),
    one 32 MiB request of 33 took 63 s and 1.4 GB where b557e08 took 1.7 s and 0.6 GB; three
    concurrent 2.9 MiB requests peaked at 3.2 GB (b557e08: 0.6 GB). On a bge-m3-shaped model
    (8,192 tokens) "a " + "\ufdfa" * 999,990 (3 MB; NFKC makes 15 tokens of each) took 45.7 s and
    6.5 GB (b557e08's cut: ~4.7 s, ~1.5 GB)."""
    text = "\u7b2c\u4e00\u7ae0 " + "\u72d0" * 999_980
    counting = _Counting(minilm_encoder.tokenizer, most=4 * minilm_encoder.max_chars)
    got = tokenize_exact(
        counting,
        [text],
        max_tokens=minilm_encoder.max_tokens,
        truncate=True,
        piece_chars=minilm_encoder.max_chars,
        max_read=MAX_READ_CHARS,
    )
    assert got == [
        minilm_encoder.tokenizer(text[:20_000], truncation=True, max_length=minilm_encoder.max_tokens)["input_ids"]
    ]


# --------------------------------------------------------------------------------------------------
# Held: parity on the listed adversarial characters (space rule), bounded fuzz
# --------------------------------------------------------------------------------------------------

_PIECES = [
    "cat", "dog", " ", "  ", "\t", "\r\n", "\n", "\u00a0", "\u3000", "\u2003", "\ufb01", "\ufb03",
    "e\u0301", "\u0301", "\u0308", "\u0130", "\u01c5", "\u00df", "\u200b", "\u200d", "\x01", "\x1c",
    "\ufeff", "\u00ad", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\u654f\u6377\u7684\u68d5\u8272\u72d0\u72f8", "\u6771\u4eac", "\ud55c\uad6d\uc5b4", "\uff83\uff9e", "\u2460",
    "\u337f", "\ufdfd", "\ufdfa", "A" * 99, "B" * 101, "x" * 60, ",", ".", "'", "''", "``", "[SEP]", "[CLS]",
    "<s>", "</s>", "<mask>", "\x00", "\u00a8", "\u00b4", "\u2028", "\u0085",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_bge_m3_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_bge_m3_dir))


def test_held_prefix_parity_on_adversarial_characters(minilm_encoder: Encoder, tiny_tokenizer: Any) -> None:
    rng = random.Random(28)
    deadline = time.monotonic() + 12
    cases = 0
    while time.monotonic() < deadline:
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 300)))
        for tokenizer in (minilm_encoder.tokenizer, tiny_tokenizer):
            limit, truncate, piece = rng.choice([8, 16, 33, 64]), rng.random() < 0.5, rng.choice([16, 24, 32, 48, 64])
            whole = tokenizer(text, truncation=truncate, max_length=limit if truncate else None, verbose=False)[
                "input_ids"
            ]
            got = tokenize_exact(
                tokenizer, [text], max_tokens=limit, truncate=truncate, piece_chars=piece, max_read=10**7
            )
            if not truncate and len(whole) > limit:
                assert isinstance(got, TooManyTokens) and limit < got.tokens <= len(whole), repr(text)
            else:
                assert got == [whole], repr(text)
            cases += 1
    assert cases > 100


def test_held_lone_surrogates_never_reach_the_tokenizer(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """A lone surrogate (which the Rust tokenizer refuses) past the decided prefix would answer where
    the whole text fails; the JSON decoder refuses it first (400), for every length."""
    live = gateway_factory(truncate=True)
    for text in ('"abc\\ud83d"', '"' + "word " * 3000 + '\\ude00"'):
        answer = httpx.post(
            f"{live.url}/v1/embeddings",
            content=b'{"input": [' + text.encode() + b"]}",
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text


# --------------------------------------------------------------------------------------------------
# Held: the request token limit
# --------------------------------------------------------------------------------------------------


def test_held_request_limit_counts_duplicates_hits_and_misses_exactly(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(truncate=True, max_request_tokens=12)  # "hello world", "good day": 4 tokens each
    assert _post(live.url, ["hello world"]).status_code == 200  # now a hit
    time.sleep(0.2)
    assert _post(live.url, ["hello world", "hello world", "good day"]).status_code == 200  # 12: fits
    over = _post(live.url, ["hello world", "good day", "hello world", "good"])  # 15
    assert over.status_code == 400 and "15 tokens" in over.text, over.text
    assert _post(live.url, ["good day"] * 3).status_code == 200  # 12 of one text
    assert _post(live.url, ["good day"] * 4).status_code == 400  # 16 of one (cached) text
    unread = _post(live.url, ["x"] * 13)  # 13 inputs: at least 13 tokens, refused unread
    assert unread.status_code == 400 and "at least 13" in unread.text, unread.text


def test_held_request_refused_before_a_huge_input_is_read(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(truncate=True, max_request_tokens=100)
    huge = f"{uuid.uuid4().hex} " + "x," * 499_000  # ~3 s to tokenise (F3), if it were read
    started = time.monotonic()
    answer = _post(live.url, ["word " * 200, huge])
    assert answer.status_code == 400 and "more than 202" in answer.text, answer.text
    assert time.monotonic() - started < 2.0


# --------------------------------------------------------------------------------------------------
# Held: sparse / multivector options, /health
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bge(tiny_bge_m3_dir: Path) -> Encoder:
    return load_encoder(str(tiny_bge_m3_dir))


@pytest.fixture
def bge_live(bge: Encoder) -> Iterator[Any]:
    from gateway import Settings, create_app
    from tests.servers import ThreadedGateway

    settings = Settings(model=str(bge.path), model_name="bge-m3", cache_prefix=f"m3-{uuid.uuid4().hex[:8]}")
    with ThreadedGateway(create_app(settings, encoder=bge)) as gateway:
        yield gateway


def test_held_sparse_and_multivector_refuse_what_they_cannot_honour(bge_live) -> None:  # type: ignore[no-untyped-def]
    url = bge_live.url
    for route in ("/v1/embeddings/sparse", "/v1/embeddings/multivector"):
        for dimensions in (8, 0, -1, 10**9):
            answer = _post(url, ["hi"], route=route, dimensions=dimensions)
            assert answer.status_code == 400 and "dimensions" in answer.text, (route, dimensions, answer.text)
        assert _post(url, ["hi"], route=route, dimensions=None).status_code == 200
    refused = _post(url, ["hi"], route="/v1/embeddings/sparse", encoding_format="base64")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "encoding_format"
    packed = _post(url, ["hi"], route="/v1/embeddings/multivector", encoding_format="base64")
    assert packed.status_code == 200 and isinstance(packed.json()["data"][0]["embedding"], str)
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["cache"]["backend"] == "memory", health


def test_held_health_says_off_only_when_the_cache_is_off(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{gateway_factory(cache=False).url}/health").json()["cache"]["backend"] == "off"
    assert httpx.get(f"{gateway_factory().url}/health").json()["cache"]["backend"] == "memory"


# --------------------------------------------------------------------------------------------------
# Held: the cache generation and BLAKE2b keys
# --------------------------------------------------------------------------------------------------


def test_held_entries_written_by_b557e08_are_never_read(  # type: ignore[no-untyped-def]
    gateway_factory, minilm_encoder: Encoder, redis_server: RedisServer
) -> None:
    """b557e08's key for a text (XXH3-128 digest, namespace without the generation), planted with a
    wrong vector in the current blob format, in the Redis the server uses: never served."""
    import redis

    prefix = f"gen-{uuid.uuid4().hex[:8]}"
    text = "hello" + " " * 9000 + "world"  # issue 28's first case: b557e08 cached "hello"'s vector
    old_namespace = (
        f"{minilm_encoder.fingerprint}-"
        f"{xxhash.xxh3_64_hexdigest(f'{minilm_encoder.numerics}|truncate=False'.encode())[:8]}"
    )
    old_key = f"{prefix}:{old_namespace}{DENSE.namespace}:{xxhash.xxh3_128_hexdigest(text.encode())}"
    wrong = -_whole_vector(minilm_encoder, text)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.set(old_key, DENSE.pack(4, wrong), ex=60)
    assert old_namespace != cache_namespace(minilm_encoder.fingerprint, minilm_encoder.numerics, truncate=False)

    live = gateway_factory(truncate=False, redis_url=redis_server.url, cache_prefix=prefix)
    for _ in range(2):  # a miss, then a hit of what it wrote itself
        answer = _post(live.url, [text])
        assert answer.status_code == 200, answer.text
        vector = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
        assert float(vector @ _whole_vector(minilm_encoder, text)) > 0.9999
        time.sleep(0.3)
    client.delete(old_key)


def test_f1_vectors_cached_by_the_margin_rule_are_never_read(  # type: ignore[no-untyped-def]
    gateway_factory, minilm_encoder: Encoder, redis_server: RedisServer
) -> None:
    """Generation 2 (the no-space margin) cached F1's wrong vector under the whole text's key: an
    entry planted there, in the Redis the server uses, is never served."""
    import redis

    from gateway.core.cache.base import cache_key

    prefix = f"gen2-{uuid.uuid4().hex[:8]}"
    text = _margin_text(minilm_encoder.max_chars, strict=False)
    older = cache_namespace(minilm_encoder.fingerprint, minilm_encoder.numerics, truncate=True, generation=2)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.set(cache_key(prefix, older + DENSE.namespace, text), DENSE.pack(4, -_whole_vector(minilm_encoder, text)))
    try:
        live = gateway_factory(truncate=True, redis_url=redis_server.url, cache_prefix=prefix)
        answer = _post(live.url, [text])
        assert answer.status_code == 200, answer.text
        vector = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
        assert float(vector @ _whole_vector(minilm_encoder, text)) > 0.9999
    finally:
        client.delete(cache_key(prefix, older + DENSE.namespace, text))
