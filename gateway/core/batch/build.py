"""The configured Batch API: its service and job store, from the settings (``EMBED_BATCH_*``).

With ``EMBED_REDIS_URL`` the jobs live in that Redis (single, sentinel or cluster, as the cache
reaches it), so every replica sharing the folder takes part; without it, in the folder itself.
"""

from __future__ import annotations

from pathlib import Path

from gateway.core.batch.local_store import LocalJobs
from gateway.core.batch.redis_store import RedisJobs
from gateway.core.batch.service import BatchLimits, BatchService
from gateway.core.batch.store import JobStore
from gateway.core.cache.clients import cluster_client, sentinel_client, single_client
from gateway.settings import Settings

__all__ = ["batch_service"]

# Above the runner's longest blocking read (1 s): a Redis that answers nothing for this long is down.
_REDIS_TIMEOUT_S = 5.0
_REDIS_CONNECTIONS = 16


def job_store(settings: Settings, folder: Path) -> JobStore:
    url = settings.redis_url.strip()
    if not url:
        return LocalJobs(folder)
    if settings.redis_mode == "cluster":
        return RedisJobs(
            cluster_client(url, timeout_s=_REDIS_TIMEOUT_S, max_connections=_REDIS_CONNECTIONS), settings.cache_prefix
        )
    if settings.redis_mode == "sentinel":
        _, client = sentinel_client(
            url,
            settings.redis_sentinel_master.strip(),
            timeout_s=_REDIS_TIMEOUT_S,
            max_connections=_REDIS_CONNECTIONS,
        )
        return RedisJobs(client, settings.cache_prefix)
    return RedisJobs(
        single_client(url, timeout_s=_REDIS_TIMEOUT_S, max_connections=_REDIS_CONNECTIONS), settings.cache_prefix
    )


def batch_service(settings: Settings, endpoints: tuple[str, ...]) -> BatchService | None:
    """The Batch API of ``settings`` (None: ``EMBED_BATCH_DIR`` is empty, the API is off)."""
    if not settings.batch_dir.strip():
        return None
    folder = Path(settings.batch_dir.strip()).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    limits = BatchLimits(
        max_file_bytes=settings.batch_max_file_bytes,
        max_lines=settings.batch_max_lines,
        chunk_inputs=settings.batch_chunk_inputs,
    )
    return BatchService(folder, job_store(settings, folder), limits, endpoints=endpoints)
