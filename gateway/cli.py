"""``embedding-gateway serve | check | openapi | cache``: flags mirror :class:`~gateway.settings.Settings`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway.settings import ENV_PREFIX, Settings, SettingsError

logger = logging.getLogger("gateway")

__all__ = ["main"]


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    for name in Settings.field_names():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"overrides {ENV_PREFIX}{name.upper()}",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load the model and serve the HTTP API")
    _settings_flags(serve)
    check = commands.add_parser("check", help="can the configured server run here? (torch, device, model, Redis)")
    _settings_flags(check)
    openapi = commands.add_parser("openapi", help="print (or write) the OpenAPI document")
    openapi.add_argument("--output", "-o", type=Path, default=None, help="write here instead of stdout")
    from gateway import cachectl

    cachectl.add_parsers(commands, _settings_flags)  # cache stats | purge | warm (issue 13)
    int8 = commands.add_parser("int8", help="int8 on the CPU: build the ONNX cache once, onto a volume")
    int8_commands = int8.add_subparsers(dest="int8_command", required=True)
    int8_build = int8_commands.add_parser(
        "build", help="export, quantise and gate EMBED_MODEL into EMBED_ONNX_CACHE_DIR (pods mount it read-only)"
    )
    _settings_flags(int8_build)
    int8_build.add_argument(
        "--all-variants", action="store_true", help="also build the weights for the other kind of CPU (VNNI / AVX2)"
    )
    # EMBED_WORKERS > 1 (issue 12): the processes `serve` starts. Their settings come on stdin, one
    # JSON line, never on the command line: any local user can read a command line (ps), and the
    # settings hold the API keys and the Redis password.
    for role, text in (
        ("engine", "(started by serve) the engine process: model and batcher behind a Unix socket"),
        ("worker", "(started by serve) one HTTP worker process in front of the engine"),
    ):
        sub = commands.add_parser(role, help=f"{text}; reads its settings as one JSON line on stdin")
        sub.add_argument(
            "--socket", type=Path, action="append", required=True, help="an engine's Unix socket (a worker: each)"
        )
        sub.add_argument("--restarts-file", type=Path, default=None, help="restart counts the supervisor writes")
        sub.add_argument("--supervisor-pid", type=int, default=None, help="a worker stops when this parent is gone")
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"), default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def openapi_document() -> dict[str, Any]:
    from gateway.http.app import create_app

    document: dict[str, Any] = create_app(Settings()).openapi_schema.to_schema()
    return document


def preflight(settings: Settings) -> str | None:
    """Check what can be checked before the model loads; the first problem as one line, or None.

    Device and dtype against this machine, the model folder (found, readable) and
    ``max_input_tokens`` against the model's own limit: each would otherwise fail minutes later,
    after a download or a load, with a traceback.
    """
    from gateway.core.keys import KeysFileError, load_keys
    from gateway.core.models_file import ModelsFileError, model_settings
    from gateway.core.ratelimit import unshared_limits_problem

    try:
        keys = load_keys(settings)  # a bad EMBED_API_KEYS_FILE: one line naming the [[keys]] table and field
    except KeysFileError as exc:
        return str(exc)
    problem = unshared_limits_problem(settings, keys)  # EMBED_WORKERS > 1 without Redis: every limit x workers
    if problem is not None:
        return problem
    try:
        models = model_settings(settings)  # a bad EMBED_MODELS_FILE: one line naming the [[models]] table
    except ModelsFileError as exc:
        return str(exc)
    if not settings.models_file.strip():
        return _one_model_problem(settings)
    for model in models:
        problem = _one_model_problem(model)
        if problem is not None:
            return f"{ENV_PREFIX}MODELS_FILE (--models-file): model {model.served_model!r}: {problem}"
    return None


def _kind_problem(settings: Settings, folder: Path) -> str | None:
    """A model of another kind than declared, or a reranker under the supervisor (not served there yet)."""
    from encoder.cross_encoder import is_cross_encoder

    kind = "reranker" if is_cross_encoder(folder) else "embedding"
    if settings.model_kind not in ("auto", kind):
        return (
            f"{ENV_PREFIX}MODEL_KIND: the model is declared {settings.model_kind!r} but its folder holds {kind!r} model"
        )
    if kind == "reranker" and settings.quantize != "none":
        return f"{ENV_PREFIX}QUANTIZE (--quantize): int8 serves embedding models only; this model is a reranker"
    if kind == "reranker" and settings.supervised:
        return (
            f"{ENV_PREFIX}MODEL (--model): a reranker is served in one process for now; unset {ENV_PREFIX}WORKERS "
            f"and {ENV_PREFIX}DEVICES, or serve it from another server"
        )
    return None


def _one_model_problem(settings: Settings) -> str | None:
    """:func:`preflight`'s checks of one model's device, dtype, folder, prompts and limits."""
    from encoder import DeviceNotAvailableError, ModelNotFoundError, resolve_device, resolve_dtype
    from encoder.model_files import read_model_spec, resolve_model_dir

    where = f"{ENV_PREFIX}DEVICES (--devices)" if settings.devices else f"{ENV_PREFIX}DEVICE (--device)"
    try:
        device, *_ = [resolve_device(entry) for entry in settings.engine_devices]  # each engine's
    except DeviceNotAvailableError as exc:
        return f"{where}: {exc}"
    try:
        resolve_dtype(device, settings.dtype)
    except (DeviceNotAvailableError, ValueError) as exc:
        return f"{ENV_PREFIX}DTYPE (--dtype): {exc}"
    try:
        spec = read_model_spec(resolve_model_dir(settings.model, settings.revision or None))
    except (ModelNotFoundError, ValueError, OSError) as exc:
        return _model_line(exc)
    if settings.quantize == "int8":
        problem = _int8_preflight(device.type)
        if problem is not None:
            return problem
        from encoder.onnx_int8 import int8_dtype_problem

        problem = int8_dtype_problem(settings.dtype)
        if problem is not None:
            return f"{ENV_PREFIX}DTYPE (--dtype): {problem}"
    problem = _kind_problem(settings, spec.path) or _prompt_problem(spec.path, settings.default_prompt_name)
    if problem is not None:
        return problem
    if settings.max_input_tokens > spec.max_tokens:
        return (
            f"{ENV_PREFIX}MAX_INPUT_TOKENS (--max-input-tokens): {settings.max_input_tokens} is above the model's "
            f"limit of {spec.max_tokens} tokens; use at most {spec.max_tokens}, or 0 for the model's limit"
        )
    return None


def _prompt_problem(model_path: Path, default_name: str) -> str | None:
    """A prompts config that cannot be read, or an EMBED_DEFAULT_PROMPT_NAME the model lacks."""
    from encoder.model_files import read_prompts

    try:
        prompts = read_prompts(model_path)
    except (ValueError, OSError) as exc:
        return _model_line(exc)
    if default_name and default_name not in prompts.prompts:
        known = ", ".join(sorted(prompts.prompts)) or "none"
        return (
            f"{ENV_PREFIX}DEFAULT_PROMPT_NAME (--default-prompt-name): {default_name!r} is not one of the "
            f"model's prompts ({known})"
        )
    return None


def _model_line(exc: Exception) -> str:
    return f"{ENV_PREFIX}MODEL (--model): {exc}"


def _model_problem(settings: Settings) -> str | None:
    """A model that can't be found or read, as one line (the int8 Job's log must not start with a traceback)."""
    from encoder import ModelNotFoundError
    from encoder.model_files import read_model_spec, resolve_model_dir

    try:
        read_model_spec(resolve_model_dir(settings.model, settings.revision or None))
    except (ModelNotFoundError, ValueError, OSError) as exc:
        return _model_line(exc)
    return None


def _int8_preflight(device_type: str) -> str | None:
    if device_type != "cpu":
        return (
            f"{ENV_PREFIX}QUANTIZE (--quantize): int8 runs on the CPU only, but the device is {device_type}; "
            f"set {ENV_PREFIX}DEVICE=cpu"
        )
    import importlib.util

    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"{ENV_PREFIX}QUANTIZE (--quantize): int8 needs {' and '.join(missing)}, not installed here; "
            "pip install 'embedding-gateway[int8]'"
        )
    return None


def _serve(settings: Settings) -> int:
    import uvicorn

    from gateway.http.app import create_app, load_model
    from gateway.http.server import uvicorn_config

    configure_logging(settings)
    problem = preflight(settings)
    if problem is not None:
        print(f"embedding-gateway: invalid setting: {problem}", file=sys.stderr)
        return 2
    if settings.supervised:  # EMBED_WORKERS > 1 or several EMBED_DEVICES
        # Every engine (re)start loads the commit resolved now, never whatever the hub's branch
        # points at by then: a restart must not change the model the workers' cache keys name.
        from gateway.core.models_file import model_settings
        from gateway.engine.supervisor import Supervisor

        models = [pin_model_revision(model) for model in model_settings(settings)]
        return Supervisor(settings, models).run()
    # Load and warm up before the socket opens: the port answers only once the model can.
    import torch

    from encoder.onnx_int8 import Int8CacheError, QualityGateError
    from gateway.core.models_file import model_settings

    encoders = []
    for model in model_settings(settings):  # EMBED_MODEL alone, or each of EMBED_MODELS_FILE's in turn
        try:
            encoders.append(load_model(model))
        except (QualityGateError, Int8CacheError) as exc:
            print(f"embedding-gateway: refusing to start: {exc}", file=sys.stderr)
            return 2
        except (torch.OutOfMemoryError, MemoryError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(
                f"embedding-gateway: refusing to start: model {model.served_model!r} does not fit in memory "
                f"(device {model.device}) beside the {len(encoders)} loaded before it: {first}",
                file=sys.stderr,
            )
            return 2
    config = uvicorn_config(create_app(settings, encoders=encoders), settings)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler it found at
    # start; with the default handler the process would die by the signal after a clean drain.
    # A graceful stop is a success: exit 0.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    server.run()
    return 0 if server.started else 1  # uvicorn leaves started False when start-up failed


def pin_model_revision(settings: Settings) -> Settings:
    """``settings`` with a hub model's revision resolved to the commit it names now (a local folder,
    or a model that cannot be resolved, as they are: preflight has said why)."""
    import msgspec

    from encoder.model_files import ModelNotFoundError, pinned_revision

    try:
        commit = pinned_revision(settings.model, settings.revision or None)
    except (ModelNotFoundError, ValueError, OSError):
        return settings
    if commit is None or commit == settings.revision:
        return settings
    logging.getLogger("gateway").info(
        "model %s: revision %s pinned to commit %s", settings.model, settings.revision or "(default)", commit
    )
    return msgspec.structs.replace(settings, revision=commit)


def _settings_from_stdin() -> Settings:
    """The supervisor's settings: the first line on stdin (the rest of stdin is the engine's stop pipe)."""
    import msgspec

    return msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)


def _engine(settings: Settings, socket_path: Path, restarts_file: Path | None) -> int:
    from gateway.engine.server import run_engine
    from gateway.http.app import load_model

    configure_logging(settings)
    return run_engine(settings, socket_path, load_model, restarts_file, stop_pipe=sys.stdin.buffer)


def _watch_parent(parent: int, server: Any) -> None:
    """A worker whose supervisor (``parent``) was killed drains and stops instead of serving on alone.

    A started worker drains by uvicorn's own stop flag (``server.should_exit``). One still starting
    has nothing to drain and may never finish starting (its start-up waits for an engine that died
    with the supervisor), so it exits at once.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        logger.warning("the supervisor (pid %d) is gone: this worker stops", parent)
        server.should_exit = True
        if not server.started:
            os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker(settings: Settings, socket_paths: list[Path], supervisor_pid: int) -> int:
    import uvicorn

    from gateway.engine.supervisor import reuseport_socket
    from gateway.http.app import create_app
    from gateway.http.server import uvicorn_config

    configure_logging(settings)
    listener = reuseport_socket(settings.host, settings.port)
    listener.listen(2048)
    config = uvicorn_config(create_app(settings, engine_sockets=socket_paths), settings)
    server = uvicorn.Server(config)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)  # as in _serve: a drained stop exits 0
    _watch_parent(supervisor_pid, server)
    server.run(sockets=[listener])
    return 0 if server.started else 1


