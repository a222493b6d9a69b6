"""Whether opens follow lookups: the signal for warming a small file's blocks at its lookup.

A program reading many small files (a training epoch, ``cat`` over a dataset, a benchmark)
looks each one up, then opens and reads it. Once the blocks' locations are known, the wait
for the disk cache (or the object store) can start at the lookup instead of at the open, and
overlap the round trips that come in between: the kernel's reply and next request, and the
open's own metadata read. A program that only looks files up (``stat``, ``find``, ``ls -l``
of names the kernel forgot) would gain nothing and cost reads of blocks nobody wants.

``OpenPredictor`` tells the two apart from what just happened: each lookup of a small file
is a guess, right when that file is opened while among the last ``WINDOW`` looked up, wrong
when it leaves them unopened. The share of right guesses is an exponentially weighted
average with weight ``WEIGHT``; warming is on while it is at least ``THRESHOLD``. Starting
at 1, a stat-only pass stops warming after about ``WINDOW`` + 11 lookups, and a reading
pass turns it back on within a dozen files.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

WINDOW = 16  # lookups that may be in flight before their open (parallel readers)
WEIGHT = 1 / 16
THRESHOLD = 0.5


class OpenPredictor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, None] = OrderedDict()  # looked up, not opened yet
        self.score = 1.0

    def likely(self) -> bool:
        """Whether the next lookup of a small file is likely to be followed by its open."""
        return self.score >= THRESHOLD

    def looked_up(self, inode: int) -> None:
        """A small regular file was looked up (counted whether or not it was warmed)."""
        with self._lock:
            self._pending[inode] = None
            self._pending.move_to_end(inode)
            while len(self._pending) > WINDOW:
                self._pending.popitem(last=False)
                self.score -= self.score * WEIGHT  # never opened: a wrong guess

    def opened(self, inode: int) -> None:
        with self._lock:
            if inode in self._pending:  # a guess came true
                del self._pending[inode]
                self.score += (1.0 - self.score) * WEIGHT
