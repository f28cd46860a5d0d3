"""The HTTP side of the embedding gateway: Litestar routes, settings, the Redis vector cache."""

from gateway.app import create_app
from gateway.settings import Settings

__all__ = ["Settings", "create_app"]
