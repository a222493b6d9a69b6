"""The SQL engine: schema, the ``Txn`` primitives in SQL, and the retrying transaction runner.

Dialects (``sqlite.py``, ``postgres.py``) supply connections, ``BEGIN`` statements, column
types and the classification of driver errors. Queries are written with ``?`` placeholders and
rewritten once per dialect. Every upsert is ``INSERT ... ON CONFLICT ... DO UPDATE``, which
SQLite (3.24+), PostgreSQL and the PostgreSQL-compatible distributed databases all accept.

Row locks: a dialect with ``row_lock = " FOR UPDATE"`` locks, in write transactions, every row
the shared layer reads by key before it decides what to write (inode attributes, chunk slice
lists, sessions). The shared layer reads every inode an operation changes (usually the parent
directory first) before it writes anything, so under READ COMMITTED these locks serialise
exactly the transactions that touch the same inodes, like a per-inode mutex held until commit;
SQLite needs none (one writer at a time).

Attributes are stored in columns of ``loft_node`` so that other tools can inspect them. A
chunk's slice list is one BLOB in ``loft_chunk.slices``: records of ``SLICE_RECORD.size`` bytes,
big-endian ``pos u32, id u64, size u32, off u32, len u32, kind u8``, oldest first.

External objects (``loft_ext``, one row per ``ExtObject``) name the source object by
``obj_key`` (the key's UTF-8 bytes, compared as bytes whatever the database's collation) and
the range by ``obj_offset``/``obj_length``: ``key`` and ``offset`` are reserved words in some
dialects. Tables added after the first release (``LATER_TABLES``) are created in a volume
formatted before, the first time a statement finds one missing (``_add_later_tables``).
"""

from __future__ import annotations

import logging
import random
import re
import struct
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from loftfs.errors import MetaUnavailable, NotFormatted
from loftfs.meta.base import BaseMeta
from loftfs.meta.txn import SETTING_VOLUME, FlockRec, NewFile, PlockRange, SessionRec, Txn
from loftfs.meta.types import Attr, DirEntry, EntryList, ExtObject, FileType, Slice

T = TypeVar("T")
log = logging.getLogger(__name__)

_NOT_FORMATTED = "no volume is formatted at this metadata URL (run `loft format`)"

SLICE_RECORD = struct.Struct(">IQIIIB")
TABLES = (
    "loft_setting",
    "loft_counter",
    "loft_node",
    "loft_edge",
    "loft_symlink",
    "loft_chunk",
    "loft_slice_ref",
    "loft_xattr",
    "loft_session",
    "loft_open",
    "loft_flock",
    "loft_plock",
    "loft_trash",
    "loft_ext",
)
#: tables a volume formatted by an earlier release may lack (see ``SQLMeta._add_later_tables``)
LATER_TABLES = ("loft_ext",)
IN_BATCH = 500  # ids per ``IN (...)`` list

