"""``embedding-gateway cache stats | purge | warm``: look after the vector cache from a shell.

* ``stats``: keys and bytes per model fingerprint and output kind. Every key is counted with SCAN;
  bytes come from ``MEMORY USAGE`` of a sample of each group's keys, scaled to the group.
* ``purge --fingerprint FP``: counts the fingerprint's keys; with ``--yes`` UNLINKs them in batches
  (a progress bar on stderr). For the vectors of a model that is no longer served. ``FP`` is a
  namespace as ``stats`` prints it, or the model fingerprint alone (every namespace of that model).
* ``warm FILE --url URL``: sends a corpus (JSONL with ``{"text": ...}`` per line, or plain text with
  one per line) through a running gateway in token-budgeted requests, so its vectors are cached
  before the traffic comes. Resumable: ``FILE.warm-state`` holds the byte offset of the next line.

Keys look like ``{prefix}:{fingerprint}[:{kind}]:{xxh3_128 hex}``, where "fingerprint" is the whole
cache namespace (``{model fingerprint}-{numerics tag}``, ``/stats`` ``cache.namespace``) (``gateway.core.cache.base``,
``gateway.core.outputs``). The Redis code only calls ``scan_iter``, ``pipeline`` and ``unlink``,
which a ``redis.cluster.RedisCluster`` offers too (it scans every primary and splits UNLINK by slot).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["KeyGroup", "WarmReport", "add_parsers", "parse_key", "purge", "run", "scan_groups", "warm"]

_HASH = re.compile(r"^[0-9a-f]{32}$")
_GLOB = re.compile(r"([*?\[\]\\])")


class RedisLike(Protocol):
    """What this module needs of a redis-py client (``redis.Redis`` or ``redis.cluster.RedisCluster``)."""

    def scan_iter(self, match: str | None = ..., count: int | None = ...) -> Iterator[bytes]: ...

    def pipeline(self, transaction: bool = ...) -> Any: ...

    def unlink(self, *names: str | bytes) -> Any: ...


def _escape(text: str) -> str:
    return _GLOB.sub(r"\\\1", text)


@dataclass(slots=True)
class KeyGroup:
    fingerprint: str
    kind: str  # dense, sparse, colbert, ...
    keys: int = 0
    sampled: list[bytes] = field(default_factory=list)
    sampled_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Estimated: the sample's mean times the number of keys."""
        return round(self.sampled_bytes / len(self.sampled) * self.keys) if self.sampled else 0


def parse_key(key: str, prefix: str) -> tuple[str, str] | None:
    """(fingerprint, kind) of a cache key, or None for a key that is not a cached output."""
    if not key.startswith(prefix + ":"):
        return None
    parts = key[len(prefix) + 1 :].split(":")
    if len(parts) == 2 and _HASH.match(parts[1]):
        return parts[0], "dense"
    if len(parts) == 3 and _HASH.match(parts[2]):
        return parts[0], parts[1]
    return None


def scan_groups(client: RedisLike, prefix: str, *, sample: int = 200, count: int = 1000) -> list[KeyGroup]:
    """Count every cached output under ``prefix`` by (fingerprint, kind); size a sample of each group."""
    groups: dict[tuple[str, str], KeyGroup] = {}
    for raw in client.scan_iter(match=f"{_escape(prefix)}:*", count=count):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        parsed = parse_key(key, prefix)
        if parsed is None:
            continue
        group = groups.get(parsed)
        if group is None:
            group = groups[parsed] = KeyGroup(*parsed)
        group.keys += 1
        if len(group.sampled) < sample:
            group.sampled.append(raw)
    for group in groups.values():
        pipe = client.pipeline(transaction=False)
        for sampled_key in group.sampled:
            pipe.memory_usage(sampled_key, samples=0)
        group.sampled_bytes = sum(int(size or 0) for size in pipe.execute())
    return sorted(groups.values(), key=lambda g: (-g.keys, g.fingerprint, g.kind))


def _matching(client: RedisLike, prefix: str, fingerprint: str, count: int) -> Iterator[bytes]:
    """Keys of the namespace ``fingerprint`` (``stats``' first column), or of every namespace of the
    model fingerprint ``fingerprint`` (its part before ``-``: all numerics and truncation variants)."""
    for raw in client.scan_iter(match=f"{_escape(prefix)}:{_escape(fingerprint)}*", count=count):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        parsed = parse_key(key, prefix)
        if parsed is not None and (parsed[0] == fingerprint or parsed[0].startswith(fingerprint + "-")):
            yield raw


