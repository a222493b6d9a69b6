"""The mount's own memory of names and attributes, valid exactly as long as the kernel's.

The kernel caches what a lookup or getattr answered for ``--entry-timeout`` /
``--attr-timeout`` seconds; within that window a change made by another client may not show
(docs/SEMANTICS.md). But the kernel also drops those caches early: under memory pressure,
when a directory holds more names than it keeps, on ``drop_caches``. Each early drop turns
the next ``stat`` into a metadata round trip although the answer would still be within its
promised validity. ``MetaCache`` keeps those answers for the rest of that validity, so they
are answered from memory; an answer served from here is given to the kernel with only the
validity it has left (``age``), so no answer is ever used longer than its timeout from the
moment it was read: the staleness bound for other clients' changes stays what it was.

This mount's own changes must show at once, which the callers ensure:

- every change made through this mount forgets what it may have changed (``forget``,
  ``forget_all``, ``changed_dir``) before it returns, and bumps a generation counter so
  that an answer read before the change and stored after it is dropped (``put`` with the
  generation the caller saw when it started reading);
- a file with a normal handle open in this mount is never answered from here (its size and
  times move with writes and background commits); its entry is forgotten at its last close;
- an open reads fresh attributes (close-to-open) and passes them on (``refresh``), so a
  ``stat`` after an open never shows older attributes than the open saw.

Bounded: at most ``max_items`` names and as many attributes, the oldest dropped first (all
answers share one validity per kind, so the oldest are the first to expire anyway); expired
ones are dropped as new ones come in, so the memory held follows the answers of the last
timeout's worth of time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from loftfs.meta.types import Attr, FileType

MAX_ITEMS = 8_192  # about 5.5 MiB when full


class MetaCache:
    def __init__(
        self,
        attr_ttl: float,
        entry_ttl: float,
        dir_entry_ttl: float,
        max_items: int = MAX_ITEMS,
    ) -> None:
        self.attr_ttl = attr_ttl
        self.entry_ttl = entry_ttl
        self.dir_entry_ttl = dir_entry_ttl
        self.max_items = max_items
        self.enabled = max_items > 0 and attr_ttl > 0
        self._lock = threading.Lock()
        # inode -> (attributes, when they were read: time.monotonic())
        self._attrs: OrderedDict[int, tuple[Attr, float]] = OrderedDict()
        # (parent, name) -> (inode, when the name was read)
        self._entries: OrderedDict[tuple[int, bytes], tuple[int, float]] = OrderedDict()
        self._gen = 0
        self.hits = 0
        self.misses = 0

    # --- answers ---------------------------------------------------------------------------------

    def generation(self) -> int:
        """Pass to ``put``: taken before reading from the engine."""
        return self._gen

    def attr(self, inode: int) -> tuple[Attr, float] | None:
        """(attributes, age in seconds) of ``inode`` while still valid, else None."""
        if not self.enabled:
            return None
        now = time.monotonic()
        with self._lock:
            item = self._attrs.get(inode)
            if item is not None and now - item[1] < self.attr_ttl:
                self.hits += 1
                return item[0], now - item[1]
            self.misses += 1
        return None

    def entry(self, parent: int, name: bytes) -> tuple[Attr, float, Attr] | None:
        """(attributes of what ``name`` in ``parent`` names, age of the older of the name and
        the attributes, the parent's attributes for the permission check) while all three are
        still valid, else None."""
        if not self.enabled:
            return None
        now = time.monotonic()
        attrs, ttl = self._attrs, self.attr_ttl
        with self._lock:
            found = self._entries.get((parent, name))
            item = attrs.get(found[0]) if found is not None else None
            up = attrs.get(parent)
            if found is not None and item is not None and up is not None:
                attr, read_at = item
                name_ttl = self.dir_entry_ttl if attr.type is FileType.DIR else self.entry_ttl
                if now - found[1] < name_ttl and now - read_at < ttl and now - up[1] < ttl:
                    self.hits += 1
                    return attr, now - min(found[1], read_at), up[0]
            self.misses += 1
        return None

    def put(self, attr: Attr, gen: int, read_at: float, parent: int = 0, name: bytes = b"") -> None:
        """Remember ``attr`` (and that ``name`` in ``parent`` names it, when given), read from
        the engine at ``read_at`` by a caller that saw generation ``gen`` before reading;
        dropped when anything was forgotten since."""
        if not self.enabled:
            return
        with self._lock:
            if gen != self._gen:
                return
            self._store(attr, read_at)
            if name:
                self._store_name(parent, name, attr.inode, read_at)

    def put_listing(
        self, pattr: Attr, entries: list[tuple[bytes, Attr]], gen: int, read_at: float
    ) -> None:
        """``put`` of a directory's attributes and of every (name, attributes) listed in it,
        read together (``loftfs.vfs.sweep``)."""
        if not self.enabled:
            return
        parent = pattr.inode
        with self._lock:
            if gen != self._gen:
                return
            for name, attr in entries:
                self._store(attr, read_at)
                self._store_name(parent, name, attr.inode, read_at)
            self._store(pattr, read_at)  # last: never the oldest, dropped first

    def refresh(self, attr: Attr, read_at: float) -> None:
        """Attributes an open just read (fresh, close-to-open): they replace what is kept, and
        an answer read earlier but not yet stored is dropped when they differ."""
        if not self.enabled:
            return
        with self._lock:
            old = self._attrs.get(attr.inode)
            if old is not None and old[0] != attr:
                self._gen += 1
            self._store(attr, read_at)

    def _store_name(self, parent: int, name: bytes, inode: int, read_at: float) -> None:
        """That ``name`` in ``parent`` names ``inode``; the oldest and expired names dropped."""
        entries = self._entries
        key = (parent, name)
        entries[key] = (inode, read_at)
        entries.move_to_end(key)
        ttl = max(self.entry_ttl, self.dir_entry_ttl)
        while entries and (
            len(entries) > self.max_items or read_at - next(iter(entries.values()))[1] > ttl
        ):
            entries.popitem(last=False)

    def _store(self, attr: Attr, read_at: float) -> None:
        attrs = self._attrs
        attrs[attr.inode] = (attr, read_at)
        attrs.move_to_end(attr.inode)
        while attrs and (
            len(attrs) > self.max_items or read_at - next(iter(attrs.values()))[1] > self.attr_ttl
        ):
            attrs.popitem(last=False)

    # --- changes made through this mount -------------------------------------------------------

    def forget(self, *inodes: int) -> None:
        """The attributes of ``inodes`` changed (or may have)."""
        with self._lock:
            self._gen += 1
            for inode in inodes:
                self._attrs.pop(inode, None)

    def changed_dir(self, parent: int, name: bytes) -> None:
        """``name`` was added to ``parent`` (its attributes changed, the name is new)."""
        with self._lock:
            self._gen += 1
            self._attrs.pop(parent, None)
            self._entries.pop((parent, name), None)

    def forget_all(self) -> None:
        """Names went away or moved (unlink, rmdir, rename): link counts and names of inodes
        not known here may have changed, so nothing kept is trusted."""
        with self._lock:
            self._gen += 1
            self._attrs.clear()
            self._entries.clear()

    def figures(self) -> dict[str, int]:
        """For the metrics (``loftfs_meta_cache_*``)."""
        with self._lock:
            return {
                "hits_total": self.hits,
                "misses_total": self.misses,
                "attrs": len(self._attrs),
                "entries": len(self._entries),
            }
