"""Issue 25: ``embedding-gateway --help`` and every command's help are plain words for a newcomer.

argparse prints descriptions and help strings as they are, so reStructuredText markup written for
Sphinx (double backticks, ``:class:`` roles) would reach the terminal verbatim. Each command, down
to ``cache warm`` and ``int8 build``, must also say what it does in a description of its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from gateway.cli import main, parser

MARKUP = ("``", ":class:", ":func:", ":mod:", ":meth:", ":data:", ":attr:")


def _commands(root: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The argv of every command and subcommand, e.g. ("cache", "warm")."""
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from _commands(sub, (*path, name))


def _sub(root: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        (action,) = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
        root = action.choices[name]
    return root


COMMANDS = list(_commands(parser()))


def test_every_command_is_found() -> None:
    assert {"serve", "check", "openapi", "cache", "int8", "engine", "worker"} <= {c[0] for c in COMMANDS}
    assert {("cache", "stats"), ("cache", "purge"), ("cache", "warm"), ("int8", "build")} <= set(COMMANDS)


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "top")
def test_help_is_plain_words_with_a_description(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*path, "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: embedding-gateway")
    for markup in MARKUP:
        assert markup not in text, f"{' '.join(path) or 'top'} --help shows {markup!r}"
    description = _sub(parser(), path).description
    assert description and len(description.split()) >= 5, f"{' '.join(path)} needs a description of its own"
    assert " ".join(description.split()[:6]) in " ".join(text.split()), "the description is shown"
    for action in _sub(parser(), path)._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"


def test_warm_help_names_the_side_file_and_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cache", "warm", "--help"])
    text = capsys.readouterr().out
    assert "FILE.warm-skipped" in text and "--skipped-file" in text
    assert "exit status" in text and "FILE.warm-state" in text
