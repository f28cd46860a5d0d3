"""Token buckets, OpenAI's reset format, the keys file, and the float fragment, without a server."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from gateway.core.keys import ApiKey, KeysFileError, load_keys
from gateway.core.outputs import DENSE, Answer, ResponseOptions
from gateway.core.ratelimit import RateLimiter, format_reset, unshared_limits_problem
from gateway.settings import Settings


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.017, "17ms"), (1, "1s"), (1.5, "1.5s"), (59.9994, "59.999s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_reads_like_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.anyio
async def test_local_buckets_refuse_past_the_limit_and_take_tokens_as_debt() -> None:
    limiter = RateLimiter()  # no Redis: this process's buckets
    key = ApiKey(key="k", name="n", requests_per_minute=2, tokens_per_minute=100)
    first = await limiter.admit(key)
    assert first.admitted and first.levels.remaining_requests() == 1
    levels = await limiter.charge(key, 150)  # one answer may overdraw the tokens bucket
    assert levels.remaining_tokens() == 0 and levels.tokens == pytest.approx(-50, abs=1)
    refused = await limiter.admit(key)
    assert not refused.admitted and refused.blocked == "tokens"
    assert refused.retry_after == pytest.approx(30, abs=1)  # 50 tokens at 100 per minute
    other = ApiKey(key="k2", name="m", requests_per_minute=1)
    assert (await limiter.admit(other)).admitted
    second = await limiter.admit(other)
    assert second.blocked == "requests" and second.retry_after == pytest.approx(60, abs=1)
    assert format_reset(second.levels.reset_requests()).endswith("s")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_keys_file_and_plain_keys_load_together(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nkey = "ka"\ntokens_per_minute = 5\n')
    keys = load_keys(Settings(api_keys_file=str(path), api_keys="kb,ka"))
    assert keys == (ApiKey(key="ka", name="a", tokens_per_minute=5), ApiKey(key="kb"))
    path.write_text('[[keys]]\nname = "a"\nkey = "ka"\n[[keys]]\nname = "a"\nkey = "kc"\n')
    with pytest.raises(KeysFileError, match=r"\[\[keys\]\] #2 \('a'\): 'name' 'a' is used by an earlier table"):
        load_keys(Settings(api_keys_file=str(path)))
    with pytest.raises(KeysFileError, match="cannot read it"):
        load_keys(Settings(api_keys_file=str(tmp_path / "missing.toml")))


def test_float_fragment_is_float32_shortest_and_exact() -> None:
    rng = np.random.default_rng(7)
    vectors = list(rng.standard_normal((50, 384)).astype(np.float32))
    body = msgspec.json.encode(DENSE.respond(Answer(vectors, [1] * 50, "m"), ResponseOptions()))
    parsed = np.array([item["embedding"] for item in msgspec.json.decode(body)["data"]], dtype=np.float32)
    assert np.array_equal(parsed.view(np.uint32), np.stack(vectors).view(np.uint32))
    old = msgspec.json.encode([v.tolist() for v in vectors])
    assert len(body) < 0.65 * len(old)


def test_workers_without_redis_refuse_keys_with_limits() -> None:
    limited = (ApiKey(key="ka", name="a", tokens_per_minute=5), ApiKey(key="kb"))
    unlimited = (ApiKey(key="ka", name="a"), ApiKey(key="kb"))
    problem = unshared_limits_problem(Settings(workers=3), limited)
    assert problem is not None and "\n" not in problem
    assert "EMBED_WORKERS" in problem and "EMBED_REDIS_URL" in problem and "3" in problem
    # one worker, shared buckets in Redis, or no limits at all: nothing to refuse
    assert unshared_limits_problem(Settings(workers=1), limited) is None
    assert unshared_limits_problem(Settings(workers=3, redis_url="redis://127.0.0.1:6379/0"), limited) is None
    assert unshared_limits_problem(Settings(workers=3), unlimited) is None


@pytest.mark.anyio
async def test_a_reservation_takes_the_tokens_only_when_the_bucket_holds_them_all() -> None:
    limiter = RateLimiter()  # no Redis: this process's buckets
    key = ApiKey(key="k", name="n", tokens_per_minute=100)
    assert (await limiter.admit(key)).admitted
    first = await limiter.reserve(key, 70)
    assert first.admitted and first.levels.tokens == pytest.approx(30, abs=1)
    short = await limiter.reserve(key, 40)
    assert not short.admitted and short.blocked == "tokens" and short.need == 40
    assert short.retry_after == pytest.approx(6, abs=0.5)  # 10 more tokens at 100 per minute
    assert (await limiter.reserve(key, 30)).admitted  # the refusal took nothing
    limiter.adjust_later(key, -50)  # a failed request's tokens go back
    assert (await limiter.reserve(key, 50)).admitted
    assert not (await limiter.reserve(key, 5)).admitted
    admission = await limiter.admit(key)  # an empty tokens bucket refuses before any work
    assert not admission.admitted and admission.blocked == "tokens" and admission.retry_after > 0.3
