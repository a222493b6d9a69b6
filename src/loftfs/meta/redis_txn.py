"""The key layout of the Redis engine and its ``Txn`` primitives.

Every key of a volume starts with ``<prefix>:`` (the URL's ``?prefix=``, ``loft`` when none is
given), so several volumes can share one database and ``destroy`` removes exactly one volume's
keys with ``SCAN MATCH <prefix>:*``. Below, ``P`` is that prefix, ``N`` an inode, ``S`` a
session id, ``I`` a chunk index:

==================  =======  =============================================================
key                 type     content
==================  =======  =============================================================
``P:setting``       hash     volume settings: name -> value (``volume``: the JSON settings)
``P:n:<name>``      string   a counter (``INCRBY``): next inode/slice/session, usage
``P:iN``            string   inode attributes, 64 bytes (``ATTR_RECORD``)
``P:dN``            hash     directory entries: name -> ``<type digit><inode decimal>``
``P:lN``            string   symlink target
``P:cN_I``          string   a chunk's slice list: 25-byte records (``SLICE_RECORD``), oldest
                             first, ``APPEND`` adds to it
``P:ckN``           set      indexes of the chunks of N that hold a slice list
``P:refs``          hash     slice id -> reference count (``HINCRBY``)
``P:dead``          zset     slices whose count is <= 0: member ``<id>:<size>``, score id
``P:ext``           hash     external objects: slice id -> ``EXT_RECORD`` (source, offset,
                             length, key length), then the key and the ETag (UTF-8)
``P:xN``            hash     extended attributes: name -> value
``P:ofN``           set      sessions that hold N open
``P:osS``           set      inodes that session S holds open
``P:flN``           hash     BSD flocks: ``<sid>:<owner>`` -> lock type
``P:plN``           hash     POSIX locks: ``<sid>:<owner>`` -> 21-byte ranges
                             (``PLOCK_RECORD``: type, start, end, pid), sorted by start
``P:lsS``           set      inodes where session S holds (or held) a lock
``P:sessions``      zset     session id, score heartbeat (ns, as a double: 256 ns steps)
``P:sessinfo``      hash     session id -> JSON info
``P:trash``         zset     inode, score time of deletion (ns, as a double)
``P:trashtime``     hash     inode -> exact time of deletion (ns)
``P:cm:<token>``    string   commit marker of one connection (see ``loftfs.meta.redis``)
==================  =======  =============================================================

Reads go to the server as the shared layer asks for them. In a write transaction each read is
sent in one round trip with the ``WATCH`` of the keys it reads, and writes are queued until
``commit`` sends them as one ``MULTI``/``EXEC`` (the shared layer never reads back what it wrote
within a transaction, see ``loftfs.meta.txn``). Writes whose effect depends on what the server
holds at commit time (reference counts, deleting everything a set indexes) are small Lua
scripts queued inside the same ``MULTI``, so they stay atomic with the rest. A read-only
transaction does not watch: each read sees the latest committed value of its keys.
"""

from __future__ import annotations

import operator
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, cast, overload

from redis.exceptions import ResponseError

from loftfs.errors import MetaUnavailable, NotFormatted
from loftfs.meta.redis_assume import SLICE_REFS_FN, Assumed, Known
from loftfs.meta.txn import SETTING_VOLUME, FlockRec, NewFile, PlockRange, SessionRec
from loftfs.meta.types import (
    CHUNK_SIZE,
    ROOT_INODE,
    Attr,
    AttrRow,
    DirEntry,
    EntryList,
    ExtObject,
    FileType,
    Listing,
    Slice,
)

# version, type, mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, parent
ATTR_RECORD = struct.Struct(">BBHIIIQQqqqQ")
ATTR_VERSION = 1
# pos, id, size, off, len, kind (the SQL engine's record, see loftfs.meta.sql)
SLICE_RECORD = struct.Struct(">IQIIIB")
# type, start, end (inclusive), pid
PLOCK_RECORD = struct.Struct(">BQQI")
# version, source, offset, length, key length (bytes); the key and the ETag follow
EXT_RECORD = struct.Struct(">BIQQH")
EXT_VERSION = 1

MGET_BATCH = 1000  # keys per MGET when listing a directory
# reads the attribute records of these keys (MGET) in a read of its own: see RedisTxn.list_dir
ReadRecords = Callable[[list[bytes]], list[bytes | None]]
# runs a ReadRecords call on another thread (Executor.submit): a listing's next batch of
# records is read while the current one is paged out
Submit = Callable[[ReadRecords, list[bytes]], "Future[list[bytes | None]]"]
CHUNK_BATCH = 256  # chunks read in one round trip
EXT_BATCH = 1000  # external object records per HMGET/HDEL/HSCAN step

Command = tuple[Any, ...]


# --- Lua scripts queued inside MULTI (sent with EVAL: a script missing from the server's cache
# --- would otherwise fail inside EXEC while the other commands apply) -------------------------

# KEYS: refs, dead. ARGV: id, size, delta, id, size, delta, ...
LUA_SLICE_REFS = (
    f"local slice_refs = {SLICE_REFS_FN}\nslice_refs(KEYS[1], KEYS[2], ARGV, 1)\nreturn 0\n"
)

