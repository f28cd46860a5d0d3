"""Several models in one server: ``EMBED_MODELS_FILE`` (TOML), one ``[[models]]`` table per model.

```toml
[[models]]
name = "bge-m3"                     # the id clients send as ``model``; the first table is the default
path = "BAAI/bge-m3"                # a folder or a hub id
aliases = ["text-embedding-3-small"]
dtype = "float16"

[[models]]
name = "e5-small"
path = "/models/multilingual-e5-small"
device = "cpu"                      # each field left out takes its EMBED_* setting
max_input_tokens = 512
truncate = true
default_prompt_name = "query"
```

Each table becomes the :class:`~gateway.settings.Settings` of one model: the server's settings with
the table's fields in place of ``EMBED_MODEL``, ``EMBED_MODEL_NAME``, ``EMBED_MODEL_ALIASES`` and the
per-model ones (device, dtype, quantize, max_input_tokens, truncate, default_prompt_name,
revision). ``kind`` is ``embedding`` or ``reranker`` (a cross-encoder), checked against the folder
(default ``auto``: a sequence classifier is a reranker). A file that
cannot be used is one :class:`ModelsFileError` line naming the table and the field, so ``serve``
exits 2 before any model loads. Without the file the server serves ``EMBED_MODEL`` alone.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.settings import ENV_PREFIX, Settings, SettingsError

__all__ = ["ANY_MODEL", "ModelEntry", "ModelsFileError", "model_settings", "read_models_file"]

ANY_MODEL = "*"  # an alias that takes any model name a request sends (as TEI does)
_WHERE = f"{ENV_PREFIX}MODELS_FILE (--models-file)"
MAX_MODELS = 16


class ModelsFileError(SettingsError):
    """The models file is missing, not TOML, or a table has a bad field."""


class ModelEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One ``[[models]]`` table; a field left out (None) takes the server's ``EMBED_*`` setting."""

    name: str
    path: str
    kind: Literal["auto", "embedding", "reranker"] = "auto"  # auto: a sequence classifier is a reranker
    aliases: tuple[str, ...] = ()
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    max_input_tokens: int | None = None
    truncate: bool | None = None
    default_prompt_name: str | None = None

    def settings(self, server: Settings) -> Settings:
        """The server's settings with this model's fields in place (checked as ``EMBED_*`` are)."""
        fields: dict[str, Any] = {
            "model": self.path.strip(),
            "model_name": self.name.strip(),
            "model_aliases": tuple(alias.strip() for alias in self.aliases),
            "models_file": "",
            "model_kind": self.kind,
        }
        for name in ("revision", "device", "dtype", "quantize", "max_input_tokens", "truncate", "default_prompt_name"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value.lower() if name in ("device", "dtype", "quantize") else value
        return msgspec.convert({**msgspec.structs.asdict(server), **fields}, Settings)


def read_models_file(path: Path, server: Settings) -> tuple[Settings, ...]:
    """One :class:`Settings` per ``[[models]]`` table of ``path``, in order (the first is the
    default); :class:`ModelsFileError` names the first bad table and field."""
    where = f"{_WHERE}: {str(path)!r}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"{where}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelsFileError(f"{where}: not valid TOML: {exc}") from None
    tables = document.get("models")
    if not isinstance(tables, list) or not tables:
        raise ModelsFileError(f"{where}: no [[models]] tables (each needs 'name' and 'path')")
    if len(tables) > MAX_MODELS:
        raise ModelsFileError(f"{where}: {len(tables)} models; at most {MAX_MODELS}")
    if server.model_name or server.model_aliases:
        raise ModelsFileError(
            f"{where}: {ENV_PREFIX}MODEL_NAME and {ENV_PREFIX}MODEL_ALIASES name one model; with a models file "
            "give each model its name and aliases in its table (unset them)"
        )
    found: list[Settings] = []
    labels: list[str] = []
    owner: dict[str, str] = {}  # every id a request may send -> the model it names
    for number, table in enumerate(tables, start=1):
        label = f"{where}: [[models]] #{number}"
        if isinstance(table, dict) and isinstance(table.get("name"), str) and table["name"].strip():
            label += f" ({table['name'].strip()!r})"
        settings = _one_model(table, label, server)
        for name in (settings.served_model, *settings.model_aliases):
            if name in owner:
                raise ModelsFileError(f"{label}: {name!r} already names model {owner[name]!r}")
            owner[name] = settings.served_model
        found.append(settings)
        labels.append(label)
    # A request may name a model by its path too: an id that is another model's path would be ambiguous.
    for settings, label in zip(found, labels, strict=True):
        named = owner.get(settings.model)
        if named is not None and named != settings.served_model:
            raise ModelsFileError(f"{label}: its path {settings.model!r} is a name or alias of model {named!r}")
    return tuple(found)


def _one_model(table: Any, label: str, server: Settings) -> Settings:
    if not isinstance(table, dict):
        raise ModelsFileError(f"{label}: is not a table")
    try:
        entry = msgspec.convert(table, ModelEntry)
    except msgspec.ValidationError as exc:
        raise ModelsFileError(f"{label}: {_field_message(str(exc))}") from None
    for field, value in (("name", entry.name), ("path", entry.path)):
        if not value.strip():
            raise ModelsFileError(f"{label}: '{field}' must be a non-empty string")
    if any(not alias.strip() for alias in entry.aliases):
        raise ModelsFileError(f"{label}: 'aliases' holds an empty name")
    if entry.name.strip() == ANY_MODEL:
        raise ModelsFileError(f"{label}: 'name' cannot be {ANY_MODEL!r} (it may be an alias: any other name)")
    if any(not character.isprintable() for name in (entry.name, *entry.aliases) for character in name):
        raise ModelsFileError(f"{label}: a name or alias holds a control character")
    try:
        return entry.settings(server)
    except msgspec.ValidationError as exc:
        raise ModelsFileError(f"{label}: {_field_message(str(exc))}") from None


def _field_message(message: str) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.name`" as "'name': Expected `str`, got `int`"."""
    unknown = re.search(r"unknown field `([^`]*)`", message)
    if unknown:
        return f"unknown field '{unknown.group(1)}' (fields: {', '.join(ModelEntry.__struct_fields__)})"
    missing = re.search(r"missing required field `([^`]*)`", message)
    if missing:
        return f"'{missing.group(1)}' is required (each table needs 'name' and 'path')"
    detail, found, path = message.rpartition(" - at `$.")
    if not found:
        return message
    field = path.rstrip("`").split(".")[0].split("[")[0]
    return f"'{field}': {detail}"


def model_settings(server: Settings) -> tuple[Settings, ...]:
    """The settings of every model the server serves: the file's, or ``EMBED_MODEL`` alone."""
    if not server.models_file.strip():
        return (server,)
    try:
        path = Path(server.models_file.strip()).expanduser()
    except RuntimeError as exc:  # ~user of a user this system does not know
        raise ModelsFileError(f"{_WHERE}: {server.models_file.strip()!r}: {exc}") from None
    return read_models_file(path, server)
