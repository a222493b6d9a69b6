"""Request handlers of the low-level binding: libfuse calls them in its worker threads and each
one calls the blocking vfs directly (no hop to another thread) and answers the kernel.

Every callback answers its request exactly once: ``FSError`` becomes its errno, any other
exception a log line and EIO; nothing ever escapes into ctypes (that would print a traceback
and leave the caller waiting forever). ``forget`` and ``forget_multi`` answer nothing, as
libfuse requires. Blocking lock requests that meet a conflict are parked in ``LockWaiters``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from loftfs.chunk.reader import BlockSlice
from loftfs.errors import FSError, LoftError
from loftfs.fuse import ll_abi as abi
from loftfs.fuse.common import IO_SIZE, device_number, fill_statvfs
from loftfs.fuse.ll_locks import LockWaiters
from loftfs.fuse.ll_threads import ThreadStates
from loftfs.meta.types import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    LOCK_EOF,
    NOW,
    ROW_INODE,
    ROW_MTIME,
    ROW_NLINK,
    ROW_SIZE,
    ROW_TYPE,
    Attr,
    AttrRow,
    Ctx,
    FileType,
)
from loftfs.metrics import Metrics, is_failure
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import VFS

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20  # largest write request (256 pages; libfuse's own buffer limit)
MAX_BACKGROUND = 64  # kernel's async requests (readahead, async direct I/O) in flight
MAX_COPY = 1 << 30  # copy_file_range answers at most this many bytes per request
GROUPS_GUESS = 32
PAGES_AHEAD_MAX = 32 << 20  # listing pages packed ahead, all directory handles together
REPORTED_MAX = 200_000  # files whose reported attributes are remembered (half dropped beyond)
_NS = 1_000_000_000
_SUID_SGID = stat.S_ISUID | stat.S_ISGID
ROOT = Ctx()

WANT = (
    abi.CAP_ASYNC_READ
    | abi.CAP_POSIX_LOCKS
    | abi.CAP_FLOCK_LOCKS
    | abi.CAP_READDIRPLUS
    # attributes with the listing only where they are wanted: the first page, and the pages
    # after the application looked at entries (``ls -l``); a plain listing (``os.listdir``,
    # ``find``) gets plain pages, which hold four times the entries and cost no attributes
    | abi.CAP_READDIRPLUS_AUTO
    | abi.CAP_PARALLEL_DIROPS
    | abi.CAP_AUTO_INVAL_DATA
    | abi.CAP_ATOMIC_O_TRUNC  # the vfs truncates in open(): one request less per O_TRUNC
    | abi.CAP_ASYNC_DIO
)
UNWANTED = (
    abi.CAP_HANDLE_KILLPRIV  # the kernel clears setuid/setgid on write and truncate
    | abi.CAP_SPLICE_READ
    | abi.CAP_SPLICE_WRITE
    | abi.CAP_SPLICE_MOVE
    | abi.CAP_WRITEBACK_CACHE  # close-to-open needs every write to reach us
    | abi.CAP_POSIX_ACL
    | abi.CAP_EXPORT_SUPPORT
    | abi.CAP_DONT_MASK
)

_LOCK_TYPES = {fcntl.F_RDLCK: F_RDLCK, fcntl.F_WRLCK: F_WRLCK, fcntl.F_UNLCK: F_UNLCK}
_KERNEL_LOCK_TYPES = {v: k for k, v in _LOCK_TYPES.items()}
_FLOCK_TYPES = {abi.LOCK_SH: F_RDLCK, abi.LOCK_EX: F_WRLCK, abi.LOCK_UN: F_UNLCK}


def _ns(ts: abi.Timespec) -> int:
    return int(ts.tv_sec) * _NS + int(ts.tv_nsec)


def _set_ts(ts: abi.Timespec, ns: int) -> None:
    ts.tv_sec, ts.tv_nsec = divmod(ns, _NS)


# struct fuse_direntplus of the kernel protocol (fuse_kernel.h), packed here instead of one
# fuse_add_direntry_plus() call per entry: fuse_entry_out (nodeid, generation, entry_valid,
# attr_valid, entry_valid_nsec, attr_valid_nsec, fuse_attr: ino, size, blocks, atime, mtime,
# ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags), then
# fuse_dirent (ino, off, namelen, type) and the name, padded to 8 bytes.
_DIRENTPLUS = struct.Struct("=QQQQIIQQQqqqIIIIIIIIIIQQII")
_DIRENT = struct.Struct("=QQII")  # struct fuse_dirent: ino, off, namelen, type; then the name
_DIRENT_ALIGN = 8


def _timeout(t: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of a timeout, as libfuse converts them."""
    if t <= 0:
        return 0, 0
    sec = int(t)
    return sec, min(int((t - sec) * 1e9), 999_999_999)


