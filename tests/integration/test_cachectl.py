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
    assert 384 * 4 <= dense["bytes_per_entry"] <= 384 * 4 + 600, "a float32 vector, its key and Redis' overhead"
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
    assert "warmed 30 texts (30 newly cached, 0 already cached), skipped 0;" in out.out and "texts/s" in out.out
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
    assert "warmed 18 texts (0 newly cached, 18 already cached)" in resumed
    assert main([*argv, "--restart"]) == 0
    assert "warmed 30 texts" in capsys.readouterr().out


def test_warm_skips_a_text_past_the_model_limit_and_warms_the_rest(gateway_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Issue 25: a text past the model's limit (truncation off, the default) is skipped, listed in the
    side file and counted; every other text, those of its own request included, is warmed."""
    live = gateway_factory()
    texts = [f"warm corpus line {i} with a few words" for i in range(20)]
    texts[7] = "word " * 400  # 402 tokens, the model takes 256
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    code = main(["cache", "warm", str(path), "--url", live.url])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Traceback" not in out.err
    side = path.with_name(path.name + ".warm-skipped")
    assert "warmed 19 texts" in out.out and "skipped 1" in out.out and str(side) in out.out
    (entry,) = [json.loads(line) for line in side.read_text().splitlines()]
    assert entry["line"] == 8 and entry["text"] == texts[7] and "256 tokens" in entry["reason"]
    assert "(19 newly cached, 0 already cached)" in out.out, "the rest of its request is warmed"
    rest = [t for i, t in enumerate(texts) if i != 7]
    again = httpx.post(f"{live.url}/v1/embeddings", json={"input": rest}, timeout=60)
    assert again.headers["x-cache-hits"] == "19"


def test_warm_skips_unreadable_and_empty_lines_and_resumes_the_side_file(
    gateway_factory, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """Lines that hold no text a request can carry are skipped before sending, one entry each; a
    resumed run adds to the side file, ``--restart`` starts it again."""
    live = gateway_factory()
    good = [json.dumps({"text": f"readable line {i}"}).encode() for i in range(6)]
    bad = [b'{"text": "cut off', b'{"text": 5}', b'{"text": ""}', b'{"text": "\\ud800 alone"}', b"\xff\xfe not utf-8"]
    rows = [good[0], bad[0], good[1], bad[1], b"", good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    argv = ["cache", "warm", str(path), "--url", live.url]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmed 6 texts (6 newly cached, 0 already cached), skipped 5" in out
    side = path.with_name(path.name + ".warm-skipped")
    entries = [json.loads(line) for line in side.read_text(encoding="utf-8").splitlines()]
    assert [e["line"] for e in entries] == [2, 4, 7, 9, 11], "blank line 5 is no text and no skip"
    assert "not a JSON line" in entries[0]["reason"] and entries[0]["raw"] == '{"text": "cut off'
    assert entries[1]["reason"] == 'no string "text" field'
    assert entries[2] == {"line": 7, "reason": "empty text", "text": ""}
    assert entries[3]["text"] == "\ud800 alone" and "surrogate" in entries[3]["reason"]
    assert "not UTF-8" in entries[4]["reason"]

    state = path.with_name(path.name + ".warm-state")
    state.write_text(json.dumps({"offset": len(b"\n".join(rows[:8])) + 1}))  # resume at line 9
    assert main(argv) == 0
    assert "warmed 2 texts (0 newly cached, 2 already cached), skipped 2" in capsys.readouterr().out
    assert [json.loads(line)["line"] for line in side.read_text().splitlines()] == [2, 4, 7, 9, 11, 9, 11]
    path.write_bytes(b"\n".join(good) + b"\n")
    assert main([*argv, "--restart"]) == 0
    assert "skipped 0;" in capsys.readouterr().out
    assert not side.exists(), "a fresh run that skips nothing leaves no stale list"


def test_warm_splits_a_request_refused_as_a_whole(gateway_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A 400 that names no text (the request is over the server's per-request token limit) halves
    the request until it fits; nothing is skipped."""
    live = gateway_factory(max_request_tokens=60)
    texts = [f"split me into smaller requests please {i}" for i in range(16)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    assert main(["cache", "warm", str(path), "--url", live.url]) == 0
    out = capsys.readouterr().out
    assert "warmed 16 texts (16 newly cached, 0 already cached), skipped 0;" in out
    assert int(out.split(" requests")[0].rsplit(" ", 1)[1]) >= 4


class _Flaky:
    """A proxy in front of a gateway that answers its first POSTs with 503 (Retry-After: 0) and 429
    (no Retry-After), then passes requests on."""

    def __init__(self, upstream: str, failures: list[int]) -> None:
        import http.server
        import threading

        self.failures, self.posts = list(failures), 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                proxy.posts += 1
                if proxy.failures:
                    status = proxy.failures.pop(0)
                    self.send_response(status)
                    if status == 503:
                        self.send_header("retry-after", "0")
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                answer = httpx.post(upstream + self.path, content=body, headers={"content-type": "application/json"})
                self.send_response(answer.status_code)
                for name in ("content-type", "x-cache-hits", "x-cache-misses"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_warm_waits_out_429_and_503_and_gives_up_after_retries(gateway_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    live = gateway_factory()
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"retried text {i}\n" for i in range(5)))
    flaky = _Flaky(live.url, [503, 429, 503])
    try:
        assert main(["cache", "warm", str(path), "--url", flaky.url]) == 0
        assert "warmed 5 texts (5 newly cached, 0 already cached), skipped 0;" in capsys.readouterr().out
        assert flaky.posts == 4, "three refusals waited out, then the request went through"

        flaky.failures = [503] * 3
        code = main(["cache", "warm", str(path), "--url", flaky.url, "--restart", "--retries", "2"])
        captured = capsys.readouterr()
        assert code == 1
        assert "gave up after 3 tries" in captured.err and "HTTP 503" in captured.err
        assert "Traceback" not in captured.err
    finally:
        flaky.server.shutdown()
        flaky.server.server_close()


def test_warm_exits_1_when_nothing_can_be_warmed(gateway_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from support.processes import free_port

    path = tmp_path / "corpus.txt"
    path.write_text("word " * 400 + "\n" + "more " * 400 + "\n")
    live = gateway_factory(api_keys="right-key")
    assert main(["cache", "warm", str(path), "--url", live.url, "--api-key", "right-key"]) == 1
    captured = capsys.readouterr()
    assert "warmed 0 texts" in captured.out and "skipped 2" in captured.out
    assert "nothing could be warmed" in captured.err

    assert main(["cache", "warm", str(path), "--url", live.url, "--api-key", "wrong", "--restart"]) == 1
    assert "refused the key (401" in capsys.readouterr().err

    began = time.monotonic()
    assert main(["cache", "warm", str(path), "--url", f"http://127.0.0.1:{free_port()}", "--restart"]) == 1
    captured = capsys.readouterr()
    assert "cannot reach the gateway" in captured.err and "Traceback" not in captured.err
    assert time.monotonic() - began < 5, "a wrong URL fails at once, not after the retries"
