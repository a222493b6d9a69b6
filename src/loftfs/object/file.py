"""Object storage in a local directory: one file per key, ``/`` in keys are subdirectories.

Writes go to a temporary file in the target directory and are renamed into place, so a reader
sees the old object or the new one, never a part, and a crash of the writer never leaves a
half-written object under a real key.

Durability on power failure comes from ``sync`` (the file system's ``fsync()``, and unmount),
not from every ``put``: an fsync of the object and one of its directory per put cost 0.45 ms
on this machine's disk, ten times the put itself, and made small files twice as slow to write
(docs/PERFORMANCE.md). ``sync`` fsyncs the objects written since the last call and their
directories, or syncs the whole file system in one call when there are many.
"""

from __future__ import annotations

import builtins
import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterator

from loftfs.errors import ObjectAuthError, ObjectChanged, ObjectNotFound, ObjectStoreError
from loftfs.object.interface import ObjectInfo, ObjectStore

# Temporary files carry this name prefix; keys may not use it and listings skip it.
TMP_PREFIX = ".loft-tmp-"

_PERMISSION = (errno.EACCES, errno.EPERM)
# More objects than this to sync: one syncfs(2) of the file system instead of an fsync each.
SYNC_EACH_LIMIT = 64
# Objects written without a sync in between: past this many, a put syncs (bounds the memory of
# the pending set on a mount that never sees fsync).
PENDING_LIMIT = 100_000
# Objects at least this large start their write-back to disk at once (see _start_writeback).
WRITEBACK_START_BYTES = 1 << 20
SYNC_FILE_RANGE_WRITE = 2

log = logging.getLogger(__name__)
_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk now, without waiting (sync_file_range
    with SYNC_FILE_RANGE_WRITE): a later ``sync`` then finds little left to write, so an
    ``fsync()`` after a large write does not pay for all of it at the end. Best effort."""
    try:
        _libc_handle().sync_file_range(
            fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(SYNC_FILE_RANGE_WRITE)
        )
    except (AttributeError, OSError):
        pass


def _syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding ``fd``; os.sync() where libc lacks it."""
    try:
        if _libc_handle().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except AttributeError:
        os.sync()


