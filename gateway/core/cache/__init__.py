"""Where outputs are kept between requests: Redis, or an in-process LRU, behind a circuit breaker.

The cache maps string keys to sealed byte values and knows nothing of HTTP or the encoder.
"""

from gateway.core.cache.base import (
    BlobCache,
    CacheBusyError,
    CacheRefusedError,
    CacheSkippedError,
    CacheUnavailableError,
    cache_key,
)
from gateway.core.cache.breaker import CircuitBreakerCache
from gateway.core.cache.memory import MemoryBlobCache
from gateway.core.cache.redis import RedisBlobCache

__all__ = [
    "BlobCache",
    "CacheBusyError",
    "CacheRefusedError",
    "CacheSkippedError",
    "CacheUnavailableError",
    "CircuitBreakerCache",
    "MemoryBlobCache",
    "RedisBlobCache",
    "cache_key",
]