def masked_url(url: str) -> str:
    """``url`` with its password (and a user-only secret) replaced by ``***``, for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    credentials, _, host = parts.netloc.rpartition("@")
    user, colon, _ = credentials.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{hidden}@{host}"))


def _check_int8(settings: Settings) -> bool:
    """The CPU's int8 instructions, what int8 should give here, and whether it can run."""
    from encoder import DeviceNotAvailableError, resolve_device
    from encoder.onnx_int8 import cpu_int8_features, expected_speedup

    features = cpu_int8_features()
    print(f"int8       CPU flags: {', '.join(features) or 'none of avx2, avx512_vnni, avx_vnni, amx_int8'}")
    print(f"           expect: {expected_speedup(features)} (EMBED_QUANTIZE={settings.quantize})")
    if settings.quantize != "int8":
        return True
    try:
        device_type = resolve_device(settings.device).type
    except DeviceNotAvailableError:
        device_type = settings.device
    problem = _int8_preflight(device_type)
    if problem is not None:
        print(f"int8       FAIL: {problem}")
    return problem is None


def _check(settings: Settings) -> int:
    """The seed's start script, done right: report what this machine offers and what fails."""
    import torch

    from encoder import DeviceNotAvailableError, ModelNotFoundError, resolve_device
    from encoder.device import available_devices
    from encoder.model_files import read_model_spec, resolve_model_dir

    ok = True
    print(f"torch      {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda       available: {torch.cuda.device_count()} device(s): {names}")
    else:
        print("cuda       not available")
    print(f"mps        {'available' if 'mps' in available_devices() else 'not available'}")
    for index, asked in enumerate(settings.engine_devices):  # one line per engine (EMBED_DEVICES)
        label = f"engine {index}" if settings.devices else "device"
        try:
            print(f"{label:10} {resolve_device(asked)} (asked: {asked})")
        except DeviceNotAvailableError as exc:
            print(f"{label:10} FAIL: {exc}")
            ok = False
    from gateway.core.models_file import ModelsFileError, model_settings

    try:
        models = model_settings(settings)  # EMBED_MODEL, or every model of EMBED_MODELS_FILE
    except ModelsFileError as exc:
        print(f"models     FAIL: {exc}")
        models, ok = (), False
    for model in models:
        label = "model" if not settings.models_file.strip() else f"model {model.served_model}"
        try:
            folder = resolve_model_dir(model.model, model.revision or None)
            spec = read_model_spec(folder)
            print(
                f"{label:10} {model.model} -> {folder}: dim {spec.dim}, pooling {spec.pooling}, "
                f"normalize {spec.normalize}, max {spec.max_tokens} tokens"
            )
        except (ModelNotFoundError, ValueError, OSError) as exc:
            print(f"{label:10} FAIL: {exc}")
            ok = False
    ok = _check_int8(settings) and ok
    if not settings.cache:
        print("cache      off")
    elif not settings.redis_url:
        print(
            f"cache      in-process LRU ({settings.memory_cache_bytes / 2**20:.0f} MiB); set EMBED_REDIS_URL for Redis"
        )
    else:
        import redis

        shown = masked_url(settings.redis_url)
        try:
            redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
            print(f"redis      {shown} answers")
        except (redis.RedisError, OSError) as exc:
            print(f"redis      FAIL: {shown}: {type(exc).__name__}")
            ok = False
    print("ok: the configured server can run here" if ok else "not ok: fix the FAIL lines above")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "openapi":
        text = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text)
        return 0
    if args.command == "cache":
        return _cache(args)
    if args.command == "int8":
        return _int8(args)
    if args.command in ("engine", "worker"):
        if args.command == "engine":
            # First thing, before the slow imports: a Ctrl-C to the group must not stop an engine
            # that draining workers still need (the supervisor stops it by closing its stdin).
            for stop in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop, signal.SIG_IGN)
        settings = _settings_from_stdin()
        if args.command == "engine":
            return _engine(settings, args.socket[0], args.restarts_file)
        return _worker(settings, args.socket, args.supervisor_pid or os.getppid())
    loaded = _load_settings(args)
    if loaded is None:
        return 2
    return _check(loaded) if args.command == "check" else _serve(loaded)