def file_etag(st: os.stat_result) -> str:
    """The version of a file as an ETag: its modification time and size (hex). A rewrite that
    keeps both (within the clock's resolution) is not seen, as with rsync's quick check."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class FileObjectStore(ObjectStore):
    """Keys map to files under ``root_dir``. Thread-safe: every operation is one or a few
    atomic file-system calls; the only state is the set of objects written since the last
    ``sync``."""

    def __init__(self, root_dir: str) -> None:
        if not root_dir or "\0" in root_dir:
            raise ObjectStoreError(f"invalid storage directory {root_dir!r}")
        self.root = os.path.abspath(root_dir)
        self._pending_lock = threading.Lock()
        self._pending: set[str] = set()  # objects put since the last sync
        self._new_dirs: set[str] = set()  # directories made since the last sync

    # --- helpers --------------------------------------------------------------------------

    def describe(self) -> str:
        return f"file://{self.root}/"

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or key.endswith("/") or "\0" in key:
            raise ObjectStoreError(f"invalid object key {key!r}")
        for part in key.split("/"):
            if part in ("", ".", "..") or part.startswith(TMP_PREFIX):
                raise ObjectStoreError(f"invalid object key {key!r}")
        return os.path.join(self.root, key)

    def _error(self, e: OSError, what: str, key: str) -> ObjectStoreError:
        """Translate an OSError into the typed error callers branch on."""
        where = f"{what} {key!r} in {self.describe()}"
        if e.errno in _PERMISSION:
            return ObjectAuthError(f"permission denied: {where}")
        if e.errno == errno.EROFS:
            return ObjectStoreError(f"read-only file system: {where}")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ObjectStoreError(f"no space left on device: {where}")
        if e.errno in (errno.ENOENT, errno.EISDIR):
            return ObjectNotFound(f"no such object: {key!r} in {self.describe()}")
        if e.errno == errno.ENOTDIR:
            if what != "put":
                return ObjectNotFound(f"no such object: {key!r} in {self.describe()}")
            return ObjectStoreError(f"{where}: a part of the key is an object, not a prefix")
        return ObjectStoreError(f"{where}: {e.strerror or e}")

    # --- operations -----------------------------------------------------------------------

    def create(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except FileExistsError:
            raise ObjectStoreError(f"{self.root} exists and is not a directory") from None
        except NotADirectoryError:
            raise ObjectStoreError(
                f"cannot create {self.root}: a component of the path is not a directory"
            ) from None
        except OSError as e:
            raise self._error(e, "create", "") from e
        if not os.path.isdir(self.root):
            raise ObjectStoreError(f"{self.root} exists and is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectAuthError(f"permission denied: cannot write into {self.root}")

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if limit < 0 else f.read(limit)
        except OSError as e:
            raise self._error(e, "get", key) from e

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        """``get`` of the file as it was when ``file_etag`` gave ``etag``: the version is
        checked on the open file before and after the read (a file replaced by rename keeps
        its old content for an open descriptor; one changed in place shows a new mtime)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                before = file_etag(os.fstat(f.fileno()))
                if before != etag:
                    raise ObjectChanged(
                        f"{key!r} in {self.describe()} changed: {etag!r} -> {before!r}"
                    )
                size = os.fstat(f.fileno()).st_size - offset if limit < 0 else limit
                data = os.pread(f.fileno(), max(0, size), offset)
                after = file_etag(os.fstat(f.fileno()))
        except OSError as e:
            raise self._error(e, "get", key) from e
        if after != etag:
            raise ObjectChanged(
                f"{key!r} in {self.describe()} changed while read: {etag!r} -> {after!r}"
            )
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
        try:
            fd = self._open_tmp(directory, tmp)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if len(data) >= WRITEBACK_START_BYTES:
                    _start_writeback(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if e.errno == errno.EISDIR or (e.errno == errno.ENOTEMPTY and os.path.isdir(path)):
                raise ObjectStoreError(
                    f"put {key!r} in {self.describe()}: the key is a prefix of other objects"
                ) from e
            raise self._error(e, "put", key) from e
        with self._pending_lock:
            self._pending.add(path)
            crowded = len(self._pending) >= PENDING_LIMIT
        if crowded:
            self.sync()

    def sync(self) -> None:
        with self._pending_lock:
            paths, self._pending = self._pending, set()
            new_dirs, self._new_dirs = self._new_dirs, set()
        if not paths and not new_dirs:
            return
        try:
            if len(paths) > SYNC_EACH_LIMIT:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    _syncfs(fd)
                finally:
                    os.close(fd)
                return
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # deleted since: nothing to keep
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            # the directories holding them, and the parents of directories made since the
            # last sync (their entries are new too)
            dirs = {os.path.dirname(p) for p in paths}
            dirs.update(os.path.dirname(d) for d in new_dirs)
            for directory in dirs:
                self._fsync_dir(directory)
        except OSError as e:
            log.error("sync of %d objects in %s failed: %s", len(paths), self.describe(), e)
            raise ObjectStoreError(f"sync of {self.describe()} failed: {e.strerror or e}") from e

    def _made_dir(self, directory: str) -> None:
        """``directory`` (and maybe some of its ancestors) was just created: their entries
        in their parents are synced by the next ``sync`` too."""
        with self._pending_lock:
            d = directory
            while len(d) > len(self.root) and d not in self._new_dirs:
                self._new_dirs.add(d)
                d = os.path.dirname(d)

    def _open_tmp(self, directory: str, tmp: str) -> int:
        # A concurrent delete may remove the (then empty) directory between makedirs and open:
        # create it again and retry.
        for attempt in range(100):
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if attempt == 99:
                    raise
                try:
                    os.makedirs(directory, exist_ok=True)
                    self._made_dir(directory)
                except FileNotFoundError:
                    continue  # an ancestor was pruned while creating the path
                except FileExistsError as e:
                    try:
                        is_dir = stat.S_ISDIR(os.lstat(directory).st_mode)
                    except FileNotFoundError:
                        continue  # raced with a delete pruning it: try again
                    if is_dir:
                        continue
                    # an object is stored where a directory is needed
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from e
        raise AssertionError("unreachable")

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            return  # a prefix, not an object: nothing to delete
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                return
            raise self._error(e, "delete", key) from e
        self._prune_dirs(os.path.dirname(path))

    def _prune_dirs(self, directory: str) -> None:
        """Remove directories left empty by a delete, up to (not including) the root."""
        while directory != self.root and directory.startswith(self.root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty, already gone, or not ours to remove
            directory = os.path.dirname(directory)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except OSError as e:
            raise self._error(e, "head", key) from e
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"no such object: {key!r} in {self.describe()}")
        return ObjectInfo(key=key, size=st.st_size, mtime_ns=st.st_mtime_ns, etag=file_etag(st))

    # --- listing --------------------------------------------------------------------------

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        """Entries (objects and, with a delimiter, common prefixes) greater than
        ``start_after`` in key order. Paging with the last returned entry as ``start_after``
        never repeats a common prefix."""
        return self._list(prefix, start_after, delimiter, limit)

    def _list(
        self, prefix: str, start_after: str, delimiter: str, limit: int
    ) -> Iterator[ObjectInfo]:
        start = self._start_dir(prefix)
        parts = start.split("/")[:-1]
        if "\0" in prefix or any(p in ("", ".", "..") or p.startswith(TMP_PREFIX) for p in parts):
            return  # no valid key starts like this (and ".." must never leave the root)
        if delimiter == "/":
            entries = self._walk(start, prefix, start_after, fold=True)
        else:
            entries = self._fold(
                self._walk(start, prefix, start_after, fold=False),
                prefix,
                start_after,
                delimiter,
            )
        for count, info in enumerate(entries, 1):
            yield info
            if limit and count >= limit:
                return

    @staticmethod
    def _start_dir(prefix: str) -> str:
        """The deepest directory (as a key prefix ending in ``/``, or "") holding every key
        that starts with ``prefix``."""
        cut = prefix.rfind("/")
        return prefix[: cut + 1] if cut >= 0 else ""

    def _scan(self, rel: str) -> builtins.list[tuple[str, bool, os.DirEntry[str]]]:
        """Entries of directory ``rel`` as (key, is_dir, entry), sorted by key; a directory's
        key ends with ``/`` so it sorts where the keys inside it do."""
        path = os.path.join(self.root, rel) if rel else self.root
        try:
            with os.scandir(path) as it:
                raw = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise self._error(e, "list", rel) from e
        out = []
        for entry in raw:
            if entry.name.startswith(TMP_PREFIX):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            out.append((rel + entry.name + ("/" if is_dir else ""), is_dir, entry))
        out.sort(key=lambda t: t[0])
        return out

    def _walk(self, rel: str, prefix: str, start_after: str, fold: bool) -> Iterator[ObjectInfo]:
        for key, is_dir, entry in self._scan(rel):
            if is_dir:
                if key.startswith(prefix):
                    if fold:
                        # Every key below starts with ``key``, which ends at the first ``/``
                        # past the prefix: one common prefix, shown if something is inside.
                        if key > start_after and self._has_objects(key):
                            yield ObjectInfo(key=key, size=0, is_prefix=True)
                        continue
                elif not prefix.startswith(key):
                    continue
                # keys below are all <= start_after unless start_after points inside
                if key <= start_after and not start_after.startswith(key):
                    continue
                yield from self._walk(key, prefix, start_after, fold)
            else:
                if not key.startswith(prefix) or key <= start_after:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while listing
                except OSError as e:
                    raise self._error(e, "list", key) from e
                yield ObjectInfo(
                    key=key, size=st.st_size, mtime_ns=st.st_mtime_ns, etag=file_etag(st)
                )

    def _has_objects(self, rel: str) -> bool:
        return next(iter(self._walk(rel, rel, "", fold=False)), None) is not None

    @staticmethod
    def _fold(
        infos: Iterator[ObjectInfo], prefix: str, start_after: str, delimiter: str
    ) -> Iterator[ObjectInfo]:
        """Group keys sharing the part up to the first ``delimiter`` past ``prefix``. Keys of
        one group are adjacent in key order, so remembering the last group is enough."""
        last = None
        for info in infos:
            rest = info.key[len(prefix) :]
            i = rest.find(delimiter) if delimiter else -1
            if i < 0:
                yield info
                continue
            common = prefix + rest[: i + len(delimiter)]
            if common == last or common <= start_after:
                continue
            last = common
            yield ObjectInfo(key=common, size=0, is_prefix=True)
