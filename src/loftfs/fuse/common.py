"""What every FUSE binding reports the same way: mount options and statfs figures."""

from __future__ import annotations

import os
from typing import Any

from loftfs.meta.types import MAX_NAME, Attr, FileType, StatFS
from loftfs.vfs.options import MountOptions

BLOCK_UNIT = 4096  # the statfs block unit reported to the kernel
# st_blksize, the preferred I/O size. glibc sizes a directory stream's buffer from it (32 KiB
# at least, 1 MiB at most), so it sets how many entries one READDIRPLUS request carries: at
# 64 KiB a listing takes half the round trips it takes at 4 KiB. stdio and Python size their
# file buffers from it too.
IO_SIZE = 1 << 16


def device_number(attr: Attr) -> int:
    """``st_rdev``: the device number of device nodes, 0 for everything else (directories use
    the field internally, see ``loftfs.meta.ops_import.LAZY_MARK``)."""
    return attr.rdev if attr.type in (FileType.CHR, FileType.BLK) else 0


def mount_options(name: str, opts: MountOptions) -> set[str]:
    """Kernel mount options. ``default_permissions``: the kernel checks mode bits itself (the
    metadata layer checks again for clients that do not go through a kernel)."""
    options = {"default_permissions", f"fsname=loftfs:{name}", "subtype=loftfs"}
    if os.geteuid() == 0:
        options.add("allow_other")  # a shared volume: every local user, checked by mode bits
    if opts.read_only:
        options.add("ro")
    options |= set(opts.fuse_options)
    return options


def fill_statvfs(out: Any, st: StatFS) -> Any:
    """Set the ``f_*`` fields of a binding's statvfs structure from ``st``; returns ``out``."""
    out.f_bsize = BLOCK_UNIT
    out.f_frsize = BLOCK_UNIT
    out.f_blocks = st.total_bytes // BLOCK_UNIT
    out.f_bfree = st.avail_bytes // BLOCK_UNIT
    out.f_bavail = st.avail_bytes // BLOCK_UNIT
    out.f_files = st.used_inodes + st.avail_inodes
    out.f_ffree = st.avail_inodes
    out.f_favail = st.avail_inodes
    out.f_namemax = MAX_NAME
    return out