# {int}: 64-bit integer type, {blob}: byte string type, {norowid}: clustered-key table suffix
SCHEMA = """
CREATE TABLE IF NOT EXISTS loft_setting (
    name VARCHAR(255) PRIMARY KEY, value TEXT NOT NULL)
CREATE TABLE IF NOT EXISTS loft_counter (
    name VARCHAR(255) PRIMARY KEY, value {int} NOT NULL)
CREATE TABLE IF NOT EXISTS loft_node (
    inode {int} PRIMARY KEY, type INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid {int} NOT NULL, gid {int} NOT NULL, nlink {int} NOT NULL, size {int} NOT NULL,
    rdev {int} NOT NULL, atime_ns {int} NOT NULL, mtime_ns {int} NOT NULL,
    ctime_ns {int} NOT NULL, parent {int} NOT NULL)
CREATE TABLE IF NOT EXISTS loft_edge (
    parent {int} NOT NULL, name {blob} NOT NULL, inode {int} NOT NULL, type INTEGER NOT NULL,
    PRIMARY KEY (parent, name)){norowid}
CREATE TABLE IF NOT EXISTS loft_symlink (
    inode {int} PRIMARY KEY, target {blob} NOT NULL)
CREATE TABLE IF NOT EXISTS loft_chunk (
    inode {int} NOT NULL, idx {int} NOT NULL, slices {blob} NOT NULL,
    PRIMARY KEY (inode, idx)){norowid}
CREATE TABLE IF NOT EXISTS loft_slice_ref (
    id {int} PRIMARY KEY, size {int} NOT NULL, refs {int} NOT NULL)
CREATE INDEX IF NOT EXISTS loft_slice_ref_dead ON loft_slice_ref (id) WHERE refs <= 0
CREATE TABLE IF NOT EXISTS loft_xattr (
    inode {int} NOT NULL, name {blob} NOT NULL, value {blob} NOT NULL,
    PRIMARY KEY (inode, name)){norowid}
CREATE TABLE IF NOT EXISTS loft_session (
    sid {int} PRIMARY KEY, heartbeat_ns {int} NOT NULL, info TEXT NOT NULL)
CREATE TABLE IF NOT EXISTS loft_open (
    sid {int} NOT NULL, inode {int} NOT NULL, PRIMARY KEY (sid, inode)){norowid}
CREATE INDEX IF NOT EXISTS loft_open_inode ON loft_open (inode)
CREATE TABLE IF NOT EXISTS loft_flock (
    inode {int} NOT NULL, sid {int} NOT NULL, owner {int} NOT NULL, ltype INTEGER NOT NULL,
    PRIMARY KEY (inode, sid, owner)){norowid}
CREATE INDEX IF NOT EXISTS loft_flock_sid ON loft_flock (sid)
CREATE TABLE IF NOT EXISTS loft_plock (
    inode {int} NOT NULL, sid {int} NOT NULL, owner {int} NOT NULL, start {int} NOT NULL,
    stop {int} NOT NULL, ltype INTEGER NOT NULL, pid {int} NOT NULL,
    PRIMARY KEY (inode, sid, owner, start)){norowid}
CREATE INDEX IF NOT EXISTS loft_plock_sid ON loft_plock (sid)
CREATE TABLE IF NOT EXISTS loft_trash (
    inode {int} PRIMARY KEY, deleted_ns {int} NOT NULL)
CREATE INDEX IF NOT EXISTS loft_trash_time ON loft_trash (deleted_ns)
CREATE TABLE IF NOT EXISTS loft_ext (
    id {int} PRIMARY KEY, source INTEGER NOT NULL, obj_key {blob} NOT NULL, etag TEXT NOT NULL,
    obj_offset {int} NOT NULL, obj_length {int} NOT NULL)
CREATE INDEX IF NOT EXISTS loft_ext_source ON loft_ext (source)
"""

_NODE_COLS = "inode, type, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, parent"
_JOINED_NODE_COLS = ", ".join(f"n.{c.strip()}" for c in _NODE_COLS.split(","))
_NODE_N = _NODE_COLS.count(",") + 1


def pack_slices(slices: Iterable[Slice]) -> bytes:
    return b"".join(SLICE_RECORD.pack(s.pos, s.id, s.size, s.off, s.len, s.kind) for s in slices)


def unpack_slices(data: bytes) -> list[Slice]:
    return [Slice(*rec) for rec in SLICE_RECORD.iter_unpack(bytes(data))]


def _attr(row: tuple[Any, ...]) -> Attr:
    return Attr(
        inode=row[0],
        type=FileType(row[1]),
        mode=row[2],
        uid=row[3],
        gid=row[4],
        nlink=row[5],
        size=row[6],
        rdev=row[7],
        atime_ns=row[8],
        mtime_ns=row[9],
        ctime_ns=row[10],
        parent=row[11],
    )


class SQLDialect:
    """What differs between SQL databases. Subclasses override the class attributes and the
    error classification."""

    int_type = "BIGINT"
    blob_type = "BYTEA"
    norowid = ""
    placeholder = "%s"
    #: appended to the key reads of write transactions (see the module docstring)
    row_lock = ""
    #: ``INSERT ... RETURNING`` is available: counters are incremented in one statement
    returning = False
    #: read transactions fetch an entry's inode attributes with the entry (one statement
    #: instead of two for a lookup; worth it where a statement costs a network round trip)
    join_entry_attr = False

    def __init__(self) -> None:
        self._rewritten: dict[str, str] = {}

    def blob_concat(self, a: str, b: str) -> str:
        return f"{a} || {b}"

    def schema(self) -> list[str]:
        text = SCHEMA.format(int=self.int_type, blob=self.blob_type, norowid=self.norowid)
        return [s.strip() for s in re.split(r"\n(?=CREATE )", text.strip())]

    def sql(self, query: str) -> str:
        if self.placeholder == "?":
            return query
        done = self._rewritten.get(query)
        if done is None:
            done = self._rewritten[query] = query.replace("?", self.placeholder)
        return done


