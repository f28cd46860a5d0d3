"""Preflight: the settings checks ``serve`` runs before it loads a model.

A setting that cannot work (a device this machine lacks, a dtype the device cannot run, a model
folder that is missing, a prompt name the model does not have, a token limit above the model's)
would otherwise fail minutes later, after a download or a load, with a traceback. Each check here
reads only small files (the model's config and tokenizer settings) and answers with the first
problem as one line that names the variable and the flag, or None when everything can work.

``serve`` exits 2 with that line; ``check`` prints every finding instead (``gateway.cli_check``).
"""

from __future__ import annotations

from pathlib import Path

from gateway.settings import ENV_PREFIX, Settings

__all__ = ["int8_preflight", "model_problem", "preflight"]


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
    """The preflight checks of one model's device, dtype, folder, prompts and limits."""
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
        problem = int8_preflight(device.type)
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


def model_problem(settings: Settings) -> str | None:
    """A model that can't be found or read, as one line (the int8 Job's log must not start with a traceback)."""
    from encoder import ModelNotFoundError
    from encoder.model_files import read_model_spec, resolve_model_dir

    try:
        read_model_spec(resolve_model_dir(settings.model, settings.revision or None))
    except (ModelNotFoundError, ValueError, OSError) as exc:
        return _model_line(exc)
    return None


def int8_preflight(device_type: str) -> str | None:
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
