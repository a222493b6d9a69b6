"""Value types of the metadata layer, shared by every engine, the data path and the vfs."""

from __future__ import annotations

import json
import stat
import uuid as _uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Final, NamedTuple

CHUNK_SIZE = 64 << 20  # a file is split into chunks of this many bytes by offset
ROOT_INODE = 1
MAX_NAME = 255
MAX_SYMLINK = 4096

# rename flags (linux/fs.h)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# setxattr flags
XATTR_CREATE = 1
XATTR_REPLACE = 2
# lock types (fcntl.h)
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2
LOCK_EOF = (1 << 63) - 1  # inclusive end of a lock that reaches end of file
# fallocate modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# access() masks
R_OK, W_OK, X_OK = 4, 2, 1
# setattr: pass NOW as atime_ns/mtime_ns to use the current time (utimensat UTIME_NOW)
NOW = -1


class FileType(IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    FIFO = 4
    CHR = 5
    BLK = 6
    SOCK = 7

    @property
    def ifmt(self) -> int:
        return _IFMT[self]

    @classmethod
    def from_mode(cls, mode: int) -> FileType:
        fmt = stat.S_IFMT(mode)
        for t, m in _IFMT.items():
            if m == fmt:
                return t
        return cls.FILE


_IFMT = {
    FileType.FILE: stat.S_IFREG,
    FileType.DIR: stat.S_IFDIR,
    FileType.SYMLINK: stat.S_IFLNK,
    FileType.FIFO: stat.S_IFIFO,
    FileType.CHR: stat.S_IFCHR,
    FileType.BLK: stat.S_IFBLK,
    FileType.SOCK: stat.S_IFSOCK,
}


@dataclass(slots=True)
class Attr:
    """Attributes of one inode. ``mode`` holds only the permission bits (07777)."""

    inode: int
    type: FileType
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = 0  # for directories: the parent directory; 0 when not tracked

    @property
    def st_mode(self) -> int:
        return self.type.ifmt | (self.mode & 0o7777)

    def copy(self) -> Attr:
        return Attr(**{f: getattr(self, f) for f in self.__slots__})  # type: ignore[attr-defined]

    def row(self) -> AttrRow:
        return (
            self.inode, self.type, self.mode, self.uid, self.gid, self.nlink, self.size,
            self.rdev, self.atime_ns, self.mtime_ns, self.ctime_ns,
        )  # fmt: skip


# An Attr's fields as a plain tuple, inode to ctime_ns (``parent`` left out): what listing pages
# are packed from, built without an Attr object per entry. Indexes below.
AttrRow = tuple[int, "FileType", int, int, int, int, int, int, int, int, int]
ROW_INODE: Final = 0
ROW_TYPE: Final = 1
ROW_NLINK: Final = 5
ROW_SIZE: Final = 6
ROW_RDEV: Final = 7
ROW_MTIME: Final = 9


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who asks: the caller's credentials, as the kernel reports them."""

    uid: int = 0
    gid: int = 0
    gids: tuple[int, ...] = ()  # supplementary groups
    pid: int = 0
    umask: int = 0o022

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids


ROOT_CTX = Ctx()


class DirEntry(NamedTuple):
    """One entry of a listing (a tuple: listings of large directories build many)."""

    name: bytes
    attr: Attr


class Listing(Sequence[DirEntry]):
    """A directory's entries in name order, by index (what ``Meta.readdir`` returns). ``rows``
    gives entries ``start`` to ``stop`` as ``(name, AttrRow)`` without an ``Attr`` each:
    engines that keep their records and decode an entry when it is read override it
    (``loftfs.meta.redis_txn``)."""

    __slots__ = ()

    def rows(self, start: int, stop: int) -> list[tuple[bytes, AttrRow]]:
        return [(e.name, e.attr.row()) for e in self[start:stop]]


class EntryList(list[DirEntry], Listing):
    """A listing decoded up front."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Slice:
    """One record of a chunk's slice list: a range of a stored slice, laid at ``pos`` in the chunk.

    The chunk's content is its slice records laid over each other in list order, later on top.
    ``id == 0`` is a hole (reads as zeros). ``size`` is the stored slice's full length (needed to
    name its blocks); ``off``/``len`` select the visible part. ``kind``: ``KIND_NATIVE`` (blocks
    of the volume's store) or ``KIND_EXTERNAL`` (``id`` names an ``ExtObject``: a range of an
    object of a source bucket, ``size`` its length); packed small files are reserved for later.
    """

    pos: int
    id: int
    size: int
    off: int
    len: int
    kind: int = 0

    @property
    def end(self) -> int:
        return self.pos + self.len


class SliceCommit(NamedTuple):
    """What ``write_slice`` committed: the chunk's slice count afterwards (a hint for
    compaction) and the file's attributes as the commit left them."""

    slices: int
    attr: Attr


KIND_NATIVE = 0  # a slice stored as blocks of the volume's own object store
KIND_EXTERNAL = 1  # a slice whose bytes are a range of an object in a source bucket


@dataclass(frozen=True, slots=True)
class ExtObject:
    """Where the bytes of an external slice live: ``length`` bytes from ``offset`` of the
    object ``key`` of source ``source``, as it was when imported (``etag``: its ETag or
    version; a read of a changed object fails instead of mixing versions).

    An imported object gets one record per 64 MiB chunk it spans, each with an id from the
    slice id space: the chunk's slice is ``Slice(pos, id, size=length, off, len,
    kind=KIND_EXTERNAL)``, reference-counted like native slices. Records never change."""

    source: int
    key: str
    etag: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One object to import: its path under the destination (``dirs`` then ``name``, each a
    valid file name), size, modification time and identity in the source."""

    dirs: tuple[bytes, ...]
    name: bytes
    size: int
    mtime_ns: int
    key: str
    etag: str


@dataclass(frozen=True, slots=True)
class ImportOwner:
    """Mode and owner of what an import creates."""

    file_mode: int = 0o644
    dir_mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass
class BatchResult:
    """What one ``Meta.import_batch`` did."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    nbytes: int = 0  # size of the files created or updated
    conflict_paths: list[bytes] = field(default_factory=list)
    # directories this batch created, by path under the destination (for the importer's cache)
    new_dirs: dict[tuple[bytes, ...], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatFS:
    total_bytes: int
    avail_bytes: int
    used_inodes: int
    avail_inodes: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    sid: int
    heartbeat_ns: int
    info: dict


@dataclass
class VolumeSettings:
    """What ``format`` writes into the metadata engine. Stored as JSON."""

    name: str
    storage: str = "file"
    bucket: str = ""
    uuid: str = field(default_factory=lambda: str(_uuid.uuid4()))
    block_size: int = 4 << 20
    compress: str = "none"
    capacity: int = 0  # bytes, 0 = unlimited
    inodes: int = 0  # 0 = unlimited
    trash_days: int = 0
    created_ns: int = 0
    version: int = 1
    extra: dict = field(default_factory=dict)
    # empty: data is stored in the clear; else the wrapped data key and how to unwrap it
    # (``loftfs.object.encrypt``). Never printed as is: it holds the salt and wrapped key.
    encryption: dict = field(default_factory=dict)
    # backend options of the object store (s3: region, endpoint, and the access and secret
    # keys when given at format). Never printed as is: secret values are masked.
    storage_options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VolumeSettings:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
