"""The transaction primitives every metadata engine implements.

The namespace logic (``loftfs.meta.base``) is written once over this small interface; an engine
provides a ``Txn`` implementation and a runner that executes a function inside one transaction,
retrying it on conflict. The contract keeps key-value engines possible:

- Within one transaction the shared layer never reads back what it wrote. An engine may
  therefore serve reads directly (watching what it read) and buffer writes until commit, as
  Redis WATCH/MULTI does, or apply them at once, as SQL engines do.
- A transaction function may run several times (after a conflict) and has no side effects
  outside the transaction, so a retry is always safe.
- ``incr_counter`` returns the new value; the shared layer calls it only in a transaction of
  its own (id allocation), so an engine may apply it immediately.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from loftfs.meta.types import Attr, ExtObject, FileType, Listing, Slice

T = TypeVar("T")

# counter names
NEXT_INODE = "next_inode"
NEXT_SLICE = "next_slice"
NEXT_SESSION = "next_session"
USED_SPACE = "used_space"
USED_INODES = "used_inodes"

# setting names
SETTING_VOLUME = "volume"
SETTING_SOURCES = "sources"  # JSON: the volume's import sources (loftfs.sources)

# Lazy import: a directory still bound to a source prefix (not listed yet) carries this st_rdev
# (directories have no device number otherwise; the FUSE layer never shows it), so every
# client learns it from the attributes it reads anyway, at no cost; the binding itself (source
# and prefix) is the setting ``lazy_setting(inode)`` (see loftfs.meta.ops_import).
LAZY_MARK = 1


def lazy_setting(inode: int) -> str:
    return f"lazy:{inode}"


@dataclass(frozen=True, slots=True)
class FlockRec:
    """A BSD flock held by ``owner`` of session ``sid`` (F_RDLCK or F_WRLCK)."""

    sid: int
    owner: int
    ltype: int


@dataclass(frozen=True, slots=True)
class PlockRange:
    """One POSIX byte-range lock: ``[start, end]`` inclusive, held by process ``pid``."""

    ltype: int
    start: int
    end: int
    pid: int


@dataclass(frozen=True, slots=True)
class NewFile:
    """A file for ``Txn.put_new_files``: its attributes, where its entry goes, and its chunks
    as (index, slice, record) of the external slice each holds."""

    attr: Attr
    parent: int
    name: bytes
    chunks: tuple[tuple[int, Slice, ExtObject], ...]


@dataclass(frozen=True, slots=True)
class SessionRec:
    sid: int
    heartbeat_ns: int
    info: str  # JSON


class Txn(Protocol):
    """One transaction of a metadata engine. See the module docstring for the contract."""

    # --- settings and counters ----------------------------------------------------------------
    def get_setting(self, name: str) -> str | None: ...
    def put_setting(self, name: str, value: str) -> None: ...
    def del_setting(self, name: str) -> None: ...
    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every setting whose name starts with ``prefix`` (an administrative read: dumps)."""
        ...

    def get_counter(self, name: str) -> int:
        """0 when the counter was never set."""
        ...

    def add_counter(self, name: str, delta: int) -> None: ...
    def incr_counter(self, name: str, delta: int) -> int:
        """Add ``delta`` and return the new value (called alone in its transaction)."""
        ...

    # --- inodes -------------------------------------------------------------------------------
    def get_attr(self, inode: int) -> Attr | None: ...
    def put_attr(self, attr: Attr) -> None:
        """Insert or replace the inode's attributes."""
        ...

    def del_attr(self, inode: int) -> None: ...

    def prefetch(
        self,
        attrs: Sequence[int] = (),
        entries: Sequence[tuple[int, bytes]] = (),
        chunks: Sequence[tuple[int, int]] = (),
        *,
        assume: bool = False,
    ) -> None:
        """Hint: these attributes, entries (parent, name) and chunks (inode, index) are read
        next. An engine that pays a round trip per read reads them in one; others ignore it.
        ``assume``: values this process saw last may stand in for the reads, checked when the
        transaction commits (Redis: one round trip instead of two, ``redis_assume``)."""
        ...

    # --- directory entries --------------------------------------------------------------------
    def get_entry(self, parent: int, name: bytes) -> tuple[int, FileType] | None: ...
    def put_entry(self, parent: int, name: bytes, inode: int, type: FileType) -> None:
        """Insert or replace an entry."""
        ...

    def del_entry(self, parent: int, name: bytes) -> None: ...
    def has_entries(self, parent: int) -> bool: ...
    def count_entries(self, parent: int, upto: int) -> int:
        """The number of entries of ``parent``, or ``upto`` when it holds at least that many
        (the count may stop there)."""
        ...

    def list_dir(self, parent: int) -> Listing:
        """The entries of ``parent`` with their attributes, ordered by name."""
        ...

    # --- symlinks -----------------------------------------------------------------------------
    def get_symlink(self, inode: int) -> bytes | None: ...
    def put_symlink(self, inode: int, target: bytes) -> None: ...
    def del_symlink(self, inode: int) -> None: ...

    # --- chunks and slices --------------------------------------------------------------------
    def get_chunk(self, inode: int, index: int) -> list[Slice]: ...
    def chunk_indexes(self, inode: int) -> list[int]:
        """Indexes of the chunks of ``inode`` that hold a slice list, ascending."""
        ...

    def put_chunk(self, inode: int, index: int, slices: list[Slice]) -> None:
        """Replace the slice list of a chunk (``[]`` deletes the chunk)."""
        ...

    def append_slices(self, inode: int, index: int, slices: list[Slice]) -> None: ...
    def del_chunks(self, inode: int) -> None: ...
    def add_slice_refs(self, deltas: Mapping[int, tuple[int, int]]) -> None:
        """Apply ``{slice id: (size, delta)}`` to the reference counts, creating missing rows.
        Rows whose count drops to zero or below are what ``deleted_slices`` reports."""
        ...

    def deleted_slices(self, limit: int) -> list[tuple[int, int]]: ...
    def forget_slices(self, ids: list[int]) -> None:
        """Drop the reference rows of ``ids`` that are still at zero or below."""
        ...

    def put_new_files(self, files: Sequence[NewFile]) -> None:
        """Write many new regular files at once (imports): each one's attributes, its entry
        and its chunks of external slices with their records. The names must be free and the
        inodes and slice ids fresh: this only inserts (engines may batch the statements)."""
        ...

    # --- external objects (imported data read in place, see ExtObject) -------------------------
    def put_ext(self, id: int, rec: ExtObject) -> None: ...
    def get_ext(self, ids: Sequence[int]) -> dict[int, ExtObject]:
        """The records of ``ids`` that exist (missing ids are left out)."""
        ...

    def del_ext(self, ids: Sequence[int]) -> None:
        """Remove the records of ``ids``; missing ones are not an error."""
        ...

    def count_ext(self, source: int) -> int:
        """How many records point at objects of source ``source``."""
        ...

    # --- extended attributes ------------------------------------------------------------------
    def get_xattr(self, inode: int, name: bytes) -> bytes | None: ...
    def put_xattr(self, inode: int, name: bytes, value: bytes) -> None: ...
    def del_xattr(self, inode: int, name: bytes) -> None: ...
    def list_xattrs(self, inode: int) -> list[bytes]: ...
    def del_xattrs(self, inode: int) -> None: ...

    # --- open files ---------------------------------------------------------------------------
    def add_open(self, sid: int, inode: int) -> None: ...
    def del_open(self, sid: int, inode: int) -> None: ...
    def open_sessions(self, inode: int) -> list[int]:
        """Sessions that hold ``inode`` open."""
        ...

    def session_opens(self, sid: int) -> list[int]: ...
    def del_session_opens(self, sid: int) -> None: ...

    # --- locks --------------------------------------------------------------------------------
    def get_flocks(self, inode: int) -> list[FlockRec]: ...
    def put_flock(self, inode: int, sid: int, owner: int, ltype: int) -> None: ...
    def del_flock(self, inode: int, sid: int, owner: int) -> None: ...
    def get_plocks(self, inode: int) -> dict[tuple[int, int], list[PlockRange]]:
        """POSIX locks of ``inode`` by (sid, owner), each list sorted by start."""
        ...

    def put_plocks(self, inode: int, sid: int, owner: int, ranges: list[PlockRange]) -> None:
        """Replace the ranges of one owner (``[]`` drops them)."""
        ...

    def del_locks(self, sid: int, inode: int | None = None) -> None:
        """Drop every flock and POSIX lock of session ``sid`` (on ``inode`` only, if given)."""
        ...

    # --- sessions -----------------------------------------------------------------------------
    def put_session(self, sid: int, heartbeat_ns: int, info: str) -> None: ...
    def touch_session(self, sid: int, heartbeat_ns: int) -> None: ...
    def get_session(self, sid: int) -> SessionRec | None: ...
    def del_session(self, sid: int) -> None: ...
    def list_sessions(self) -> list[SessionRec]:
        """All sessions, oldest heartbeat first."""
        ...

    # --- trash --------------------------------------------------------------------------------
    def put_trash(self, inode: int, deleted_ns: int) -> None: ...
    def del_trash(self, inode: int) -> None: ...
    def expired_trash(self, before_ns: int, limit: int) -> list[int]:
        """Inodes moved to the trash before ``before_ns``, oldest first."""
        ...

    def trash_count(self) -> int: ...


TxnFn = Callable[[Txn], T]
