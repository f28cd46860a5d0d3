"""The ``embedding-gateway`` command line: one parser, and a dispatch to the module of each command.

* ``serve`` (``gateway.cli_serve``): load the model and serve the HTTP API; its settings are checked
  first (``gateway.cli_preflight``), so a setting that cannot work is one line and exit 2.
* ``check`` and ``openapi`` (``gateway.cli_check``): report on the setup; print the API's document.
* ``cache stats | purge | warm`` (``gateway.cachectl``, ``gateway.cachectl_warm``).
* ``int8 build``: build the int8 ONNX weights once, onto a volume the pods mount read-only.
* ``engine`` and ``worker``: the processes ``serve`` starts itself with several workers or devices.

Every setting is a flag of ``serve``, ``check``, ``int8 build`` and ``cache stats | purge``: the
field ``max_inputs`` of ``gateway.settings.Settings`` is ``--max-inputs`` and ``EMBED_MAX_INPUTS``;
a flag wins over the variable. The help texts are written for someone new to the project, in plain
words: argparse prints them as they are, so they hold no reStructuredText markup.

The names tests and tools import from here (``main``, ``preflight``, ``openapi_document``,
``pin_model_revision``, ...) are re-exported from the modules that now hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import msgspec

from gateway.cli_check import check, masked_url, openapi_document
from gateway.cli_preflight import int8_preflight, model_problem, preflight
from gateway.cli_serve import (
    JsonFormatter,
    configure_logging,
    pin_model_revision,
    run_engine_process,
    run_worker,
    serve,
    settings_from_stdin,
)
from gateway.settings import ENV_PREFIX, Settings, SettingsError
from gateway.settings_help import SETTINGS_HELP

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "main",
    "masked_url",
    "openapi_document",
    "parser",
    "pin_model_revision",
    "preflight",
]

# The names these functions had when they lived here (tests call some of them).
_serve, _check, _int8_preflight, _model_problem = serve, check, int8_preflight, model_problem

DESCRIPTION = """\
An OpenAI-compatible embedding server with a shared vector cache.

