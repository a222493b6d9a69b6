"""Metadata backup and restore: ``dump_meta`` writes a volume's namespace as one JSON document,
``load_meta`` restores such a document into an empty metadata engine of any kind.

Both work over the ``Txn`` primitives of ``loftfs.meta.txn`` through the engine's
``_transaction`` runner, so every engine gets them without code of its own. Both stream: the
dump holds one directory listing and a bounded batch of records at a time, the load parses one
line at a time and writes a few thousand records per transaction.

The document (format version 2, described for users in ``docs/DUMP.md``) is valid JSON laid
out one member or array element per line, which is what lets ``load_meta`` parse it line by
line::

    {
    "format":"loftfs-dump",
    "version":2,
    "volume":{...volume settings...},
    "sources":{...the volume's import sources...},
    "root":{"inode":1,"type":"dir","attr":{...},"xattrs":[...]},
    "tree":[
    {"parent":1,"name":"a","inode":2,"type":"file","attr":{...}},
    {"chunk":2,"index":0,"slices":[[pos,id,size,off,len,kind],...]},
    {"parent":1,"name":"b","inode":2,"type":"file"},
    {"parent":1,"name":"c","inode":3,"type":"file","attr":{...}},
    {"ext":7,"source":1,"key":"photos/c.jpg","etag":"...","offset":0,"length":1234},
    {"chunk":3,"index":0,"slices":[[0,7,1234,0,1234,1]]},
    {"parent":1,"name":"d","inode":4,"type":"dir","attr":{...},"lazy":{"source":1,"prefix":"d/"}},
    ...
    ],
    "trash":[
    {"trash":9,"deleted_ns":...,"type":"file","attr":{...}},
    ...
    ],
    "counters":{"next_inode":...,...},
    "summary":{"inodes":...,"entries":...,"chunks":...,"slices":...,"exts":...,"bytes":...,
    "trash":...}
    }

The tree is written depth first: a directory's entries in byte order of their names, then its
subdirectories one after the other. An entry that defines its inode carries ``attr`` (and
``xattrs``, ``target`` for symlinks), followed by the inode's chunk records; a further hard
link to an inode already written carries only ``parent``, ``name``, ``inode`` and ``type``.
Byte strings (names, symlink targets, xattrs) are JSON strings when they are valid UTF-8 and
``{"b64": "..."}`` otherwise. The output is deterministic: dumping a volume loaded from a dump
gives the same bytes.

External slices (kind 1, imported data read in place) name an ``ExtObject``: its record
(``ext``: the slice id; ``source``, ``key``, ``etag``, ``offset``, ``length``) is written once,
on the line right before the first chunk record that uses the slice, in the tree or the trash;
later chunk records of the same slice (copies, hard links) refer to it by id. ``sources`` is
the volume's ``sources`` setting as stored (``null`` when it has none): ``loftfs.sources``
keeps credentials in it sealed, under a key that only the volume's bucket holds.

A directory still bound to a source prefix by a lazy import (not listed yet: ``rdev`` is
``LAZY_MARK``) carries its binding, the setting ``lazy:<inode>``, as ``lazy`` in the record
that defines it (the root's included): ``source`` (the source id) and ``prefix``. Mark and
binding are read in one transaction and go together: ``load_meta`` refuses a directory that
has one without the other. A mark whose binding is gone (the directory was listed while the
dump read it) is written as no mark, and bindings of directories that are not marked, or no
longer exist, are not written: nothing uses them.

Version 1 (before external objects and lazy imports) has no ``sources`` member, no ``ext``
records, no ``lazy`` bindings and no ``exts`` count; ``load_meta`` reads both versions.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast

from loftfs.errors import ConfigError, LoftError, NotFormatted, VolumeExists
from loftfs.meta.core import MAX_FILE_SIZE, MetaCore, check_name, space_of
from loftfs.meta.interface import Meta
from loftfs.meta.ops_import import LAZY_MARK, lazy_setting
from loftfs.meta.txn import (
    NEXT_INODE,
    NEXT_SESSION,
    NEXT_SLICE,
    SETTING_SOURCES,
    SETTING_VOLUME,
    USED_INODES,
    USED_SPACE,
    Txn,
)
from loftfs.meta.types import (
    CHUNK_SIZE,
    KIND_EXTERNAL,
    MAX_SYMLINK,
    ROOT_INODE,
    Attr,
    DirEntry,
    ExtObject,
    FileType,
    Slice,
    VolumeSettings,
)

T = TypeVar("T")

FORMAT_NAME = "loftfs-dump"
FORMAT_VERSION = 2
#: Versions ``load_meta`` reads (1: before external objects and import sources).
READABLE_VERSIONS = (1, 2)

#: Counters a dump carries, in document order.
COUNTERS = (NEXT_INODE, NEXT_SLICE, NEXT_SESSION, USED_SPACE, USED_INODES)
#: Key in ``VolumeSettings.extra`` of a volume that ``load_meta`` is still writing.
LOAD_MARKER = "loft_load_in_progress"

ENTRIES_PER_TXN = 256  # dump: directory entries whose xattrs/chunks are read in one transaction
CHUNKS_PER_TXN = 512  # dump: slice lists read in one transaction
RECORDS_PER_TXN = 2000  # load: records written in one transaction
SLICES_PER_TXN = 20_000  # load: ... unless their slice lists hold this many records first
MAX_LINE = 64 << 20  # load: longest line accepted (a record is far smaller)
PROGRESS_EVERY = 500  # records between two progress callbacks
SPILL_AFTER = 200_000  # inodes an InodeSet keeps in memory before moving to a temporary file
EXT_SPILL_AFTER = 20_000  # ... external object ids (as many as imported files: spilled sooner)

_MAX_U32 = (1 << 32) - 1
_MAX_I32 = (1 << 31) - 1  # largest source id every engine stores (SQL INTEGER)
MAX_EXT_KEY = 1024  # bytes of an object key (the S3 limit)
MAX_EXT_ETAG = 1024  # bytes of an ETag or version id
_MAX_I64 = (1 << 63) - 1
_MIN_I64 = -(1 << 63)
_ATTR_FIELDS = ("mode", "uid", "gid", "nlink", "size", "rdev", "atime_ns", "mtime_ns", "ctime_ns")
_TYPE_NAMES = {t: t.name.lower() for t in FileType}
_TYPES = {name: t for t, name in _TYPE_NAMES.items()}
_INPUT_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
_ARRAY_OPEN = re.compile(rb'^"([a-z_]+)"\s*:\s*\[$')


class DumpFormatError(LoftError):
    """The dump is malformed or truncated; ``line`` is where the problem was found."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"malformed dump at line {line}: {message}")


