"""Run the app under uvicorn with the limits a public server needs.

uvicorn gives us keep-alive timeouts (``timeout_keep_alive``) and a bounded graceful shutdown
(``timeout_graceful_shutdown``); we use those as they are. Its ``limit_concurrency`` we do not use:
it counts open connections, idle keep-alive ones included, and answers 503 before any route runs,
so a handful of idle sockets (a proxy's keep-alive pool) made ``/livez`` and ``/readyz`` fail, the
kubelet restarted busy pods, and no counter saw the refusals (issue 27). Idle connections cost a
few KB and their deadlines close them; what needs a cap is the work in flight. So the cap counts
requests in flight, and is kept by the request middleware (:class:`~gateway.http.middleware.InFlight`),
which sees the route: a request counts once its body is complete, and probes and ``/metrics`` never.

What uvicorn's httptools protocol lacks (header limits counted over every byte, deadlines for the
head, the body and the drain, the in-flight mark) is added by :func:`guarded_protocol`, in
:mod:`gateway.http.wire`; this module hands it to uvicorn with uvicorn's own settings.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from gateway.http.wire import ConnectionLimits, guarded_protocol
from gateway.settings import Settings

__all__ = ["ConnectionLimits", "guarded_protocol", "uvicorn_config"]

logger = logging.getLogger("gateway.server")


class _CancelledAtShutdown(logging.Filter):
    """uvicorn logs a request cancelled by its graceful-shutdown timeout as an error with a
    traceback; it is expected then: one line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.levelno = (
                "a request was cancelled: the shutdown timeout passed before it finished",
                (),
                None,
                logging.WARNING,
            )
            record.levelname = "WARNING"
        return True


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for ``app``: its own timeouts, plus :func:`guarded_protocol`."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CancelledAtShutdown) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_CancelledAtShutdown())
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_bytes_per_s=settings.body_min_bytes_per_s,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        log_config=None,  # keep the logging set up by the CLI (JSON when asked)
        access_log=False,  # our middleware logs one richer line per request
        lifespan="on",
        timeout_keep_alive=settings.keepalive_timeout_s,
        # no limit_concurrency: it counts idle connections and refuses probes (module docstring)
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