def purge(
    client: RedisLike, prefix: str, fingerprint: str, *, yes: bool, batch: int = 500, progress: bool = True
) -> tuple[int, int]:
    """(keys found, keys unlinked) for ``fingerprint``; without ``yes`` nothing is deleted."""
    from tqdm import tqdm

    found = sum(1 for _ in _matching(client, prefix, fingerprint, batch))
    if not yes or not found:
        return found, 0
    removed = 0
    with tqdm(total=found, unit="keys", desc=f"unlink {fingerprint}", disable=not progress, file=sys.stderr) as bar:
        pending: list[bytes] = []
        for key in _matching(client, prefix, fingerprint, batch):
            pending.append(key)
            if len(pending) >= batch:
                removed += int(client.unlink(*pending))
                bar.update(len(pending))
                pending = []
        if pending:
            removed += int(client.unlink(*pending))
            bar.update(len(pending))
    return found, removed


# --- warm --------------------------------------------------------------------------------------


@dataclass(slots=True)
class WarmReport:
    texts: int = 0
    hits: int = 0
    misses: int = 0
    requests: int = 0
    seconds: float = 0.0
    resumed_at: int = 0  # byte offset the run started from

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0


def _text_of(line: str, jsonl: bool) -> str | None:
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if not jsonl:
        return line
    value = json.loads(line)
    text = value.get("text") if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise ValueError('every JSONL line needs a string "text"')
    return text or None


def _is_jsonl(path: Path) -> bool:
    if path.suffix in (".jsonl", ".ndjson"):
        return True
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                return raw.lstrip().startswith(b"{")
    return False


def _batches(path: Path, start: int, max_tokens: int, max_inputs: int) -> Iterator[tuple[list[str], int]]:
    """(texts, byte offset after them): a request's worth each, by a 4-characters-per-token estimate."""
    jsonl = _is_jsonl(path)
    texts: list[str] = []
    budget = 0
    with path.open("rb") as handle:
        handle.seek(start)
        offset = start
        for raw in handle:
            offset += len(raw)
            text = _text_of(raw.decode("utf-8"), jsonl)
            if text is None:
                continue
            estimate = len(text) // 4 + 2
            if texts and (budget + estimate > max_tokens or len(texts) >= max_inputs):
                yield texts, offset - len(raw)
                texts, budget = [], 0
            texts.append(text)
            budget += estimate
        if texts:
            yield texts, offset