class PartialLoad(LoftError):
    """A load failed and the records it had written could not be removed."""


@dataclass
class DumpStats:
    """What a dump holds: written by ``dump_meta``, read back by ``load_meta``.

    ``inodes`` counts every inode record (the root, the tree and the trash), ``bytes`` the
    logical size of the regular files among them, ``exts`` the external object records.
    ``doc_bytes`` is the size of the document written or parsed so far; ``skipped`` counts
    directories the dump met twice (a volume changing while it was dumped) and left out the
    second time.
    """

    inodes: int = 0
    entries: int = 0
    chunks: int = 0
    slices: int = 0
    exts: int = 0
    bytes: int = 0
    trash: int = 0
    doc_bytes: int = 0
    skipped: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "inodes": self.inodes,
            "entries": self.entries,
            "chunks": self.chunks,
            "slices": self.slices,
            "exts": self.exts,
            "bytes": self.bytes,
            "trash": self.trash,
        }


ProgressFn = Callable[[DumpStats], None]


def _core(meta: Meta) -> MetaCore:
    if not isinstance(meta, MetaCore):
        raise ConfigError(
            f"the metadata engine {type(meta).__name__} does not support dump and load "
            "(it is not built on loftfs.meta.base.BaseMeta)"
        )
    return meta


# --- inode sets ------------------------------------------------------------------------------


