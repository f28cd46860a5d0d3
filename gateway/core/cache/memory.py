"""An in-process LRU with a TTL, for running without Redis (one process, nothing shared)."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["MemoryBlobCache"]

# What one entry costs besides its key and value bytes: the dict slot, the tuple, the float and
# the two objects' headers (measured with sys.getsizeof on CPython 3.11).
_ENTRY_OVERHEAD = 200


class MemoryBlobCache:
    """Holds at most ``max_bytes`` of entries, each counted by its real size; the least recently
    used goes first. Counting bytes, not items, is what bounds memory: a ColBERT entry of 256
    tokens (about 417 KB) weighs as much as 270 dense 384-d vectors.
    """

    backend = "memory"

    def __init__(self, *, max_bytes: int, ttl_seconds: int) -> None:
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return sys.getsizeof(key) + sys.getsizeof(value) + _ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._items)

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
            size = self._size(key, value)
            if size > self.max_bytes:
                continue  # larger than the whole cache: keeping it would evict everything else
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self._size(key, old[1])
            self._items[key] = (expires, value)
            self.bytes += size
        while self.bytes > self.max_bytes and self._items:
            key, (_, value) = self._items.popitem(last=False)
            self.bytes -= self._size(key, value)

    async def put_first(self, key: str, value: bytes) -> bytes | None:
        # No await in between: nothing else runs on the loop from the lookup to the write.
        found = (await self.get_blobs([key]))[0]
        if found is None:
            await self.put_blobs([(key, value)])
            found = (await self.get_blobs([key]))[0]
        return found

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()
        self.bytes = 0
