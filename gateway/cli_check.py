"""``check`` and ``openapi``: commands that report on a setup without serving anything.

``check`` is the start script done right: it prints what this machine offers (torch, CUDA, MPS),
resolves each configured device and model, says what int8 would give on this CPU and whether Redis
answers, marks each problem with FAIL and exits 1 if there is one. Unlike ``serve``'s preflight it
goes on after a problem, so one run lists them all. A Redis password is never printed.

``openapi`` prints the OpenAPI document of the HTTP API, as the server would serve it.
"""

from __future__ import annotations

from typing import Any

from gateway.cli_preflight import int8_preflight
from gateway.settings import Settings

__all__ = ["check", "masked_url", "openapi_document"]


def openapi_document() -> dict[str, Any]:
    from gateway.http.app import create_app

    document: dict[str, Any] = create_app(Settings()).openapi_schema.to_schema()
    return document


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
    problem = int8_preflight(device_type)
    if problem is not None:
        print(f"int8       FAIL: {problem}")
    return problem is None


def check(settings: Settings) -> int:
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