class SQLTxn:
    """The ``Txn`` primitives over one DB-API cursor inside an open transaction. ``write``
    says whether the transaction may write (its key reads then take the dialect's row lock)."""

    def __init__(self, cur: Any, dialect: SQLDialect, write: bool = False) -> None:
        self.cur = cur
        self.d = dialect
        self.lock = dialect.row_lock if write else ""
        # attributes fetched along with an entry, served once by ``get_attr`` (reads only:
        # a read transaction sees one snapshot, so they cannot differ from a fresh read)
        self.prefetched: dict[int, Attr] | None = (
            {} if dialect.join_entry_attr and not write else None
        )
        # chunk 0 of the inode an entry names, fetched along with it when set to a dict (a
        # ``lookup_peek``), served once by ``get_chunk``
        self.chunk0: dict[int, list[Slice]] | None = None

    def _x(self, query: str, args: tuple[Any, ...] = ()) -> Any:
        self.cur.execute(self.d.sql(query), args)
        return self.cur

    def _xmany(self, query: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.cur.executemany(self.d.sql(query), rows)

    def _one(self, query: str, args: tuple[Any, ...] = ()) -> Any:
        return self._x(query, args).fetchone()

    def _all(self, query: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return list(self._x(query, args).fetchall())

    # --- settings and counters ----------------------------------------------------------------
    def get_setting(self, name: str) -> str | None:
        row = self._one("SELECT value FROM loft_setting WHERE name = ?", (name,))
        return None if row is None else str(row[0])

    def put_setting(self, name: str, value: str) -> None:
        self._x(
            "INSERT INTO loft_setting (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def del_setting(self, name: str) -> None:
        self._x("DELETE FROM loft_setting WHERE name = ?", (name,))

    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        # substr, not LIKE or a range: no pattern characters to escape, and no dependence on
        # the database's collation (an administrative read: a scan of the table is fine)
        rows = self._all(
            "SELECT name, value FROM loft_setting WHERE substr(name, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return dict(sorted((str(n), str(v)) for n, v in rows))

    def get_counter(self, name: str) -> int:
        row = self._one("SELECT value FROM loft_counter WHERE name = ?", (name,))
        return 0 if row is None else int(row[0])

    def add_counter(self, name: str, delta: int) -> None:
        self._x(
            "INSERT INTO loft_counter (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = loft_counter.value + excluded.value",
            (name, delta),
        )

    def incr_counter(self, name: str, delta: int) -> int:
        if self.d.returning:
            rows = self._all(
                "INSERT INTO loft_counter (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = loft_counter.value + excluded.value "
                "RETURNING value",
                (name, delta),
            )
            return int(rows[0][0])
        self.add_counter(name, delta)
        return self.get_counter(name)

    # --- inodes -------------------------------------------------------------------------------
    def get_attr(self, inode: int) -> Attr | None:
        if self.prefetched:
            attr = self.prefetched.pop(inode, None)
            if attr is not None:
                return attr
        row = self._one(f"SELECT {_NODE_COLS} FROM loft_node WHERE inode = ?{self.lock}", (inode,))
        return None if row is None else _attr(row)

    def put_attr(self, attr: Attr) -> None:
        self._x(
            f"INSERT INTO loft_node ({_NODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (inode) DO UPDATE SET type = excluded.type, mode = excluded.mode, "
            "uid = excluded.uid, gid = excluded.gid, nlink = excluded.nlink, "
            "size = excluded.size, rdev = excluded.rdev, atime_ns = excluded.atime_ns, "
            "mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, "
            "parent = excluded.parent",
            (
                attr.inode,
                int(attr.type),
                attr.mode,
                attr.uid,
                attr.gid,
                attr.nlink,
                attr.size,
                attr.rdev,
                attr.atime_ns,
                attr.mtime_ns,
                attr.ctime_ns,
                attr.parent,
            ),
        )

    def del_attr(self, inode: int) -> None:
        self._x("DELETE FROM loft_node WHERE inode = ?", (inode,))

    # --- directory entries --------------------------------------------------------------------
    def prefetch(
        self,
        attrs: Sequence[int] = (),
        entries: Sequence[tuple[int, bytes]] = (),
        chunks: Sequence[tuple[int, int]] = (),
        *,
        assume: bool = False,
    ) -> None:
        return None  # each read is one statement: nothing to gain

    def get_entry(self, parent: int, name: bytes) -> tuple[int, FileType] | None:
        if self.prefetched is not None:
            chunk0 = self.chunk0
            col, join = (
                (", c.slices", " LEFT JOIN loft_chunk c ON c.inode = e.inode AND c.idx = 0")
                if chunk0 is not None
                else ("", "")
            )
            row = self._one(
                f"SELECT e.inode, e.type, {_JOINED_NODE_COLS}{col} FROM loft_edge e "
                f"LEFT JOIN loft_node n ON n.inode = e.inode{join} "
                "WHERE e.parent = ? AND e.name = ?",
                (parent, name),
            )
            if row is None:
                return None
            if row[2] is not None:
                self.prefetched[int(row[0])] = _attr(row[2 : 2 + _NODE_N])
            if chunk0 is not None:
                packed = row[2 + _NODE_N]
                chunk0[int(row[0])] = [] if packed is None else unpack_slices(packed)
            return int(row[0]), FileType(row[1])
        row = self._one(
            "SELECT inode, type FROM loft_edge WHERE parent = ? AND name = ?", (parent, name)
        )
        return None if row is None else (int(row[0]), FileType(row[1]))

    def put_entry(self, parent: int, name: bytes, inode: int, type: FileType) -> None:
        self._x(
            "INSERT INTO loft_edge (parent, name, inode, type) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (parent, name) DO UPDATE SET inode = excluded.inode, "
            "type = excluded.type",
            (parent, name, inode, int(type)),
        )

    def del_entry(self, parent: int, name: bytes) -> None:
        self._x("DELETE FROM loft_edge WHERE parent = ? AND name = ?", (parent, name))

    def has_entries(self, parent: int) -> bool:
        return self._one("SELECT 1 FROM loft_edge WHERE parent = ? LIMIT 1", (parent,)) is not None

    def count_entries(self, parent: int, upto: int) -> int:
        row = self._one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM loft_edge WHERE parent = ? LIMIT ?) t",
            (parent, upto),
        )
        return int(row[0]) if row else 0

    def list_dir(self, parent: int) -> EntryList:
        rows = self._all(
            f"SELECT e.name, {_JOINED_NODE_COLS} FROM loft_edge e "
            "JOIN loft_node n ON n.inode = e.inode WHERE e.parent = ? ORDER BY e.name",
            (parent,),
        )
        return EntryList(DirEntry(bytes(r[0]), _attr(r[1:])) for r in rows)

    # --- symlinks -----------------------------------------------------------------------------
    def get_symlink(self, inode: int) -> bytes | None:
        row = self._one("SELECT target FROM loft_symlink WHERE inode = ?", (inode,))
        return None if row is None else bytes(row[0])

    def put_symlink(self, inode: int, target: bytes) -> None:
        self._x(
            "INSERT INTO loft_symlink (inode, target) VALUES (?, ?) "
            "ON CONFLICT (inode) DO UPDATE SET target = excluded.target",
            (inode, target),
        )

    def del_symlink(self, inode: int) -> None:
        self._x("DELETE FROM loft_symlink WHERE inode = ?", (inode,))

    # --- chunks and slices --------------------------------------------------------------------
    def get_chunk(self, inode: int, index: int) -> list[Slice]:
        if index == 0 and self.chunk0:
            slices = self.chunk0.pop(inode, None)
            if slices is not None:
                return slices
        row = self._one(
            f"SELECT slices FROM loft_chunk WHERE inode = ? AND idx = ?{self.lock}", (inode, index)
        )
        return [] if row is None else unpack_slices(row[0])

    def chunk_indexes(self, inode: int) -> list[int]:
        rows = self._all("SELECT idx FROM loft_chunk WHERE inode = ? ORDER BY idx", (inode,))
        return [int(r[0]) for r in rows]

    def put_chunk(self, inode: int, index: int, slices: list[Slice]) -> None:
        if not slices:
            self._x("DELETE FROM loft_chunk WHERE inode = ? AND idx = ?", (inode, index))
            return
        self._x(
            "INSERT INTO loft_chunk (inode, idx, slices) VALUES (?, ?, ?) "
            "ON CONFLICT (inode, idx) DO UPDATE SET slices = excluded.slices",
            (inode, index, pack_slices(slices)),
        )

    def append_slices(self, inode: int, index: int, slices: list[Slice]) -> None:
        if not slices:
            return
        concat = self.d.blob_concat("loft_chunk.slices", "excluded.slices")
        self._x(
            "INSERT INTO loft_chunk (inode, idx, slices) VALUES (?, ?, ?) "
            f"ON CONFLICT (inode, idx) DO UPDATE SET slices = {concat}",
            (inode, index, pack_slices(slices)),
        )

    def del_chunks(self, inode: int) -> None:
        self._x("DELETE FROM loft_chunk WHERE inode = ?", (inode,))

    def add_slice_refs(self, deltas: Mapping[int, tuple[int, int]]) -> None:
        for sid in sorted(deltas):
            size, delta = deltas[sid]
            self._x(
                "INSERT INTO loft_slice_ref (id, size, refs) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET refs = loft_slice_ref.refs + excluded.refs",
                (sid, size, delta),
            )

    def deleted_slices(self, limit: int) -> list[tuple[int, int]]:
        rows = self._all(
            "SELECT id, size FROM loft_slice_ref WHERE refs <= 0 ORDER BY id LIMIT ?", (limit,)
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    def forget_slices(self, ids: list[int]) -> None:
        for i in range(0, len(ids), IN_BATCH):
            part = ids[i : i + IN_BATCH]
            marks = ", ".join("?" * len(part))
            self._x(f"DELETE FROM loft_slice_ref WHERE refs <= 0 AND id IN ({marks})", tuple(part))

    # --- external objects ---------------------------------------------------------------------
    def put_new_files(self, files: Sequence[NewFile]) -> None:
        """Four batched INSERTs for the whole list (one statement per table)."""
        self._xmany(
            f"INSERT INTO loft_node ({_NODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    a.inode, int(a.type), a.mode, a.uid, a.gid, a.nlink, a.size, a.rdev,
                    a.atime_ns, a.mtime_ns, a.ctime_ns, a.parent,
                )
                for a in (f.attr for f in files)
            ],
        )  # fmt: skip
        self._xmany(
            "INSERT INTO loft_edge (parent, name, inode, type) VALUES (?, ?, ?, ?)",
            [(f.parent, f.name, f.attr.inode, int(f.attr.type)) for f in files],
        )
        self._xmany(
            "INSERT INTO loft_chunk (inode, idx, slices) VALUES (?, ?, ?)",
            [(f.attr.inode, i, pack_slices([s])) for f in files for i, s, _ in f.chunks],
        )
        self._xmany(
            "INSERT INTO loft_ext (id, source, obj_key, etag, obj_offset, obj_length) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (s.id, r.source, r.key.encode("utf-8"), r.etag, r.offset, r.length)
                for f in files
                for _, s, r in f.chunks
            ],
        )

    def put_ext(self, id: int, rec: ExtObject) -> None:
        self._x(
            "INSERT INTO loft_ext (id, source, obj_key, etag, obj_offset, obj_length) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET source = excluded.source, "
            "obj_key = excluded.obj_key, etag = excluded.etag, "
            "obj_offset = excluded.obj_offset, obj_length = excluded.obj_length",
            (id, rec.source, rec.key.encode("utf-8"), rec.etag, rec.offset, rec.length),
        )

    def get_ext(self, ids: Sequence[int]) -> dict[int, ExtObject]:
        wanted = sorted(set(ids))
        out: dict[int, ExtObject] = {}
        for i in range(0, len(wanted), IN_BATCH):
            part = wanted[i : i + IN_BATCH]
            marks = ", ".join("?" * len(part))
            rows = self._all(
                "SELECT id, source, obj_key, etag, obj_offset, obj_length FROM loft_ext "
                f"WHERE id IN ({marks})",
                tuple(part),
            )
            for r in rows:
                out[int(r[0])] = ExtObject(
                    int(r[1]), bytes(r[2]).decode("utf-8"), str(r[3]), int(r[4]), int(r[5])
                )
        return out

    def del_ext(self, ids: Sequence[int]) -> None:
        wanted = sorted(set(ids))
        for i in range(0, len(wanted), IN_BATCH):
            part = wanted[i : i + IN_BATCH]
            marks = ", ".join("?" * len(part))
            self._x(f"DELETE FROM loft_ext WHERE id IN ({marks})", tuple(part))

    def count_ext(self, source: int) -> int:
        row = self._one("SELECT COUNT(*) FROM loft_ext WHERE source = ?", (source,))
        return int(row[0])

    # --- extended attributes ------------------------------------------------------------------
    def get_xattr(self, inode: int, name: bytes) -> bytes | None:
        row = self._one("SELECT value FROM loft_xattr WHERE inode = ? AND name = ?", (inode, name))
        return None if row is None else bytes(row[0])

    def put_xattr(self, inode: int, name: bytes, value: bytes) -> None:
        self._x(
            "INSERT INTO loft_xattr (inode, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
            (inode, name, value),
        )

    def del_xattr(self, inode: int, name: bytes) -> None:
        self._x("DELETE FROM loft_xattr WHERE inode = ? AND name = ?", (inode, name))

    def list_xattrs(self, inode: int) -> list[bytes]:
        rows = self._all("SELECT name FROM loft_xattr WHERE inode = ? ORDER BY name", (inode,))
        return [bytes(r[0]) for r in rows]

    def del_xattrs(self, inode: int) -> None:
        self._x("DELETE FROM loft_xattr WHERE inode = ?", (inode,))

    # --- open files ---------------------------------------------------------------------------
    def add_open(self, sid: int, inode: int) -> None:
        self._x(
            "INSERT INTO loft_open (sid, inode) VALUES (?, ?) ON CONFLICT (sid, inode) DO NOTHING",
            (sid, inode),
        )

    def del_open(self, sid: int, inode: int) -> None:
        self._x("DELETE FROM loft_open WHERE sid = ? AND inode = ?", (sid, inode))

    def open_sessions(self, inode: int) -> list[int]:
        return [int(r[0]) for r in self._all("SELECT sid FROM loft_open WHERE inode = ?", (inode,))]

    def session_opens(self, sid: int) -> list[int]:
        return [int(r[0]) for r in self._all("SELECT inode FROM loft_open WHERE sid = ?", (sid,))]

    def del_session_opens(self, sid: int) -> None:
        self._x("DELETE FROM loft_open WHERE sid = ?", (sid,))

    # --- locks --------------------------------------------------------------------------------
    def get_flocks(self, inode: int) -> list[FlockRec]:
        rows = self._all("SELECT sid, owner, ltype FROM loft_flock WHERE inode = ?", (inode,))
        return [FlockRec(int(r[0]), int(r[1]), int(r[2])) for r in rows]

    def put_flock(self, inode: int, sid: int, owner: int, ltype: int) -> None:
        self._x(
            "INSERT INTO loft_flock (inode, sid, owner, ltype) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (inode, sid, owner) DO UPDATE SET ltype = excluded.ltype",
            (inode, sid, owner, ltype),
        )

    def del_flock(self, inode: int, sid: int, owner: int) -> None:
        self._x(
            "DELETE FROM loft_flock WHERE inode = ? AND sid = ? AND owner = ?", (inode, sid, owner)
        )

    def get_plocks(self, inode: int) -> dict[tuple[int, int], list[PlockRange]]:
        rows = self._all(
            "SELECT sid, owner, ltype, start, stop, pid FROM loft_plock WHERE inode = ? "
            "ORDER BY sid, owner, start",
            (inode,),
        )
        out: dict[tuple[int, int], list[PlockRange]] = {}
        for sid, owner, ltype, start, stop, pid in rows:
            out.setdefault((int(sid), int(owner)), []).append(
                PlockRange(int(ltype), int(start), int(stop), int(pid))
            )
        return out

    def put_plocks(self, inode: int, sid: int, owner: int, ranges: list[PlockRange]) -> None:
        self._x(
            "DELETE FROM loft_plock WHERE inode = ? AND sid = ? AND owner = ?", (inode, sid, owner)
        )
        for r in ranges:
            self._x(
                "INSERT INTO loft_plock (inode, sid, owner, start, stop, ltype, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (inode, sid, owner, r.start, r.end, r.ltype, r.pid),
            )

    def del_locks(self, sid: int, inode: int | None = None) -> None:
        if inode is None:
            self._x("DELETE FROM loft_flock WHERE sid = ?", (sid,))
            self._x("DELETE FROM loft_plock WHERE sid = ?", (sid,))
        else:
            self._x("DELETE FROM loft_flock WHERE sid = ? AND inode = ?", (sid, inode))
            self._x("DELETE FROM loft_plock WHERE sid = ? AND inode = ?", (sid, inode))

    # --- sessions -----------------------------------------------------------------------------
    def put_session(self, sid: int, heartbeat_ns: int, info: str) -> None:
        self._x(
            "INSERT INTO loft_session (sid, heartbeat_ns, info) VALUES (?, ?, ?) "
            "ON CONFLICT (sid) DO UPDATE SET heartbeat_ns = excluded.heartbeat_ns, "
            "info = excluded.info",
            (sid, heartbeat_ns, info),
        )

    def touch_session(self, sid: int, heartbeat_ns: int) -> None:
        self._x("UPDATE loft_session SET heartbeat_ns = ? WHERE sid = ?", (heartbeat_ns, sid))

    def get_session(self, sid: int) -> SessionRec | None:
        row = self._one(
            f"SELECT sid, heartbeat_ns, info FROM loft_session WHERE sid = ?{self.lock}", (sid,)
        )
        return None if row is None else SessionRec(int(row[0]), int(row[1]), str(row[2]))

    def del_session(self, sid: int) -> None:
        self._x("DELETE FROM loft_session WHERE sid = ?", (sid,))

    def list_sessions(self) -> list[SessionRec]:
        rows = self._all("SELECT sid, heartbeat_ns, info FROM loft_session ORDER BY heartbeat_ns")
        return [SessionRec(int(r[0]), int(r[1]), str(r[2])) for r in rows]

    # --- trash --------------------------------------------------------------------------------
    def put_trash(self, inode: int, deleted_ns: int) -> None:
        self._x(
            "INSERT INTO loft_trash (inode, deleted_ns) VALUES (?, ?) "
            "ON CONFLICT (inode) DO UPDATE SET deleted_ns = excluded.deleted_ns",
            (inode, deleted_ns),
        )

    def del_trash(self, inode: int) -> None:
        self._x("DELETE FROM loft_trash WHERE inode = ?", (inode,))

    def expired_trash(self, before_ns: int, limit: int) -> list[int]:
        rows = self._all(
            "SELECT inode FROM loft_trash WHERE deleted_ns < ? ORDER BY deleted_ns LIMIT ?",
            (before_ns, limit),
        )
        return [int(r[0]) for r in rows]

    def trash_count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM loft_trash")
        return int(row[0])


