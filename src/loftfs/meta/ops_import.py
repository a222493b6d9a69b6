"""Import operations of the shared layer: many imported objects written per transaction.

An imported object becomes a regular file whose data is external slices (``ExtObject``): one
record per 64 MiB chunk the object spans, read in place from the source. ``import_batch``
writes a batch of them (and the directories their keys imply) in one transaction, together
with the importer's checkpoint, so an interrupted import resumes exactly where its last
committed batch ended.

What an object meets at its path decides what happens to it:

- nothing: the file is created (``created``);
- a file imported from the same source object: left alone when the object's ETag is the one
  recorded (``unchanged``; writes made here since are kept); refreshed to the new version when
  it differs and the file was not changed here since (``updated``); a conflict when it was;
- anything else (a file written here, another object's file, a directory or other node): a
  conflict, reported and left alone, unless ``overwrite`` (files only: the file's data is
  replaced by the object's, its inode and links stay; a directory is never replaced).

Directories get the importer's mode and owner; files too, with the object's modification time
as mtime and atime. Imported files count in the volume's usage and quotas like any other.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator, Mapping, Sequence

from loftfs.errors import FSError
from loftfs.meta.core import DIR_SIZE, Acct, MetaCore, now_ns, space_of
from loftfs.meta.txn import LAZY_MARK, NEXT_INODE, NEXT_SLICE, NewFile, Txn, lazy_setting
from loftfs.meta.types import (
    CHUNK_SIZE,
    KIND_EXTERNAL,
    Attr,
    BatchResult,
    ExtObject,
    FileType,
    ImportItem,
    ImportOwner,
    Slice,
)

__all__ = [
    "LAZY_MARK",
    "BatchResult",
    "ImportItem",
    "ImportOps",
    "ImportOwner",
    "chunk_pieces",
    "lazy_setting",
]

MAX_CONFLICTS_REPORTED = 100  # conflicting paths kept per batch (all are counted)
ID_RANGE = 20_000  # inode and slice ids an importing client takes from the counters at once


def is_lazy(attr: Attr) -> bool:
    return attr.type == FileType.DIR and attr.rdev == LAZY_MARK


def chunk_pieces(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the 64 MiB pieces of an object of ``size`` bytes (none when 0)."""
    return [(off, min(CHUNK_SIZE, size - off)) for off in range(0, size, CHUNK_SIZE)]


