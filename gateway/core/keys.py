"""API keys with names and limits: ``EMBED_API_KEYS_FILE`` (TOML) and the plain ``EMBED_API_KEYS`` list.

```toml
[[keys]]
name = "ingest"                 # what /stats, /metrics and the logs show (never the key)
key = "sk-ingest-..."
requests_per_minute = 600       # optional
tokens_per_minute = 1_000_000   # optional
```

A file that cannot be used is one :class:`KeysFileError` line naming the table and the field, so
``serve`` exits 2 before the model loads. Keys from ``EMBED_API_KEYS`` have no name and no limits.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.settings import ENV_PREFIX, Settings, SettingsError

__all__ = ["ApiKey", "KeysFileError", "load_keys", "read_keys_file"]

_FIELDS = {"name", "key", "requests_per_minute", "tokens_per_minute"}
_WHERE = f"{ENV_PREFIX}API_KEYS_FILE (--api-keys-file)"


class KeysFileError(SettingsError):
    """The keys file is missing, not TOML, or a table has a bad field."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    name: str | None = None  # None: a key from the plain EMBED_API_KEYS list
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


def _positive(table: str, field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeysFileError(f"{table}: '{field}' must be a positive integer, got {value!r}")
    return value


def read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    """The ``[[keys]]`` tables of ``path``; :class:`KeysFileError` names the first bad table and field."""
    where = f"{_WHERE}: {str(path)!r}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"{where}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{where}: not valid TOML: {exc}") from None
    tables = document.get("keys")
    if not isinstance(tables, list) or not tables:
        raise KeysFileError(f"{where}: no [[keys]] tables (each needs 'name' and 'key')")
    found: list[ApiKey] = []
    names: set[str] = set()
    secrets: set[str] = set()
    for number, entry in enumerate(tables, start=1):
        table = f"{where}: [[keys]] #{number}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{table}: is not a table")
        if isinstance(entry.get("name"), str) and entry["name"].strip():
            table += f" ({entry['name'].strip()!r})"
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise KeysFileError(f"{table}: unknown field '{unknown[0]}' (fields: {', '.join(sorted(_FIELDS))})")
        for field in ("name", "key"):
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                raise KeysFileError(f"{table}: '{field}' must be a non-empty string")
        name, key = entry["name"].strip(), entry["key"].strip()
        if name in names:
            raise KeysFileError(f"{table}: 'name' {name!r} is used by an earlier table")
        if key in secrets:
            raise KeysFileError(f"{table}: 'key' is the same as an earlier table's")
        names.add(name)
        secrets.add(key)
        found.append(
            ApiKey(
                key=key,
                name=name,
                requests_per_minute=_positive(table, "requests_per_minute", entry.get("requests_per_minute")),
                tokens_per_minute=_positive(table, "tokens_per_minute", entry.get("tokens_per_minute")),
            )
        )
    return tuple(found)


def load_keys(settings: Settings) -> tuple[ApiKey, ...]:
    """Every accepted key: the named ones from the file, then the plain list (empty: no auth).

    Empty only when neither setting is given: a given one that names no key is a
    :class:`SettingsError` (an empty file, ``" , "``), never a server open to anyone."""
    named = read_keys_file(Path(settings.api_keys_file).expanduser()) if settings.api_keys_file.strip() else ()
    taken = {entry.key for entry in named}
    plain = tuple(ApiKey(key=key) for key in sorted(settings.api_key_set()) if key not in taken)
    return named + plain
