"""The request path without a web framework: service, cache, outputs, inputs, errors, telemetry.

Importable by a CLI, a worker process or a test without Litestar or uvicorn.
"""
