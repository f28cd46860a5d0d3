"""An auth setting that was given but names no key stops the server (issue 26, item 7).

Unset (or blank) ``EMBED_API_KEYS`` means no auth, as README's settings table says; a value that
yields no key (an empty ``@file``, only commas and blanks) is a mistake that would otherwise open the
server to anyone, so it is a :class:`SettingsError`, never an empty key set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.keys import KeysFileError, load_keys
from gateway.settings import Settings, SettingsError


@pytest.mark.parametrize("value", [" , ", ",", ",,, ,", "\t,\t"])
def test_a_list_without_a_key_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match=r"EMBED_API_KEYS \(--api-keys\).*no key") as caught:
        Settings(api_keys=value).api_key_set()
    assert "\n" not in str(caught.value)
    with pytest.raises(SettingsError, match="no key"):
        load_keys(Settings(api_keys=value))
    with pytest.raises(SettingsError, match="no key"):
        Settings.load({"EMBED_API_KEYS": value}).api_key_set()


@pytest.mark.parametrize("content", ["", "\n", "\n\n  \n", " , \n,\n"])
def test_a_key_file_without_a_key_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(content)
    with pytest.raises(SettingsError, match="no key") as caught:
        Settings(api_keys=f"@{path}").api_key_set()
    message = str(caught.value)
    assert "EMBED_API_KEYS (--api-keys)" in message and str(path) in message and "\n" not in message
    with pytest.raises(SettingsError, match="no key"):
        load_keys(Settings(api_keys=f"@{path}"))


@pytest.mark.parametrize("value", ["", "   "])
def test_unset_or_blank_means_no_auth(value: str) -> None:
    """README: ``EMBED_API_KEYS`` (none) ... unset = no auth."""
    assert Settings(api_keys=value).api_key_set() == frozenset()
    assert Settings.load({"EMBED_API_KEYS": value}).api_key_set() == frozenset()
    assert Settings.load({}).api_key_set() == frozenset()
    assert load_keys(Settings(api_keys=value)) == ()


def test_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("\nfirst\n\n second \n")
    assert Settings(api_keys=f"@{path}").api_key_set() == {"first", "second"}
    assert Settings(api_keys=" a, ,b ").api_key_set() == {"a", "b"}


def test_an_empty_keys_file_is_refused(tmp_path: Path) -> None:
    """EMBED_API_KEYS_FILE already refuses a file without ``[[keys]]``: the same promise, kept."""
    path = tmp_path / "keys.toml"
    path.write_text("")
    with pytest.raises(KeysFileError, match="no \\[\\[keys\\]\\] tables"):
        load_keys(Settings(api_keys_file=str(path)))