class ImportOps(MetaCore):
    _import_ids: dict[str, range] | None = None  # id ranges taken for imports, per counter

    # --- generic settings (source table, import checkpoints) ----------------------------------

    def get_setting(self, name: str) -> str | None:
        return self._read(lambda tx: tx.get_setting(name))

    def set_setting(self, name: str, value: str) -> None:
        self._transaction(lambda tx: tx.put_setting(name, value), True)

    def delete_settings(self, names: Sequence[str]) -> None:
        def fn(tx: Txn) -> None:
            for name in names:
                tx.del_setting(name)

        self._transaction(fn, True)

    # --- lazy directories ---------------------------------------------------------------------

    def bind_lazy(self, inode: int, source: int, prefix: str) -> None:
        """Bind directory ``inode`` to ``prefix`` of ``source``: it is listed from the source on
        its first lookup or readdir (``import_batch`` with ``finish_lazy``)."""
        record = json.dumps({"source": source, "prefix": prefix})

        def fn(tx: Txn, acct: Acct) -> None:
            attr = MetaCore._get_dir(tx, inode)
            new = attr.copy()
            new.rdev = LAZY_MARK
            new.ctime_ns = now_ns()
            tx.put_attr(new)
            tx.put_setting(lazy_setting(inode), record)

        self._write(fn)

    def lazy_binding(self, inode: int) -> tuple[int, str] | None:
        """(source, prefix) a directory is still bound to; None once it was listed."""
        text = self._read(lambda tx: tx.get_setting(lazy_setting(inode)))
        if not text:
            return None
        doc = json.loads(text)
        return int(doc["source"]), str(doc["prefix"])

    # --- ids ----------------------------------------------------------------------------------

    def _reserve(self, counter: str, count: int) -> list[int]:
        """``count`` fresh ids of ``counter``, from ranges of at least ``ID_RANGE`` taken in
        one transaction each (ids never used are just skipped numbers)."""
        if count <= 0:
            return []
        with self._alloc_lock:
            pools = self._import_ids
            if pools is None:
                pools = self._import_ids = {}
            pool = pools.get(counter, range(0))
            if len(pool) < count:
                take = max(count, ID_RANGE)
                end = self._transaction(lambda tx: tx.incr_counter(counter, take), True)
                pool = range(end - take, end)
            pools[counter] = pool[count:]
            return list(pool[:count])

    # --- the batch ----------------------------------------------------------------------------

    def import_batch(
        self,
        dest: int,
        items: Sequence[ImportItem],
        *,
        source: int,
        owner: ImportOwner,
        dir_cache: Mapping[tuple[bytes, ...], int],
        overwrite: bool = False,
        checkpoint: tuple[str, str] | None = None,
        lazy_dirs: Sequence[tuple[bytes, str]] = (),
        finish_lazy: bool = False,
    ) -> BatchResult:
        """Write ``items`` under directory ``dest`` in one transaction (see the module
        docstring), and the setting ``checkpoint`` (name, value) with them. ``dir_cache``:
        directories known from earlier batches (path -> inode), checked before use.
        ``lazy_dirs``: (name, prefix) of subdirectories of ``dest`` to make bound to prefixes
        of the source (left alone when the name exists); ``finish_lazy``: ``dest`` stops being
        bound (it was listed). ENOENT/ENOTDIR when ``dest`` is not a directory; ENOSPC past a
        quota."""
        dir_paths: set[tuple[bytes, ...]] = set()
        chunks = 0
        for item in items:
            for i in range(1, len(item.dirs) + 1):
                dir_paths.add(item.dirs[:i])
            chunks += len(chunk_pieces(item.size))
        inodes = self._reserve(NEXT_INODE, len(items) + len(dir_paths) + len(lazy_dirs))
        slice_ids = self._reserve(NEXT_SLICE, chunks)

        def fn(tx: Txn, acct: Acct) -> BatchResult:
            batch = _Batch(
                self, tx, acct, dest, source, owner, dir_cache, overwrite,
                iter(inodes), iter(slice_ids), {(name,): prefix for name, prefix in lazy_dirs},
            )  # fmt: skip
            return batch.run(items, checkpoint, finish_lazy)

        return self._write(fn)