def _load_settings(args: argparse.Namespace, *, serving: bool = True) -> Settings | None:
    """The settings of a command that reads the environment, or None after one line on stderr.

    Every such command (serve, check, int8 build, cache) names a misspelt ``EMBED_*`` variable the
    same way: a typo must not pass for a default, silently, in a Job any more than in the server.
    """
    try:
        settings = Settings.load(overrides={name: getattr(args, name) for name in Settings.field_names()})
        if serving:
            settings.api_key_set()  # an unreadable key file is a start-up error, not a 500 later
    except SettingsError as exc:
        print(f"embedding-gateway: invalid setting: {exc}", file=sys.stderr)
        return None
    for line in Settings.unknown_variables():
        print(f"embedding-gateway: warning: {line}", file=sys.stderr)
    return settings


def _int8(args: argparse.Namespace) -> int:
    """``int8 build``: the int8 cache of EMBED_MODEL, built once (README "int8 on CPU")."""
    settings = _load_settings(args, serving=False)
    if settings is None:
        return 2
    configure_logging(settings)
    problem = _int8_preflight("cpu") or _model_problem(settings)
    if problem is not None:
        print(f"embedding-gateway: {problem}", file=sys.stderr)
        return 2
    from encoder.onnx_int8 import GateFloor, build_int8_cache

    return build_int8_cache(
        settings.model,
        cache_dir=settings.onnx_cache_dir or None,
        revision=settings.revision or None,
        threads=settings.cpu_threads or None,
        floor=GateFloor(settings.int8_min_cosine, settings.int8_min_mean_cosine, settings.int8_min_top10_overlap),
        all_variants=args.all_variants,
    )


def _cache(args: argparse.Namespace) -> int:
    from gateway import cachectl

    if args.cache_command == "warm":  # talks to a running gateway, not to Redis
        return cachectl.run(args)
    settings = _load_settings(args, serving=False)
    if settings is None:
        return 2
    return cachectl.run(args, settings.redis_url, settings.cache_prefix)


if __name__ == "__main__":
    raise SystemExit(main())
