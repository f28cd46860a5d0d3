"""``embedding-gateway serve | openapi``: flags mirror :class:`~gateway.settings.Settings`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from gateway.settings import ENV_PREFIX, Settings, SettingsError

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
    openapi = commands.add_parser("openapi", help="print (or write) the OpenAPI document")
    openapi.add_argument("--output", "-o", type=Path, default=None, help="write here instead of stdout")
    return parser


def openapi_document() -> dict[str, Any]:
    from gateway.app import create_app

    document: dict[str, Any] = create_app(Settings()).openapi_schema.to_schema()
    return document


def _serve(settings: Settings) -> int:
    import uvicorn

    from gateway.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our middleware logs one richer line per request
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn sets started=False when the lifespan (model load) failed.
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "openapi":
        text = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text)
        return 0
    overrides = {name: getattr(args, name) for name in Settings.field_names()}
    try:
        settings = Settings.load(overrides=overrides)
    except SettingsError as exc:
        print(f"embedding-gateway: invalid setting: {exc}", file=sys.stderr)
        return 2
    return _serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
