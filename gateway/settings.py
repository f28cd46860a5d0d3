"""One frozen :class:`Settings` struct: the only place that reads the environment.

Every field ``name`` is set by the variable ``EMBED_<NAME>`` and by the CLI flag ``--<name>``
(underscores become dashes); flags win over variables, variables over defaults. Values are
converted and checked by msgspec, so ``EMBED_PORT=eighty`` is one clear error at start.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["ENV_PREFIX", "Settings", "SettingsError"]

ENV_PREFIX = "EMBED_"

_BOOLEANS = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Server configuration. docs/configuration.md (``gateway.settings_help``) documents each field."""

    # model
    model: str = "BAAI/bge-m3"
    model_name: str = ""  # served id; empty: the folder or repo basename
    model_aliases: tuple[str, ...] = ()
    models_file: str = ""  # TOML: [[models]] name, path, ... (several models; the first is the default)
    # what the model is: auto (a sequence classifier is a reranker, anything else an embedding model)
    model_kind: Literal["auto", "embedding", "reranker"] = "auto"
    # bge-m3 as a reranker: the weights of its dense, sparse and ColBERT scores (FlagEmbedding's)
    rerank_weights: tuple[float, float, float] = (0.4, 0.2, 0.4)
    revision: str = ""
    # the model's prompt applied when a request names none; empty: the model's own default_prompt_name
    default_prompt_name: str = ""
    device: Annotated[str, msgspec.Meta(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")] = "auto"
    dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"] = "auto"
    cpu_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: every core
    # limits
    max_inputs: PositiveInt = 2048
    max_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: the model's own limit
    max_request_tokens: PositiveInt = 300_000
    truncate: bool = False
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    # batching
    max_batch_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: by device (CPU 512, GPU 16384)
    max_batch_size: PositiveInt = 128
    max_queue_tokens: PositiveInt = 2_000_000
    # 2: the next batch is planned and queued for the device while a pass runs; 1: one at a time
    pipeline_depth: Annotated[int, msgspec.Meta(ge=1, le=2)] = 2
    # cache
    redis_url: str = ""  # empty: an in-process LRU cache
    memory_cache_bytes: PositiveInt = 256 * 1024 * 1024  # the in-process cache (no Redis), entries counted by size
    cache: bool = True
    cache_ttl_seconds: PositiveInt = 604_800
    cache_prefix: str = "emb"
    cache_share_numerics: bool = False  # true: replicas differing only in dtype/runtime share vectors
    # how cached outputs are stored: float16 halves them, int8 (a scale per vector) quarters them;
    # the server answers what it stores, and a gate checks the type on the model at start
    cache_dtype: Literal["float32", "float16", "int8"] = "float32"
    cache_dtype_min_cosine: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0  # 0: by type (0.99999 / 0.999)
    cache_timeout_ms: PositiveInt = 250
    cache_breaker_failures: PositiveInt = 3  # consecutive failures that open the circuit
    cache_breaker_seconds: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # how long an open circuit skips Redis
    # server
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8001
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: PositiveInt = 30
    max_connections: PositiveInt = 1000  # requests in flight before new ones get 503 (probes and /metrics never)
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024  # a request head; 431 above
    max_headers: PositiveInt = 100  # header lines per request; 431 above
    header_timeout_s: PositiveFloat = 10.0  # to receive a request head (idle or slow clients are closed)
    body_timeout_s: PositiveFloat = 60.0  # a request body that sends nothing for this long gets 408
    body_min_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 1024  # 408 below it, after body_timeout_s; 0: off
    keepalive_timeout_s: PositiveInt = 5  # an idle keep-alive connection is closed after this
    strict_settings: bool = False  # an EMBED_* variable that is no setting (a typo) stops the start; else a warning
    # access
    api_keys: str = ""  # comma list, or @/path/to/file with one key per line
    public_metrics: bool = False  # true: /stats, /metrics and /dashboard need no key
    # clients, keys and limits (issue 13)
    api_keys_file: str = ""  # TOML: [[keys]] name, key, requests_per_minute, tokens_per_minute
    compression: bool = True  # zstd or gzip answers for clients that accept them
    compression_min_bytes: PositiveInt = 4096  # smaller answers go out as they are (bench/features.py)
    history_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # one /stats/history sample per interval
    history_samples: PositiveInt = 360  # samples kept (360 x 10 s = one hour)
    # redis modes (issue 12)
    redis_mode: Literal["single", "cluster", "sentinel"] = "single"
    redis_sentinel_master: str = ""  # sentinel mode: the master's name the sentinels know
    redis_max_connections: PositiveInt = 64  # per Redis node; more concurrent calls wait for one
    # The share of a key's limits a replica may take without asking Redis (far from the limits); 0: every
    # admission asks Redis, so replicas pass a limit by at most one request each, at a round trip per request.
    rate_limit_local_share: Annotated[float, msgspec.Meta(ge=0, le=0.05)] = 0.05
    redis_pool_timeout_ms: PositiveInt = 1000  # how long a call waits for a free connection (then: a miss)
    # workers (issue 12)
    workers: PositiveInt = 1  # HTTP worker processes; above 1, one engine process owns the model and the batcher
    # several engines (issue 20): one engine process per entry (cuda:0,cuda:1 / cuda:0,cuda:0 / cpu,cpu);
    # empty: one engine on EMBED_DEVICE (in this process when EMBED_WORKERS is 1)
    devices: tuple[str, ...] = ()
    engine_start_timeout_s: PositiveFloat = 600.0  # a (re)started engine must load and warm up within this
    # int8 (issue 15)
    quantize: Literal["none", "int8"] = "none"  # int8: ONNX Runtime on the CPU, gated against float32
    onnx_cache_dir: str = ""  # empty: ~/.cache/embedding-gateway/onnx
    int8_min_cosine: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.98  # worst probe text, int8 vs float32
    int8_min_mean_cosine: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.995
    int8_min_top10_overlap: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.95  # probe queries' top 10 documents
    # OpenAI's Batch API (issue 23): files and outputs in a folder every replica shares; empty: off
    batch_dir: str = ""
    batch_max_file_bytes: PositiveInt = 200 * 1024 * 1024  # an uploaded file (OpenAI's 200 MB); 400 above
    batch_max_lines: PositiveInt = 50_000  # request lines of one batch file (OpenAI's 50,000); 400 above
    batch_chunk_inputs: PositiveInt = 1024  # inputs of one unit of work a replica takes (and redoes if it dies)
    batch_chunks_in_flight: PositiveInt = 2  # chunks one process runs at once (the next queued while one runs)
    batch_claim_idle_s: PositiveFloat = 60.0  # a chunk whose replica went silent this long is redone elsewhere

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here as a validation error at this struct.
        url = self.redis_url.strip()
        if url and not url.startswith(_REDIS_SCHEMES):
            scheme = url.partition("://")[0] if "://" in url else url[:16]
            raise ValueError(
                f"EMBED_REDIS_URL (--redis-url): scheme {scheme!r} is not one of "
                f"{', '.join(_REDIS_SCHEMES)} (empty: an in-process cache)"
            )
        _check_redis_mode(self.redis_mode, url, self.redis_sentinel_master.strip())
        _check_devices(self.devices)
        if any(weight < 0 for weight in self.rerank_weights) or sum(self.rerank_weights) <= 0:
            raise ValueError(
                f"{ENV_PREFIX}RERANK_WEIGHTS (--rerank-weights): {self.rerank_weights} must be three weights of "
                "at least 0 (dense, sparse, ColBERT), not all 0"
            )

    @property
    def engine_devices(self) -> tuple[str, ...]:
        """One device per engine: ``devices``, or ``device`` alone."""
        return self.devices or (self.device,)

    @property
    def supervised(self) -> bool:
        """Whether ``serve`` runs a supervisor of engine and worker processes (else one process)."""
        return self.workers > 1 or len(self.engine_devices) > 1

    @property
    def served_model(self) -> str:
        """The model id clients send and responses name."""
        if self.model_name:
            return self.model_name
        return PurePath(self.model.rstrip("/")).name or self.model

    @property
    def accepted_models(self) -> frozenset[str]:
        """Ids a request may name: the served id, its aliases and ``EMBED_MODEL`` itself."""
        return frozenset({self.served_model, self.model, *self.model_aliases})

    def api_key_set(self) -> frozenset[str]:
        """The accepted API keys; empty only when ``api_keys`` is unset or blank (no auth).

        ``@path`` reads one key per line from a file. A value that was given but yields no key (an
        empty file, only commas and blanks) is a :class:`SettingsError`: an empty set means "no
        auth", so a mistake in the secret would otherwise open the server to anyone, silently."""
        where = f"{ENV_PREFIX}API_KEYS (--api-keys)"
        source = self.api_keys.strip()
        if not source:
            return frozenset()
        origin = "the comma list"
        if source.startswith("@"):
            path = Path(source[1:]).expanduser()
            try:
                source = path.read_text(encoding="utf-8").replace("\n", ",")
            except OSError as exc:
                raise SettingsError(f"{where}: cannot read key file {str(path)!r}: {exc.strerror}") from None
            origin = f"the key file {str(path)!r}"
        keys = frozenset(key.strip() for key in source.split(",") if key.strip())
        if not keys:
            # Never the value itself: it is a secret's place, even when it holds no key.
            raise SettingsError(
                f"{where}: {origin} has no key (one per line or comma-separated); unset it to serve without auth"
            )
        return keys

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return cls.__struct_fields__

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str] | None = None) -> list[str]:
        """One line per ``EMBED_*`` variable that is no setting, with the setting it most likely
        meant: ``EMBED_MAX_CONECTIONS`` would otherwise start a server with the default, silently."""
        environ = os.environ if environ is None else environ
        known = {ENV_PREFIX + name.upper() for name in cls.field_names()}
        lines = []
        for variable in sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known):
            guess = difflib.get_close_matches(variable, known, n=1, cutoff=0.75)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            lines.append(f"{variable} is not a setting{hint}; it is ignored")
        return lines

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
        """Build settings from ``EMBED_*`` variables (default: ``os.environ``) and CLI overrides.

        With ``strict_settings`` an ``EMBED_*`` variable that is no setting is a :class:`SettingsError`
        (see :meth:`unknown_variables`, which callers otherwise print as warnings)."""
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for name in cls.field_names():
            value = environ.get(ENV_PREFIX + name.upper())
            if value is not None and value.strip() != "":
                raw[name] = value.strip()
        raw.update({key: value for key, value in (overrides or {}).items() if value is not None})
        for listed in ("model_aliases", "devices", "rerank_weights"):  # comma lists
            if isinstance(raw.get(listed), str):
                raw[listed] = tuple(entry.strip() for entry in raw[listed].split(",") if entry.strip())
        if isinstance(raw.get("devices"), tuple):  # CPU,CPU as EMBED_DEVICE=CPU is taken
            raw["devices"] = tuple(entry.lower() for entry in raw["devices"])
        for info in msgspec.structs.fields(cls):  # operators write on/off and yes/no too
            if info.type is bool and isinstance(raw.get(info.name), str):
                raw[info.name] = _BOOLEANS.get(raw[info.name].lower(), raw[info.name])
        for name in ("log_level", "log_format", "device", "dtype", "redis_mode"):
            if isinstance(raw.get(name), str):
                raw[name] = raw[name].lower()
        try:
            # strict=False turns "8001" into 8001 and "true"/"0" into booleans.
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(_explain(str(exc), raw)) from None
        unknown = cls.unknown_variables(environ) if settings.strict_settings else []
        if unknown:
            raise SettingsError(f"{unknown[0].removesuffix('; it is ignored')} ({ENV_PREFIX}STRICT_SETTINGS is on)")
        if settings.devices:
            # The first engine's device is the device: what loads in process (a one-entry list),
            # what `check` and the int8 checks judge. Each engine gets its own entry.
            settings = msgspec.structs.replace(settings, device=settings.devices[0])
        return settings


