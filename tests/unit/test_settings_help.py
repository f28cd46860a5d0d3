"""docs/configuration.md is generated from the code (issue 25): it cannot drift from Settings."""

from __future__ import annotations

import math
import re
from pathlib import Path

from gateway.settings import Settings
from gateway.settings_help import SETTINGS_HELP, render

ROOT = Path(__file__).resolve().parents[2]


def _shown(value: object) -> set[str]:
    """How a default may be written on the page."""
    if isinstance(value, bool):
        return {"true", "on"} if value else {"false", "off"}
    if isinstance(value, tuple):
        return {",".join(str(item) for item in value)}
    return {str(value)}


def test_every_setting_is_explained_and_nothing_else() -> None:
    assert list(SETTINGS_HELP) != [] and set(SETTINGS_HELP) == set(Settings.__struct_fields__)


def test_each_default_shown_is_the_real_default() -> None:
    defaults = Settings()
    for name, shown in SETTINGS_HELP.items():
        value = getattr(defaults, name)
        literal = re.fullmatch(r"`([^`]*)`", shown.default)
        if literal is None:  # words: only for a default that is empty and decided elsewhere
            assert value in ("", ()), (name, shown.default, value)
        elif isinstance(value, float) and not isinstance(value, bool):
            assert math.isclose(float(literal.group(1)), value), (name, shown.default, value)
        else:
            assert literal.group(1) in _shown(value), (name, shown.default, value)


def test_the_committed_page_is_what_the_code_renders() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render(), (
        "docs/configuration.md drifted: run `python -m gateway.settings_help > docs/configuration.md`"
    )