class _Batch:
    """The work of one ``import_batch`` transaction (rerun from scratch on a conflict)."""

    def __init__(
        self,
        meta: ImportOps,
        tx: Txn,
        acct: Acct,
        dest: int,
        source: int,
        owner: ImportOwner,
        dir_cache: Mapping[tuple[bytes, ...], int],
        overwrite: bool,
        inodes: Iterator[int],
        slice_ids: Iterator[int],
        lazy: dict[tuple[bytes, ...], str],
    ) -> None:
        self.meta = meta
        self.tx = tx
        self.acct = acct
        self.dest = dest
        self.source = source
        self.owner = owner
        self.dir_cache = dir_cache
        self.overwrite = overwrite
        self.now = now_ns()
        self.result = BatchResult()
        self.dirs: dict[tuple[bytes, ...], int | None] = {}  # None: blocked by a non-directory
        self.changed_dirs: dict[int, Attr] = {}  # directories whose times or nlink change
        self.new_dirs: set[int] = set()  # created here: known to be empty before this batch
        self.refs: dict[int, tuple[int, int]] = {}
        self.inodes = inodes  # fresh ids, reserved before the transaction
        self.slice_ids = slice_ids
        self.lazy = lazy  # paths to create bound to a source prefix
        self.created: dict[tuple[int, bytes], tuple[int, FileType]] = {}  # entries made here
        self.new_files: list[NewFile] = []  # written together at the end

    def run(
        self,
        items: Sequence[ImportItem],
        checkpoint: tuple[str, str] | None,
        finish_lazy: bool = False,
    ) -> BatchResult:
        tx = self.tx
        root = MetaCore._get_dir(tx, self.dest)
        if root.nlink == 0:
            raise FSError(errno.ENOENT)
        self.dirs[()] = self.dest
        space = 0
        new_inodes = 0
        for item in items:
            parent = self._directory(item.dirs)
            if parent is None:
                self._conflict(item)
                continue
            existing = self._entry(parent, item.name)
            if existing is None:
                inode = next(self.inodes)
                self.new_files.append(self._new_file(inode, parent, item))
                self.created[(parent, item.name)] = (inode, FileType.FILE)
                self._touch(parent, 0)
                space += space_of(FileType.FILE, item.size)
                new_inodes += 1
                self.result.created += 1
                self.result.nbytes += item.size
                continue
            inode, ftype = existing
            if ftype != FileType.FILE:
                self._conflict(item)
                continue
            attr = tx.get_attr(inode)
            if attr is None:
                self._conflict(item)
                continue
            state = self._origin(attr, item)
            if state == "same":
                self.result.unchanged += 1
                continue
            if state == "conflict" and not self.overwrite:
                self._conflict(item)
                continue
            space += space_of(FileType.FILE, item.size) - space_of(FileType.FILE, attr.size)
            self._write_file(inode, item, attr)
            self._touch(parent, 0)
            self.result.updated += 1
            self.result.nbytes += item.size
        for path in self.lazy:
            self._directory(path)
        if finish_lazy:
            self._touch(self.dest, 0)
            self.changed_dirs[self.dest].rdev = 0
            tx.del_setting(lazy_setting(self.dest))
        new_inodes += len(self.new_dirs)
        space += DIR_SIZE * len(self.new_dirs)
        self.meta._check_inodes(tx, new_inodes)
        self.meta._check_space(tx, space)
        if self.new_files:
            tx.put_new_files(self.new_files)
        for attr in self.changed_dirs.values():
            tx.put_attr(attr)
        refs = {k: v for k, v in self.refs.items() if v[1]}
        if refs:
            tx.add_slice_refs(refs)
        if checkpoint is not None:
            tx.put_setting(*checkpoint)
        self.acct.space += space
        self.acct.inodes += new_inodes
        return self.result

    # --- helpers ------------------------------------------------------------------------------

    def _entry(self, parent: int, name: bytes) -> tuple[int, FileType] | None:
        """The entry ``name`` of ``parent``, as this batch left it so far."""
        made = self.created.get((parent, name))
        if made is not None:
            return made
        if parent in self.new_dirs:
            return None  # made by this batch: nothing else is in it
        return self.tx.get_entry(parent, name)

    def _conflict(self, item: ImportItem) -> None:
        self.result.conflicts += 1
        if len(self.result.conflict_paths) < MAX_CONFLICTS_REPORTED:
            self.result.conflict_paths.append(b"/".join((*item.dirs, item.name)))

    def _dir_attr(self, inode: int) -> Attr | None:
        attr = self.changed_dirs.get(inode)
        if attr is None:
            attr = self.tx.get_attr(inode)
        return attr

    def _touch(self, parent: int, subdirs: int) -> None:
        attr = self.changed_dirs.get(parent)
        if attr is None:
            found = self.tx.get_attr(parent)
            if found is None:
                raise FSError(errno.ENOENT)
            attr = found.copy()
            self.changed_dirs[parent] = attr
        attr.mtime_ns = attr.ctime_ns = self.now
        attr.nlink += subdirs

    def _directory(self, path: tuple[bytes, ...]) -> int | None:
        """The directory at ``path`` under the destination, made when missing; None when a
        non-directory (or a directory being removed) is in the way."""
        if path in self.dirs:
            return self.dirs[path]
        parent = self._directory(path[:-1])
        if parent is None:
            self.dirs[path] = None
            return None
        tx = self.tx
        inode: int | None = None
        cached = self.dir_cache.get(path)
        if cached is not None and parent not in self.new_dirs:
            entry = self._entry(parent, path[-1])
            if entry is not None and entry == (cached, FileType.DIR):
                inode = cached
        if inode is None:
            entry = self._entry(parent, path[-1])
            if entry is None:
                inode = next(self.inodes)
                o = self.owner
                bound = self.lazy.get(path)
                if bound is not None:
                    tx.put_setting(
                        lazy_setting(inode), json.dumps({"source": self.source, "prefix": bound})
                    )
                # kept with the other changed directories and written at the end: a
                # transaction never reads back what it wrote (Txn contract)
                self.changed_dirs[inode] = Attr(
                    inode=inode,
                    type=FileType.DIR,
                    mode=o.dir_mode & 0o7777,
                    uid=o.uid,
                    gid=o.gid,
                    nlink=2,
                    size=DIR_SIZE,
                    rdev=LAZY_MARK if bound is not None else 0,
                    atime_ns=self.now,
                    mtime_ns=self.now,
                    ctime_ns=self.now,
                    parent=parent,
                )
                tx.put_entry(parent, path[-1], inode, FileType.DIR)
                self.created[(parent, path[-1])] = (inode, FileType.DIR)
                self._touch(parent, 1)
                self.new_dirs.add(inode)
                self.result.new_dirs[path] = inode
            elif entry[1] == FileType.DIR:
                inode = entry[0]
                attr = self._dir_attr(inode)
                if attr is None or attr.nlink == 0:
                    inode = None
            else:
                inode = None
        self.dirs[path] = inode
        return inode

    def _origin(self, attr: Attr, item: ImportItem) -> str:
        """``same``: imported from this object at this version (changes made here since, if
        any, are kept); ``stale``: imported from this object at another version and not changed
        here since; else ``conflict`` (another file, or changed on both sides)."""
        tx = self.tx
        first = tx.get_chunk(attr.inode, 0)
        if not first:
            # an empty file matches an empty object (which has no external slice to compare)
            empty = item.size == 0 and attr.size == 0 and not tx.chunk_indexes(attr.inode)
            return "same" if empty else "conflict"
        base = first[0]  # the bottom slice: the imported data, under any local writes
        if base.kind != KIND_EXTERNAL or base.pos != 0 or base.off != 0:
            return "conflict"
        rec = tx.get_ext([base.id]).get(base.id)
        if rec is None or rec.source != self.source or rec.key != item.key or rec.offset:
            return "conflict"
        if rec.etag == item.etag:
            return "same"
        # another version: refreshed only when the file is exactly what was imported
        pieces = chunk_pieces(attr.size)
        if len(first) != 1 or len(tx.chunk_indexes(attr.inode)) != len(pieces):
            return "conflict"
        for index in range(1, len(pieces)):
            slices = tx.get_chunk(attr.inode, index)
            if len(slices) != 1 or slices[0].kind != KIND_EXTERNAL:
                return "conflict"
        return "stale"

    def _new_file(self, inode: int, parent: int, item: ImportItem) -> NewFile:
        o = self.owner
        attr = Attr(
            inode=inode,
            type=FileType.FILE,
            mode=o.file_mode & 0o7777,
            uid=o.uid,
            gid=o.gid,
            nlink=1,
            size=item.size,
            atime_ns=item.mtime_ns,
            mtime_ns=item.mtime_ns,
            ctime_ns=self.now,
        )
        return NewFile(attr, parent, item.name, self._external_chunks(item))

    def _external_chunks(self, item: ImportItem) -> tuple[tuple[int, Slice, ExtObject], ...]:
        """(index, slice, record) of each chunk of ``item``'s object, with fresh slice ids
        (their references counted)."""
        chunks = []
        for index, (off, length) in enumerate(chunk_pieces(item.size)):
            sid = next(self.slice_ids)
            s = Slice(0, sid, length, 0, length, KIND_EXTERNAL)
            chunks.append((index, s, ExtObject(self.source, item.key, item.etag, off, length)))
            self.refs[sid] = (length, 1)
        return tuple(chunks)

    def _write_file(self, inode: int, item: ImportItem, old: Attr) -> None:
        """Replace the data of the existing file ``inode`` (attributes ``old``) with the
        object of ``item``: its previous data references go, external slices come."""
        tx = self.tx
        indexes = tx.chunk_indexes(inode)
        for index in indexes:
            for s in tx.get_chunk(inode, index):
                if s.id:
                    size, n = self.refs.get(s.id, (s.size, 0))
                    self.refs[s.id] = (size, n - 1)
        if indexes:
            tx.del_chunks(inode)
        attr = old.copy()
        attr.size = item.size
        attr.mtime_ns = attr.atime_ns = item.mtime_ns
        attr.ctime_ns = self.now
        tx.put_attr(attr)
        for index, s, rec in self._external_chunks(item):
            tx.put_ext(s.id, rec)
            tx.put_chunk(inode, index, [s])
