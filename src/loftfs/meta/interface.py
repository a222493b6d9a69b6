"""The ``Meta`` interface: everything the file system asks of its metadata engine.

All methods are synchronous and thread-safe: the vfs calls them from worker threads. Names are
``bytes``. POSIX failures raise ``FSError(errno)``; an unreachable engine raises
``MetaUnavailable``. Every method that changes the namespace is one atomic transaction.
Permission checks (mode bits, sticky bit, setgid, supplementary groups, root) are made by the
shared layer, so every engine behaves the same; see ``loftfs.meta.perm``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from loftfs.meta.types import (
    Attr,
    BatchResult,
    Ctx,
    ExtObject,
    FileType,
    ImportItem,
    ImportOwner,
    Listing,
    SessionInfo,
    Slice,
    SliceCommit,
    StatFS,
    VolumeSettings,
)


class Meta(ABC):
    """A volume's namespace. Obtain one with ``loftfs.meta.open_meta(url)``."""

    url: str
    #: calls cross a network to a server (a round trip worth overlapping work with); False for
    #: the embedded SQLite engine
    remote: bool = True

    # --- volume -------------------------------------------------------------------------------

    @abstractmethod
    def init_volume(self, settings: VolumeSettings) -> None:
        """Format: store the settings and create the root directory.
        Raises ``VolumeExists`` if a volume is already there (nothing is changed then)."""

    @abstractmethod
    def load_settings(self) -> VolumeSettings:
        """The volume's settings; raises ``NotFormatted`` when there is no volume."""

    @abstractmethod
    def recent_settings(self) -> VolumeSettings:
        """The settings as of at most a few seconds ago (cached): quotas changed by another
        client (``loft config``, the control plane) reach every mount this way."""

    @abstractmethod
    def update_settings(self, settings: VolumeSettings) -> None:
        """Replace the stored settings (``loft config``); the uuid must not change."""

    @abstractmethod
    def destroy_volume(self) -> None:
        """Delete every metadata record of the volume (data objects are the caller's job)."""

    @abstractmethod
    def close(self) -> None:
        """Flush pending counters, release connections. The object is unusable afterwards."""

    # --- sessions -----------------------------------------------------------------------------

    @abstractmethod
    def new_session(self, info: dict, *, heartbeat_s: float = 12.0) -> int:
        """Register this client (host, pid, mountpoint...) and start heartbeats every
        ``heartbeat_s`` seconds in a background thread. Also cleans stale sessions of others."""

    @abstractmethod
    def close_session(self) -> None:
        """Stop heartbeats and remove this client's session with its locks and open files
        (deleting files that were unlinked while open)."""

    @abstractmethod
    def list_sessions(self) -> list[SessionInfo]:
        """Live and stale sessions, oldest first."""

    @abstractmethod
    def clean_stale_sessions(self, timeout_s: float = 60.0) -> int:
        """Remove sessions whose heartbeat is older than ``timeout_s``: their locks, open-file
        records, and the deferred deletions they held. Returns how many were removed."""

    # --- namespace ----------------------------------------------------------------------------

    @abstractmethod
    def statfs(self, ctx: Ctx) -> StatFS:
        """Space and inodes, honoring the volume's capacity and inode quotas."""

    @abstractmethod
    def lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        """The entry ``name`` in directory ``parent`` (``.`` and ``..`` included).
        Needs search (x) permission on ``parent``."""

    @abstractmethod
    def lookup_peek(self, ctx: Ctx, parent: int, name: bytes) -> tuple[Attr, list[Slice] | None]:
        """``lookup``, with the slice list of the child's chunk 0 when the child is a regular
        file (None otherwise), read in the same transaction. A hint to warm the block caches
        before the open that usually follows: nothing may be answered from it (the open
        reads the file again)."""

    @abstractmethod
    def getattr(self, inode: int) -> Attr: ...

    @abstractmethod
    def setattr(
        self,
        ctx: Ctx,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        """chmod/chown/utimens; ``None`` leaves a field alone, ``NOW`` (-1) means current time.
        Updates ctime; clears setuid/setgid on chown as Linux does. Size changes go to
        ``truncate``."""

    @abstractmethod
    def access(self, ctx: Ctx, inode: int, mask: int) -> None:
        """Raise EACCES unless ``ctx`` may access ``inode`` with ``mask`` (R_OK|W_OK|X_OK)."""

    @abstractmethod
    def mknod(
        self, ctx: Ctx, parent: int, name: bytes, type: FileType, mode: int, rdev: int = 0
    ) -> Attr:
        """Create a file, fifo, socket or device node. ``mode`` is final (umask applied by the
        caller); setgid directories give their gid (and, to subdirectories, their setgid bit)."""

    @abstractmethod
    def create(self, ctx: Ctx, parent: int, name: bytes, mode: int, flags: int) -> Attr:
        """``mknod`` of a regular file followed by ``open`` with ``flags``, in one transaction."""

    @abstractmethod
    def make(
        self,
        ctx: Ctx,
        parent: int,
        name: bytes,
        type: FileType,
        mode: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
        open: bool = False,
    ) -> tuple[Attr, Attr]:
        """``mknod``, ``mkdir``, ``symlink`` (``target``) or, with ``open``, ``create`` of a
        regular file, whichever ``type`` says; returns the new node's attributes and the
        parent's as the same commit left them (what a caller keeping attributes needs)."""

    @abstractmethod
    def mkdir(self, ctx: Ctx, parent: int, name: bytes, mode: int) -> Attr: ...

    @abstractmethod
    def symlink(self, ctx: Ctx, parent: int, name: bytes, target: bytes) -> Attr: ...

    @abstractmethod
    def readlink(self, inode: int) -> bytes: ...

    @abstractmethod
    def link(self, ctx: Ctx, inode: int, new_parent: int, new_name: bytes) -> Attr:
        """Hard link; EPERM for directories."""

    @abstractmethod
    def unlink(self, ctx: Ctx, parent: int, name: bytes) -> None:
        """Remove a non-directory entry. At nlink 0 the file's data is released, unless some
        client still has it open: then deletion waits for the last ``close``."""

    @abstractmethod
    def rmdir(self, ctx: Ctx, parent: int, name: bytes) -> None: ...

    @abstractmethod
    def rename(
        self, ctx: Ctx, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE; a replaced target is unlinked."""

    @abstractmethod
    def readdir(self, ctx: Ctx, inode: int) -> Listing:
        """All entries of a directory with their attributes, without ``.`` and ``..``, in a stable
        order. Needs read permission. An engine may decode each entry when it is read, and read
        attributes then too: an entry whose inode was removed in between comes with nlink 0 and
        no other attributes."""

    @abstractmethod
    def readdir_small(self, ctx: Ctx, inode: int, limit: int) -> tuple[Attr, Listing | None]:
        """The directory's attributes and, when it holds at most ``limit`` entries, its
        ``readdir``, read together; None instead of a listing (and no more than about
        ``limit`` entries' worth read) when it holds more. Needs read permission."""

    # --- open files ---------------------------------------------------------------------------

    @abstractmethod
    def open(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        """Check permission for ``flags`` (O_RDONLY/O_WRONLY/O_RDWR, O_TRUNC) and record that this
        session has the inode open. Returns fresh attributes (close-to-open)."""

    @abstractmethod
    def release(self, inode: int) -> None:
        """The last handle of this session on ``inode`` was closed: drop the open record, and
        delete the file if it was unlinked meanwhile and no other client has it open."""

    def reopen(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        """``open`` of an inode this session's open record already covers (the file is open
        here, or its release is deferred): only the permission check and fresh attributes,
        which engines answer with a read-only transaction."""
        return self.open(ctx, inode, flags)

    def open_with_chunk(self, ctx: Ctx, inode: int, flags: int) -> tuple[Attr, list[Slice] | None]:
        """``open``, plus the slice list of chunk 0 when the engine can read it in the same
        round trip (a small file's first read then needs no metadata call); None otherwise."""
        return self.open(ctx, inode, flags), None

    @abstractmethod
    def peek(self, ctx: Ctx, inode: int, flags: int) -> tuple[Attr, list[Slice] | None]:
        """The permission check of ``open`` and fresh attributes, with the slice list of chunk
        0 (None when the inode is not a regular file), in one read-only transaction that
        records nothing: for an open that takes the whole content at once (``VFS``'s light
        opens of small files, which need no open record)."""

    def release_many(self, inodes: list[int]) -> None:
        """``release`` of several inodes, in one transaction where the engine can."""
        for inode in inodes:
            self.release(inode)

    # --- file data ----------------------------------------------------------------------------

    @abstractmethod
    def read_chunk(self, inode: int, index: int) -> list[Slice]:
        """The slice list of chunk ``index`` of a file, oldest first ([] when never written)."""

    @abstractmethod
    def new_slice_id(self) -> int:
        """A fresh, never reused slice id (allocated in batches per client)."""

    @abstractmethod
    def write_slice(self, inode: int, index: int, slice: Slice, mtime_ns: int) -> SliceCommit:
        """Append ``slice`` (whose blocks are already durable) to chunk ``index``; grow the file
        to cover it; set mtime/ctime. Raises ENOSPC/EDQUOT past the quota. Returns the chunk's
        slice count afterwards (a hint for compaction) and the attributes it wrote."""

    @abstractmethod
    def truncate(self, ctx: Ctx, inode: int, length: int, *, check_perm: bool = True) -> Attr:
        """Set the file's length (grow with zeros, or shrink releasing data beyond)."""

    @abstractmethod
    def fallocate(self, ctx: Ctx, inode: int, mode: int, offset: int, length: int) -> Attr:
        """Preallocate (grow size unless KEEP_SIZE), PUNCH_HOLE (with KEEP_SIZE) or ZERO_RANGE.
        Other modes raise EOPNOTSUPP."""

    @abstractmethod
    def copy_file_range(
        self, ctx: Ctx, src: int, src_off: int, dst: int, dst_off: int, length: int
    ) -> int:
        """Copy a byte range by referencing the source's slices (no data is copied).
        Returns the number of bytes copied (short at the source's end)."""

    @abstractmethod
    def replace_slices(self, inode: int, index: int, old: list[Slice], new: list[Slice]) -> bool:
        """Compaction: if the chunk's slice list still starts with ``old``, replace that prefix
        with ``new`` (keeping slices appended since). Slices no longer referenced are queued
        for deletion. Returns False (changing nothing) when the chunk changed otherwise."""

    @abstractmethod
    def deleted_slices(self, limit: int = 1000) -> list[tuple[int, int]]:
        """Slices whose reference count reached zero, as (id, size): their blocks may be deleted."""

    @abstractmethod
    def forget_deleted_slices(self, ids: list[int]) -> None:
        """Drop the records of slices whose blocks were deleted from the object store (ids
        from ``deleted_slices``): their reference rows and, for external slices, their
        ``ExtObject`` records, in one transaction."""

    @abstractmethod
    def get_ext(self, ids: Sequence[int]) -> dict[int, ExtObject]:
        """The ``ExtObject`` records of the external slices ``ids`` (missing ids are left
        out)."""

    @abstractmethod
    def count_ext(self, source: int) -> int:
        """How many external object records point at source ``source`` (0: nothing of the
        volume reads from it any more). May take time proportional to the volume's records."""

    # --- settings and imports (loftfs.meta.ops_import) ------------------------------------------

    @abstractmethod
    def get_setting(self, name: str) -> str | None:
        """A volume-wide setting by name (import sources, checkpoints); None when unset."""

    @abstractmethod
    def set_setting(self, name: str, value: str) -> None: ...

    @abstractmethod
    def delete_settings(self, names: Sequence[str]) -> None:
        """Remove settings (missing names are not an error), in one transaction."""

    @abstractmethod
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
        """Files for imported objects (external slices) under ``dest``, in one transaction
        with ``checkpoint``; see ``loftfs.meta.ops_import``."""

    @abstractmethod
    def bind_lazy(self, inode: int, source: int, prefix: str) -> None:
        """Bind a directory to a source prefix, listed on first use (lazy import)."""

    @abstractmethod
    def lazy_binding(self, inode: int) -> tuple[int, str] | None:
        """(source, prefix) of a directory not listed yet; None otherwise."""

    @abstractmethod
    def cleanup_trash(self) -> int:
        """Release the data of trashed files older than the volume's ``trash_days`` (their
        slices go to ``deleted_slices``). Returns how many files were purged."""

    # --- extended attributes ------------------------------------------------------------------

    @abstractmethod
    def getxattr(self, ctx: Ctx, inode: int, name: bytes) -> bytes:
        """ENODATA when absent."""

    @abstractmethod
    def setxattr(self, ctx: Ctx, inode: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """XATTR_CREATE: EEXIST if present; XATTR_REPLACE: ENODATA if absent."""

    @abstractmethod
    def listxattr(self, ctx: Ctx, inode: int) -> list[bytes]: ...

    @abstractmethod
    def removexattr(self, ctx: Ctx, inode: int, name: bytes) -> None: ...

    # --- locks (owners are per session: two clients never share an owner; an owner is a
    # signed 64-bit integer, bindings map the kernel's unsigned lock owners into that range) ----

    @abstractmethod
    def flock(self, ctx: Ctx, inode: int, owner: int, ltype: int, block: bool) -> None:
        """BSD flock: F_RDLCK (shared), F_WRLCK (exclusive), F_UNLCK. EAGAIN on conflict when
        not blocking; otherwise waits (polling) until granted."""

    @abstractmethod
    def getlk(
        self, ctx: Ctx, inode: int, owner: int, ltype: int, start: int, end: int
    ) -> tuple[int, int, int, int]:
        """F_GETLK: the first conflicting lock as (ltype, start, end, pid), or
        (F_UNLCK, 0, 0, 0). ``end`` is inclusive; ``LOCK_EOF`` (2**63-1) means 'to EOF'."""

    @abstractmethod
    def setlk(
        self,
        ctx: Ctx,
        inode: int,
        owner: int,
        block: bool,
        ltype: int,
        start: int,
        end: int,
        pid: int,
    ) -> None:
        """F_SETLK/F_SETLKW POSIX byte-range lock (split/merge like the kernel does).
        EAGAIN on conflict when not blocking."""

    # --- accounting ---------------------------------------------------------------------------

    @abstractmethod
    def usage(self) -> tuple[int, int]:
        """(used bytes, used inodes) of the whole volume."""