# KEYS: refs, dead. ARGV: ids
LUA_FORGET_SLICES = """
for _, id in ipairs(ARGV) do
  local n = redis.call('HGET', KEYS[1], id)
  if (not n) or tonumber(n) <= 0 then
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], id, id)
  end
end
return 0
"""

# KEYS: an index set. ARGV: key head. Deletes head..member for every member, then the set.
LUA_DEL_INDEXED = """
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('DEL', ARGV[1] .. m)
end
redis.call('DEL', KEYS[1])
return 0
"""

# KEYS: P:osS. ARGV: head of the per-inode open sets (P:of), sid.
LUA_DEL_SESSION_OPENS = """
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('SREM', ARGV[1] .. m, ARGV[2])
end
redis.call('DEL', KEYS[1])
return 0
"""

# KEYS: P:lsS. ARGV: prefix P:, sid, inode ('' = every inode of the session).
LUA_DEL_LOCKS = """
local inodes
if ARGV[3] ~= '' then
  if redis.call('SISMEMBER', KEYS[1], ARGV[3]) == 0 then return 0 end
  inodes = {ARGV[3]}
else
  inodes = redis.call('SMEMBERS', KEYS[1])
end
local head = ARGV[2] .. ':'
for _, n in ipairs(inodes) do
  for _, kind in ipairs({'fl', 'pl'}) do
    local key = ARGV[1] .. kind .. n
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if string.sub(f, 1, #head) == head then redis.call('HDEL', key, f) end
    end
  end
  redis.call('SREM', KEYS[1], n)
end
return 0
"""

# Read-only speculation (not inside MULTI): an entry and the attributes of its inode in one
# round trip. KEYS: P:dN. ARGV: name, head of attribute keys (P:i).
LUA_ENTRY_ATTR = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
return {v, redis.call('GET', ARGV[2] .. string.sub(v, 2))}
"""


# A lookup in one round trip: the parent's attributes, the entry and the child's attributes.
# KEYS: P:i<parent>, P:d<parent>. ARGV: name, head of attribute keys (P:i), and optionally the
# head of chunk keys (P:c): then a regular file's chunk 0 comes fourth ('' when it has none).
# Returns {} when the parent is missing, {parent} when the name is.
LUA_LOOKUP = """
local p = redis.call('GET', KEYS[1])
if not p then return {} end
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return {p} end
local a = redis.call('GET', ARGV[2] .. string.sub(v, 2))
if not a then return {p, v} end
if ARGV[3] and string.sub(v, 1, 1) == '1' then
  return {p, v, a, redis.call('GET', ARGV[3] .. string.sub(v, 2) .. '_0') or ''}
