"""In-memory LRU cache of whole blocks. Blocks are immutable, so a cached block is never stale;
the cache only has to stay within its share of the mount's memory budget."""

from __future__ import annotations

import threading
from collections import OrderedDict

from loftfs.chunk.budget import MemoryBudget


class MemBlockCache:
    """Holds at most ``capacity`` bytes, every byte also counted in ``budget``. When writers
    need memory the budget asks the cache to shrink (``reclaim``); when the budget is full the
    cache evicts its own oldest blocks, and if that is not enough it simply does not cache."""

    def __init__(self, budget: MemoryBudget, capacity: int) -> None:
        self._budget = budget
        self.capacity = max(0, capacity)
        self._lock = threading.Lock()
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        budget.add_reclaimer(self.reclaim)

    @property
    def size(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._blocks

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._blocks.get(key)
            if data is None:
                self.misses += 1
                return None
            self._blocks.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> bool:
        """Cache ``data``; returns False when no room could be made."""
        n = len(data)
        if n > self.capacity:
            return False
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return True
            self._budget.release(self._evict_locked(self._bytes + n - self.capacity))
            while not self._budget.try_acquire(n):
                if not self._blocks:
                    return False
                self._budget.release(self._evict_locked(n))
            self._blocks[key] = data
            self._bytes += n
            return True

    def _evict_locked(self, n: int) -> int:
        """Drop oldest blocks worth at least ``n`` bytes; the caller releases them from the
        budget. Returns the bytes dropped."""
        freed = 0
        while freed < n and self._blocks:
            _, data = self._blocks.popitem(last=False)
            freed += len(data)
        self._bytes -= freed
        return freed

    def reclaim(self, n: int) -> int:
        with self._lock:
            freed = self._evict_locked(n)
        self._budget.release(freed)
        return freed

    def discard(self, key: str) -> None:
        with self._lock:
            data = self._blocks.pop(key, None)
            if data is None:
                return
            self._bytes -= len(data)
        self._budget.release(len(data))

    def clear(self) -> None:
        with self._lock:
            freed = self._evict_locked(self._bytes)
        self._budget.release(freed)
