"""``embedding-gateway cache stats | purge | warm`` against a real Redis and a live gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from gateway.cachectl import parse_key
from gateway.cli import main

PREFIX = "ctl"
OLD = "0123456789abcdef"  # a fingerprint no server serves any more


def _fill_old(client, count: int = 1200) -> None:  # type: ignore[no-untyped-def]
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.set(f"{PREFIX}:{OLD}:{i:032x}", b"x" * 100)
    for i in range(10):
        pipe.set(f"{PREFIX}:{OLD}:sparse:{i:032x}", b"y" * 50)
    pipe.hset(f"{PREFIX}:ratelimit:{{ingest}}:requests", mapping={"level": 1, "at": 0})
    pipe.set("other-app:key", b"z")
    pipe.execute()


def _stats(redis_url: str, capsys: pytest.CaptureFixture[str]) -> dict[tuple[str, str], dict[str, int]]:
    assert main(["cache", "stats", "--redis-url", redis_url, "--cache-prefix", PREFIX, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    return {(row["fingerprint"], row["kind"]): row for row in body["groups"]}


def test_parse_key_knows_the_layout() -> None:
    digest = "a" * 32
    assert parse_key(f"emb:fp1:{digest}", "emb") == ("fp1", "dense")
    assert parse_key(f"emb:fp1:colbert:{digest}", "emb") == ("fp1", "colbert")
    assert parse_key("emb:ratelimit:{k}:requests", "emb") is None
    assert parse_key(f"other:fp1:{digest}", "emb") is None
    # BLAKE2b-256 keys (64 hex digits) count as well as the XXH3-128 ones written before them
    assert parse_key(f"emb:fp1:{'b' * 64}", "emb") == ("fp1", "dense")
    assert parse_key(f"emb:fp1:sparse:{'b' * 64}", "emb") == ("fp1", "sparse")
    assert parse_key(f"emb:fp1:{'b' * 48}", "emb") is None
    assert parse_key(f"emb:fp1:{'B' * 64}", "emb") is None


def test_stats_and_purge(gateway_factory, fresh_redis, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(redis_url=fresh_redis.url, cache_prefix=PREFIX)
    texts = [f"cachectl text {i}" for i in range(25)]
    assert httpx.post(f"{live.url}/v1/embeddings", json={"input": texts}, timeout=60).status_code == 200
    fingerprint = httpx.get(f"{live.url}/stats").json()["cache"]["namespace"]
    client = fresh_redis.client()
    _fill_old(client)
    for _ in range(50):  # the write-back runs after the answer
        if len(list(client.scan_iter(match=f"{PREFIX}:{fingerprint}:*"))) == 25:
            break
        time.sleep(0.05)

    groups = _stats(fresh_redis.url, capsys)
    assert groups[(fingerprint, "dense")]["keys"] == 25
    assert groups[(OLD, "dense")]["keys"] == 1200
    assert groups[(OLD, "sparse")]["keys"] == 10
    assert len(groups) == 3, "rate-limit buckets and other apps' keys are not cache entries"
    dense = groups[(fingerprint, "dense")]
    assert dense["bytes"] >= 25 * 384 * 4, "each value holds a 384-d float32 vector"
    assert groups[(OLD, "dense")]["sampled"] == 200
    assert 1200 * 100 <= groups[(OLD, "dense")]["bytes"] <= 1200 * 400

    assert main(["cache", "purge", "--redis-url", fresh_redis.url, "--cache-prefix", PREFIX, "--fingerprint", OLD]) == 0
    assert "1210 keys" in capsys.readouterr().out
    assert len(list(client.scan_iter(match=f"{PREFIX}:{OLD}:*"))) == 1210, "without --yes nothing is deleted"

    argv = ["cache", "purge", "--redis-url", fresh_redis.url, "--cache-prefix", PREFIX, "--fingerprint", OLD, "--yes"]
    assert main([*argv, "--batch", "300"]) == 0
    out = capsys.readouterr()
    assert "unlinked 1210 of 1210" in out.out
    assert "1210/1210" in out.err, "a progress bar on stderr"
    assert not list(client.scan_iter(match=f"{PREFIX}:{OLD}:*"))
    assert len(list(client.scan_iter(match=f"{PREFIX}:{fingerprint}:*"))) == 25, "other fingerprints stay"
    assert client.get("other-app:key") == b"z"
    assert client.exists(f"{PREFIX}:ratelimit:{{ingest}}:requests")


def test_purge_by_the_model_fingerprint_takes_each_of_its_namespaces(fresh_redis, capsys) -> None:  # type: ignore[no-untyped-def]
    client = fresh_redis.client()
    model, other = "fedcba9876543210", "fedcba98765432ff"
    digest = "0" * 32
    for namespace in (f"{model}-aaaa1111", f"{model}-bbbb2222"):
        client.set(f"{PREFIX}:{namespace}:{digest}", b"v")
        client.set(f"{PREFIX}:{namespace}:sparse:{digest}", b"v")
    client.set(f"{PREFIX}:{other}-aaaa1111:{digest}", b"v")
    argv = ["cache", "purge", "--redis-url", fresh_redis.url, "--cache-prefix", PREFIX, "--fingerprint"]
    assert main([*argv, f"{model}-aaaa1111", "--yes"]) == 0  # one namespace, as stats prints it
    assert "unlinked 2 of 2" in capsys.readouterr().out
    assert main([*argv, model, "--yes"]) == 0  # the model: every namespace left of it
    assert "unlinked 2 of 2" in capsys.readouterr().out
    assert client.exists(f"{PREFIX}:{other}-aaaa1111:{digest}"), "another model's keys stay"


def test_cache_commands_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="EMBED_REDIS_URL"):
        main(["cache", "stats", "--redis-url", ""])


@pytest.mark.parametrize("form", ["jsonl", "text"])
def test_warm_sends_a_corpus_and_resumes(gateway_factory, tmp_path: Path, capsys, form: str) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory(api_keys="warm-key")
    texts = [f"warm corpus line {i} with a few words" for i in range(30)]
    path = tmp_path / f"corpus.{form}"
    lines = [json.dumps({"text": t}) for t in texts] if form == "jsonl" else texts
    path.write_text("\n".join([*lines[:10], "", *lines[10:]]) + "\n")

    argv = ["cache", "warm", str(path), "--url", live.url, "--api-key", "warm-key", "--max-tokens", "40"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "warmed 30 texts in" in out.out and "0 hits, 30 misses" in out.out and "texts/s" in out.out
    requests = int(out.out.split(" requests")[0].rsplit(" ", 1)[1])
    assert requests >= 4, "the token budget splits the corpus"
    stats = httpx.get(f"{live.url}/stats", headers={"authorization": "Bearer warm-key"}).json()
    assert stats["cache"]["misses"] == 30

    # a finished run resumes at the end: nothing to send
    assert main(argv) == 0
    assert "warmed 0 texts" in capsys.readouterr().out
    # an interrupted run (state after line 12) sends only the rest, and they are hits now
    state = path.with_name(path.name + ".warm-state")
    offset = len("\n".join([*lines[:10], "", *lines[10:12]]).encode()) + 1
    state.write_text(json.dumps({"offset": offset}))
    assert main(argv) == 0
    resumed = capsys.readouterr().out
    assert "warmed 18 texts" in resumed and "18 hits, 0 misses" in resumed
    assert main([*argv, "--restart"]) == 0
    assert "warmed 30 texts" in capsys.readouterr().out