end
return {p, v, a}
"""


class Keys:
    """Key names of one volume (see the module docstring)."""

    __slots__ = (
        "dead",
        "ext",
        "head",
        "refs",
        "sessinfo",
        "sessions",
        "setting",
        "trash",
        "trash_time",
    )

    def __init__(self, prefix: str) -> None:
        self.head = prefix + ":"
        h = self.head
        self.setting = h + "setting"
        self.refs = h + "refs"
        self.dead = h + "dead"
        self.ext = h + "ext"
        self.sessions = h + "sessions"
        self.sessinfo = h + "sessinfo"
        self.trash = h + "trash"
        self.trash_time = h + "trashtime"

    @property
    def pattern(self) -> str:
        """``SCAN MATCH`` pattern of every key of the volume (prefixes hold no glob syntax)."""
        return self.head + "*"

    def counter(self, name: str) -> str:
        return f"{self.head}n:{name}"

    def attr(self, inode: int) -> str:
        return f"{self.head}i{inode}"

    def dir(self, inode: int) -> str:
        return f"{self.head}d{inode}"

    def symlink(self, inode: int) -> str:
        return f"{self.head}l{inode}"

    def chunk(self, inode: int, index: int) -> str:
        return f"{self.head}c{inode}_{index}"

    def chunk_set(self, inode: int) -> str:
        return f"{self.head}ck{inode}"

    def xattr(self, inode: int) -> str:
        return f"{self.head}x{inode}"

    def open_by(self, inode: int) -> str:
        return f"{self.head}of{inode}"

    def opens_of(self, sid: int) -> str:
        return f"{self.head}os{sid}"

    def flocks(self, inode: int) -> str:
        return f"{self.head}fl{inode}"

    def plocks(self, inode: int) -> str:
        return f"{self.head}pl{inode}"

    def locks_of(self, sid: int) -> str:
        return f"{self.head}ls{sid}"

    def marker(self, token: str) -> str:
        return f"{self.head}cm:{token}"


# --- value encodings ----------------------------------------------------------------------------


_TYPES = {t.value: t for t in FileType}
_unpack_attr = ATTR_RECORD.unpack


def pack_attr(a: Attr) -> bytes:
    return ATTR_RECORD.pack(
        ATTR_VERSION,
        int(a.type),
        a.mode,
        a.uid,
        a.gid,
        a.nlink,
        a.size,
        a.rdev,
        a.atime_ns,
        a.mtime_ns,
        a.ctime_ns,
        a.parent,
    )


def unpack_attr(inode: int, data: bytes) -> Attr:
    if len(data) != ATTR_RECORD.size or data[0] != ATTR_VERSION:
        raise MetaUnavailable(f"inode {inode}: attribute record of an unknown format")
    _, t, *rest = ATTR_RECORD.unpack(data)
    try:
        return Attr(inode, _TYPES[t], *rest)
    except KeyError:
        raise MetaUnavailable(f"inode {inode}: attribute record of an unknown type {t}") from None


def pack_entry(inode: int, type: FileType) -> bytes:
    return b"%d%d" % (int(type), inode)


def unpack_entry(data: bytes) -> tuple[int, FileType]:
    return int(data[1:]), _TYPES[data[0] - 48]


def pack_slices(slices: Iterable[Slice]) -> bytes:
    return b"".join(SLICE_RECORD.pack(s.pos, s.id, s.size, s.off, s.len, s.kind) for s in slices)


def unpack_slices(data: bytes | None) -> list[Slice]:
    if not data:
        return []
    return [Slice(*rec) for rec in SLICE_RECORD.iter_unpack(data)]


def pack_plocks(ranges: Iterable[PlockRange]) -> bytes:
    return b"".join(PLOCK_RECORD.pack(r.ltype, r.start, r.end, r.pid) for r in ranges)


def unpack_plocks(data: bytes) -> list[PlockRange]:
    return [PlockRange(*rec) for rec in PLOCK_RECORD.iter_unpack(data)]


def pack_ext(rec: ExtObject) -> bytes:
    key = rec.key.encode("utf-8")
    head = EXT_RECORD.pack(EXT_VERSION, rec.source, rec.offset, rec.length, len(key))
    return head + key + rec.etag.encode("utf-8")


def unpack_ext(id: int, data: bytes) -> ExtObject:
    if len(data) < EXT_RECORD.size or data[0] != EXT_VERSION:
        raise MetaUnavailable(f"external object {id}: record of an unknown format")
    _, source, offset, length, key_len = EXT_RECORD.unpack_from(data)
    end = EXT_RECORD.size + key_len
    if len(data) < end:
        raise MetaUnavailable(f"external object {id}: record cut short")
    key = bytes(data[EXT_RECORD.size : end]).decode("utf-8")
    return ExtObject(source, key, bytes(data[end:]).decode("utf-8"), offset, length)


def _owner_field(sid: int, owner: int) -> bytes:
    return b"%d:%d" % (sid, owner)


def _split_owner(field: bytes) -> tuple[int, int]:
    sid, owner = field.split(b":", 1)
    return int(sid), int(owner)


# --- the transaction ----------------------------------------------------------------------------


class Conn(Protocol):
    """What a transaction needs of its connection (``loftfs.meta.redis.Link``)."""

    def call(self, cmds: Sequence[Command]) -> list[Any]:
        """Send ``cmds`` in one round trip; their replies, error replies as exceptions."""
        ...

    def eval_ro(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a read-only Lua script (cached on the server by its digest)."""
        ...