_DEVICE = re.compile(r"^(cpu|mps|cuda(:[0-9]+)?)$")
MAX_ENGINES = 16


def _check_devices(devices: tuple[str, ...]) -> None:
    """Every engine's device is a concrete one, and all of one kind: the cache namespace holds one
    model's numerics, so a CPU engine's float32 vectors must not mix with a GPU's float16 ones."""
    where = f"{ENV_PREFIX}DEVICES (--devices)"
    for device in devices:
        if not _DEVICE.match(device):
            raise ValueError(f"{where}: {device!r} is not cpu, mps, cuda or cuda:N")
    if len({device.partition(":")[0] for device in devices}) > 1:
        raise ValueError(f"{where}: {','.join(devices)} mixes kinds of device; use one kind (cpu,cpu or cuda:0,cuda:1)")
    if len(devices) > MAX_ENGINES:
        raise ValueError(f"{where}: {len(devices)} engines; at most {MAX_ENGINES}")


def _check_redis_mode(mode: str, url: str, master: str) -> None:
    """The URL's shape and the sentinel master's name must fit ``EMBED_REDIS_MODE``."""
    name = "EMBED_REDIS_MODE (--redis-mode)"
    hosts = url.partition("://")[2].rpartition("@")[2].partition("/")[0].partition("?")[0]
    if mode == "sentinel" and not master:
        raise ValueError(f"{name} is sentinel: set EMBED_REDIS_SENTINEL_MASTER (--redis-sentinel-master)")
    if mode != "sentinel" and master:
        raise ValueError(f"EMBED_REDIS_SENTINEL_MASTER is set but {name} is {mode!r}, not sentinel")
    if mode == "single":
        if "," in hosts:
            raise ValueError(f"EMBED_REDIS_URL lists several hosts: set {name} to sentinel (or cluster: name one node)")
        return
    if not url:
        raise ValueError(f"{name} is {mode}: set EMBED_REDIS_URL (--redis-url)")
    if url.startswith("unix://"):
        raise ValueError(f"{name} is {mode}: EMBED_REDIS_URL must be redis:// or rediss://, not unix://")
    if mode == "cluster":
        if "," in hosts:
            raise ValueError(f"{name} is cluster: EMBED_REDIS_URL names one node, the others are discovered")
        db = url.partition("://")[2].partition("/")[2].partition("?")[0]
        if db not in ("", "0"):
            raise ValueError(f"{name} is cluster: a cluster has only database 0, not /{db}")


_CHOICES = {
    "device": "auto, cpu, cuda, cuda:N or mps",
    "dtype": "auto, float32, float16 or bfloat16 (fp32, fp16, half, bf16)",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json",
    "redis_mode": "single, cluster or sentinel",
    "quantize": "none or int8",
}


def _explain(message: str, raw: Mapping[str, Any]) -> str:
    # msgspec says "... - at `$.port`"; name the variable the operator actually sets.
    if "at `$." not in message:
        return message.removeprefix("ValueError: ")
    detail, _, path = message.rpartition(" - at `$.")
    name = path.rstrip("`").split(".")[0].split("[")[0]
    if name in _CHOICES:
        detail = f"{raw.get(name)!r} is not a choice: use {_CHOICES[name]}"
    return f"{ENV_PREFIX}{name.upper()} (--{name.replace('_', '-')}): {detail}"