def warm(
    path: Path,
    url: str,
    *,
    api_key: str = "",
    model: str | None = None,
    max_tokens: int = 8192,
    max_inputs: int = 256,
    state: Path | None = None,
    restart: bool = False,
    progress: bool = True,
    timeout_s: float = 300.0,
) -> WarmReport:
    """Send ``path``'s texts through the gateway at ``url``; resume from ``state`` unless ``restart``."""
    import httpx
    from tqdm import tqdm

    state = state or path.with_name(path.name + ".warm-state")
    start = 0
    if state.exists() and not restart:
        start = int(json.loads(state.read_text()).get("offset", 0))
    report = WarmReport(resumed_at=start)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + ("/embeddings" if url.rstrip("/").endswith("/v1") else "/v1/embeddings")
    began = time.perf_counter()
    size = path.stat().st_size
    with (
        httpx.Client(timeout=timeout_s, headers=headers) as client,
        tqdm(
            total=size, initial=start, unit="B", unit_scale=True, desc="warm", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        done = start
        for texts, offset in _batches(path, start, max_tokens, max_inputs):
            body: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
            if model:
                body["model"] = model
            while True:
                response = client.post(endpoint, json=body)
                if response.status_code in (429, 503):  # over a limit or a full queue: wait as told
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                break
            if response.status_code != 200:
                raise RuntimeError(f"{endpoint} answered {response.status_code}: {response.text[:300]}")
            report.requests += 1
            report.texts += len(texts)
            report.hits += int(response.headers.get("x-cache-hits", 0))
            report.misses += int(response.headers.get("x-cache-misses", 0))
            state.write_text(json.dumps({"offset": offset, "file": str(path), "size": size}))
            bar.update(offset - done)
            done = offset
    report.seconds = time.perf_counter() - began
    state.write_text(json.dumps({"offset": size, "file": str(path), "size": size, "finished": True}))
    return report


# --- CLI ---------------------------------------------------------------------------------------


def add_parsers(commands: Any, settings_flags: Any) -> None:
    """``cache stats | purge | warm`` under ``embedding-gateway`` (``settings_flags``: serve's flags)."""
    cache = commands.add_parser("cache", help="look after the vector cache: stats, purge, warm")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    stats = actions.add_parser("stats", help="keys and bytes per model fingerprint (same Redis flags as serve)")
    stats.add_argument("--sample", type=int, default=200, help="keys sized with MEMORY USAGE per group")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    settings_flags(stats)
    purge_ = actions.add_parser("purge", help="delete one fingerprint's keys (counts only without --yes)")
    purge_.add_argument("--fingerprint", required=True)
    purge_.add_argument("--yes", action="store_true", help="really delete")
    purge_.add_argument("--batch", type=int, default=500, help="keys per UNLINK")
    settings_flags(purge_)
    warm_ = actions.add_parser("warm", help="send a corpus through a running gateway so its vectors are cached")
    warm_.add_argument("file", type=Path, help="JSONL with {'text': ...} per line, or plain text, one per line")
    warm_.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8001")
    warm_.add_argument("--api-key", default="", help="Bearer key of the gateway (when it has keys)")
    warm_.add_argument("--model", default=None)
    warm_.add_argument("--max-tokens", type=int, default=8192, help="estimated tokens per request")
    warm_.add_argument("--max-inputs", type=int, default=256, help="texts per request")
    warm_.add_argument("--state", type=Path, default=None, help="resume file (default: FILE.warm-state)")
    warm_.add_argument("--restart", action="store_true", help="ignore the resume file and start at line 1")


def _client(redis_url: str) -> RedisLike:
    import redis

    if not redis_url:
        raise SystemExit("embedding-gateway cache: set EMBED_REDIS_URL (or --redis-url): the cache is in Redis")
    client: RedisLike = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    return client


def run(args: argparse.Namespace, redis_url: str = "", prefix: str = "emb") -> int:
    if args.cache_command == "warm":
        report = warm(
            args.file,
            args.url,
            api_key=args.api_key,
            model=args.model,
            max_tokens=args.max_tokens,
            max_inputs=args.max_inputs,
            state=args.state,
            restart=args.restart,
        )
        print(
            f"warmed {report.texts} texts in {report.requests} requests, {report.seconds:.1f} s: "
            f"{report.hits} hits, {report.misses} misses, {report.texts_per_second:.1f} texts/s"
        )
        return 0
    client = _client(redis_url)
    if args.cache_command == "stats":
        groups = scan_groups(client, prefix, sample=args.sample)
        rows = [
            {"fingerprint": g.fingerprint, "kind": g.kind, "keys": g.keys, "bytes": g.bytes, "sampled": len(g.sampled)}
            for g in groups
        ]
        if args.json:
            print(json.dumps({"prefix": prefix, "groups": rows}))
        else:
            width = max([len("namespace"), *(len(str(row["fingerprint"])) for row in rows)])
            print(f"{'namespace':<{width}} {'kind':<8} {'keys':>12} {'bytes (est.)':>14} {'sampled':>8}")
            for row in rows:
                print(
                    f"{row['fingerprint']:<{width}} {row['kind']:<8} {row['keys']:>12,} {row['bytes']:>14,} "
                    f"{row['sampled']:>8}"
                )
            print(f"{'total':<{width + 9}} {sum(g.keys for g in groups):>12,} {sum(g.bytes for g in groups):>14,}")
        return 0
    found, removed = purge(client, prefix, args.fingerprint, yes=args.yes, batch=args.batch)
    if args.yes:
        print(f"unlinked {removed} of {found} keys of fingerprint {args.fingerprint} (prefix {prefix!r})")
    else:
        print(f"{found} keys of fingerprint {args.fingerprint} (prefix {prefix!r}); pass --yes to delete them")
    return 0