class InodeSet:
    """A set of inode numbers (or slice ids) with bounded memory: past ``memory_limit`` members
    it moves to a temporary SQLite file (deleted by ``close``), so a volume of any size can be
    walked."""

    def __init__(self, memory_limit: int = SPILL_AFTER) -> None:
        self._mem: set[int] = set()
        self._limit = memory_limit
        self._db: sqlite3.Connection | None = None
        self._dir: str | None = None

    def add(self, inode: int) -> bool:
        """Add ``inode``; False when it was a member already."""
        if self._db is None:
            if inode in self._mem:
                return False
            self._mem.add(inode)
            if len(self._mem) > self._limit:
                self._spill()
            return True
        cur = self._db.execute("INSERT OR IGNORE INTO inodes (i) VALUES (?)", (inode,))
        return cur.rowcount == 1

    def __contains__(self, inode: int) -> bool:
        if self._db is None:
            return inode in self._mem
        return self._db.execute("SELECT 1 FROM inodes WHERE i = ?", (inode,)).fetchone() is not None

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def _spill(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="loft-dump-")
        db = sqlite3.connect(os.path.join(self._dir, "inodes.db"))
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE inodes (i INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO inodes (i) VALUES (?)", ((i,) for i in self._mem))
        self._db = db  # one open transaction, never committed: the file is thrown away
        self._mem = set()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._mem = set()


# --- encoding ----------------------------------------------------------------------------------


def _enc_bytes(data: bytes) -> str | dict[str, str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def _attr_rec(attr: Attr) -> dict[str, int]:
    rec = {f: getattr(attr, f) for f in _ATTR_FIELDS}
    rec["parent"] = attr.parent
    return rec


def _xattr_rec(xattrs: list[tuple[bytes, bytes]]) -> list[list[str | dict[str, str]]]:
    return [[_enc_bytes(n), _enc_bytes(v)] for n, v in xattrs]


def _json(value: Any, sort: bool = False) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort
    ).encode("utf-8")


class _DocWriter:
    """Writes the document one member or array element per line (see the module docstring)."""

    def __init__(self, out: BinaryIO, stats: DumpStats) -> None:
        self.out = out
        self.stats = stats
        self._first = True

    def _w(self, data: bytes) -> None:
        self.out.write(data)
        self.stats.doc_bytes += len(data)

    def begin(self) -> None:
        self._w(b"{\n")

    def member(self, key: str, value: Any, *, sort: bool = False, last: bool = False) -> None:
        self._w(_json(key) + b":" + _json(value, sort) + (b"\n" if last else b",\n"))

    def open_array(self, key: str) -> None:
        self._w(_json(key) + b":[")
        self._first = True

    def element(self, value: Any) -> None:
        self._w((b"\n" if self._first else b",\n") + _json(value))
        self._first = False

    def close_array(self) -> None:
        self._w(b"\n],\n")

    def end(self) -> None:
        self._w(b"}\n")


# --- dump --------------------------------------------------------------------------------------


@dataclass
class _Extra:
    """What a node record needs besides its attributes."""

    xattrs: list[tuple[bytes, bytes]]
    target: bytes | None = None
    indexes: list[int] | None = None  # chunk indexes of a file, ascending
    chunks: list[tuple[int, list[Slice]]] | None = None  # the first of them, already read
    exts: dict[int, ExtObject] | None = None  # records of the external slices of ``chunks``
    lazy: tuple[int, str] | None = None  # (source, prefix) a directory is still bound to
    attr: Attr | None = None  # attributes read again, replacing the listing's (``_read_lazy``)


def _external_ids(chunks: list[tuple[int, list[Slice]]]) -> list[int]:
    return sorted(
        {s.id for _, slices in chunks for s in slices if s.kind == KIND_EXTERNAL and s.id}
    )


def _read_chunks(
    tx: Txn, inode: int, indexes: list[int]
) -> tuple[list[tuple[int, list[Slice]]], dict[int, ExtObject]]:
    """The slice lists of chunks ``indexes`` of ``inode``, with the records of their external
    slices (read in the same transaction, so that they belong together)."""
    chunks = [(i, tx.get_chunk(inode, i)) for i in indexes]
    ids = _external_ids(chunks)
    return chunks, tx.get_ext(ids) if ids else {}


def _binding(text: str, inode: int) -> tuple[int, str]:
    """(source, prefix) of the stored lazy-import binding ``text`` of directory ``inode``."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if (
        isinstance(doc, dict)
        and set(doc) == {"source", "prefix"}
        and type(doc["source"]) is int
        and 0 <= doc["source"] <= _MAX_I32
        and isinstance(doc["prefix"], str)
    ):
        prefix: str = doc["prefix"]
        try:
            size = len(prefix.encode("utf-8"))
        except UnicodeEncodeError:
            size = -1
        if 0 <= size <= MAX_EXT_KEY:
            return doc["source"], prefix
    raise LoftError(
        f"directory {inode} has an invalid lazy-import binding (setting "
        f"{lazy_setting(inode)!r} = {text[:200]!r}): its metadata is damaged"
    )


def _read_lazy(tx: Txn, attr: Attr, extra: _Extra) -> None:
    """The binding of a directory marked as bound to a source prefix (``LAZY_MARK``). When it
    has none (listed since ``attr`` was read, which clears both), the directory is written as
    it is now, unmarked."""
    text = tx.get_setting(lazy_setting(attr.inode))
    if text is not None:
        extra.lazy = _binding(text, attr.inode)
        return
    fresh = tx.get_attr(attr.inode)
    if fresh is None or fresh.type != FileType.DIR:
        fresh = attr  # removed meanwhile: written from the listing, like any entry
    extra.attr = fresh.copy()
    extra.attr.rdev = 0


def _read_extras(tx: Txn, attrs: list[Attr]) -> list[_Extra]:
    """Xattrs, symlink targets, lazy-import bindings and (up to ``CHUNKS_PER_TXN`` in all)
    slice lists of ``attrs``, with the records of their external slices."""
    budget = CHUNKS_PER_TXN
    out = []
    external: list[int] = []
    for attr in attrs:
        inode = attr.inode
        names = sorted(tx.list_xattrs(inode))
        xattrs = []
        for name in names:
            value = tx.get_xattr(inode, name)
            if value is not None:
                xattrs.append((name, value))
        extra = _Extra(xattrs)
        if attr.type == FileType.SYMLINK:
            extra.target = tx.get_symlink(inode)
        elif attr.type == FileType.DIR and attr.rdev == LAZY_MARK:
            _read_lazy(tx, attr, extra)
        elif attr.type == FileType.FILE:
            extra.indexes = sorted(tx.chunk_indexes(inode))
            take = extra.indexes[: max(0, budget)]
            budget -= len(take)
            extra.chunks = [(i, tx.get_chunk(inode, i)) for i in take]
            external += _external_ids(extra.chunks)
        out.append(extra)
    if external:
        found = tx.get_ext(external)  # one read for the whole batch
        for extra in out:
            if extra.chunks:
                extra.exts = {i: found[i] for i in _external_ids(extra.chunks) if i in found}
    return out


def _add_extra(rec: dict[str, Any], attr: Attr, extra: _Extra) -> None:
    """The optional fields of a record that defines ``attr``."""
    if extra.xattrs:
        rec["xattrs"] = _xattr_rec(extra.xattrs)
    if attr.type == FileType.SYMLINK:
        rec["target"] = _enc_bytes(extra.target or b"")
    if extra.lazy is not None:
        rec["lazy"] = {"source": extra.lazy[0], "prefix": extra.lazy[1]}


class _Dumper:
    keep_secrets = False

    def __init__(self, core: MetaCore, out: BinaryIO, progress: ProgressFn | None) -> None:
        self.core = core
        self.stats = DumpStats()
        self.doc = _DocWriter(out, self.stats)
        self.progress = progress
        self._since_progress = 0
        self.space = 0  # used_space of the inodes written
        self.exts_written = InodeSet(EXT_SPILL_AFTER)  # ids of the external records written

    def read(self, fn: Callable[[Txn], T]) -> T:
        return self.core._transaction(fn, False)

    def _tick(self) -> None:
        self._since_progress += 1
        if self.progress is not None and self._since_progress >= PROGRESS_EVERY:
            self._since_progress = 0
            self.progress(self.stats)

    def _node(self, rec: dict[str, Any], attr: Attr, extra: _Extra) -> None:
        """Complete and write a record that defines ``attr``, then its chunk records."""
        attr = extra.attr or attr
        rec["type"] = _TYPE_NAMES[attr.type]
        rec["attr"] = _attr_rec(attr)
        _add_extra(rec, attr, extra)
        self.doc.element(rec)
        self.stats.inodes += 1
        self.space += space_of(attr.type, attr.size)
        if attr.type == FileType.FILE:
            self.stats.bytes += attr.size
            self._chunks(attr.inode, extra)
        self._tick()

    def _chunks(self, inode: int, extra: _Extra) -> None:
        done = extra.chunks or []
        for index, slices in done:
            self._chunk(inode, index, slices, extra.exts or {})
        rest = (extra.indexes or [])[len(done) :]
        for start in range(0, len(rest), CHUNKS_PER_TXN):
            page = rest[start : start + CHUNKS_PER_TXN]

            def fn(
                tx: Txn, page: list[int] = page
            ) -> tuple[list[tuple[int, list[Slice]]], dict[int, ExtObject]]:
                return _read_chunks(tx, inode, page)

            chunks, exts = self.read(fn)
            for index, slices in chunks:
                self._chunk(inode, index, slices, exts)

    def _chunk(
        self, inode: int, index: int, slices: list[Slice], exts: dict[int, ExtObject]
    ) -> None:
        """Write a chunk record, preceded by the records of its external slices not written
        yet."""
        if not slices:
            return  # removed between reading the indexes and the list (a live volume)
        for sid in _external_ids([(index, slices)]):
            if sid in self.exts_written:
                continue
            rec = exts.get(sid)
            if rec is None:
                raise LoftError(
                    f"chunk {index} of inode {inode} holds external slice {sid}, which has no "
                    "object record: the file changed during the dump, or the metadata is "
                    "damaged"
                )
            self.doc.element(
                {
                    "ext": sid,
                    "source": rec.source,
                    "key": rec.key,
                    "etag": rec.etag,
                    "offset": rec.offset,
                    "length": rec.length,
                }
            )
            self.exts_written.add(sid)
            self.stats.exts += 1
        self.doc.element(
            {
                "chunk": inode,
                "index": index,
                "slices": [[s.pos, s.id, s.size, s.off, s.len, s.kind] for s in slices],
            }
        )
        self.stats.chunks += 1
        self.stats.slices += len(slices)

    def run(self) -> DumpStats:
        try:
            return self._run()
        finally:
            self.exts_written.close()

    def _run(self) -> DumpStats:
        def header(tx: Txn) -> tuple[str, str | None, Attr | None, list[_Extra]]:
            text = tx.get_setting(SETTING_VOLUME)
            if text is None:
                raise NotFormatted("no volume is formatted at this metadata URL")
            sources = tx.get_setting(SETTING_SOURCES)
            root = tx.get_attr(ROOT_INODE)
            return text, sources, root, [] if root is None else _read_extras(tx, [root])

        volume_text, sources_text, root, extras = self.read(header)
        if root is None or root.type != FileType.DIR:
            raise LoftError("the volume has no root directory: its metadata is damaged")
        sources = None
        if sources_text is not None:
            try:
                sources = json.loads(sources_text)
            except ValueError as e:
                raise LoftError(
                    f"the volume's {SETTING_SOURCES!r} setting is not valid JSON ({e}): its "
                    "metadata is damaged"
                ) from None
        doc = self.doc
        doc.begin()
        doc.member("format", FORMAT_NAME)
        doc.member("version", FORMAT_VERSION)
        volume = json.loads(volume_text)
        options = volume.get("storage_options")
        if isinstance(options, dict) and not self.keep_secrets:
            for name in SECRET_OPTIONS:
                options.pop(name, None)
        doc.member("volume", volume, sort=True)
        doc.member(SETTING_SOURCES, sources, sort=True)
        root = extras[0].attr or root
        rec: dict[str, Any] = {"inode": ROOT_INODE, "type": "dir", "attr": _attr_rec(root)}
        _add_extra(rec, root, extras[0])
        doc.member("root", rec)
        self.stats.inodes += 1
        self.space += space_of(FileType.DIR, root.size)
        doc.open_array("tree")
        seen = InodeSet()
        try:
            self._tree(seen)
        finally:
            seen.close()
        doc.close_array()
        doc.open_array("trash")
        self._trash()
        doc.close_array()
        counters = self.read(lambda tx: {name: tx.get_counter(name) for name in COUNTERS})
        # usage as the records written add up (what a load recomputes): files left out, like
        # those unlinked while open, are not counted
        counters[USED_SPACE] = self.space
        counters[USED_INODES] = self.stats.inodes
        doc.member("counters", counters)
        doc.member("summary", self.stats.summary(), last=True)
        doc.end()
        if self.progress is not None:
            self.progress(self.stats)
        return self.stats

    def _list_dir(self, inode: int) -> list[DirEntry]:
        return list(self.read(lambda tx: tx.list_dir(inode)))

    def _tree(self, seen: InodeSet) -> None:
        """Depth first from the root; the stack holds, per level, the subdirectories still to
        visit (inode numbers only), so memory follows the largest listing, not the volume."""
        seen.add(ROOT_INODE)
        stack: list[list[int]] = [[ROOT_INODE]]
        while stack:
            if not stack[-1]:
                stack.pop()
                continue
            parent = stack[-1].pop()
            listing = self._list_dir(parent)
            listing.sort(key=lambda e: e[0])
            subdirs: list[int] = []
            for start in range(0, len(listing), ENTRIES_PER_TXN):
                self._entries(parent, listing[start : start + ENTRIES_PER_TXN], seen, subdirs)
            del listing
            if subdirs:
                subdirs.reverse()  # popped from the end: visited in name order
                stack.append(subdirs)

    def _entries(
        self,
        parent: int,
        batch: list[DirEntry],
        seen: InodeSet,
        subdirs: list[int],
    ) -> None:
        todo: list[tuple[bytes, Attr, bool]] = []
        for name, attr in batch:
            new = True
            if attr.type == FileType.DIR or attr.nlink > 1:
                new = seen.add(attr.inode)
            if attr.type == FileType.DIR and not new:
                self.stats.skipped += 1  # moved while we walked: it is written where first met
                continue
            todo.append((name, attr, new))
        defined = [attr for _, attr, new in todo if new]
        extras = iter(self.read(lambda tx: _read_extras(tx, defined)))
        for name, attr, new in todo:
            rec: dict[str, Any] = {"parent": parent, "name": _enc_bytes(name), "inode": attr.inode}
            self.stats.entries += 1
            if new:
                self._node(rec, attr, next(extras))
                if attr.type == FileType.DIR:
                    subdirs.append(attr.inode)
            else:
                rec["type"] = _TYPE_NAMES[attr.type]
                self.doc.element(rec)
                self._tick()

    def _trash(self) -> None:
        """Trash records in the order the engine keeps them (oldest first).

        ``Txn`` has no way to read a trash record's deletion time, so it is reconstructed: a
        file goes to the trash when its last link is removed, which also sets its ctime, so the
        ctime is the deletion time, kept strictly increasing in trash order (a file unlinked
        while open went to the trash at its last close, later than its ctime: its time is then
        early by as long as it stayed open). On a volume loaded from a dump the times read back
        exactly as they were written.
        """
        count = self.read(lambda tx: tx.trash_count())
        if count <= 0:
            return
        inodes = self.read(lambda tx: tx.expired_trash(_MAX_I64, count))
        last = _MIN_I64
        for start in range(0, len(inodes), ENTRIES_PER_TXN):
            page = inodes[start : start + ENTRIES_PER_TXN]

            def fn(tx: Txn, page: list[int] = page) -> list[tuple[Attr, _Extra]]:
                attrs = [a for a in (tx.get_attr(i) for i in page) if a is not None]
                attrs = [a for a in attrs if a.nlink == 0]  # a linked inode is no trash
                return list(zip(attrs, _read_extras(tx, attrs), strict=True))

            for attr, extra in self.read(fn):
                last = max(attr.ctime_ns, last + 1)
                self._node({"trash": attr.inode, "deleted_ns": last}, attr, extra)
                self.stats.trash += 1


#: Storage options that are secrets: left out of a dump unless asked for.
SECRET_OPTIONS = ("secret_key", "session_token")


def dump_meta(
    meta: Meta,
    out: BinaryIO,
    *,
    progress: ProgressFn | None = None,
    keep_secrets: bool = False,
) -> DumpStats:
    """Write the volume at ``meta`` to ``out`` as one JSON document (see the module docstring).

    Reads only, in many short transactions: a volume that changes meanwhile gives a dump that
    mixes states (each record is consistent, the whole is no snapshot), so dump a volume
    nobody writes. Not written: sessions, open files and locks (they belong to running
    clients), files unlinked while still open, and slices waiting for block gc. ``progress``
    is called every few hundred records with the running counts. Raises ``NotFormatted`` when
    there is no volume, ``MetaUnavailable`` when the engine fails and ``OSError`` when ``out``
    does; what was written until then is an incomplete document that ``load_meta`` refuses.

    The object store's secret key (and session token) stored in the settings are left out
    unless ``keep_secrets``: a restored volume then takes its credentials from the environment
    at mount. The encryption record is kept: its data key is wrapped, useless without the
    passphrase or key file; so are the import sources' credentials, sealed.
    """
    dumper = _Dumper(_core(meta), out, progress)
    dumper.keep_secrets = keep_secrets
    return dumper.run()


# --- parsing -----------------------------------------------------------------------------------


class _Lines:
    """The document's lines, numbered from 1."""

    def __init__(self, stream: BinaryIO, stats: DumpStats) -> None:
        self.stream = stream
        self.stats = stats
        self.no = 0

    def next(self, expected: str) -> bytes:
        """The next line without its end and surrounding blanks; at the end of the input a
        truncation error that says what was ``expected``."""
        raw = self.stream.readline(MAX_LINE + 1)
        if not raw:
            if self.no == 0:
                raise DumpFormatError(1, "the dump is empty (truncated?)")
            raise DumpFormatError(
                self.no + 1, f"the dump ends here, before {expected} (truncated?)"
            )
        self.no += 1
        self.stats.doc_bytes += len(raw)
        if len(raw) > MAX_LINE:
            raise DumpFormatError(self.no, f"line longer than {MAX_LINE >> 20} MiB")
        if not raw.endswith(b"\n"):
            raise DumpFormatError(self.no, f"the line is cut off, before {expected} (truncated?)")
        return raw.strip()

    def error(self, message: str) -> DumpFormatError:
        return DumpFormatError(self.no, message)

    def expect_end(self) -> None:
        """Only blanks may follow the closing line."""
        while True:
            piece = self.stream.read(1 << 16)
            if not piece:
                return
            if piece.strip():
                raise DumpFormatError(self.no + 1, "unexpected data after the end of the dump")

    def parse(self, text: bytes) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self.error(f"invalid JSON ({e})") from None

    def member(self, key: str, *, last: bool = False) -> Any:
        """The value of the member line ``"key":value`` (followed by ',' unless ``last``)."""
        line = self.next(f'the "{key}" member')
        body = line[:-1] if line.endswith(b",") else line
        if line.endswith(b",") == last:
            raise self.error(
                f'"{key}" must be the last member' if last else f"',' missing after \"{key}\""
            )
        obj = self.parse(b"{" + body + b"}") if body.startswith(b'"') else None
        if not isinstance(obj, dict) or list(obj) != [key]:
            raise self.error(f'expected the "{key}" member')
        return obj[key]

    def array(self, key: str) -> Iterator[dict[str, Any]]:
        """The records of the array member ``key`` (one per line), checking the separators."""
        line = self.next(f'the "{key}" array')
        m = _ARRAY_OPEN.match(line)
        if m is None or m.group(1).decode() != key:
            raise self.error(f'expected the "{key}" array')
        more = None  # did the previous element end with ','?
        while True:
            line = self.next(f'the end of the "{key}" array')
            if line in (b"]", b"],"):
                if more:
                    raise self.error(f"',' after the last element of \"{key}\"")
                if line != b"],":
                    raise self.error(f"',' missing after the \"{key}\" array")
                return
            if more is False:
                raise self.error(f"',' missing at the end of line {self.no - 1}")
            more = line.endswith(b",")
            rec = self.parse(line[:-1] if more else line)
            if not isinstance(rec, dict) or not rec:
                raise self.error(f'the elements of "{key}" must be JSON objects')
            yield rec


def _open_input(stream: BinaryIO) -> BinaryIO:
    """``stream`` itself, or its decompressed content when it starts like gzip."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(cast(Any, stream))
    if bytes(cast(Any, buffered).peek(2)[:2]) == b"\x1f\x8b":
        return cast(BinaryIO, gzip.GzipFile(fileobj=buffered, mode="rb"))
    return cast(BinaryIO, buffered)


class _Fields:
    """Typed access to one record's fields, with errors that name the line."""

    def __init__(self, lines: _Lines, rec: dict[str, Any], what: str) -> None:
        self.lines = lines
        self.rec = rec
        self.what = what

    def error(self, message: str) -> DumpFormatError:
        return self.lines.error(f"{self.what}: {message}")

    def check_keys(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        keys = set(self.rec)
        missing = [k for k in required if k not in keys]
        if missing:
            raise self.error(f"missing {', '.join(repr(k) for k in missing)}")
        unknown = sorted(keys - set(required) - set(optional))
        if unknown:
            raise self.error(f"unknown field {unknown[0]!r}")

    def integer(self, key: str, lo: int = 0, hi: int = _MAX_I64, rec: Any = None) -> int:
        value = (self.rec if rec is None else rec).get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise self.error(f"{key!r} must be an integer from {lo} to {hi}, not {value!r}")
        return value

    def ftype(self, key: str = "type") -> FileType:
        value = self.rec.get(key)
        t = _TYPES.get(value) if isinstance(value, str) else None
        if t is None:
            raise self.error(f"{key!r} must be one of {', '.join(_TYPES)}, not {value!r}")
        return t

    def blob(self, value: Any, what: str) -> bytes:
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:
                raise self.error(f"{what} is not valid UTF-8 (use {{'b64': ...}})") from None
        if isinstance(value, dict) and list(value) == ["b64"] and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise self.error(f"{what}: invalid base64") from None
        raise self.error(f"{what} must be a string or {{'b64': ...}}")

    def attr(self, inode: int, ftype: FileType) -> Attr:
        rec = self.rec.get("attr")
        if not isinstance(rec, dict):
            raise self.error("'attr' must be an object")
        unknown = sorted(set(rec) - {*_ATTR_FIELDS, "parent"})
        if unknown:
            raise self.error(f"unknown attribute {unknown[0]!r}")
        attr = Attr(
            inode=inode,
            type=ftype,
            mode=self.integer("mode", 0, 0o7777, rec),
            uid=self.integer("uid", 0, _MAX_U32, rec),
            gid=self.integer("gid", 0, _MAX_U32, rec),
            nlink=self.integer("nlink", 0, _MAX_U32, rec),
            size=self.integer("size", 0, MAX_FILE_SIZE, rec),
            rdev=self.integer("rdev", 0, _MAX_I64, rec),
            atime_ns=self.integer("atime_ns", _MIN_I64, _MAX_I64, rec),
            mtime_ns=self.integer("mtime_ns", _MIN_I64, _MAX_I64, rec),
            ctime_ns=self.integer("ctime_ns", _MIN_I64, _MAX_I64, rec),
            parent=self.integer("parent", 0, _MAX_I64, rec),
        )
        return attr

    def xattrs(self) -> list[tuple[bytes, bytes]]:
        value = self.rec.get("xattrs", [])
        if not isinstance(value, list):
            raise self.error("'xattrs' must be a list of [name, value] pairs")
        out = []
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2:
                raise self.error("'xattrs' must be a list of [name, value] pairs")
            name = self.blob(pair[0], "an xattr name")
            if not name or b"\0" in name or len(name) > 255:
                raise self.error(f"invalid xattr name {name!r}")
            out.append((name, self.blob(pair[1], "an xattr value")))
        return out

    def slices(self) -> list[Slice]:
        value = self.rec.get("slices")
        if not isinstance(value, list) or not value:
            raise self.error("'slices' must be a non-empty list")
        out = []
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 6
                or any(type(x) is not int or x < 0 for x in item)
            ):
                raise self.error("a slice must be [pos, id, size, off, len, kind] (integers >= 0)")
            s = Slice(*item)
            if s.len <= 0 or s.end > CHUNK_SIZE or s.kind > 255 or s.id > _MAX_I64:
                raise self.error(f"slice {item} lies outside its chunk")
            if s.id and s.off + s.len > s.size:
                raise self.error(f"slice {item} reaches past its stored slice")
            out.append(s)
        return out

    def text(self, key: str, lo: int, hi: int) -> str:
        """A string field of ``lo`` to ``hi`` bytes in UTF-8."""
        value = self.rec.get(key)
        if not isinstance(value, str):
            raise self.error(f"{key!r} must be a string, not {value!r}")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise self.error(f"{key!r} is not valid UTF-8") from None
        if not lo <= size <= hi:
            raise self.error(f"{key!r} must hold {lo} to {hi} bytes, not {size}")
        return value

    def ext(self) -> tuple[int, ExtObject]:
        """An external object record: the slice id and the ``ExtObject``."""
        self.check_keys(("ext", "source", "key", "etag", "offset", "length"))
        sid = self.integer("ext", 1)
        rec = ExtObject(
            source=self.integer("source", 0, _MAX_I32),
            key=self.text("key", 1, MAX_EXT_KEY),
            etag=self.text("etag", 0, MAX_EXT_ETAG),
            offset=self.integer("offset", 0),
            length=self.integer("length", 0, CHUNK_SIZE),
        )
        return sid, rec

    def lazy(self) -> tuple[int, str]:
        """The lazy-import binding of a directory record: (source, prefix)."""
        value = self.rec.get("lazy")
        if not isinstance(value, dict):
            raise self.error("'lazy' must be an object")
        f = _Fields(self.lines, value, f"{self.what}: 'lazy'")
        f.check_keys(("source", "prefix"))
        return f.integer("source", 0, _MAX_I32), f.text("prefix", 0, MAX_EXT_KEY)


# --- load ----------------------------------------------------------------------------------------


class _Loader:
    """Checks records as they are parsed and writes them in batched transactions."""

    def __init__(
        self, core: MetaCore, lines: _Lines, progress: ProgressFn | None, version: int
    ) -> None:
        self.core = core
        self.lines = lines
        self.stats = lines.stats
        self.progress = progress
        self.version = version
        self.ops: list[tuple[Any, ...]] = []
        self.refs: dict[int, list[int]] = {}  # slice id -> [size, references] of this batch
        self.batch_slices = 0
        self.dirs = InodeSet()  # directories defined so far
        self.links = InodeSet()  # hard-linked inodes defined so far
        self.max_inode = ROOT_INODE
        self.max_slice = 0
        self.space = 0
        self.file: tuple[int, int] | None = None  # (inode, last chunk index) taking chunks
        self.exts = InodeSet(EXT_SPILL_AFTER)  # external object records used by a chunk so far
        self.pending: dict[int, ExtObject] = {}  # ... read but not used yet

    def close(self) -> None:
        self.dirs.close()
        self.links.close()
        self.exts.close()

    # --- writing ---------------------------------------------------------------------------

    def _op(self, *op: Any) -> None:
        self.ops.append(op)

    def flush(self) -> None:
        if not self.ops and not self.refs:
            return
        ops = self.ops
        refs = {sid: (v[0], v[1]) for sid, v in self.refs.items()}
        self.core._transaction(lambda tx: _apply(tx, ops, refs), True)
        self.ops, self.refs, self.batch_slices = [], {}, 0
        if self.progress is not None:
            self.progress(self.stats)

    def _maybe_flush(self) -> None:
        if len(self.ops) >= RECORDS_PER_TXN or self.batch_slices >= SLICES_PER_TXN:
            self.flush()

    # --- records ---------------------------------------------------------------------------

    def node(self, f: _Fields, inode: int, ftype: FileType) -> Attr:
        """The attributes, xattrs and symlink target of a record that defines ``inode``."""
        attr = f.attr(inode, ftype)
        self._op("attr", attr)
        for name, value in f.xattrs():
            self._op("xattr", inode, name, value)
        if ftype == FileType.SYMLINK:
            target = f.blob(f.rec.get("target"), "'target'")
            if not target or len(target) > MAX_SYMLINK:
                raise f.error("a symlink target must hold 1 to 4096 bytes")
            self._op("symlink", inode, target)
        elif "target" in f.rec:
            raise f.error("only symlinks have a 'target'")
        if ftype == FileType.DIR:
            self._lazy(f, attr)
        elif "lazy" in f.rec:
            raise f.error("only directories have a 'lazy' binding")
        self.stats.inodes += 1
        self.space += space_of(ftype, attr.size)
        self.max_inode = max(self.max_inode, inode)
        if ftype == FileType.DIR:
            self.dirs.add(inode)
        elif attr.nlink > 1:
            self.links.add(inode)
        if ftype == FileType.FILE:
            self.stats.bytes += attr.size
            self.file = (inode, -1)
        return attr

    def _lazy(self, f: _Fields, attr: Attr) -> None:
        """The binding of a directory bound by a lazy import: a directory has one exactly when
        its ``rdev`` is ``LAZY_MARK`` (either without the other would leave it empty for
        good, or bound to nothing)."""
        if "lazy" not in f.rec:
            if attr.rdev == LAZY_MARK:
                raise f.error(
                    f"a directory with rdev {LAZY_MARK} (bound by a lazy import) needs its "
                    "'lazy' binding"
                )
            return
        if self.version < 2:
            raise f.error(f"'lazy' bindings need format version 2, not {self.version}")
        source, prefix = f.lazy()
        if attr.rdev != LAZY_MARK:
            raise f.error(
                f"a directory with a 'lazy' binding must have rdev {LAZY_MARK}, not {attr.rdev}"
            )
        value = json.dumps({"source": source, "prefix": prefix})  # as ``Meta.bind_lazy``
        self._op("setting", lazy_setting(attr.inode), value)

    def root(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            raise self.lines.error('"root" must be an object')
        f = _Fields(self.lines, rec, "root")
        f.check_keys(("inode", "type", "attr"), ("xattrs", "lazy"))
        if f.integer("inode", ROOT_INODE, ROOT_INODE) != ROOT_INODE or f.ftype() != FileType.DIR:
            raise f.error("the root must be directory inode 1")
        self.node(f, ROOT_INODE, FileType.DIR)

    def tree_record(self, rec: dict[str, Any]) -> None:
        if "chunk" in rec:
            self.chunk(_Fields(self.lines, rec, "chunk record"))
            return
        if "ext" in rec:
            self.ext(_Fields(self.lines, rec, "external object record"))
            return
        self.no_pending()
        f = _Fields(self.lines, rec, "entry record")
        if "attr" not in rec:
            f.check_keys(("parent", "name", "inode", "type"))
        else:
            f.check_keys(("parent", "name", "inode", "type", "attr"), ("xattrs", "target", "lazy"))
        parent = f.integer("parent", ROOT_INODE)
        name = f.blob(rec["name"], "'name'")
        try:
            check_name(name)
        except LoftError:
            raise f.error(f"invalid name {name!r}") from None
        if name in (b".", b".."):
            raise f.error(f"invalid name {name!r}")
        inode = f.integer("inode", ROOT_INODE + 1)
        ftype = f.ftype()
        if parent not in self.dirs:
            raise f.error(f"its directory (inode {parent}) is not defined before it")
        self.file = None
        if "attr" in rec:
            self.node(f, inode, ftype)
        elif ftype == FileType.DIR or inode not in self.links:
            raise f.error(
                f"hard link to inode {inode}, which is not a hard-linked file defined before it"
            )
        self._op("entry", parent, name, inode, ftype)
        self.stats.entries += 1
        self._maybe_flush()

    def trash_record(self, rec: dict[str, Any]) -> None:
        if "chunk" in rec:
            self.chunk(_Fields(self.lines, rec, "chunk record"))
            return
        if "ext" in rec:
            self.ext(_Fields(self.lines, rec, "external object record"))
            return
        self.no_pending()
        f = _Fields(self.lines, rec, "trash record")
        f.check_keys(("trash", "deleted_ns", "type", "attr"), ("xattrs",))
        inode = f.integer("trash", ROOT_INODE + 1)
        deleted_ns = f.integer("deleted_ns", _MIN_I64, _MAX_I64)
        if f.ftype() != FileType.FILE:
            raise f.error("only regular files go to the trash")
        self.file = None
        self.node(f, inode, FileType.FILE)
        self._op("trash", inode, deleted_ns)
        self.stats.trash += 1
        self._maybe_flush()

    def chunk(self, f: _Fields) -> None:
        f.check_keys(("chunk", "index", "slices"))
        inode = f.integer("chunk", ROOT_INODE + 1)
        index = f.integer("index", 0, MAX_FILE_SIZE // CHUNK_SIZE)
        if self.file is None or self.file[0] != inode:
            raise f.error(f"chunks of inode {inode} must follow the record that defines the file")
        if index <= self.file[1]:
            raise f.error(f"chunk {index} of inode {inode} is out of order")
        self.file = (inode, index)
        slices = f.slices()
        if self.version >= 2:
            self._check_external(f, slices)
        self._op("chunk", inode, index, slices)
        for s in slices:
            if s.id:
                ref = self.refs.setdefault(s.id, [s.size, 0])
                ref[1] += 1
                self.max_slice = max(self.max_slice, s.id)
        self.stats.chunks += 1
        self.stats.slices += len(slices)
        self.batch_slices += len(slices)
        self._maybe_flush()

    def ext(self, f: _Fields) -> None:
        """An external object record: it must come right before the chunk record that uses
        it first (``_check_external``)."""
        if self.version < 2:
            raise f.error(f"external object records need format version 2, not {self.version}")
        sid, rec = f.ext()
        if sid in self.pending or sid in self.exts:
            raise f.error(f"external object {sid} is defined twice")
        if self.file is None:
            raise f.error("an external object must come right before the chunk that uses it")
        self.pending[sid] = rec
        self._op("ext", sid, rec)
        self.max_slice = max(self.max_slice, sid)
        self.stats.exts += 1

    def _check_external(self, f: _Fields, slices: list[Slice]) -> None:
        """Every external slice names a record read before it: the records read right before
        this chunk record are used by it, with the stored slice's size their length."""
        for s in slices:
            if s.kind != KIND_EXTERNAL or not s.id:
                continue
            rec = self.pending.pop(s.id, None)
            if rec is not None:
                if s.size != rec.length:
                    raise f.error(
                        f"external slice {s.id} has size {s.size}, its object record "
                        f"length {rec.length}"
                    )
                self.exts.add(s.id)
            elif s.id not in self.exts:
                raise f.error(f"external slice {s.id} has no object record before it")
        self.no_pending()

    def no_pending(self) -> None:
        """Refuse an external object record that the chunk record after it did not use."""
        if self.pending:
            sid = min(self.pending)
            raise self.lines.error(
                f"external object {sid} must come right before the chunk record that uses it"
            )

    def check_summary(self, summary: Any) -> None:
        """The counts of the ``summary`` line must be those of the records read (version 1
        has no ``exts``)."""
        if not isinstance(summary, dict):
            raise self.lines.error('"summary" must be an object')
        got = self.stats.summary()
        if self.version < 2:
            del got["exts"]
        unknown = sorted(set(summary) - set(got))
        if unknown:
            raise self.lines.error(f"unknown summary field {unknown[0]!r}")
        for key, value in got.items():
            if summary.get(key) != value:
                raise self.lines.error(
                    f"the summary says {key} = {summary.get(key)!r} but the dump holds {value} "
                    "(records lost or added?)"
                )

    def finish(self, counters: dict[str, int], volume_text: str, sources_text: str | None) -> None:
        """Write the last batch, then set the counters and store the settings in one
        transaction."""
        self.flush()
        targets = {
            NEXT_INODE: max(counters[NEXT_INODE], self.max_inode + 1),
            NEXT_SLICE: max(counters[NEXT_SLICE], self.max_slice + 1),
            NEXT_SESSION: max(counters[NEXT_SESSION], 1),
            USED_SPACE: self.space,
            USED_INODES: self.stats.inodes,
        }

        def fn(tx: Txn) -> None:
            current = {name: tx.get_counter(name) for name in targets}
            for name, value in targets.items():
                if value != current[name]:
                    tx.add_counter(name, value - current[name])
            if sources_text is not None:
                tx.put_setting(SETTING_SOURCES, sources_text)
            tx.put_setting(SETTING_VOLUME, volume_text)

        self.core._transaction(fn, True)


def _apply(tx: Txn, ops: list[tuple[Any, ...]], refs: dict[int, tuple[int, int]]) -> None:
    for op in ops:
        kind = op[0]
        if kind == "attr":
            tx.put_attr(op[1])
        elif kind == "entry":
            tx.put_entry(op[1], op[2], op[3], op[4])
        elif kind == "chunk":
            tx.put_chunk(op[1], op[2], op[3])
        elif kind == "xattr":
            tx.put_xattr(op[1], op[2], op[3])
        elif kind == "symlink":
            tx.put_symlink(op[1], op[2])
        elif kind == "trash":
            tx.put_trash(op[1], op[2])
        elif kind == "ext":
            tx.put_ext(op[1], op[2])
        elif kind == "setting":
            tx.put_setting(op[1], op[2])
        else:  # pragma: no cover - the loader only queues the kinds above
            raise AssertionError(kind)
    if refs:
        tx.add_slice_refs(refs)


@dataclass
class _Header:
    """What the opening lines hold."""

    version: int
    volume_text: str  # the settings as stored JSON
    sources_text: str | None  # the import sources as stored JSON (None: none)
    root: Any  # the root record, checked by ``_Loader.root``


def _read_header(lines: _Lines) -> _Header:
    """Check the opening lines up to the root record."""
    first = lines.next("the start of the document")
    if first != b"{":
        raise lines.error("not a loftfs dump (it does not start with '{' on a line of its own)")
    try:
        name = lines.member("format")
    except DumpFormatError as e:
        if "truncated" in str(e):
            raise
        name = None
    if name != FORMAT_NAME:
        raise lines.error(f'not a loftfs dump (line 2 is not "format":"{FORMAT_NAME}",)')
    version = lines.member("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise lines.error(
            f"dump format version {version!r} is not supported (this loft reads {readable})"
        )
    volume = lines.member("volume")
    if not isinstance(volume, dict):
        raise lines.error('"volume" must be an object')
    for key in ("name", "uuid"):
        if not isinstance(volume.get(key), str) or not volume[key]:
            raise lines.error(f'"volume" lacks its {key}')
    try:
        VolumeSettings.from_json(json.dumps(volume))
    except (TypeError, ValueError) as e:
        raise lines.error(f'"volume" holds invalid settings ({e})') from None
    sources_text = None
    if version >= 2:
        sources = lines.member(SETTING_SOURCES)
        if sources is not None:
            sources_text = json.dumps(sources, sort_keys=True)
    return _Header(version, json.dumps(volume, sort_keys=True), sources_text, lines.member("root"))


def _read_counters(lines: _Lines) -> dict[str, int]:
    counters = lines.member("counters")
    if not isinstance(counters, dict):
        raise lines.error('"counters" must be an object')
    unknown = sorted(set(counters) - set(COUNTERS))
    if unknown:
        raise lines.error(f"unknown counter {unknown[0]!r}")
    for name in COUNTERS:
        value = counters.get(name)
        if type(value) is not int or value < 0:
            raise lines.error(f"counter {name!r} must be an integer >= 0, not {value!r}")
    return counters


def check_target(meta: Meta, *, discard_interrupted: bool = False) -> None:
    """Make sure ``meta`` holds no volume. With ``discard_interrupted``, the metadata of an
    interrupted ``load_meta`` is deleted first (the bucket is never touched). Raises
    ``VolumeExists`` otherwise, having changed nothing."""
    try:
        settings = meta.load_settings()
    except NotFormatted:
        return
    marker = settings.extra.get(LOAD_MARKER)
    if marker is None:
        raise VolumeExists(
            f"the target already holds volume {settings.name!r}: load needs an empty, "
            "unformatted metadata engine"
        )
    if not discard_interrupted:
        raise VolumeExists(
            f"the target holds an interrupted load of volume {settings.name!r}: rerun with "
            "--discard-interrupted to delete its metadata first (its bucket is not touched)"
        )
    meta.destroy_volume()


def load_meta(
    meta: Meta,
    inp: BinaryIO,
    *,
    discard_interrupted: bool = False,
    progress: ProgressFn | None = None,
) -> DumpStats:
    """Restore a dump written by ``dump_meta`` (plain or gzip-compressed) into ``meta``.

    The target must hold no volume (``check_target``); ``VolumeExists`` otherwise, before
    anything is written. Records are checked as they are parsed and written a few thousand per
    transaction; slice reference counts, ``used_space`` and ``used_inodes`` are recomputed from
    the records, id counters are taken from the dump (raised past every id it holds). Until
    the last transaction the stored settings carry ``LOAD_MARKER``; the volume settings of the
    dump replace them at the end.

    A malformed or truncated dump raises ``DumpFormatError`` naming the line; on that or any
    other failure (interrupts included) the records written so far are deleted again and the
    target is left unformatted. If even that fails, ``PartialLoad`` says so: rerun with
    ``discard_interrupted``. The bucket named by the settings is never touched.
    """
    core = _core(meta)
    check_target(meta, discard_interrupted=discard_interrupted)
    stats = DumpStats()
    lines = _Lines(_open_input(inp), stats)
    try:
        header = _read_header(lines)
    except _INPUT_ERRORS as e:
        raise DumpFormatError(lines.no + 1, f"unreadable input ({e})") from e
    interim = VolumeSettings.from_json(header.volume_text)
    interim.extra = {**interim.extra, LOAD_MARKER: {"started_ns": time.time_ns()}}
    meta.init_volume(interim)
    loader = _Loader(core, lines, progress, header.version)
    try:
        loader.root(header.root)
        for rec in lines.array("tree"):
            loader.tree_record(rec)
        loader.no_pending()
        for rec in lines.array("trash"):
            loader.trash_record(rec)
        loader.no_pending()
        counters = _read_counters(lines)
        loader.check_summary(lines.member("summary", last=True))
        if lines.next("the closing '}'") != b"}":
            raise lines.error("expected the closing '}'")
        lines.expect_end()
        loader.finish(counters, header.volume_text, header.sources_text)
    except BaseException as e:
        failure: BaseException = e
        if isinstance(e, _INPUT_ERRORS):
            failure = DumpFormatError(lines.no + 1, f"unreadable input ({e})")
        try:
            meta.destroy_volume()
        except Exception as cleanup:
            raise PartialLoad(
                f"{failure}; removing the partly loaded metadata failed too ({cleanup}): "
                "rerun the load with --discard-interrupted"
            ) from e
        if failure is not e:
            raise failure from e
        raise
    finally:
        loader.close()
    return stats


__all__ = [
    "COUNTERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LOAD_MARKER",
    "READABLE_VERSIONS",
    "DumpFormatError",
    "DumpStats",
    "InodeSet",
    "PartialLoad",
    "check_target",
    "dump_meta",
    "load_meta",
]
