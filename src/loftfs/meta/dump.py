"""Metadata backup and restore: ``dump_meta`` writes a volume's namespace as one JSON document,
``load_meta`` restores such a document into an empty metadata engine of any kind.

Both work over the ``Txn`` primitives of ``loftfs.meta.txn`` through the engine's
``_transaction`` runner, so every engine gets them without code of its own. Both stream: the
dump holds one directory listing and a bounded batch of records at a time, the load parses one
line at a time and writes a few thousand records per transaction.

The document (format version 1, described for users in ``docs/DUMP.md``) is valid JSON laid
out one member or array element per line, which is what lets ``load_meta`` parse it line by
line::

    {
    "format":"loftfs-dump",
    "version":1,
    "volume":{...volume settings...},
    "root":{"inode":1,"type":"dir","attr":{...},"xattrs":[...]},
    "tree":[
    {"parent":1,"name":"a","inode":2,"type":"file","attr":{...}},
    {"chunk":2,"index":0,"slices":[[pos,id,size,off,len,kind],...]},
    {"parent":1,"name":"b","inode":2,"type":"file"},
    ...
    ],
    "trash":[
    {"trash":9,"deleted_ns":...,"type":"file","attr":{...}},
    ...
    ],
    "counters":{"next_inode":...,...},
    "summary":{"inodes":...,"entries":...,"chunks":...,"slices":...,"bytes":...,"trash":...}
    }

The tree is written depth first: a directory's entries in byte order of their names, then its
subdirectories one after the other. An entry that defines its inode carries ``attr`` (and
``xattrs``, ``target`` for symlinks), followed by the inode's chunk records; a further hard
link to an inode already written carries only ``parent``, ``name``, ``inode`` and ``type``.
Byte strings (names, symlink targets, xattrs) are JSON strings when they are valid UTF-8 and
``{"b64": "..."}`` otherwise. The output is deterministic: dumping a volume loaded from a dump
gives the same bytes.
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
from loftfs.meta.txn import (
    NEXT_INODE,
    NEXT_SESSION,
    NEXT_SLICE,
    SETTING_VOLUME,
    USED_INODES,
    USED_SPACE,
    Txn,
)
from loftfs.meta.types import (
    CHUNK_SIZE,
    MAX_SYMLINK,
    ROOT_INODE,
    Attr,
    FileType,
    Slice,
    VolumeSettings,
)

T = TypeVar("T")

FORMAT_NAME = "loftfs-dump"
FORMAT_VERSION = 1

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

_MAX_U32 = (1 << 32) - 1
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
    logical size of the regular files among them. ``doc_bytes`` is the size of the document
    written or parsed so far; ``skipped`` counts directories the dump met twice (a volume
    changing while it was dumped) and left out the second time.
    """

    inodes: int = 0
    entries: int = 0
    chunks: int = 0
    slices: int = 0
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
    """A set of inode numbers with bounded memory: past ``memory_limit`` members it moves to a
    temporary SQLite file (deleted by ``close``), so a volume of any size can be walked."""

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


def _read_extras(tx: Txn, attrs: list[Attr]) -> list[_Extra]:
    """Xattrs, symlink targets and (up to ``CHUNKS_PER_TXN`` in all) slice lists of ``attrs``."""
    budget = CHUNKS_PER_TXN
    out = []
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
        elif attr.type == FileType.FILE:
            extra.indexes = sorted(tx.chunk_indexes(inode))
            take = extra.indexes[: max(0, budget)]
            budget -= len(take)
            extra.chunks = [(i, tx.get_chunk(inode, i)) for i in take]
        out.append(extra)
    return out


class _Dumper:
    keep_secrets = False

    def __init__(self, core: MetaCore, out: BinaryIO, progress: ProgressFn | None) -> None:
        self.core = core
        self.stats = DumpStats()
        self.doc = _DocWriter(out, self.stats)
        self.progress = progress
        self._since_progress = 0
        self.space = 0  # used_space of the inodes written

    def read(self, fn: Callable[[Txn], T]) -> T:
        return self.core._transaction(fn, False)

    def _tick(self) -> None:
        self._since_progress += 1
        if self.progress is not None and self._since_progress >= PROGRESS_EVERY:
            self._since_progress = 0
            self.progress(self.stats)

    def _node(self, rec: dict[str, Any], attr: Attr, extra: _Extra) -> None:
        """Complete and write a record that defines ``attr``, then its chunk records."""
        rec["type"] = _TYPE_NAMES[attr.type]
        rec["attr"] = _attr_rec(attr)
        if extra.xattrs:
            rec["xattrs"] = _xattr_rec(extra.xattrs)
        if attr.type == FileType.SYMLINK:
            rec["target"] = _enc_bytes(extra.target or b"")
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
            self._chunk(inode, index, slices)
        rest = (extra.indexes or [])[len(done) :]
        for start in range(0, len(rest), CHUNKS_PER_TXN):
            page = rest[start : start + CHUNKS_PER_TXN]

            def fn(tx: Txn, page: list[int] = page) -> list[tuple[int, list[Slice]]]:
                return [(i, tx.get_chunk(inode, i)) for i in page]

            for index, slices in self.read(fn):
                self._chunk(inode, index, slices)

    def _chunk(self, inode: int, index: int, slices: list[Slice]) -> None:
        if not slices:
            return  # removed between reading the indexes and the list (a live volume)
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
        def header(tx: Txn) -> tuple[str, Attr | None, list[_Extra]]:
            text = tx.get_setting(SETTING_VOLUME)
            if text is None:
                raise NotFormatted("no volume is formatted at this metadata URL")
            root = tx.get_attr(ROOT_INODE)
            return text, root, [] if root is None else _read_extras(tx, [root])

        volume_text, root, extras = self.read(header)
        if root is None or root.type != FileType.DIR:
            raise LoftError("the volume has no root directory: its metadata is damaged")
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
        rec: dict[str, Any] = {"inode": ROOT_INODE, "type": "dir", "attr": _attr_rec(root)}
        if extras[0].xattrs:
            rec["xattrs"] = _xattr_rec(extras[0].xattrs)
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

    def _list_dir(self, inode: int) -> list[tuple[bytes, Attr]]:
        return self.read(lambda tx: tx.list_dir(inode))

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
        batch: list[tuple[bytes, Attr]],
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
    passphrase or key file.
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


