"""An in-process LRU with a TTL, for running without Redis (one process, nothing shared)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["MemoryBlobCache"]


class MemoryBlobCache:
    """Holds at most ``max_items`` sealed values; the least recently used goes first."""

    backend = "memory"

    def __init__(self, *, max_items: int, ttl_seconds: int) -> None:
        self.max_items = max_items
        self.ttl_seconds = ttl_seconds
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        found: list[bytes | None] = []
        for key in keys:
            entry = self._items.get(key)
            if entry is None or entry[0] < now:
                found.append(None)
                continue
            self._items.move_to_end(key)
            found.append(entry[1])
        return found

    async def put_blobs(self, items: Sequence[tuple[str, bytes]]) -> None:
        expires = time.monotonic() + self.ttl_seconds
        for key, value in items:
            self._items[key] = (expires, value)
            self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()
