"""The mount's memory budget for file data (``--buffer-size``): write buffers and cached blocks
draw from one pool, so memory stays bounded however many files are open."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Reclaimer = Callable[[int], int]


class MemoryBudget:
    """A counting semaphore of bytes. ``acquire`` blocks (backpressure) until the bytes are
    free; before waiting it asks the registered reclaimers (e.g. the block cache) to give
    memory back. A request larger than the whole budget is granted when nothing else is held,
    so it can never wait forever."""

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError("memory budget must be positive")
        self.total = total
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._reclaimers: list[Reclaimer] = []

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever held at once (observable bound for tests and metrics)."""
        return self._peak

    def add_reclaimer(self, fn: Reclaimer) -> None:
        """``fn(n)`` should try to release ``n`` bytes (via ``release``) and return how many it
        did. It is called without the budget's lock held."""
        self._reclaimers.append(fn)

    def _fits(self, n: int) -> bool:
        return self._used + n <= self.total or self._used == 0

    def _take(self, n: int) -> None:
        self._used += n
        self._peak = max(self._peak, self._used)

    def try_acquire(self, n: int) -> bool:
        with self._cond:
            if self._fits(n):
                self._take(n)
                return True
            return False

    def acquire(self, n: int, timeout: float | None = None) -> bool:
        """Take ``n`` bytes, waiting at most ``timeout`` seconds (forever when None)."""
        if self.try_acquire(n):
            return True
        self._reclaim(n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._fits(n):
                if deadline is None:
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._take(n)
            return True

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self._used -= n
            if self._used < 0:
                raise AssertionError("memory budget released more than acquired")
            self._cond.notify_all()

    def _reclaim(self, n: int) -> None:
        with self._cond:
            missing = self._used + n - self.total
        for fn in self._reclaimers:
            if missing <= 0:
                return
            missing -= fn(missing)