class RedisTxn:
    """One attempt of a transaction on one connection (``link``, see ``loftfs.meta.redis``).

    ``write``: reads watch their keys and writes are queued for ``commit``; otherwise reads
    are plain and a write is a programming error.
    """

    __slots__ = (
        "_cache",
        "_chunks",
        "_entries",
        "_known",
        "_link",
        "_queued",
        "_watched",
        "assumed",
        "k",
        "reads",
        "seen",
        "write",
    )

    def __init__(self, link: Conn, keys: Keys, write: bool, known: Known | None = None) -> None:
        self._link = link
        self.k = keys
        self.write = write
        self._known = known if write else None  # values a prefetch may assume
        self._watched: set[str] = set()
        self._queued: list[Command] = []
        self._cache: dict[str, Any] = {}  # key -> value read (None: missing)
        self._chunks: dict[int, list[int]] = {}  # inode -> what chunk_indexes() returned
        self._entries: dict[tuple[int, bytes], Any] = {}  # (parent, name) -> entry read ahead
        self.reads = 0  # round trips of watched reads
        self.assumed: Assumed = {}  # taken from ``known`` instead of read: checked at commit
        self.seen: dict[str, Any] = {}  # values of attribute and chunk keys read or assumed

    @property
    def watched(self) -> bool:
        """Whether a read of this transaction sent a ``WATCH``."""
        return bool(self._watched)

    # --- plumbing -----------------------------------------------------------------------------

    @property
    def link(self) -> Conn:
        """The connection, for engine fast paths that send their own round trip."""
        return self._link

    def _read(self, keys: Sequence[str], cmds: Sequence[Command]) -> list[Any]:
        """Send ``cmds`` (in a write transaction after a WATCH of ``keys``) in one round trip
        and return their replies."""
        if self.write:
            self.reads += 1
            new = [k for k in keys if k not in self._watched]
            if new:
                self._watched.update(new)
                replies = self._link.call([("WATCH", *new), *cmds])
                return _checked(replies[1:])
        return _checked(self._link.call(list(cmds)))

    def _read1(self, keys: Sequence[str], cmd: Command) -> Any:
        return self._read(keys, (cmd,))[0]

    def _forget(self, *keys: str) -> None:
        """Drop cached reads of keys this transaction writes (reads return stored values)."""
        for key in keys:
            self._cache.pop(key, None)
            if key.startswith(self.k.head + "ck"):
                self._chunks.pop(int(key[len(self.k.head) + 2 :]), None)

    def _queue(self, *cmds: Command) -> None:
        if not self.write:
            raise RuntimeError("a write primitive was called in a read-only metadata transaction")
        self._queued.extend(cmds)

    def server_call(self, cmds: Sequence[Command]) -> list[Any]:
        """Engine plumbing: send ``cmds`` as they are (no WATCH, nothing queued) and return
        the replies, error replies as exception objects."""
        return self._link.call(list(cmds))

    @property
    def queued(self) -> list[Command]:
        return self._queued

    # --- settings and counters ----------------------------------------------------------------

    def get_setting(self, name: str) -> str | None:
        v = self._read1([self.k.setting], ("HGET", self.k.setting, name))
        return None if v is None else bytes(v).decode()

    def put_new_files(self, files: Sequence[NewFile]) -> None:
        for f in files:
            self.put_attr(f.attr)
            self.put_entry(f.parent, f.name, f.attr.inode, f.attr.type)
            for index, s, rec in f.chunks:
                self.put_chunk(f.attr.inode, index, [s])
                self.put_ext(s.id, rec)

    def put_setting(self, name: str, value: str) -> None:
        self._queue(("HSET", self.k.setting, name, value))

    def del_setting(self, name: str) -> None:
        self._queue(("HDEL", self.k.setting, name))

    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        key = self.k.setting
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        out: dict[str, str] = {}
        cursor: Any = 0
        while True:
            cursor, flat = self._read1(
                [key], ("HSCAN", key, cursor, "MATCH", pattern, "COUNT", EXT_BATCH)
            )
            for name, value in _pairs(flat):
                out[bytes(name).decode()] = bytes(value).decode()
            if int(cursor) == 0:
                return dict(sorted(out.items()))

    def has_volume(self) -> bool:
        """Whether the volume is formatted (its settings exist)."""
        return bool(self._read1([self.k.setting], ("HEXISTS", self.k.setting, SETTING_VOLUME)))

    def get_counter(self, name: str) -> int:
        key = self.k.counter(name)
        v = self._read1([key], ("GET", key))
        return 0 if v is None else int(v)

    def add_counter(self, name: str, delta: int) -> None:
        self._queue(("INCRBY", self.k.counter(name), delta))

    def incr_counter(self, name: str, delta: int) -> int:
        # called alone in its transaction (see loftfs.meta.txn): applied at once, no WATCH
        return int(_checked(self._link.call([("INCRBY", self.k.counter(name), delta)]))[0])

    # --- inodes -------------------------------------------------------------------------------

    def get_attr(self, inode: int) -> Attr | None:
        key = self.k.attr(inode)
        if key in self._cache:
            data = self._cache[key]
        else:
            data = self._read1([key], ("GET", key))
            self._cache[key] = self.seen[key] = data
        if data is None:
            if inode == ROOT_INODE and not self.has_volume():
                raise NotFormatted(
                    "no volume is formatted at this metadata URL (run `loft format`)"
                )
            return None
        return unpack_attr(inode, data)

    def put_attr(self, attr: Attr) -> None:
        key = self.k.attr(attr.inode)
        self._forget(key)
        self._queue(("SET", key, pack_attr(attr)))

    def del_attr(self, inode: int) -> None:
        key = self.k.attr(inode)
        self._forget(key)
        self._queue(("DEL", key))

    # --- directory entries --------------------------------------------------------------------

    def prefetch(
        self,
        attrs: Sequence[int] = (),
        entries: Sequence[tuple[int, bytes]] = (),
        chunks: Sequence[tuple[int, int]] = (),
        *,
        assume: bool = False,
    ) -> None:
        """Read these in one round trip (watched in a write transaction): the reads that
        follow find them here. With ``assume`` (a write transaction of a process that keeps
        ``Known`` values), values known here are taken as they are and checked at commit
        (``loftfs.meta.redis_assume``); so are a chunk past the end of a file whose
        attributes are known (assumed absent) and the entries asked for in a directory whose
        attributes are known (assumed absent: a name is created right after the kernel looked
        it up). What is left is read."""
        known = self._known if assume else None
        cmds: list[Command] = []
        keys: list[str] = []
        cached: list[str | tuple[int, bytes]] = []
        sizes: dict[int, int] = {}
        for inode in attrs:
            key = self.k.attr(inode)
            if key in self._cache:
                continue
            if known is not None:
                hit, value = known.get(key)
                if hit:
                    self._assume(key, value)
                    if value is not None:
                        sizes[inode] = unpack_attr(inode, value).size
                    continue
            keys.append(key)
            cmds.append(("GET", key))
            cached.append(key)
        for inode, index in chunks:
            key = self.k.chunk(inode, index)
            if key in self._cache:
                continue
            if known is not None:
                hit, value = known.get(key)
                size = sizes.get(inode)
                if hit or (size is not None and size <= index * CHUNK_SIZE):
                    self._assume(key, value)
                    continue
            keys.append(key)
            cmds.append(("GET", key))
            cached.append(key)
        for parent, name in entries:
            if (parent, name) in self._entries:
                continue
            dkey = self.k.dir(parent)
            if known is not None and parent in sizes:
                value = known.get((dkey, name))[1]
                self.assumed[(dkey, name)] = value
                self._entries[(parent, name)] = value
                continue
            keys.append(dkey)
            cmds.append(("HGET", dkey, name))
            cached.append((parent, name))
        if not cmds:
            return
        if self.write:  # several keys read: an error drawn from them is checked (see reads)
            self.reads += len(cmds) - 1
        for where, value in zip(cached, self._read(keys, cmds), strict=True):
            if isinstance(where, str):
                self._cache[where] = self.seen[where] = value
            else:
                self._entries[where] = value

    def _assume(self, key: str, value: bytes | None) -> None:
        self._cache[key] = self.seen[key] = self.assumed[key] = value

    def get_entry(self, parent: int, name: bytes) -> tuple[int, FileType] | None:
        dkey = self.k.dir(parent)
        if (parent, name) in self._entries:
            v = self._entries[(parent, name)]
            return None if v is None else unpack_entry(v)
        if self.write:
            v = self._read1([dkey], ("HGET", dkey, name))
            return None if v is None else unpack_entry(v)
        # read-only: fetch the entry's attributes with it (the caller reads them next)
        reply = self._link.eval_ro(LUA_ENTRY_ATTR, [dkey], [name, self.k.head + "i"])
        if not reply:
            return None
        inode, type = unpack_entry(reply[0])
        self._cache[self.k.attr(inode)] = reply[1]
        return inode, type

    def put_entry(self, parent: int, name: bytes, inode: int, type: FileType) -> None:
        self._entries.pop((parent, name), None)
        self._queue(("HSET", self.k.dir(parent), name, pack_entry(inode, type)))

    def del_entry(self, parent: int, name: bytes) -> None:
        self._entries.pop((parent, name), None)
        self._queue(("HDEL", self.k.dir(parent), name))

    def has_entries(self, parent: int) -> bool:
        key = self.k.dir(parent)
        return bool(self._read1([key], ("EXISTS", key)))

    def count_entries(self, parent: int, upto: int) -> int:
        key = self.k.dir(parent)
        return min(upto, int(self._read1([key], ("HLEN", key))))

    def list_dir(
        self, parent: int, later: ReadRecords | None = None, submit: Submit | None = None
    ) -> Listing:
        """HGETALL, then the attribute records by MGET, a batch per command, in one round
        trip; the directory's own record comes with them. Native commands: a Lua script that
        joined the records on the server cost the server 4x the time.

        With ``later`` (a function that reads records in a read of its own) only the first
        batch is read here and the rest as the listing is read: a large listing starts paging
        out after two round trips. With ``submit`` too, each batch is read on another thread
        while the one before is paged out (one batch ahead, so memory follows what is read).
        An entry whose inode is gone by its MGET (a concurrent unlink) is left out without
        ``later``; with it, it stays (the indexes of a listing are fixed from the first page
        on) as an entry without attributes (see ``_Listing``)."""
        dkey = self.k.dir(parent)
        raw = self._read1([dkey], ("HGETALL", dkey))
        if not raw:
            return EntryList()
        # (name, "<type digit><inode decimal>"); names are unique: sorted by name alone
        rows = sorted(zip(raw[0::2], raw[1::2], strict=True), key=_first)
        head = (self.k.head + "i").encode()
        keys = [head + v[1:] for _, v in rows]  # attribute keys: "P:i<inode decimal>"
        own = self.k.attr(parent)
        now = [*keys[: MGET_BATCH if later else len(keys)], own.encode()]
        cmds = [("MGET", *now[i : i + MGET_BATCH]) for i in range(0, len(now), MGET_BATCH)]
        records: list[bytes | None] = []
        for part in self._read(now, cmds):
            records.extend(part)
        self._cache[own] = records.pop()
        if later is None and None in records:
            kept = [i for i, r in enumerate(records) if r is not None]
            rows, records = [rows[i] for i in kept], [records[i] for i in kept]
        return _Listing(rows, records, keys, later, submit)

    # --- symlinks -----------------------------------------------------------------------------

    def get_symlink(self, inode: int) -> bytes | None:
        key = self.k.symlink(inode)
        v = self._read1([key], ("GET", key))
        return None if v is None else bytes(v)

    def put_symlink(self, inode: int, target: bytes) -> None:
        self._queue(("SET", self.k.symlink(inode), target))

    def del_symlink(self, inode: int) -> None:
        self._queue(("DEL", self.k.symlink(inode)))

    # --- chunks and slices --------------------------------------------------------------------

    def get_chunk(self, inode: int, index: int) -> list[Slice]:
        key = self.k.chunk(inode, index)
        if key not in self._cache:
            # the chunks a chunk_indexes() call listed are read together: callers walk them
            known = self._chunks.get(inode, ())
            keys = [key]
            if index in known:
                pos = known.index(index)
                keys += [self.k.chunk(inode, i) for i in known[pos + 1 : pos + CHUNK_BATCH]]
                keys = [k for k in keys if k not in self._cache]
            values = dict(zip(keys, self._read1(keys, ("MGET", *keys)), strict=True))
            self._cache.update(values)
            self.seen.update(values)
        return unpack_slices(self._cache[key])

    def chunk_indexes(self, inode: int) -> list[int]:
        key = self.k.chunk_set(inode)
        indexes = sorted(int(i) for i in self._read1([key], ("SMEMBERS", key)))
        self._chunks[inode] = indexes
        return indexes

    def put_chunk(self, inode: int, index: int, slices: list[Slice]) -> None:
        key, index_set = self.k.chunk(inode, index), self.k.chunk_set(inode)
        self._forget(key, index_set)
        if slices:
            self._queue(("SET", key, pack_slices(slices)), ("SADD", index_set, index))
        else:
            self._queue(("DEL", key), ("SREM", index_set, index))

    def append_slices(self, inode: int, index: int, slices: list[Slice]) -> None:
        if slices:
            self._forget(self.k.chunk(inode, index), self.k.chunk_set(inode))
            self._queue(
                ("APPEND", self.k.chunk(inode, index), pack_slices(slices)),
                ("SADD", self.k.chunk_set(inode), index),
            )

    def del_chunks(self, inode: int) -> None:
        head = self.k.chunk(inode, 0)[:-1]  # P:cN_
        self._forget(self.k.chunk_set(inode), *[k for k in self._cache if k.startswith(head)])
        self._queue(("EVAL", LUA_DEL_INDEXED, 1, self.k.chunk_set(inode), head))

    def add_slice_refs(self, deltas: Mapping[int, tuple[int, int]]) -> None:
        if not deltas:
            return
        args: list[int] = []
        for sid in sorted(deltas):
            size, delta = deltas[sid]
            args += (sid, size, delta)
        self._queue(("EVAL", LUA_SLICE_REFS, 2, self.k.refs, self.k.dead, *args))

    def deleted_slices(self, limit: int) -> list[tuple[int, int]]:
        if limit <= 0:
            return []
        members = self._read1([self.k.dead], ("ZRANGE", self.k.dead, 0, limit - 1))
        out = []
        for m in members:
            sid, size = bytes(m).split(b":", 1)
            out.append((int(sid), int(size)))
        return out

    def forget_slices(self, ids: list[int]) -> None:
        for i in range(0, len(ids), 1000):
            part = ids[i : i + 1000]
            self._queue(("EVAL", LUA_FORGET_SLICES, 2, self.k.refs, self.k.dead, *part))

    # --- external objects ---------------------------------------------------------------------

    def put_ext(self, id: int, rec: ExtObject) -> None:
        self._queue(("HSET", self.k.ext, id, pack_ext(rec)))

    def get_ext(self, ids: Sequence[int]) -> dict[int, ExtObject]:
        """Not watched, even in a write transaction: the hash is one key for the whole volume,
        so a watch would fail on every record any client adds or removes (every import batch,
        every gc pass). It need not hold: records never change, and one is removed only once
        no chunk names its slice, so the chunk read (watched) that led to an id already fails
        the transaction if the slice loses its last reference meanwhile."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        key = self.k.ext
        cmds = [
            ("HMGET", key, *wanted[i : i + EXT_BATCH]) for i in range(0, len(wanted), EXT_BATCH)
        ]
        values: list[Any] = []
        for part in _checked(self._link.call(cmds)):
            values.extend(part)
        return {
            id: unpack_ext(id, data)
            for id, data in zip(wanted, values, strict=True)
            if data is not None
        }

    def del_ext(self, ids: Sequence[int]) -> None:
        wanted = sorted(set(ids))
        for i in range(0, len(wanted), EXT_BATCH):
            self._queue(("HDEL", self.k.ext, *wanted[i : i + EXT_BATCH]))

    def count_ext(self, source: int) -> int:
        """A walk of the whole hash (``HSCAN``, a step per round trip): an administrative
        question, answered in time proportional to the volume's external objects. A hash that
        Redis resizes during the walk may show a record twice (``SCAN``'s guarantee is "at
        least once"), which can only raise the count: zero is exact."""
        key = self.k.ext
        count = 0
        cursor: Any = 0
        while True:
            cursor, flat = self._read1([key], ("HSCAN", key, cursor, "COUNT", EXT_BATCH))
            for id, data in _pairs(flat):
                if unpack_ext(int(id), data).source == source:
                    count += 1
            if int(cursor) == 0:
                return count

    # --- extended attributes ------------------------------------------------------------------

    def get_xattr(self, inode: int, name: bytes) -> bytes | None:
        key = self.k.xattr(inode)
        v = self._read1([key], ("HGET", key, name))
        return None if v is None else bytes(v)

    def put_xattr(self, inode: int, name: bytes, value: bytes) -> None:
        self._queue(("HSET", self.k.xattr(inode), name, value))

    def del_xattr(self, inode: int, name: bytes) -> None:
        self._queue(("HDEL", self.k.xattr(inode), name))

    def list_xattrs(self, inode: int) -> list[bytes]:
        key = self.k.xattr(inode)
        return sorted(bytes(n) for n in self._read1([key], ("HKEYS", key)))

    def del_xattrs(self, inode: int) -> None:
        self._queue(("DEL", self.k.xattr(inode)))

    # --- open files ---------------------------------------------------------------------------

    def add_open(self, sid: int, inode: int) -> None:
        self._queue(("SADD", self.k.open_by(inode), sid), ("SADD", self.k.opens_of(sid), inode))

    def del_open(self, sid: int, inode: int) -> None:
        self._queue(("SREM", self.k.open_by(inode), sid), ("SREM", self.k.opens_of(sid), inode))

    def open_sessions(self, inode: int) -> list[int]:
        key = self.k.open_by(inode)
        return sorted(int(s) for s in self._read1([key], ("SMEMBERS", key)))

    def session_opens(self, sid: int) -> list[int]:
        key = self.k.opens_of(sid)
        return sorted(int(i) for i in self._read1([key], ("SMEMBERS", key)))

    def del_session_opens(self, sid: int) -> None:
        head = self.k.open_by(0)[:-1]  # P:of
        self._queue(("EVAL", LUA_DEL_SESSION_OPENS, 1, self.k.opens_of(sid), head, sid))

    # --- locks --------------------------------------------------------------------------------

    def get_flocks(self, inode: int) -> list[FlockRec]:
        key = self.k.flocks(inode)
        out = []
        for field, value in _pairs(self._read1([key], ("HGETALL", key))):
            sid, owner = _split_owner(field)
            out.append(FlockRec(sid, owner, int(value)))
        return out

    def put_flock(self, inode: int, sid: int, owner: int, ltype: int) -> None:
        self._queue(
            ("HSET", self.k.flocks(inode), _owner_field(sid, owner), ltype),
            ("SADD", self.k.locks_of(sid), inode),
        )

    def del_flock(self, inode: int, sid: int, owner: int) -> None:
        self._queue(("HDEL", self.k.flocks(inode), _owner_field(sid, owner)))

    def get_plocks(self, inode: int) -> dict[tuple[int, int], list[PlockRange]]:
        key = self.k.plocks(inode)
        out: dict[tuple[int, int], list[PlockRange]] = {}
        for field, value in sorted(_pairs(self._read1([key], ("HGETALL", key)))):
            ranges = unpack_plocks(value)
            if ranges:
                out[_split_owner(field)] = sorted(ranges, key=lambda r: r.start)
        return dict(sorted(out.items()))

    def put_plocks(self, inode: int, sid: int, owner: int, ranges: list[PlockRange]) -> None:
        key, field = self.k.plocks(inode), _owner_field(sid, owner)
        if ranges:
            data = pack_plocks(sorted(ranges, key=lambda r: r.start))
            self._queue(("HSET", key, field, data), ("SADD", self.k.locks_of(sid), inode))
        else:
            self._queue(("HDEL", key, field))

    def del_locks(self, sid: int, inode: int | None = None) -> None:
        self._queue(
            (
                "EVAL",
                LUA_DEL_LOCKS,
                1,
                self.k.locks_of(sid),
                self.k.head,
                sid,
                "" if inode is None else inode,
            )
        )

    # --- sessions -----------------------------------------------------------------------------

    def put_session(self, sid: int, heartbeat_ns: int, info: str) -> None:
        self._queue(
            ("ZADD", self.k.sessions, heartbeat_ns, sid),
            ("HSET", self.k.sessinfo, sid, info),
        )

    def touch_session(self, sid: int, heartbeat_ns: int) -> None:
        self._queue(("ZADD", self.k.sessions, "XX", heartbeat_ns, sid))

    def get_session(self, sid: int) -> SessionRec | None:
        score, info = self._read(
            [self.k.sessions, self.k.sessinfo],
            [("ZSCORE", self.k.sessions, sid), ("HGET", self.k.sessinfo, sid)],
        )
        if score is None:
            return None
        return SessionRec(sid, int(float(score)), "" if info is None else bytes(info).decode())

    def del_session(self, sid: int) -> None:
        self._queue(("ZREM", self.k.sessions, sid), ("HDEL", self.k.sessinfo, sid))

    def list_sessions(self) -> list[SessionRec]:
        scored, infos = self._read(
            [self.k.sessions, self.k.sessinfo],
            [("ZRANGE", self.k.sessions, 0, -1, "WITHSCORES"), ("HGETALL", self.k.sessinfo)],
        )
        info = {int(k): bytes(v).decode() for k, v in _pairs(infos)}
        out = []
        for member, score in _pairs(scored):
            sid = int(member)
            out.append(SessionRec(sid, int(float(score)), info.get(sid, "")))
        return out

    # --- trash --------------------------------------------------------------------------------

    def put_trash(self, inode: int, deleted_ns: int) -> None:
        self._queue(
            ("ZADD", self.k.trash, deleted_ns, inode),
            ("HSET", self.k.trash_time, inode, deleted_ns),
        )

    def del_trash(self, inode: int) -> None:
        self._queue(("ZREM", self.k.trash, inode), ("HDEL", self.k.trash_time, inode))

    def expired_trash(self, before_ns: int, limit: int) -> list[int]:
        if limit <= 0:
            return []
        # scores are doubles: x < before implies float(x) <= float(before); exact times decide
        keys = [self.k.trash, self.k.trash_time]
        members = self._read1(
            keys, ("ZRANGEBYSCORE", self.k.trash, "-inf", before_ns, "LIMIT", 0, limit)
        )
        if not members:
            return []
        times = self._read(keys, [("HMGET", self.k.trash_time, *members)])[0]
        return [int(m) for m, t in zip(members, times, strict=True) if t and int(t) < before_ns]

    def trash_count(self) -> int:
        return int(self._read1([self.k.trash], ("ZCARD", self.k.trash)))


class _Listing(Listing):
    """A directory's entries in name order, each decoded from its attribute record when read.
    A listing is paged out to the kernel a few hundred entries a request, so the decoding is
    spread over the pages (and done while the kernel takes in the previous page, see
    ``loftfs.fuse.ll_ops``) instead of all before the first page; pages are packed from
    ``rows``, which builds no ``Attr``.

    Records past those read with the entries are read by ``later``, ``MGET_BATCH`` at a time:
    when first needed, or one batch ahead through ``submit``. An entry whose record is missing
    then (its inode was removed since the entries were read) has only its name, inode number
    and type: nlink 0 and every other attribute 0."""

    __slots__ = ("_ahead", "_keys", "_later", "_lock", "_records", "_rows", "_submit")

    def __init__(
        self,
        rows: list[tuple[bytes, bytes]],
        records: list[bytes | None],
        keys: list[bytes],
        later: ReadRecords | None,
        submit: Submit | None = None,
    ) -> None:
        self._rows = rows  # (name, hash value: "<type digit><inode decimal>")
        self._records = records  # of the first len(records) entries
        self._keys = keys
        self._later = later
        self._submit = submit if later is not None else None
        self._lock = threading.Lock()
        self._ahead: tuple[int, Future[list[bytes | None]]] | None = None  # (start, reading)
        self._read_ahead()

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> DirEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[DirEntry]: ...

    def __getitem__(self, index: int | slice) -> DirEntry | list[DirEntry]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._rows)))]
        if index < 0:
            index += len(self._rows)
        name, value = self._rows[index]
        record = self._record(index)
        if record is None:
            return DirEntry(name, Attr(*_no_attributes(value)))
        return DirEntry(name, unpack_attr(int(value[1:]), record))

    def rows(self, start: int, stop: int) -> list[tuple[bytes, AttrRow]]:
        """Written for speed (every entry of every listing page passes here): one pass over
        the records, per-entry checks only when a record is missing or of another format."""
        stop = min(stop, len(self._rows))
        if start >= stop:
            return []
        self._record(stop - 1)  # read them (the batches in order)
        names = self._rows[start:stop]
        records = self._records[start:stop]
        if None not in records:
            present = cast(list[bytes], records)
            fields = list(map(_unpack_attr, present)) if _sized(present) else []
            if fields and all(f[0] == ATTR_VERSION and f[1] in _TYPES for f in fields):
                types = _TYPES
                return [
                    (name, (int(value[1:]), types[f[1]], *f[2:11]))
                    for (name, value), f in zip(names, fields, strict=True)
                ]
        out: list[tuple[bytes, AttrRow]] = []
        for (name, value), record in zip(names, records, strict=True):
            if record is None:
                out.append((name, _no_attributes(value)))
            else:
                out.append((name, unpack_attr(int(value[1:]), record).row()))  # raises the reason
        return out

    def _record(self, index: int) -> bytes | None:
        if index < 0:
            index += len(self._rows)
        records = self._records
        if index < len(records):
            return records[index]
        assert self._later is not None  # without it every record was read at once
        with self._lock:  # one reader extends the list at a time: records stay aligned
            while len(records) <= index:
                start = len(records)
                keys = self._keys[start : start + MGET_BATCH]
                ahead, self._ahead = self._ahead, None
                got = ahead[1].result() if ahead and ahead[0] == start else self._later(keys)
                if len(got) != len(keys):
                    raise MetaUnavailable("a listing's attribute records came back short")
                records.extend(got)
                self._read_ahead()
        return records[index]

    def _read_ahead(self) -> None:
        """Start reading the batch after those read, if there is one (see ``Submit``)."""
        start = len(self._records)
        if self._submit is not None and start < len(self._keys) and self._ahead is None:
            keys = self._keys[start : start + MGET_BATCH]
            assert self._later is not None
            try:
                self._ahead = (start, self._submit(self._later, keys))
            except RuntimeError:  # the engine is closing: read when needed
                pass


_first = operator.itemgetter(0)


def _sized(records: list[bytes]) -> bool:
    """Every record of the attribute record's size."""
    return set(map(len, records)) == {ATTR_RECORD.size}


def _no_attributes(value: bytes) -> AttrRow:
    """The row of an entry whose inode is gone (see ``_Listing``): from its directory entry."""
    inode, kind = unpack_entry(value)
    return (inode, kind, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    """A flat RESP2 reply ``[k1, v1, k2, v2, ...]`` as a list of pairs."""
    it = iter(flat)
    return list(zip(it, it, strict=True))


def _checked(replies: list[Any]) -> list[Any]:
    """Raise the first error reply (an unexpected one: wrong key type, out of memory, ...)."""
    for r in replies:
        if isinstance(r, ResponseError):
            raise r
    return replies