_PADDING = [bytes(n) for n in range(_DIRENT_ALIGN)]
_IFMT_OF = {t: t.ifmt for t in FileType}
_DEVICES = frozenset((FileType.CHR, FileType.BLK))  # see device_number


def direntplus_page(
    entries: Iterable[tuple[bytes, AttrRow]],
    first_index: int,
    size: int,
    file_timeout: tuple[int, int],
    dir_timeout: tuple[int, int],
    attr_timeout: tuple[int, int],
    listed: list[AttrRow],
) -> bytes:
    """A READDIRPLUS reply of at most ``size`` bytes: the entries that fit, each with its
    attributes and its index (``first_index`` on) as the offset of the next one, byte for byte
    what fuse_add_direntry_plus writes. The rows of the entries packed are appended to
    ``listed`` (the kernel now holds their attributes). Runs once per entry of every listing:
    rows, not ``Attr`` objects, and everything it can hoisted out of the loop."""
    parts: list[bytes] = []
    add = parts.append
    pack = _DIRENTPLUS.pack
    head = _DIRENTPLUS.size
    ifmt = _IFMT_OF
    devices = _DEVICES
    directory = FileType.DIR
    f_s, f_ns = file_timeout
    d_s, d_ns = dir_timeout
    a_s, a_ns = attr_timeout
    pos = 0
    index = first_index
    for name, row in entries:
        length = len(name)
        padded = (head + length + _DIRENT_ALIGN - 1) & ~(_DIRENT_ALIGN - 1)
        pos += padded
        if pos > size:
            break
        ino, kind, mode, uid, gid, nlink, fsize, rdev, atime, mtime, ctime = row
        # nodeid 0: no attributes (an entry whose inode was removed while it was listed, see
        # Listing); the kernel lists the name and makes no dentry of it
        node = ino if nlink else 0
        mode = ifmt[kind] | (mode & 0o7777)
        at_s, at_ns = divmod(atime, _NS)
        mt_s, mt_ns = divmod(mtime, _NS)
        ct_s, ct_ns = divmod(ctime, _NS)
        if kind is directory:
            e_s, e_ns = d_s, d_ns
        else:
            e_s, e_ns = f_s, f_ns
        add(
            pack(
                node, 0, e_s, a_s, e_ns, a_ns,
                ino, fsize, (fsize + 511) >> 9, at_s, mt_s, ct_s, at_ns, mt_ns, ct_ns,
                mode, nlink, uid, gid, rdev if kind in devices else 0, IO_SIZE, 0,
                ino, index, length, mode >> 12,
            )
        )  # fmt: skip
        add(name)
        add(_PADDING[padded - head - length])
        listed.append(row)
        index += 1
    return b"".join(parts)


def dirent_page(
    entries: Iterable[tuple[bytes, AttrRow]],
    first_index: int,
    size: int,
    listed: list[AttrRow] | None = None,
) -> bytes:
    """A READDIR reply of at most ``size`` bytes: names, inodes and types of the entries that
    fit, byte for byte what fuse_add_direntry writes. The rows of the entries packed are
    appended to ``listed`` when given."""
    parts: list[bytes] = []
    add = parts.append
    pack = _DIRENT.pack
    head = _DIRENT.size
    ifmt = _IFMT_OF
    pos = 0
    for index, (name, row) in enumerate(entries, start=first_index):
        length = len(name)
        padded = (head + length + _DIRENT_ALIGN - 1) & ~(_DIRENT_ALIGN - 1)
        pos += padded
        if pos > size:
            break
        add(pack(row[ROW_INODE], index, length, ifmt[row[ROW_TYPE]] >> 12))
        add(name)
        add(_PADDING[padded - head - length])
        if listed is not None:
            listed.append(row)
    return b"".join(parts)


def fill_stat(st: abi.Stat, attr: Attr) -> None:
    st.st_ino = attr.inode
    st.st_mode = attr.st_mode
    st.st_nlink = attr.nlink
    st.st_uid = attr.uid
    st.st_gid = attr.gid
    st.st_rdev = device_number(attr)
    st.st_size = attr.size
    st.st_blksize = IO_SIZE
    st.st_blocks = (attr.size + 511) // 512
    _set_ts(st.st_atim, attr.atime_ns)
    _set_ts(st.st_mtim, attr.mtime_ns)
    _set_ts(st.st_ctim, attr.ctime_ns)


def lock_owner(fi: abi.FileInfo) -> int:
    """The kernel's 64-bit lock owner as a signed 64-bit integer (the metadata engines store
    owners in signed 64-bit columns; the mapping is one-to-one)."""
    owner = int(fi.lock_owner)
    return owner - (1 << 64) if owner >= 1 << 63 else owner


def lock_range(lk: abi.Flock) -> tuple[int, int]:
    """(start, inclusive end) of a ``struct flock`` as libfuse gives it (``l_whence`` is
    always SEEK_SET there; ``l_len`` 0 means "to end of file")."""
    start, length = int(lk.l_start), int(lk.l_len)
    if length == 0:
        end = LOCK_EOF
    elif length > 0:
        end = min(start + length - 1, LOCK_EOF)
    else:
        start, end = start + length, start - 1
    if start < 0 or end < start:
        raise FSError(errno.EINVAL)
    return start, end


