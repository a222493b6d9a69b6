"""Lazy import: directories bound to a source prefix are listed from the source when first
needed (DESIGN 2.6).

``loft import --lazy`` binds the destination directory to the prefix without listing anything
(``Meta.bind_lazy``). A bound directory carries a mark in its attributes (``is_lazy``), so the
vfs learns it from attributes it reads anyway and calls ``LazyDirs.populate`` before the first
lookup in it or listing of it: one delimiter listing of its prefix, written in batches by the
same ``Meta.import_batch`` as an eager import; the objects become files (read in place), the
common prefixes subdirectories bound in turn, and the last batch clears the mark, so the
directory is a normal one from then on. Only what is touched is ever listed.

Several clients may populate the same directory at once: a batch writes nothing for names
that are already there from the same objects, and only the first clears the binding. A
failure (the source unreachable) fails the lookup or listing with EIO and leaves the directory
bound, to be tried again by the next request.
"""

from __future__ import annotations

import errno
import logging
import threading

from loftfs.errors import FSError, LoftError
from loftfs.importer import key_path
from loftfs.meta.interface import Meta
from loftfs.meta.ops_import import ImportItem, ImportOwner
from loftfs.sources import SourceStores

log = logging.getLogger(__name__)

BATCH = 1000  # objects per metadata transaction while listing a directory


class LazyDirs:
    def __init__(self, meta: Meta, sources: SourceStores) -> None:
        self.meta = meta
        self.sources = sources
        self._lock = threading.Lock()
        self._known: set[int] = set()  # directories seen bound (may be stale: checked again)
        self._busy: dict[int, threading.Lock] = {}
        self.listings = 0
        self.objects = 0
        self.failures = 0

    def figures(self) -> dict[str, int | float]:
        return {
            "lazy_listings_total": self.listings,
            "lazy_objects_total": self.objects,
            "lazy_failures_total": self.failures,
            "lazy_pending_dirs": len(self._known),
        }

    def seen(self, inode: int) -> None:
        """A directory's attributes said it is bound."""
        with self._lock:
            self._known.add(inode)

    def pending(self, inode: int) -> bool:
        return inode in self._known

    def populate(self, inode: int) -> None:
        """List the directory from its source if it is still bound (once per directory and
        mount at a time; waiters find it done)."""
        if inode not in self._known:
            return
        with self._lock:
            lock = self._busy.setdefault(inode, threading.Lock())
        with lock:
            if inode not in self._known:
                return
            try:
                self._populate(inode)
            except FSError:
                raise
            except LoftError as e:
                self.failures += 1
                log.error("lazy import: listing directory %d from its source failed: %s", inode, e)
                raise FSError(errno.EIO, str(e)) from e
            with self._lock:
                self._known.discard(inode)
                self._busy.pop(inode, None)

    def _populate(self, inode: int) -> None:
        binding = self.meta.lazy_binding(inode)
        if binding is None:
            return  # listed meanwhile (by another client)
        source_id, prefix = binding
        _, store = self.sources.get(source_id)
        attr = self.meta.getattr(inode)
        owner = ImportOwner(0o644, attr.mode, attr.uid, attr.gid)
        items: list[ImportItem] = []
        dirs: list[tuple[bytes, str]] = []
        self.listings += 1
        count = 0
        for info in store.list(prefix, delimiter="/"):
            rel = info.key[len(prefix) :]
            if info.is_prefix:
                name = rel.rstrip("/")
                if key_path(name) is not None:
                    dirs.append((name.encode("utf-8"), info.key))
            else:
                path = key_path(rel)
                if path is None or path[0]:
                    continue  # a "directory" marker or a key no file name can spell
                items.append(ImportItem((), path[1], info.size, info.mtime_ns, info.key, info.etag))
            if len(items) + len(dirs) >= BATCH:
                count += len(items)
                self._write(inode, source_id, owner, items, dirs, finish=False)
                items, dirs = [], []
        count += len(items)
        self._write(inode, source_id, owner, items, dirs, finish=True)
        self.objects += count
        log.debug("lazy import: listed %s (%d objects) into directory %d", prefix, count, inode)

    def _write(
        self,
        inode: int,
        source: int,
        owner: ImportOwner,
        items: list[ImportItem],
        dirs: list[tuple[bytes, str]],
        *,
        finish: bool,
    ) -> None:
        result = self.meta.import_batch(
            inode,
            items,
            source=source,
            owner=owner,
            dir_cache={},
            lazy_dirs=dirs,
            finish_lazy=finish,
        )
        if result.conflicts:
            log.warning(
                "lazy import into directory %d: %d names exist already and were left alone "
                "(e.g. %s)",
                inode,
                result.conflicts,
                result.conflict_paths[0].decode("utf-8", "replace"),
            )
