"""ctypes declarations of libfuse3's low-level API (``fuse_lowlevel.h``, ``fuse_common.h``).

Struct layouts follow the C headers of libfuse 3.x on 64-bit Linux (x86_64, and the generic
layout of aarch64/riscv64). libfuse allocates ``fuse_file_info`` and ``fuse_conn_info`` itself
and hands us pointers, so only the leading fields we read or write are declared for them; the
fields of ``fuse_file_info`` we use kept their offsets from 3.0 to 3.17.

``FuseLib.load()`` opens ``libfuse3.so.3`` and picks the multi-threaded loop the installed
library exports: ``fuse_session_loop_mt_312`` (3.12+, a config object with ``max_threads``),
``fuse_session_loop_mt_32`` (3.2 to 3.11) or ``fuse_session_loop_mt_31`` / the 3.0 symbol.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_int,
    c_int16,
    c_int32,
    c_int64,
    c_long,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
)
from typing import Any

from loftfs.errors import ConfigError

LIBRARY = "libfuse3.so.3"

fuse_ino_t = c_uint64
off_t = c_int64
mode_t = c_uint32
dev_t = c_uint64
gid_t = c_uint32

# fuse_common.h: fuse_conn_info.capable / want
CAP_ASYNC_READ = 1 << 0
CAP_POSIX_LOCKS = 1 << 1
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_EXPORT_SUPPORT = 1 << 4
CAP_DONT_MASK = 1 << 6
CAP_SPLICE_WRITE = 1 << 7
CAP_SPLICE_MOVE = 1 << 8
CAP_SPLICE_READ = 1 << 9
CAP_FLOCK_LOCKS = 1 << 10
CAP_IOCTL_DIR = 1 << 11
CAP_AUTO_INVAL_DATA = 1 << 12
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_ASYNC_DIO = 1 << 15
CAP_WRITEBACK_CACHE = 1 << 16
CAP_NO_OPEN_SUPPORT = 1 << 17
CAP_PARALLEL_DIROPS = 1 << 18
CAP_POSIX_ACL = 1 << 19
CAP_HANDLE_KILLPRIV = 1 << 20

# fuse_lowlevel.h: setattr's to_set
SET_ATTR_MODE = 1 << 0
SET_ATTR_UID = 1 << 1
SET_ATTR_GID = 1 << 2
SET_ATTR_SIZE = 1 << 3
SET_ATTR_ATIME = 1 << 4
SET_ATTR_MTIME = 1 << 5
SET_ATTR_ATIME_NOW = 1 << 7
SET_ATTR_MTIME_NOW = 1 << 8
SET_ATTR_CTIME = 1 << 10

# fuse_file_info: the bitfield word after ``flags`` (GCC packs bitfields from the lowest bit)
FI_WRITEPAGE = 1 << 0
FI_DIRECT_IO = 1 << 1
FI_KEEP_CACHE = 1 << 2
FI_FLUSH = 1 << 3
FI_NONSEEKABLE = 1 << 4
FI_FLOCK_RELEASE = 1 << 5
FI_CACHE_READDIR = 1 << 6
FI_NOFLUSH = 1 << 7

# flock(2) operations as libfuse passes them to the flock handler
LOCK_SH = 1
LOCK_EX = 2
LOCK_NB = 4
LOCK_UN = 8


class Timespec(Structure):
    _fields_ = [("tv_sec", c_long), ("tv_nsec", c_long)]


def _stat_fields() -> list[tuple[str, Any]] | None:
    machine = platform.machine().lower()
    times = [("st_atim", Timespec), ("st_mtim", Timespec), ("st_ctim", Timespec)]
    if machine in ("x86_64", "amd64"):
        return [
            ("st_dev", c_uint64),
            ("st_ino", c_uint64),
            ("st_nlink", c_uint64),
            ("st_mode", c_uint32),
            ("st_uid", c_uint32),
            ("st_gid", c_uint32),
            ("_pad0", c_int32),
            ("st_rdev", c_uint64),
            ("st_size", c_int64),
            ("st_blksize", c_int64),
            ("st_blocks", c_int64),
            *times,
            ("_reserved", c_int64 * 3),
        ]
    if machine in ("aarch64", "arm64", "riscv64", "loongarch64"):  # asm-generic/stat.h
        return [
            ("st_dev", c_uint64),
            ("st_ino", c_uint64),
            ("st_mode", c_uint32),
            ("st_nlink", c_uint32),
            ("st_uid", c_uint32),
            ("st_gid", c_uint32),
            ("st_rdev", c_uint64),
            ("_pad1", c_uint64),
            ("st_size", c_int64),
            ("st_blksize", c_int32),
            ("_pad2", c_int32),
            ("st_blocks", c_int64),
            *times,
            ("_unused", c_int32 * 2),
        ]
    return None


_STAT_FIELDS = _stat_fields()


class Stat(Structure):
    """``struct stat`` of the running architecture."""

    _fields_ = _STAT_FIELDS or [("_unsupported", c_uint64)]


class StatVFS(Structure):
    _fields_ = [
        ("f_bsize", c_ulong),
        ("f_frsize", c_ulong),
        ("f_blocks", c_uint64),
        ("f_bfree", c_uint64),
        ("f_bavail", c_uint64),
        ("f_files", c_uint64),
        ("f_ffree", c_uint64),
        ("f_favail", c_uint64),
        ("f_fsid", c_ulong),
        ("f_flag", c_ulong),
        ("f_namemax", c_ulong),
        ("_spare", c_int * 6),
    ]


class Flock(Structure):
    _fields_ = [
        ("l_type", c_int16),
        ("l_whence", c_int16),
        ("l_start", off_t),
        ("l_len", off_t),
        ("l_pid", c_int32),
    ]


class FileInfo(Structure):
    """The leading fields of ``struct fuse_file_info`` (libfuse allocates it)."""

    _fields_ = [
        ("flags", c_int32),
        ("bits", c_uint32),  # writepage, direct_io, keep_cache, ... (FI_* masks)
        ("_padding", c_uint32 * 2),
        ("fh", c_uint64),
        ("lock_owner", c_uint64),
        ("poll_events", c_uint32),
    ]


class ConnInfo(Structure):
    """The leading fields of ``struct fuse_conn_info`` (libfuse allocates it)."""

    _fields_ = [
        ("proto_major", c_uint32),
        ("proto_minor", c_uint32),
        ("max_write", c_uint32),
        ("max_read", c_uint32),
        ("max_readahead", c_uint32),
        ("capable", c_uint32),
        ("want", c_uint32),
        ("max_background", c_uint32),
        ("congestion_threshold", c_uint32),
        ("time_gran", c_uint32),
    ]


class EntryParam(Structure):
    _fields_ = [
        ("ino", fuse_ino_t),
        ("generation", c_uint64),
        ("attr", Stat),
        ("attr_timeout", c_double),
        ("entry_timeout", c_double),
    ]


class FuseCtx(Structure):
    _fields_ = [("uid", c_uint32), ("gid", c_uint32), ("pid", c_int32), ("umask", c_uint32)]


class ForgetData(Structure):
    _fields_ = [("ino", fuse_ino_t), ("nlookup", c_uint64)]


class FuseBuf(Structure):
    """``struct fuse_buf``: one buffer in memory (``flags`` 0) for ``FuseBufVec``."""

    _fields_ = [
        ("size", c_size_t),
        ("flags", c_int),
        ("mem", c_void_p),
        ("fd", c_int),
        ("pos", off_t),
    ]


class FuseBufVec(Structure):
    """``struct fuse_bufvec`` with a single buffer (``fuse_lowlevel_notify_store``)."""

    _fields_ = [("count", c_size_t), ("idx", c_size_t), ("off", c_size_t), ("buf", FuseBuf * 1)]


class FuseArgs(Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


class LoopConfigV1(Structure):
    """``struct fuse_loop_config`` of libfuse 3.2 to 3.11."""

    _fields_ = [("clone_fd", c_int), ("max_idle_threads", c_uint)]


req_t = c_void_p
FI = POINTER(FileInfo)

INIT = CFUNCTYPE(None, c_void_p, POINTER(ConnInfo))
DESTROY = CFUNCTYPE(None, c_void_p)
LOOKUP = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p)
FORGET = CFUNCTYPE(None, req_t, fuse_ino_t, c_uint64)
GETATTR = CFUNCTYPE(None, req_t, fuse_ino_t, FI)
SETATTR = CFUNCTYPE(None, req_t, fuse_ino_t, POINTER(Stat), c_int, FI)
READLINK = CFUNCTYPE(None, req_t, fuse_ino_t)
MKNOD = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, mode_t, dev_t)
MKDIR = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, mode_t)
UNLINK = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p)
SYMLINK = CFUNCTYPE(None, req_t, c_char_p, fuse_ino_t, c_char_p)
RENAME = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, fuse_ino_t, c_char_p, c_uint)
LINK = CFUNCTYPE(None, req_t, fuse_ino_t, fuse_ino_t, c_char_p)
WITH_FI = CFUNCTYPE(None, req_t, fuse_ino_t, FI)  # open, flush, release, opendir, releasedir
READ = CFUNCTYPE(None, req_t, fuse_ino_t, c_size_t, off_t, FI)  # read, readdir, readdirplus
WRITE = CFUNCTYPE(None, req_t, fuse_ino_t, c_void_p, c_size_t, off_t, FI)
FSYNC = CFUNCTYPE(None, req_t, fuse_ino_t, c_int, FI)  # fsync, fsyncdir
STATFS = CFUNCTYPE(None, req_t, fuse_ino_t)
SETXATTR = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, c_void_p, c_size_t, c_int)
GETXATTR = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, c_size_t)
LISTXATTR = CFUNCTYPE(None, req_t, fuse_ino_t, c_size_t)
REMOVEXATTR = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p)
ACCESS = CFUNCTYPE(None, req_t, fuse_ino_t, c_int)
CREATE = CFUNCTYPE(None, req_t, fuse_ino_t, c_char_p, mode_t, FI)
GETLK = CFUNCTYPE(None, req_t, fuse_ino_t, FI, POINTER(Flock))
SETLK = CFUNCTYPE(None, req_t, fuse_ino_t, FI, POINTER(Flock), c_int)
FORGET_MULTI = CFUNCTYPE(None, req_t, c_size_t, POINTER(ForgetData))
FLOCK = CFUNCTYPE(None, req_t, fuse_ino_t, FI, c_int)
FALLOCATE = CFUNCTYPE(None, req_t, fuse_ino_t, c_int, off_t, off_t, FI)
COPY_FILE_RANGE = CFUNCTYPE(
    None, req_t, fuse_ino_t, off_t, FI, fuse_ino_t, off_t, FI, c_size_t, c_int
)
LSEEK = CFUNCTYPE(None, req_t, fuse_ino_t, off_t, c_int, FI)


class LowLevelOps(Structure):
    """``struct fuse_lowlevel_ops``, in header order; unused slots stay NULL."""

    _fields_ = [
        ("init", INIT),
        ("destroy", DESTROY),
        ("lookup", LOOKUP),
        ("forget", FORGET),
        ("getattr", GETATTR),
        ("setattr", SETATTR),
        ("readlink", READLINK),
        ("mknod", MKNOD),
        ("mkdir", MKDIR),
        ("unlink", UNLINK),
        ("rmdir", UNLINK),
        ("symlink", SYMLINK),
        ("rename", RENAME),
        ("link", LINK),
        ("open", WITH_FI),
        ("read", READ),
        ("write", WRITE),
        ("flush", WITH_FI),
        ("release", WITH_FI),
        ("fsync", FSYNC),
        ("opendir", WITH_FI),
        ("readdir", READ),
        ("releasedir", WITH_FI),
        ("fsyncdir", FSYNC),
        ("statfs", STATFS),
        ("setxattr", SETXATTR),
        ("getxattr", GETXATTR),
        ("listxattr", LISTXATTR),
        ("removexattr", REMOVEXATTR),
        ("access", ACCESS),
        ("create", CREATE),
        ("getlk", GETLK),
        ("setlk", SETLK),
        ("bmap", c_void_p),
        ("ioctl", c_void_p),
        ("poll", c_void_p),
        ("write_buf", c_void_p),
        ("retrieve_reply", c_void_p),
        ("forget_multi", FORGET_MULTI),
        ("flock", FLOCK),
        ("fallocate", FALLOCATE),
        ("readdirplus", READ),
        ("copy_file_range", COPY_FILE_RANGE),
        ("lseek", LSEEK),
    ]


_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "fuse_reply_err": (c_int, [req_t, c_int]),
    "fuse_reply_none": (None, [req_t]),
    "fuse_reply_entry": (c_int, [req_t, POINTER(EntryParam)]),
    "fuse_reply_create": (c_int, [req_t, POINTER(EntryParam), FI]),
    "fuse_reply_attr": (c_int, [req_t, POINTER(Stat), c_double]),
    "fuse_reply_readlink": (c_int, [req_t, c_char_p]),
    "fuse_reply_open": (c_int, [req_t, FI]),
    "fuse_reply_write": (c_int, [req_t, c_size_t]),
    "fuse_reply_buf": (c_int, [req_t, c_void_p, c_size_t]),
    "fuse_reply_statfs": (c_int, [req_t, POINTER(StatVFS)]),
    "fuse_reply_xattr": (c_int, [req_t, c_size_t]),
    "fuse_reply_lock": (c_int, [req_t, POINTER(Flock)]),
    "fuse_reply_lseek": (c_int, [req_t, off_t]),
    "fuse_add_direntry": (c_size_t, [req_t, c_void_p, c_size_t, c_char_p, POINTER(Stat), off_t]),
    "fuse_add_direntry_plus": (
        c_size_t,
        [req_t, c_void_p, c_size_t, c_char_p, POINTER(EntryParam), off_t],
    ),
    "fuse_req_ctx": (POINTER(FuseCtx), [req_t]),
    "fuse_req_getgroups": (c_int, [req_t, c_int, POINTER(gid_t)]),
    "fuse_req_interrupted": (c_int, [req_t]),
    "fuse_session_new": (c_void_p, [POINTER(FuseArgs), POINTER(LowLevelOps), c_size_t, c_void_p]),
    "fuse_session_mount": (c_int, [c_void_p, c_char_p]),
    "fuse_session_exit": (None, [c_void_p]),
    "fuse_session_exited": (c_int, [c_void_p]),
    "fuse_session_unmount": (None, [c_void_p]),
    "fuse_session_destroy": (None, [c_void_p]),
    "fuse_opt_free_args": (None, [POINTER(FuseArgs)]),
    "fuse_lowlevel_notify_inval_inode": (c_int, [c_void_p, fuse_ino_t, off_t, off_t]),
    "fuse_lowlevel_notify_store": (
        c_int,
        [c_void_p, fuse_ino_t, off_t, POINTER(FuseBufVec), c_int],
    ),
    "fuse_version": (c_int, []),
}

# Called without releasing the GIL (through ``ctypes.PyDLL``): calls that only read request
# memory or fill a buffer, and the replies that write a few hundred bytes to /dev/fuse (which
# never blocks). Releasing the GIL around a few microseconds of work invites another worker
# thread to take it, and the replying thread then waits for it only to return: with every
# reply a hand-off, a no-op FLUSH took 156 us in the mount instead of 68. Replies carrying file
# data (``fuse_reply_buf``) and notifications (which may wait for the kernel) release it.
_HOLDING_GIL = frozenset(
    {
        "fuse_reply_err",
        "fuse_reply_none",
        "fuse_reply_entry",
        "fuse_reply_create",
        "fuse_reply_attr",
        "fuse_reply_open",
        "fuse_reply_write",
        "fuse_req_ctx",
        "fuse_req_getgroups",
        "fuse_req_interrupted",
        "fuse_add_direntry",
        "fuse_add_direntry_plus",
    }
)

_LOOP_CFG_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "fuse_loop_cfg_create": (c_void_p, []),
    "fuse_loop_cfg_destroy": (None, [c_void_p]),
    "fuse_loop_cfg_set_max_threads": (None, [c_void_p, c_uint]),
    "fuse_loop_cfg_set_idle_threads": (None, [c_void_p, c_uint]),
    "fuse_loop_cfg_set_clone_fd": (None, [c_void_p, c_uint]),
    "fuse_session_loop_mt_312": (c_int, [c_void_p, c_void_p]),
}


class FuseLib:
    """The loaded library with typed functions (``lib.fuse_reply_err(req, errno)``)."""

    def __init__(self, cdll: ctypes.CDLL, pydll: ctypes.PyDLL) -> None:
        self.cdll = cdll
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(pydll if name in _HOLDING_GIL else cdll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        self.version: int = cdll.fuse_version()
        self._loop_31: Any = None
        self.loop_kind = self._bind_loop()

    def _bind_loop(self) -> str:
        """Bind the newest multi-threaded loop entry point the library exports."""
        if all(hasattr(self.cdll, name) for name in _LOOP_CFG_PROTOTYPES):
            for name, (restype, argtypes) in _LOOP_CFG_PROTOTYPES.items():
                fn = getattr(self.cdll, name)
                fn.restype = restype
                fn.argtypes = argtypes
            return "312"
        if hasattr(self.cdll, "fuse_session_loop_mt_32"):
            fn = self.cdll.fuse_session_loop_mt_32
            fn.restype = c_int
            fn.argtypes = [c_void_p, POINTER(LoopConfigV1)]
            return "32"
        name = (
            "fuse_session_loop_mt_31"
            if hasattr(self.cdll, "fuse_session_loop_mt_31")
            else "fuse_session_loop_mt"
        )
        fn = getattr(self.cdll, name)
        fn.restype = c_int
        fn.argtypes = [c_void_p, c_int]
        self._loop_31 = fn
        return "31"

    def loop_mt(self, se: int, max_threads: int) -> int:
        """Run the multi-threaded session loop until the session exits (blocks)."""
        if self.loop_kind == "312":
            cfg = self.cdll.fuse_loop_cfg_create()
            if not cfg:
                raise MemoryError("fuse_loop_cfg_create failed")
            try:
                self.cdll.fuse_loop_cfg_set_max_threads(cfg, max_threads)
                self.cdll.fuse_loop_cfg_set_clone_fd(cfg, 0)
                return int(self.cdll.fuse_session_loop_mt_312(se, cfg))
            finally:
                self.cdll.fuse_loop_cfg_destroy(cfg)
        if self.loop_kind == "32":
            v1 = LoopConfigV1(clone_fd=0, max_idle_threads=max_threads)
            return int(self.cdll.fuse_session_loop_mt_32(se, ctypes.byref(v1)))
        return int(self._loop_31(se, 0))

    # The attributes set in __init__ from _PROTOTYPES, declared for type checkers.
    fuse_reply_err: Any
    fuse_reply_none: Any
    fuse_reply_entry: Any
    fuse_reply_create: Any
    fuse_reply_attr: Any
    fuse_reply_readlink: Any
    fuse_reply_open: Any
    fuse_reply_write: Any
    fuse_reply_buf: Any
    fuse_reply_statfs: Any
    fuse_reply_xattr: Any
    fuse_reply_lock: Any
    fuse_reply_lseek: Any
    fuse_add_direntry: Any
    fuse_add_direntry_plus: Any
    fuse_req_ctx: Any
    fuse_req_getgroups: Any
    fuse_req_interrupted: Any
    fuse_session_new: Any
    fuse_session_mount: Any
    fuse_session_exit: Any
    fuse_session_exited: Any
    fuse_session_unmount: Any
    fuse_session_destroy: Any
    fuse_opt_free_args: Any
    fuse_lowlevel_notify_inval_inode: Any
    fuse_lowlevel_notify_store: Any


_LIB: FuseLib | None = None


def load() -> FuseLib:
    """The process-wide ``FuseLib``; ``ConfigError`` when libfuse3 or the platform is missing."""
    global _LIB
    if _LIB is not None:
        return _LIB
    if _STAT_FIELDS is None:
        raise ConfigError(
            f"the low-level FUSE binding does not know struct stat on {platform.machine()}"
        )
    if ctypes.sizeof(c_void_p) != 8:
        raise ConfigError("the low-level FUSE binding needs a 64-bit platform")
    path = ctypes.util.find_library("fuse3") or LIBRARY
    try:
        cdll = ctypes.CDLL(path, use_errno=True)
    except OSError as e:
        raise ConfigError(f"cannot load {LIBRARY} (install libfuse3): {e}") from None
    lib = FuseLib(cdll, ctypes.PyDLL(path))
    if lib.version < 300:  # FUSE_MAKE_VERSION(3, 0)
        raise ConfigError(f"{path} is libfuse {lib.version}, 3.0 or newer is needed")
    _LIB = lib
    return lib
