"""The docs site (issue 25): the charts it shows are the measured ones, the README stays short."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_charts_in_the_docs_are_the_measured_ones() -> None:
    measured = {path.name: path.read_bytes() for path in (ROOT / "bench" / "measured").glob("*.svg")}
    shown = {path.name: path.read_bytes() for path in (ROOT / "docs" / "img").glob("*.svg")}
    assert measured and shown == measured, "copy bench/measured/*.svg to docs/img/ after a bench run"


def test_the_readme_is_short_and_holds_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and commands[0].endswith("embedding-gateway serve")
    assert commands[1].endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, ".ci/run runs the README's test command"