Start with "embedding-gateway check" to see whether the configured server can run on this machine,
then "embedding-gateway serve". Every setting can be given as a flag or as an environment variable
(--max-inputs or EMBED_MAX_INPUTS); a flag wins. Run any command with --help for its options."""

SERVE_DESCRIPTION = """\
Load the model, warm it up, and serve the HTTP API (OpenAI's /v1/embeddings and more) on
EMBED_HOST:EMBED_PORT (default 127.0.0.1:8001). The settings are checked before the model loads: a
setting that cannot work is reported as one line naming the variable and the flag, and the command
exits with status 2. With EMBED_WORKERS above 1 or several EMBED_DEVICES, serve starts one engine
process per device and the HTTP worker processes in front of them."""

CHECK_DESCRIPTION = """\
Report whether the configured server can run here: the torch version, CUDA and MPS, each device,
each model (found, its dimension and token limit), what int8 would give on this CPU, and whether
Redis answers. Problems are marked FAIL; the exit status is 1 if there is one, else 0. Nothing is
served and no model is loaded."""

INT8_BUILD_DESCRIPTION = """\
Export EMBED_MODEL to ONNX, quantise it to int8, check its vectors against the float32 model's
(the quality gate), and store the result in EMBED_ONNX_CACHE_DIR. Run it once, for example as a
Kubernetes Job writing to a volume; the serving pods then mount that volume read-only and start
without building anything."""

ROLE_DESCRIPTION = """\
Started by "serve" itself, not by hand. It reads its settings as one JSON line on stdin, never on
the command line, where any local user could read the API keys and the Redis password."""


def _default_text(name: str, value: object) -> str:
    """A setting's default as the help shows it (argparse expands %, so it is doubled). An empty
    default that the server fills in itself (the model's name, the ONNX cache folder) shows what
    docs/configuration.md says it becomes, not "empty"."""
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, tuple):
        text = ",".join(str(item) for item in value) or "empty"
    else:
        text = str(value) if value != "" else "empty"
    page = SETTINGS_HELP[name].default if name in SETTINGS_HELP else "(empty)"
    if text == "empty" and page != "(empty)":
        text = page.split(" (")[0].replace("`", "")
    return text.replace("%", "%%")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in a group of their own so the help shows them apart. The usage line
    names the command's own options and then "[--SETTING VALUE ...]", not the 70-odd settings."""
    own = parser.format_usage().removeprefix("usage: ").strip().replace("%", "%%")
    parser.usage = f"{own} [--SETTING VALUE ...]"
    group = parser.add_argument_group(
        "settings",
        f"each flag sets the environment variable of the same name ({ENV_PREFIX}MODEL for --model)\n"
        "and wins over it; docs/configuration.md (the Configuration page) says what each one does",
    )
    defaults = {field.name: field.default for field in msgspec.structs.fields(Settings)}
    for name in Settings.field_names():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{ENV_PREFIX}{name.upper()} (default: {_default_text(name, defaults.get(name))})",
        )


def parser() -> argparse.ArgumentParser:
    """The whole command line: every command, its help text and its flags."""
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="embedding-gateway", description=DESCRIPTION, formatter_class=raw)
    commands = top.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    serve_ = commands.add_parser(
        "serve", help="load the model and serve the HTTP API", description=SERVE_DESCRIPTION, formatter_class=raw
    )
    _settings_flags(serve_)
    check_ = commands.add_parser(
        "check",
        help="say whether the configured server can run here (torch, device, model, Redis)",
        description=CHECK_DESCRIPTION,
        formatter_class=raw,
    )
    _settings_flags(check_)
    openapi = commands.add_parser(
        "openapi",
        help="print the OpenAPI document of the HTTP API",
        description="Print the OpenAPI document (JSON) that describes the HTTP API, or write it to a file.",
    )
    openapi.add_argument("--output", "-o", type=Path, default=None, help="write it to this file instead of stdout")
    from gateway import cachectl

    cachectl.add_parsers(commands, _settings_flags)  # cache stats | purge | warm
    from gateway import batch_run

    batch_run.add_parsers(commands, _settings_flags)  # batch run
    int8 = commands.add_parser(
        "int8",
        help="build the int8 weights for the CPU once, onto a volume",
        description="int8 on the CPU: build the quantised ONNX weights once, so serving pods only load them.",
    )
    int8_commands = int8.add_subparsers(dest="int8_command", required=True, metavar="{build}")
    int8_build = int8_commands.add_parser(
        "build",
        help="export, quantise and check EMBED_MODEL into EMBED_ONNX_CACHE_DIR",
        description=INT8_BUILD_DESCRIPTION,
        formatter_class=raw,
    )
    int8_build.add_argument(
        "--all-variants", action="store_true", help="also build the weights for the other kind of CPU (VNNI or AVX2)"
    )
    _settings_flags(int8_build)
    for role, text in (
        ("engine", "the engine process: the model and its batcher behind a Unix socket"),
        ("worker", "one HTTP worker process in front of the engines"),
    ):
        sub = commands.add_parser(
            role, help=f"(started by serve) {text}", description=f"{text[0].upper()}{text[1:]}. {ROLE_DESCRIPTION}"
        )
        sub.add_argument(
            "--socket",
            type=Path,
            action="append",
            required=True,
            help="an engine's Unix socket (a worker takes one per engine)",
        )
        sub.add_argument("--restarts-file", type=Path, default=None, help="the engine restart counts serve writes")
        sub.add_argument("--supervisor-pid", type=int, default=None, help="a worker stops when this process is gone")
    return top


_parser = parser  # its former name


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status."""
    args = parser().parse_args(argv)
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
    if args.command == "batch":
        return _batch(args)
    if args.command in ("engine", "worker"):
        if args.command == "engine":
            # First thing, before the slow imports: a Ctrl-C to the group must not stop an engine
            # that draining workers still need (the supervisor stops it by closing its stdin).
            for stop in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop, signal.SIG_IGN)
        settings = settings_from_stdin()
        if args.command == "engine":
            return run_engine_process(settings, args.socket[0], args.restarts_file)
        return run_worker(settings, args.socket, args.supervisor_pid or os.getppid())
    loaded = _load_settings(args)
    if loaded is None:
        return 2
    return check(loaded) if args.command == "check" else serve(loaded)


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
    problem = int8_preflight("cpu") or model_problem(settings)
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


def _batch(args: argparse.Namespace) -> int:
    """``batch run``: a Batch API file through the configured model, in this process."""
    settings = _load_settings(args)
    if settings is None:
        return 2
    configure_logging(settings)
    problem = preflight(settings)
    if problem is not None:
        print(f"embedding-gateway: {problem}", file=sys.stderr)
        return 2
    from gateway import batch_run

    return batch_run.run(args, settings)


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
