"""The HTTP layer: Litestar routes, auth, errors and request context over :mod:`gateway.core`."""
