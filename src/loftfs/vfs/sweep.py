"""Batched lookups for a directory being swept.

A program that stats or opens the files of one directory one after the other (``find``, a data
loader's epoch, ``rsync``, ``juicefs bench``'s stat pass) sends one LOOKUP per name once the
kernel's dentries have expired or were dropped; with a remote metadata engine each is a round
trip. When the lookups of one directory keep missing the mount's cache (``SWEEP_MISSES`` within
one validity window), ``SweepDetector`` says so, and the mount reads the whole directory, names
and attributes, in one go (``Meta.readdir_small``: a round trip or two for thousands of
entries) into its ``MetaCache``, in the background; the lookups that follow are answered from
memory.

Nothing is answered longer than before: a listing read at ``t`` serves lookups until
``t + --entry-timeout`` (``--attr-timeout`` for the attributes), exactly like one lookup's
answer, and only names that exist are cached (a name created by another client since is looked
up as before). A directory of more than ``MAX_LISTED`` entries is not listed (the cache keeps
at most twice that many names); it is not counted again for ``TOO_BIG_HOLD_S``.
"""

from __future__ import annotations

import threading
import time

SWEEP_MISSES = 16  # lookups of one directory missing the cache within a window: list it
MAX_LISTED = 4096  # entries; half of MetaCache's bound
TOO_BIG_HOLD_S = 60.0
MAX_TRACKED = 1024  # directories whose misses are counted at once


class SweepDetector:
    """Counts cache misses per directory; ``missed`` answers True when the directory should be
    listed now (the caller lists it, then calls ``done``). One listing at a time."""

    def __init__(self, window_s: float, misses: int = SWEEP_MISSES) -> None:
        self.window_s = window_s
        self.misses = misses
        self._lock = threading.Lock()
        self._counts: dict[int, tuple[int, float]] = {}  # dir -> (misses, window start)
        self._hold: dict[int, float] = {}  # dir -> not counted again before (monotonic)
        self._listing = False
        self.listings = 0
        self.too_big = 0

    def missed(self, parent: int) -> bool:
        """A lookup in ``parent`` went to the engine. True: list ``parent`` now."""
        now = time.monotonic()
        with self._lock:
            until = self._hold.get(parent)
            if until is not None:
                if now < until:
                    return False
                del self._hold[parent]
            count, start = self._counts.get(parent, (0, now))
            if now - start > self.window_s:
                count, start = 0, now
            count += 1
            if count < self.misses or self._listing:
                if parent not in self._counts and len(self._counts) >= MAX_TRACKED:
                    self._counts.clear()
                self._counts[parent] = (count, start)
                return False
            self._counts.pop(parent, None)
            self._listing = True
            return True

    def done(self, parent: int, listed: bool | None) -> None:
        """The listing of ``parent`` ended: ``listed`` True (cached: not again while it is
        valid), False (too big: not for ``TOO_BIG_HOLD_S``), None (failed)."""
        hold = TOO_BIG_HOLD_S if listed is False else self.window_s
        now = time.monotonic()
        with self._lock:
            self._listing = False
            if listed:
                self.listings += 1
            elif listed is False:
                self.too_big += 1
            if len(self._hold) >= MAX_TRACKED:
                self._hold = {d: t for d, t in self._hold.items() if t > now}
            self._hold[parent] = now + hold

    def figures(self) -> dict[str, int]:
        with self._lock:
            return {"listings_total": self.listings, "too_big_total": self.too_big}
