"""What each setting means, in the words the docs print: the one source of the configuration page.

``docs/configuration.md`` is :func:`render`'s output (``python -m gateway.settings_help >
docs/configuration.md``), and a test checks that every :class:`~gateway.settings.Settings` field is
here, that nothing else is, that each default shown in backticks is the field's real default, and
that the committed page is what :func:`render` prints now: the page cannot drift from the code.
"""

from __future__ import annotations

import msgspec

from gateway.settings import ENV_PREFIX, Settings

__all__ = ["SETTINGS_HELP", "SettingHelp", "render"]


class SettingHelp(msgspec.Struct, frozen=True):
    default: str  # as shown: `value` (checked against the field's default) or words, e.g. (none)
    meaning: str  # Markdown


# In the order the page lists them (related settings together), keyed by Settings field.
SETTINGS_HELP: dict[str, SettingHelp] = {
    "model": SettingHelp(
        "`BAAI/bge-m3`",
        "local model folder or Hugging Face hub id",
    ),
    "model_name": SettingHelp(
        "folder or repo basename",
        "the model id clients send and responses name",
    ),
    "model_aliases": SettingHelp(
        "(empty)",
        (
            "comma list of other accepted ids, e.g. `text-embedding-3-small`; `*` accepts any id (as TEI "
            "does), so LlamaIndex's, LangChain's and Chroma's `text-embedding-ada-002` and Haystack's "
            "`text-embedding-3-small` work unchanged; answers always name the model that served them"
        ),
    ),
    "models_file": SettingHelp(
        "(empty)",
        (
            "TOML file of `[[models]]` tables: several models in one server, the first the default (see "
            "[Several models](api/models.md)); replaces `EMBED_MODEL`"
        ),
    ),
    "model_kind": SettingHelp(
        "`auto`",
        (
            "`embedding` or `reranker` (a cross-encoder for the rerank routes), checked against the folder; "
            "`auto`: a sequence classifier is a reranker"
        ),
    ),
    "rerank_weights": SettingHelp(
        "`0.4,0.2,0.4`",
        ("bge-m3 as a reranker: the weights of its dense, sparse and ColBERT scores (see [Rerank](api/rerank.md))"),
    ),
    "revision": SettingHelp(
        "(empty)",
        "hub revision to load",
    ),
    "default_prompt_name": SettingHelp(
        "(empty)",
        (
            "the model's prompt applied when a request names none; empty: the model's own "
            "`default_prompt_name` (see [Instruction prompts](api/models.md#instruction-prompts))"
        ),
    ),
    "device": SettingHelp(
        "`auto`",
        "`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N`, `mps`",
    ),
    "dtype": SettingHelp(
        "`auto`",
        "`auto` (float16 on GPU, float32 on CPU), `float32`, `float16`, `bfloat16`",
    ),
    "cpu_threads": SettingHelp(
        "`0`",
        "torch threads on CPU; 0 = every core this process may use",
    ),
    "max_inputs": SettingHelp(
        "`2048`",
        "inputs per request",
    ),
    "max_input_tokens": SettingHelp(
        "`0`",
        "tokens per input; 0 = the model's limit (may only lower it)",
    ),
    "max_request_tokens": SettingHelp(
        "`300000`",
        "tokens per request, all inputs together",
    ),
    "truncate": SettingHelp(
        "`false`",
        "`false`: an over-long input is a 400, as at OpenAI; `true`: cut it to the limit",
    ),
    "max_body_bytes": SettingHelp(
        "`33554432`",
        "request body limit (413 above)",
    ),
    "max_batch_tokens": SettingHelp(
        "`0`",
        (
            "padded tokens per forward pass (longest x count); 0 = by device: 512 on CPU (wide batches only "
            "add padding there), 8192 on MPS, 16384 on CUDA"
        ),
    ),
    "pipeline_depth": SettingHelp(
        "`2`",
        (
            "forward passes handed to the device at once: 2 plans and queues the next batch while a pass runs"
            " (the device never waits for the server between passes); 1 runs them one at a time"
        ),
    ),
    "max_batch_size": SettingHelp(
        "`128`",
        "inputs per forward pass",
    ),
    "max_queue_tokens": SettingHelp(
        "`2000000`",
        "queued tokens before new work gets 503 + Retry-After",
    ),
    "redis_url": SettingHelp(
        "(empty)",
        "`redis://host:port/db` (also `rediss://`, `unix://`); empty = an in-process LRU cache",
    ),
    "memory_cache_bytes": SettingHelp(
        "`268435456`",
        (
            "size of the in-process cache (no Redis); every entry counted by its bytes, a ColBERT matrix as "
            "much as the vectors it weighs"
        ),
    ),
    "redis_mode": SettingHelp(
        "`single`",
        (
            "`single`, `sentinel` (the URL lists the sentinels) or `cluster` (the URL names any node); see "
            "[Redis modes](operations.md#redis-modes)"
        ),
    ),
    "redis_sentinel_master": SettingHelp(
        "(empty)",
        ("sentinel mode: the master's name in the sentinels' configuration (required there, refused elsewhere)"),
    ),
    "redis_max_connections": SettingHelp(
        "`64`",
        "connections per Redis node; more concurrent cache calls wait for a free one",
    ),
    "redis_pool_timeout_ms": SettingHelp(
        "`1000`",
        "how long a cache call waits for a free connection before it is a miss (not a Redis failure)",
    ),
    "workers": SettingHelp(
        "`1`",
        (
            "HTTP worker processes on one port; above 1, one engine process owns the model and the batcher "
            "(see [Scaling out](deploy.md#scaling-out))"
        ),
    ),
    "devices": SettingHelp(
        "(empty)",
        (
            "one engine process per entry (`cuda:0,cuda:1`, `cuda:0,cuda:0`, `cpu,cpu`), all of one kind; "
            "empty: one engine on `EMBED_DEVICE` (see [Several "
            "engines](deploy.md#several-engines-embed_devices))"
        ),
    ),
    "engine_start_timeout_s": SettingHelp(
        "`600`",
        "workers mode: how long a (re)started engine may take to load and warm up",
    ),
    "cache": SettingHelp(
        "`on`",
        "`off` computes every input",
    ),
    "cache_ttl_seconds": SettingHelp(
        "`604800`",
        "expiry of cached vectors (7 days)",
    ),
    "cache_prefix": SettingHelp(
        "`emb`",
        "first part of every key",
    ),
    "cache_share_numerics": SettingHelp(
        "`false`",
        ("`true`: replicas that differ only in dtype or runtime share vectors (see [Cache](operations.md#cache))"),
    ),
    "cache_dtype": SettingHelp(
        "`float32`",
        (
            "how outputs are stored in the cache: `float16` (half the bytes) or `int8` (a scale per block "
            "of a vector: about 0.3x); the server answers what it stores, so a miss and its "
            "later hits are the same vector bit for bit; part of the cache namespace (see "
            "[Cache](operations.md#cache))"
        ),
    ),
    "cache_dtype_min_cosine": SettingHelp(
        "`0`",
        (
            "the storage type's gate at start: the worst cosine between the model's outputs of a fixed "
            "probe set and their stored form; below it the server does not start (exit 2); 0: by type, "
            "0.99999 for float16 and 0.999 for int8"
        ),
    ),
    "cache_timeout_ms": SettingHelp(
        "`250`",
        "bound on each cache read (writes get 4x)",
    ),
    "cache_breaker_failures": SettingHelp(
        "`3`",
        "consecutive Redis failures that open the circuit breaker",
    ),
    "cache_breaker_seconds": SettingHelp(
        "`5`",
        "how long an open breaker skips Redis before one probe call",
    ),
    "host": SettingHelp(
        "`127.0.0.1`",
        "listen address (`0.0.0.0` in the container)",
    ),
    "port": SettingHelp(
        "`8001`",
        "listen port",
    ),
    "log_level": SettingHelp(
        "`info`",
        "`debug`, `info`, `warning`, `error`",
    ),
    "log_format": SettingHelp(
        "`text`",
        "`text` or `json` (one object per line)",
    ),
    "shutdown_timeout_s": SettingHelp(
        "`30`",
        "on SIGTERM, how long requests in flight and pending cache writes may take",
    ),
    "max_connections": SettingHelp(
        "`1000`",
        (
            "requests in flight before others get 503; probes and `/metrics` never do; idle connections and "
            "bodies still arriving do not count"
        ),
    ),
    "max_header_bytes": SettingHelp(
        "`65536`",
        "size of a request head; 431 above",
    ),
    "max_headers": SettingHelp(
        "`100`",
        "header lines per request; 431 above",
    ),
    "header_timeout_s": SettingHelp(
        "`10`",
        "to receive a whole request head; idle and slowloris connections are closed after it",
    ),
    "body_timeout_s": SettingHelp(
        "`60`",
        "a body that sends nothing for this long gets 408",
    ),
    "body_min_bytes_per_s": SettingHelp(
        "`1024`",
        ("average rate a body must keep after its first `EMBED_BODY_TIMEOUT_S`; 408 below it; 0 turns it off"),
    ),
    "keepalive_timeout_s": SettingHelp(
        "`5`",
        "an idle keep-alive connection is closed after this (uvicorn's `timeout_keep_alive`)",
    ),
    "strict_settings": SettingHelp(
        "`false`",
        (
            "an `EMBED_*` variable that is no setting (a typo such as `EMBED_MAX_CONECTIONS`) stops the start"
            " (exit 2); otherwise `serve` and `check` print a warning naming the setting it most likely meant"
        ),
    ),
    "api_keys": SettingHelp(
        "(empty)",
        (
            "comma list, or `@/path/file` with one key per line; unset = no auth; a value that names no key "
            "(an empty file, only commas) stops the server (exit 2)"
        ),
    ),
    "public_metrics": SettingHelp(
        "`false`",
        "`true` opens `/stats`, `/stats/history` and `/metrics` without a key (the `/dashboard` page is always open)",
    ),
    "api_keys_file": SettingHelp(
        "(empty)",
        (
            "TOML with `[[keys]]` tables: `name`, `key`, optional `requests_per_minute`, `tokens_per_minute` "
            "(see [Keys and limits](clients.md#keys-and-limits)); works beside `EMBED_API_KEYS`"
        ),
    ),
    "rate_limit_local_share": SettingHelp(
        "`0.05`",
        (
            "share of a key's limits a replica admits without asking Redis while far from them (0 to 0.05); "
            "`0`: every admission asks Redis, and replicas pass a limit by at most one request each"
        ),
    ),
    "compression": SettingHelp(
        "`true`",
        "zstd (or gzip) answers for clients whose `Accept-Encoding` takes them",
    ),
    "compression_min_bytes": SettingHelp(
        "`4096`",
        (
            "answers smaller than this go out uncompressed (a single vector: see [Keys and "
            "limits](clients.md#keys-and-limits))"
        ),
    ),
    "history_interval_s": SettingHelp(
        "`10`",
        "seconds per `/stats/history` sample",
    ),
    "history_samples": SettingHelp(
        "`360`",
        "samples kept (360 x 10 s = the last hour)",
    ),
    "quantize": SettingHelp(
        "`none`",
        ("`int8`: the transformer runs in ONNX Runtime with int8 weights, CPU only (see [int8 on CPU](int8.md))"),
    ),
    "onnx_cache_dir": SettingHelp(
        "`~/.cache/embedding-gateway/onnx` (the image: `/onnx`)",
        (
            "where the ONNX export and the int8 model are kept, per model fingerprint; a complete folder on a"
            " read-only volume is used as it is (`embedding-gateway int8 build` fills it; see [Deploying "
            "int8](int8.md#deploying-int8-build-once-onto-a-volume-serve-it-read-only))"
        ),
    ),
    "int8_min_cosine": SettingHelp(
        "`0.98`",
        ("int8 quality gate: worst cosine (int8 vs float32) over the probe texts; below it the server does not start"),
    ),
    "int8_min_mean_cosine": SettingHelp(
        "`0.995`",
        "int8 quality gate: mean cosine over the probe texts",
    ),
    "int8_min_top10_overlap": SettingHelp(
        "`0.95`",
        ("int8 quality gate: share of float32's top-10 documents per probe query that int8 also ranks top 10"),
    ),
    "batch_dir": SettingHelp(
        "(none: the Batch API is off)",
        "folder for `/v1/files` and batch outputs; replicas must share it (an RWX volume); "
        "with `EMBED_REDIS_URL` the jobs and work queue live in Redis, else in this folder, run by one process",
    ),
    "batch_max_file_bytes": SettingHelp("`209715200`", "largest uploaded file (OpenAI's 200 MB); 400 above"),
    "batch_max_lines": SettingHelp("`50000`", "most request lines in one batch file (OpenAI's 50,000); 400 above"),
    "batch_chunk_inputs": SettingHelp(
        "`1024`", "inputs in one unit of batch work: what a replica takes at a time, and redoes if its holder died"
    ),
    "batch_chunks_in_flight": SettingHelp(
        "`2`", "chunks each server process runs at once (the next one queued for the device while one runs)"
    ),
    "batch_claim_idle_s": SettingHelp(
        "`60.0`", "a chunk whose replica stopped renewing its claim this long is taken over by another (XAUTOCLAIM)"
    ),
}

_INTRO = """# Configuration

Every setting is an environment variable and a flag of `embedding-gateway serve`
(`EMBED_MAX_INPUTS` is `--max-inputs`); flags win over variables, variables over defaults. Values
are checked at start: `EMBED_PORT=eighty` is one clear line and exit 2, never a traceback. Only
`gateway/settings.py` reads the environment.

This page is generated from the code (`python -m gateway.settings_help > docs/configuration.md`);
a test fails when the two differ.
"""


def render() -> str:
    """The configuration page: the intro, then one table row per setting."""
    lines = [_INTRO, "| variable | default | meaning |", "|---|---|---|"]
    for name, shown in SETTINGS_HELP.items():
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown.default} | {shown.meaning} |")
    return "\n".join(lines) + "\n"


def field_names() -> tuple[str, ...]:
    return Settings.__struct_fields__


if __name__ == "__main__":
    print(render(), end="")