class _NextPage:
    """A directory handle's next listing page, packed ahead (see ``_readdir``)."""

    __slots__ = ("key", "listed", "lock", "page", "reserved")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[int, int, bool] | None = None  # (offset, size, plus) it answers
        self.page = b""
        self.listed: list[AttrRow] = []
        self.reserved = 0  # bytes counted against PAGES_AHEAD_MAX


class LowLevelOperations:
    """The ``fuse_lowlevel_ops`` table over one ``VFS``.

    ``kernel_checks_permissions`` (the mount has ``default_permissions``) allows one thing: the
    kernel's request to clear setuid/setgid after a write or truncate by a non-owner is applied
    although that caller could not chmod the file itself (the kernel already decided it).
    """

    def __init__(
        self,
        lib: abi.FuseLib,
        vfs: VFS,
        opts: MountOptions,
        *,
        kernel_checks_permissions: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.lib = lib
        self.metrics = metrics  # times every request when set
        self.vfs = vfs
        self.opts = opts
        self.kernel_checks_permissions = kernel_checks_permissions
        self.threads = ThreadStates()
        self.locks = LockWaiters(self._reply_err, self._interrupted)
        self.conn: dict[str, int] = {}  # what init negotiated, for logs and tests
        # POSIX lock owners that may hold locks: (inode, owner), and by file handle
        self._posix_owners: set[tuple[int, int]] = set()
        self._owners_by_fh: dict[int, set[int]] = {}
        self._owners_lock = threading.Lock()
        # inode -> (size, mtime_ns) of regular files as last reported to the kernel
        self._reported: dict[int, tuple[int, int]] = {}
        self._dir_pages: dict[int, _NextPage] = {}  # by directory handle
        self._ahead_bytes = 0  # reserved by pages packed ahead
        self._ahead_lock = threading.Lock()
        self.session: int | None = None  # the fuse_session, set once it exists
        self.table = self._build_table()

    # --- plumbing --------------------------------------------------------------------------------

    def _build_table(self) -> abi.LowLevelOps:
        table = abi.LowLevelOps()
        table.init = abi.INIT(self._init_callback)
        table.destroy = abi.DESTROY(self._destroy_callback)
        # No forget/forget_multi: inodes live in the metadata engine, not in memory, so there
        # is nothing to forget, and without a handler libfuse answers in C (a cache drop
        # forgets every inode the kernel held: no call into Python for it).
        handlers: dict[str, Callable[..., None]] = {
            "lookup": self.lookup,
            "getattr": self.getattr,
            "setattr": self.setattr,
            "readlink": self.readlink,
            "mknod": self.mknod,
            "mkdir": self.mkdir,
            "unlink": self.unlink,
            "rmdir": self.rmdir,
            "symlink": self.symlink,
            "rename": self.rename,
            "link": self.link,
            "open": self.open,
            "read": self.read,
            "write": self.write,
            "flush": self.flush,
            "release": self.release,
            "fsync": self.fsync,
            "opendir": self.opendir,
            "readdir": self.readdir,
            "readdirplus": self.readdirplus,
            "releasedir": self.releasedir,
            "fsyncdir": self.fsyncdir,
            "statfs": self.statfs,
            "setxattr": self.setxattr,
            "getxattr": self.getxattr,
            "listxattr": self.listxattr,
            "removexattr": self.removexattr,
            "access": self.access,
            "create": self.create,
            "getlk": self.getlk,
            "setlk": self.setlk,
            "flock": self.flock,
            "fallocate": self.fallocate,
            "copy_file_range": self.copy_file_range,
            "lseek": self.lseek,
        }
        fields: dict[str, Any] = {f[0]: f[1] for f in abi.LowLevelOps._fields_}
        for name, handler in handlers.items():
            setattr(table, name, fields[name](self._guard(name, handler)))
        # ctypes keeps the callback objects alive through the structure's _objects.
        return table

    def _guard(self, name: str, handler: Callable[..., None]) -> Callable[..., None]:
        pin = self.threads.pin
        fail = self._fail
        if self.metrics is None:

            def callback(req: int, *args: Any) -> None:
                try:
                    pin()
                    handler(req, *args)
                except BaseException as e:
                    fail(req, name, e)

        else:
            observe = self.metrics.op_observer(name)
            clock = time.perf_counter

            def callback(req: int, *args: Any) -> None:
                start = clock()
                failed = False
                try:
                    pin()
                    handler(req, *args)
                except BaseException as e:
                    failed = is_failure(e)
                    fail(req, name, e)
                try:
                    observe(clock() - start, failed)
                except BaseException:  # nothing may escape into ctypes
                    pass

        callback.__name__ = f"fuse_{name}"
        return callback

    def _fail(self, req: int, name: str, exc: BaseException) -> None:
        try:
            if isinstance(exc, FSError):
                err = exc.errno or errno.EIO
            elif isinstance(exc, LoftError):
                log.error("%s failed: %s", name, exc)
                err = errno.EIO
            else:
                log.error("unexpected error in %s", name, exc_info=exc)
                err = errno.EIO
            self.lib.fuse_reply_err(req, err)
        except BaseException:  # nothing may escape into ctypes; the request is lost either way
            try:
                self.lib.fuse_reply_err(req, errno.EIO)
            except BaseException:
                pass

    def _reply_err(self, req: int, err: int) -> None:
        try:
            self.lib.fuse_reply_err(req, err)
        except BaseException:
            log.exception("answering a request failed")

    def _interrupted(self, req: int) -> bool:
        return bool(self.lib.fuse_req_interrupted(req))

    def _ctx(self, req: int) -> Ctx:
        c = self.lib.fuse_req_ctx(req).contents
        uid = int(c.uid)
        gids: tuple[int, ...] = ()
        if uid != 0:
            buf = (abi.gid_t * GROUPS_GUESS)()
            n = self.lib.fuse_req_getgroups(req, GROUPS_GUESS, buf)
            if n > GROUPS_GUESS:
                buf = (abi.gid_t * n)()
                n = min(n, self.lib.fuse_req_getgroups(req, n, buf))
            if n > 0:
                gids = tuple(buf[:n])
        return Ctx(uid=uid, gid=int(c.gid), gids=gids, pid=int(c.pid), umask=int(c.umask))

    def _remember_reported(self, attr: Attr) -> None:
        """Note the (size, mtime) the kernel now caches for a regular file."""
        if attr.type == FileType.FILE:
            self._make_room(1)
            self._reported[attr.inode] = (attr.size, attr.mtime_ns)

    def _make_room(self, n: int) -> None:
        reported = self._reported
        if len(reported) + n > REPORTED_MAX:
            for key in list(itertools.islice(reported, max(n, REPORTED_MAX // 2))):
                reported.pop(key, None)

    def _entry(self, attr: Attr, age: float = 0.0) -> abi.EntryParam:
        """The reply to a lookup; ``age``: how long ago ``attr`` was read (an answer from the
        vfs's cache), taken off the timeouts."""
        self._remember_reported(attr)
        e = abi.EntryParam()
        e.ino = attr.inode
        fill_stat(e.attr, attr)
        opts = self.opts
        e.attr_timeout = max(0.0, opts.attr_timeout - age)
        ttl = opts.dir_entry_timeout if attr.type == FileType.DIR else opts.entry_timeout
        e.entry_timeout = max(0.0, ttl - age)
        return e

    def _reply_entry(self, req: int, attr: Attr, age: float = 0.0) -> None:
        self.lib.fuse_reply_entry(req, ctypes.byref(self._entry(attr, age)))

    def _reply_attr(self, req: int, attr: Attr, age: float = 0.0) -> None:
        self._remember_reported(attr)
        st = abi.Stat()
        fill_stat(st, attr)
        self.lib.fuse_reply_attr(req, ctypes.byref(st), max(0.0, self.opts.attr_timeout - age))

    def _invalidate_attrs(self, attr: Attr) -> None:
        """Close-to-open: the file changed since the kernel cached its attributes (another
        client wrote it). Opening does not refresh them and a stale size would cut reads
        short, so drop them: the next read or stat fetches fresh ones. Attributes only, so
        this cannot wait on page locks (it is safe inside the open request)."""
        se = self.session
        if se is not None:
            self.lib.fuse_lowlevel_notify_inval_inode(se, attr.inode, -1, 0)
        self._remember_reported(attr)

    def store_in_kernel(self, inode: int, data: bytes) -> bool:
        """Put ``data`` into the kernel's page cache of ``inode`` from offset 0
        (``VFS.kernel_store`` while the session exists); True when the kernel took all of it.
        The kernel copies the bytes before this returns."""
        se = self.session
        if se is None:
            return False
        vec = abi.FuseBufVec(count=1)
        vec.buf[0].size = len(data)
        vec.buf[0].mem = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)
        rc = self.lib.fuse_lowlevel_notify_store(se, inode, 0, ctypes.byref(vec), 0)
        if rc != 0:
            log.debug("inode %d: storing %d bytes in the kernel's cache: %s", inode, len(data), rc)
        return rc == 0

    def _ok(self, req: int) -> None:
        self.lib.fuse_reply_err(req, 0)

    def _note_posix_owner(self, inode: int, fh: int, owner: int) -> None:
        with self._owners_lock:
            self._posix_owners.add((inode, owner))
            self._owners_by_fh.setdefault(fh, set()).add(owner)

    def _drop_posix_locks(self, inode: int, fh: int, owners: list[int]) -> None:
        for owner in owners:
            self.locks.cancel(("posix", inode, owner))
            try:
                self.vfs.setlk(ROOT, fh, owner, False, F_UNLCK, 0, LOCK_EOF, 0)
            except FSError as e:
                log.warning("inode %d: dropping POSIX locks at close failed: %s", inode, e)

    def shutdown(self) -> None:
        """Answer the parked lock requests (before the session goes away)."""
        self.locks.stop()

    # --- lifecycle -------------------------------------------------------------------------------

    def _init_callback(self, userdata: int, conn_ptr: Any) -> None:
        try:
            self.threads.pin()
            c = conn_ptr.contents
            want = (int(c.want) | WANT) & ~UNWANTED & int(c.capable)
            c.want = want
            c.max_write = min(int(c.max_write), MAX_WRITE)
            c.max_background = MAX_BACKGROUND
            c.congestion_threshold = MAX_BACKGROUND * 3 // 4
            c.time_gran = 1
            self.conn = {
                "proto_major": int(c.proto_major),
                "proto_minor": int(c.proto_minor),
                "capable": int(c.capable),
                "want": want,
                "max_write": int(c.max_write),
                "max_readahead": int(c.max_readahead),
            }
            missing = WANT & ~want
            log.info(
                "FUSE protocol %d.%d, max_write %d, max_readahead %d%s",
                c.proto_major,
                c.proto_minor,
                c.max_write,
                c.max_readahead,
                f", kernel lacks capabilities 0x{missing:x}" if missing else "",
            )
        except BaseException:
            log.exception("FUSE init failed")

    def _destroy_callback(self, userdata: int) -> None:
        return None  # unmount work (committing buffered data) is done by the mount's owner

    # --- attributes ------------------------------------------------------------------------------

    def lookup(self, req: int, parent: int, name: bytes) -> None:
        self._reply_entry(req, *self.vfs.lookup_aged(self._ctx(req), parent, name))

    def getattr(self, req: int, ino: int, fi: Any) -> None:
        self._reply_attr(req, *self.vfs.getattr_aged(ino))

    def setattr(self, req: int, ino: int, st_ptr: Any, to_set: int, fi: Any) -> None:
        ctx = self._ctx(req)
        st = st_ptr.contents
        fh = fi.contents.fh if fi else None
        kw: dict[str, int] = {}
        if to_set & abi.SET_ATTR_MODE:
            kw["mode"] = stat.S_IMODE(st.st_mode)
        if to_set & abi.SET_ATTR_UID:
            kw["uid"] = int(st.st_uid)
        if to_set & abi.SET_ATTR_GID:
            kw["gid"] = int(st.st_gid)
        if to_set & abi.SET_ATTR_SIZE:
            kw["size"] = int(st.st_size)
        if to_set & abi.SET_ATTR_ATIME:
            kw["atime_ns"] = NOW if to_set & abi.SET_ATTR_ATIME_NOW else _ns(st.st_atim)
        if to_set & abi.SET_ATTR_MTIME:
            kw["mtime_ns"] = NOW if to_set & abi.SET_ATTR_MTIME_NOW else _ns(st.st_mtim)
        if to_set & abi.SET_ATTR_CTIME:
            kw["ctime_ns"] = _ns(st.st_ctim)
        if "mode" in kw and ctx.uid != 0 and self.kernel_checks_permissions:
            current = self.vfs.getattr(ino)
            cleared = current.mode & ~kw["mode"]
            if (
                current.uid != ctx.uid
                and cleared
                and not cleared & ~_SUID_SGID
                and not kw["mode"] & ~current.mode
            ):
                # The kernel clearing setuid/setgid after a write or truncate by a non-owner
                # (it checked the caller already; the caller could not chmod by itself).
                attr = self.vfs.setattr(ROOT, ino, fh, mode=kw.pop("mode"))
                if not kw:
                    self._reply_attr(req, attr)
                    return
        self._reply_attr(req, self.vfs.setattr(ctx, ino, fh, **kw))

    def access(self, req: int, ino: int, mask: int) -> None:
        self.vfs.access(self._ctx(req), ino, mask)
        self._ok(req)

    def statfs(self, req: int, ino: int) -> None:
        s = fill_statvfs(abi.StatVFS(), self.vfs.statfs(self._ctx(req)))
        self.lib.fuse_reply_statfs(req, ctypes.byref(s))

    # --- namespace -------------------------------------------------------------------------------

    def mknod(self, req: int, parent: int, name: bytes, mode: int, rdev: int) -> None:
        attr = self.vfs.mknod(
            self._ctx(req), parent, name, FileType.from_mode(mode), stat.S_IMODE(mode), rdev
        )
        self._reply_entry(req, attr)

    def mkdir(self, req: int, parent: int, name: bytes, mode: int) -> None:
        self._reply_entry(req, self.vfs.mkdir(self._ctx(req), parent, name, stat.S_IMODE(mode)))

    def symlink(self, req: int, target: bytes, parent: int, name: bytes) -> None:
        self._reply_entry(req, self.vfs.symlink(self._ctx(req), parent, name, target))

    def readlink(self, req: int, ino: int) -> None:
        self.lib.fuse_reply_readlink(req, self.vfs.readlink(self._ctx(req), ino))

    def link(self, req: int, ino: int, new_parent: int, new_name: bytes) -> None:
        self._reply_entry(req, self.vfs.link(self._ctx(req), ino, new_parent, new_name))

    def unlink(self, req: int, parent: int, name: bytes) -> None:
        self.vfs.unlink(self._ctx(req), parent, name)
        self._ok(req)

    def rmdir(self, req: int, parent: int, name: bytes) -> None:
        self.vfs.rmdir(self._ctx(req), parent, name)
        self._ok(req)

    def rename(
        self, req: int, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self.vfs.rename(self._ctx(req), parent, name, new_parent, new_name, flags)
        self._ok(req)

    # --- files -----------------------------------------------------------------------------------

    def open(self, req: int, ino: int, fi_ptr: Any) -> None:
        fi = fi_ptr.contents
        fh, keep, attr = self.vfs.open(self._ctx(req), ino, fi.flags)
        if self._reported.get(ino) != (attr.size, attr.mtime_ns):
            self._invalidate_attrs(attr)
        fi.fh = fh
        fi.bits = (fi.bits & ~(abi.FI_DIRECT_IO | abi.FI_KEEP_CACHE)) | (
            abi.FI_KEEP_CACHE if keep else 0
        )
        if self.lib.fuse_reply_open(req, fi_ptr) == -errno.ENOENT:
            self.vfs.release(fh)  # the caller was interrupted: nobody will close this handle

    def create(self, req: int, parent: int, name: bytes, mode: int, fi_ptr: Any) -> None:
        fi = fi_ptr.contents
        fh, attr = self.vfs.create(self._ctx(req), parent, name, stat.S_IMODE(mode), fi.flags)
        fi.fh = fh
        fi.bits &= ~(abi.FI_DIRECT_IO | abi.FI_KEEP_CACHE)
        e = self._entry(attr)
        if self.lib.fuse_reply_create(req, ctypes.byref(e), fi_ptr) == -errno.ENOENT:
            self.vfs.release(fh)

    def read(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        data = self.vfs.read_span(fi.contents.fh, off, size)
        if isinstance(data, BlockSlice):
            # The reply copies straight from the cached block: no intermediate bytes object.
            base = ctypes.cast(ctypes.c_char_p(data.block), ctypes.c_void_p).value or 0
            self.lib.fuse_reply_buf(req, base + data.start, data.end - data.start)
            return
        self.lib.fuse_reply_buf(req, data, len(data))

    def write(self, req: int, ino: int, buf: int, size: int, off: int, fi: Any) -> None:
        # The buffer is libfuse's and is reused after we return: the vfs copies from this view
        # into its own buffers before returning (one copy instead of two).
        view = memoryview((ctypes.c_char * size).from_address(buf)).cast("B")
        n = self.vfs.write(fi.contents.fh, off, view)
        self.lib.fuse_reply_write(req, n)

    def flush(self, req: int, ino: int, fi_ptr: Any) -> None:
        fi = fi_ptr.contents
        key = (ino, lock_owner(fi))
        with self._owners_lock:
            had_locks = key in self._posix_owners
            self._posix_owners.discard(key)
        if had_locks:
            # close() drops every POSIX lock its process holds on the file (the kernel leaves
            # that to us when the file system handles locks).
            self._drop_posix_locks(ino, fi.fh, [key[1]])
        attr = self.vfs.flush(fi.fh)
        if attr is not None:
            # The kernel holds the size this handle wrote, and dropped the times it changed
            # (FUSE invalidates them on write): these attributes are no news to it, and the
            # next open need not drop its cache of them (``open``, close-to-open).
            self._remember_reported(attr)
        self._ok(req)

    def release(self, req: int, ino: int, fi_ptr: Any) -> None:
        fi = fi_ptr.contents
        with self._owners_lock:
            owners = [
                owner
                for owner in self._owners_by_fh.pop(fi.fh, ())
                if (ino, owner) in self._posix_owners
            ]
            self._posix_owners.difference_update((ino, owner) for owner in owners)
        if owners:
            # Open file description locks (F_OFD_SETLK) are owned by the description and end
            # with its last close, which only this release tells; a flush never names them.
            self._drop_posix_locks(ino, fi.fh, owners)
        if fi.bits & abi.FI_FLOCK_RELEASE:
            try:
                self.vfs.flock(ROOT, fi.fh, lock_owner(fi), F_UNLCK, False)
            except FSError as e:
                log.warning("inode %d: dropping the flock at close failed: %s", ino, e)
        self.vfs.release(fi.fh)
        self._ok(req)

    def fsync(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        self.vfs.fsync(fi.contents.fh, bool(datasync))
        self._ok(req)

    def fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        self.vfs.fallocate(self._ctx(req), fi.contents.fh, mode, offset, length)
        self._ok(req)

    def copy_file_range(
        self,
        req: int,
        ino_in: int,
        off_in: int,
        fi_in: Any,
        ino_out: int,
        off_out: int,
        fi_out: Any,
        length: int,
        flags: int,
    ) -> None:
        if flags:
            raise FSError(errno.EINVAL)
        n = self.vfs.copy_file_range(
            self._ctx(req),
            fi_in.contents.fh,
            off_in,
            fi_out.contents.fh,
            off_out,
            min(length, MAX_COPY),
        )
        self.lib.fuse_reply_write(req, n)

    def lseek(self, req: int, ino: int, off: int, whence: int, fi: Any) -> None:
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other kinds): the whole file reads as
        data, holes included, which POSIX allows."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FSError(errno.EINVAL)
        size = self.vfs.getattr(ino).size
        if off < 0 or off >= size:
            raise FSError(errno.ENXIO)
        self.lib.fuse_reply_lseek(req, off if whence == os.SEEK_DATA else size)

    # --- locks -----------------------------------------------------------------------------------

    def getlk(self, req: int, ino: int, fi_ptr: Any, lock: Any) -> None:
        fi, lk = fi_ptr.contents, lock.contents
        ltype = _LOCK_TYPES.get(int(lk.l_type))
        if ltype is None or ltype == F_UNLCK:
            raise FSError(errno.EINVAL)
        start, end = lock_range(lk)
        found, fstart, fend, pid = self.vfs.getlk(
            self._ctx(req), fi.fh, lock_owner(fi), ltype, start, end
        )
        out = abi.Flock()
        out.l_type = _KERNEL_LOCK_TYPES[found]
        out.l_whence = os.SEEK_SET
        if found != F_UNLCK:
            out.l_start = fstart
            out.l_len = 0 if fend >= LOCK_EOF else fend - fstart + 1
            out.l_pid = pid
        self.lib.fuse_reply_lock(req, ctypes.byref(out))

    def setlk(self, req: int, ino: int, fi_ptr: Any, lock: Any, sleep: int) -> None:
        fi, lk = fi_ptr.contents, lock.contents
        ltype = _LOCK_TYPES.get(int(lk.l_type))
        if ltype is None:
            raise FSError(errno.EINVAL)
        start, end = lock_range(lk)
        ctx, fh, owner, pid = self._ctx(req), int(fi.fh), lock_owner(fi), int(lk.l_pid)

        def attempt() -> None:
            if ltype != F_UNLCK:
                self._note_posix_owner(ino, fh, owner)  # first: a racing close then unlocks
            self.vfs.setlk(ctx, fh, owner, False, ltype, start, end, pid)

        self._lock_or_park(req, ("posix", ino, owner), attempt, bool(sleep) and ltype != F_UNLCK)

    def flock(self, req: int, ino: int, fi_ptr: Any, op: int) -> None:
        fi = fi_ptr.contents
        ltype = _FLOCK_TYPES.get(op & (abi.LOCK_SH | abi.LOCK_EX | abi.LOCK_UN))
        if ltype is None:
            raise FSError(errno.EINVAL)
        ctx, fh, owner = self._ctx(req), int(fi.fh), lock_owner(fi)

        def attempt() -> None:
            self.vfs.flock(ctx, fh, owner, ltype, False)

        block = not op & abi.LOCK_NB and ltype != F_UNLCK
        self._lock_or_park(req, ("flock", ino, owner), attempt, block)

    def _lock_or_park(
        self, req: int, key: tuple[str, int, int], attempt: Callable[[], None], block: bool
    ) -> None:
        try:
            attempt()
        except FSError as e:
            if e.errno == errno.EAGAIN and block:
                self.locks.park(req, key, attempt)
                return
            raise
        self._ok(req)

    # --- directories -----------------------------------------------------------------------------

    def opendir(self, req: int, ino: int, fi_ptr: Any) -> None:
        fh = self.vfs.opendir(self._ctx(req), ino)
        fi_ptr.contents.fh = fh
        self._dir_pages[fh] = _NextPage()
        if self.lib.fuse_reply_open(req, fi_ptr) == -errno.ENOENT:
            self._dir_pages.pop(fh, None)
            self.vfs.releasedir(fh)

    def readdir(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        self._readdir(req, size, off, int(fi.contents.fh), plus=False)

    def readdirplus(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        self._readdir(req, size, off, int(fi.contents.fh), plus=True)

    def _readdir(self, req: int, size: int, off: int, fh: int, *, plus: bool) -> None:
        """Answer one page, then pack the page the kernel will most likely ask for next (same
        size, the following offset) while the kernel and the application digest this one: on
        more than one core a large listing then costs the packing or the kernel's work per
        page, not both."""
        nxt = self._dir_pages.get(fh)
        if nxt is None:  # not opened through opendir here: nothing to keep
            self._send_page(req, *self._dir_page(fh, off, size, plus), plus)
            return
        # The kernel sends one listing request of a handle at a time; the lock orders this
        # request after the packing the previous one started.
        with nxt.lock:
            if nxt.key == (off, size, plus):
                page, listed = nxt.page, nxt.listed
            else:
                page, listed = self._dir_page(fh, off, size, plus)
            self._drop_ahead(nxt)
            self._send_page(req, page, listed, plus)
            if listed and self._reserve_ahead(nxt, size):
                following = off + len(listed)
                try:
                    nxt.page, nxt.listed = self._dir_page(fh, following, size, plus)
                except Exception:  # this request is answered: an error is the next one's
                    self._drop_ahead(nxt)
                    return
                nxt.key = (following, size, plus)

    def _reserve_ahead(self, nxt: _NextPage, size: int) -> bool:
        """Room for a page packed ahead: ``PAGES_AHEAD_MAX`` bounds them all (a program may
        hold many directories open after reading a page of each)."""
        with self._ahead_lock:
            if self._ahead_bytes + size > PAGES_AHEAD_MAX:
                return False
            self._ahead_bytes += size
        nxt.reserved = size
        return True

    def _drop_ahead(self, nxt: _NextPage) -> None:
        nxt.key = None
        nxt.page, nxt.listed = b"", []
        if nxt.reserved:
            with self._ahead_lock:
                self._ahead_bytes -= nxt.reserved
            nxt.reserved = 0

    def _send_page(self, req: int, page: bytes, listed: list[AttrRow], plus: bool) -> None:
        self.lib.fuse_reply_buf(req, page, len(page))
        if plus:  # the kernel now holds these attributes
            regular = FileType.FILE
            self._make_room(len(listed))
            self._reported.update(
                (r[ROW_INODE], (r[ROW_SIZE], r[ROW_MTIME]))
                for r in listed
                if r[ROW_TYPE] is regular and r[ROW_NLINK]
            )

    def _dir_page(self, fh: int, off: int, size: int, plus: bool) -> tuple[bytes, list[AttrRow]]:
        """One READDIR(PLUS) reply from entry ``off`` on, and the attributes of its entries."""
        # Permission to list was checked at opendir, as on a local file system.
        entries = self.vfs.readdir(ROOT, fh, off, sizes=plus)
        listed: list[AttrRow] = []
        if plus:
            page = direntplus_page(
                entries,
                off + 1,
                size,
                _timeout(self.opts.entry_timeout),
                _timeout(self.opts.dir_entry_timeout),
                _timeout(self.opts.attr_timeout),
                listed,
            )
        else:
            page = dirent_page(entries, off + 1, size, listed)
        return page, listed

    def releasedir(self, req: int, ino: int, fi: Any) -> None:
        fh = int(fi.contents.fh)
        nxt = self._dir_pages.pop(fh, None)
        if nxt is not None:
            with nxt.lock:
                self._drop_ahead(nxt)
        self.vfs.releasedir(fh)
        self._ok(req)

    def fsyncdir(self, req: int, ino: int, datasync: int, fi: Any) -> None:
        self._ok(req)  # every namespace change is committed when it returns

    # --- extended attributes ---------------------------------------------------------------------

    def _xattrs_enabled(self) -> None:
        if not self.opts.enable_xattr:
            raise FSError(errno.ENOSYS)  # the kernel stops asking after the first ENOSYS

    def setxattr(self, req: int, ino: int, name: bytes, value: int, size: int, flags: int) -> None:
        self._xattrs_enabled()
        data = ctypes.string_at(value, size) if size else b""
        self.vfs.setxattr(self._ctx(req), ino, name, data, flags)
        self._ok(req)

    def _reply_sized(self, req: int, data: bytes, size: int) -> None:
        """getxattr/listxattr: size 0 asks for the length only; too small a buffer is ERANGE."""
        if size == 0:
            self.lib.fuse_reply_xattr(req, len(data))
        elif len(data) > size:
            raise FSError(errno.ERANGE)
        else:
            self.lib.fuse_reply_buf(req, data, len(data))

    def getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        self._xattrs_enabled()
        self._reply_sized(req, self.vfs.getxattr(self._ctx(req), ino, name), size)

    def listxattr(self, req: int, ino: int, size: int) -> None:
        self._xattrs_enabled()
        names = self.vfs.listxattr(self._ctx(req), ino)
        self._reply_sized(req, b"".join(n + b"\0" for n in names), size)

    def removexattr(self, req: int, ino: int, name: bytes) -> None:
        self._xattrs_enabled()
        self.vfs.removexattr(self._ctx(req), ino, name)
        self._ok(req)