# --- load ----------------------------------------------------------------------------------------


class _Loader:
    """Checks records as they are parsed and writes them in batched transactions."""

    def __init__(self, core: MetaCore, lines: _Lines, progress: ProgressFn | None) -> None:
        self.core = core
        self.lines = lines
        self.stats = lines.stats
        self.progress = progress
        self.ops: list[tuple[Any, ...]] = []
        self.refs: dict[int, list[int]] = {}  # slice id -> [size, references] of this batch
        self.batch_slices = 0
        self.dirs = InodeSet()  # directories defined so far
        self.links = InodeSet()  # hard-linked inodes defined so far
        self.max_inode = ROOT_INODE
        self.max_slice = 0
        self.space = 0
        self.file: tuple[int, int] | None = None  # (inode, last chunk index) taking chunks

    def close(self) -> None:
        self.dirs.close()
        self.links.close()

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

    def root(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            raise self.lines.error('"root" must be an object')
        f = _Fields(self.lines, rec, "root")
        f.check_keys(("inode", "type", "attr"), ("xattrs",))
        if f.integer("inode", ROOT_INODE, ROOT_INODE) != ROOT_INODE or f.ftype() != FileType.DIR:
            raise f.error("the root must be directory inode 1")
        self.node(f, ROOT_INODE, FileType.DIR)

    def tree_record(self, rec: dict[str, Any]) -> None:
        if "chunk" in rec:
            self.chunk(_Fields(self.lines, rec, "chunk record"))
            return
        f = _Fields(self.lines, rec, "entry record")
        if "attr" not in rec:
            f.check_keys(("parent", "name", "inode", "type"))
        else:
            f.check_keys(("parent", "name", "inode", "type", "attr"), ("xattrs", "target"))
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

    def check_summary(self, summary: Any) -> None:
        """The counts of the ``summary`` line must be those of the records read."""
        if not isinstance(summary, dict):
            raise self.lines.error('"summary" must be an object')
        got = self.stats.summary()
        unknown = sorted(set(summary) - set(got))
        if unknown:
            raise self.lines.error(f"unknown summary field {unknown[0]!r}")
        for key, value in got.items():
            if summary.get(key) != value:
                raise self.lines.error(
                    f"the summary says {key} = {summary.get(key)!r} but the dump holds {value} "
                    "(records lost or added?)"
                )

    def finish(self, counters: dict[str, int], volume_text: str) -> None:
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
        else:  # pragma: no cover - the loader only queues the kinds above
            raise AssertionError(kind)
    if refs:
        tx.add_slice_refs(refs)


def _read_header(lines: _Lines) -> tuple[str, Any]:
    """Check the opening lines; returns the settings as stored JSON and the root record."""
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
    if version != FORMAT_VERSION:
        raise lines.error(
            f"dump format version {version!r} is not supported (this loft reads {FORMAT_VERSION})"
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
    return json.dumps(volume, sort_keys=True), lines.member("root")


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
        volume_text, root = _read_header(lines)
    except _INPUT_ERRORS as e:
        raise DumpFormatError(lines.no + 1, f"unreadable input ({e})") from e
    interim = VolumeSettings.from_json(volume_text)
    interim.extra = {**interim.extra, LOAD_MARKER: {"started_ns": time.time_ns()}}
    meta.init_volume(interim)
    loader = _Loader(core, lines, progress)
    try:
        loader.root(root)
        for rec in lines.array("tree"):
            loader.tree_record(rec)
        for rec in lines.array("trash"):
            loader.trash_record(rec)
        counters = _read_counters(lines)
        loader.check_summary(lines.member("summary", last=True))
        if lines.next("the closing '}'") != b"}":
            raise lines.error("expected the closing '}'")
        lines.expect_end()
        loader.finish(counters, volume_text)
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
    "DumpFormatError",
    "DumpStats",
    "InodeSet",
    "PartialLoad",
    "check_target",
    "dump_meta",
    "load_meta",
]
