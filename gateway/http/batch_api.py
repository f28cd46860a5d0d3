"""The Batch API's part of the app's life: its service on the runtime, its runner in the background.

Every server process (each HTTP worker too) runs a :class:`~gateway.core.batch.runner.BatchRunner`:
with Redis they all take chunks; without it, the one holding the folder's runner lock does. At
shutdown the runner stops first, and chunks it held go back to the queue for another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar

from gateway.core.batch.build import batch_service
from gateway.core.batch.runner import BatchRunner
from gateway.http.batch_lines import BATCH_ROUTES, LineExecutor
from gateway.http.runtime import Runtime
from gateway.settings import Settings

__all__ = ["running_batches"]


@contextlib.asynccontextmanager
async def running_batches(app: Litestar, settings: Settings, runtime: Runtime) -> AsyncIterator[None]:
    service = batch_service(settings, tuple(BATCH_ROUTES))
    if service is None:
        yield
        return
    runner = BatchRunner(
        service.jobs,
        service.files,
        service.folder,
        LineExecutor(app),
        chunks_in_flight=settings.batch_chunks_in_flight,
        claim_idle_s=settings.batch_claim_idle_s,
    )
    runtime.batches, runtime.batch_runner = service, runner
    task = asyncio.create_task(runner.run(), name="batch-runner")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.jobs.close()
