"""The embedding gateway: ``gateway.core`` (the request path), ``gateway.http`` (Litestar), settings, CLI.

``create_app`` is imported lazily, so ``import gateway.core`` never pulls in the web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.http.app import create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from gateway.http.app import create_app

        return create_app
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