class SQLMeta(BaseMeta):
    """A ``BaseMeta`` over a SQL database; dialect modules add connections and error rules."""

    dialect: SQLDialect
    #: give up on a busy/conflicting database after this long (MetaUnavailable)
    RETRY_DEADLINE_S = 60.0
    #: ``_add_later_tables`` ran (it is tried once per engine object)
    _later_added = False

    def _with_chunk0(self, tx: Txn) -> None:
        """A ``lookup_peek``: the entry's query reads chunk 0 too (no query of its own)."""
        if isinstance(tx, SQLTxn):
            tx.chunk0 = {}

    # --- dialect hooks ------------------------------------------------------------------------
    # ``_conn`` and ``_begin`` serve the default runner below; an engine that replaces ``_run``
    # (PostgreSQL: pooled connections, pipelining) need not provide them.

    def _conn(self) -> Any:
        """A DB-API connection for the calling thread, in autocommit mode."""
        raise NotImplementedError

    def _begin(self, cur: Any, write: bool) -> None:
        """Open a transaction: writers must hold the write lock (or a serializable snapshot)."""
        raise NotImplementedError

    @abstractmethod
    def _is_conflict(self, exc: BaseException) -> bool:
        """A transient error (busy, lock conflict, serialization failure): retry."""

    @abstractmethod
    def _is_missing_schema(self, exc: BaseException) -> bool:
        """The tables do not exist: the volume was never formatted (or was destroyed)."""

    @abstractmethod
    def _is_db_error(self, exc: BaseException) -> bool:
        """An error of the database driver (mapped to ``MetaUnavailable``)."""

    # --- runner -------------------------------------------------------------------------------

    def _transaction(self, fn: Callable[[Txn], T], write: bool) -> T:
        dialect = self.dialect
        return self._run(lambda cur: fn(SQLTxn(cur, dialect, write)), write)

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        """Run ``fn(cursor)`` in one transaction, retrying conflicts (see ``_transaction``)."""
        deadline = time.monotonic() + self.RETRY_DEADLINE_S
        delay = 0.001
        while True:
            conn = self._conn()
            cur = conn.cursor()
            try:
                self._begin(cur, write)
                result = fn(cur)
                cur.execute("COMMIT")
                return result
            except BaseException as e:
                self._rollback(cur)
                if self._is_conflict(e):
                    if time.monotonic() < deadline:
                        time.sleep(delay * (1 + random.random()))
                        delay = min(delay * 2, 0.05)
                        continue
                    raise MetaUnavailable(f"metadata database stays busy: {e}") from e
                if self._is_missing_schema(e):
                    if self._later_table_missing(e):
                        self._add_later_tables()
                        continue
                    raise NotFormatted(_NOT_FORMATTED) from e
                if self._is_db_error(e):
                    raise MetaUnavailable(f"metadata database error: {e}") from e
                raise
            finally:
                cur.close()

    @staticmethod
    def _rollback(cur: Any) -> None:
        try:
            cur.execute("ROLLBACK")
        except Exception:
            pass

    # --- schema -------------------------------------------------------------------------------

    def _engine_create(self) -> None:
        statements = self.dialect.schema()

        def fn(cur: Any) -> None:
            for stmt in statements:
                cur.execute(stmt)

        self._run(fn, True)

    def _later_table_missing(self, exc: BaseException) -> bool:
        """Whether ``exc`` says that a table of ``LATER_TABLES`` is missing, and this engine
        object has not tried to add it yet. Both dialects name the table in the message."""
        if self._later_added or not self._is_missing_schema(exc):
            return False
        text = str(exc)
        return any(re.search(rf"\b{name}\b", text) for name in LATER_TABLES)

    def _add_later_tables(self) -> None:
        """Create the tables of ``LATER_TABLES`` (and their indexes) in a volume formatted
        before they existed, then let the caller retry its transaction. Every statement is
        ``IF NOT EXISTS``, so clients upgrading one volume at once all succeed (PostgreSQL
        reports such a race as a unique violation, retried as a conflict). Raises
        ``NotFormatted`` and creates nothing when there is no volume at all."""
        self._later_added = True
        later = [
            stmt
            for stmt in self.dialect.schema()
            if any(re.search(rf"\b{name}\b", stmt) for name in LATER_TABLES)
        ]
        probe = self.dialect.sql("SELECT 1 FROM loft_setting WHERE name = ?")

        def fn(cur: Any) -> None:
            cur.execute(probe, (SETTING_VOLUME,))
            if cur.fetchone() is None:
                raise NotFormatted(_NOT_FORMATTED)
            for stmt in later:
                cur.execute(stmt)

        self._run(fn, True)
        log.info("added the tables %s to the volume at %s", ", ".join(LATER_TABLES), self.url)

    def _engine_destroy(self) -> None:
        def fn(cur: Any) -> None:
            for table in TABLES:
                cur.execute(f"DROP TABLE IF EXISTS {table}")

        self._run(fn, True)
