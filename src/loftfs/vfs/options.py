"""Mount-time options, shared by the CLI, the vfs and the data path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

FUSE_BINDINGS = ("lowlevel", "pyfuse3")


def default_cache_dir() -> str:
    """``/var/cache/loftfs`` for root, ``~/.cache/loftfs`` for other users; ``LOFT_CACHE_DIR``
    overrides both (tests point it at a temporary directory)."""
    env = os.environ.get("LOFT_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/loftfs"
    return os.path.join(os.path.expanduser("~"), ".cache", "loftfs")


@dataclass
class MountOptions:
    buffer_size: int = 300 << 20  # bytes of file data buffered in memory (writes + reads)
    upload_threads: int = 16  # concurrent block uploads per mount
    fetch_threads: int = 16  # concurrent block downloads (reads + readahead) per mount
    readahead_blocks: int = 4  # blocks read ahead on sequential access (upper bound)
    attr_timeout: float = 1.0  # kernel attribute cache, seconds
    entry_timeout: float = 1.0  # kernel dentry cache, seconds
    dir_entry_timeout: float = 1.0
    # Extended attributes, off by default: the kernel then stops asking (ENOSYS), which saves a
    # round trip per write (security.capability) and two per entry of ``ls -l`` (measured 10x
    # faster ``ls -l``, docs/PERFORMANCE.md); ``--enable-xattr`` turns them on.
    enable_xattr: bool = False
    read_only: bool = False
    heartbeat_s: float = 12.0  # session heartbeat interval
    session_timeout_s: float = 60.0  # a session silent this long is stale and gets cleaned
    gc_interval_s: float = 30.0  # background deletion of unreferenced blocks; 0 disables
    compact_threshold: int = 32  # slices per chunk that trigger background compaction
    fuse_options: list[str] = field(default_factory=list)  # -o options passed to the kernel
    max_fuse_tasks: int = 64  # concurrent FUSE requests in flight (loop threads / trio tasks)
    # "lowlevel": libfuse3's low-level API through ctypes (fuse/lowlevel.py): every operation,
    # locks across mounts included; "pyfuse3": the pyfuse3 binding (no lock, fallocate or
    # copy_file_range handlers). See docs/ARCHITECTURE.md for the measurements behind the default.
    fuse_binding: str = "lowlevel"
    # Local disk block cache (chunk/cache_disk.py): directories (blocks spread over them by
    # hash), total size (0 disables it) and the share of each file system kept free.
    cache_dirs: list[str] = field(default_factory=lambda: [default_cache_dir()])
    cache_size: int = 100 << 30
    free_space_ratio: float = 0.1
    # Write-back: blocks are acknowledged once staged durably in the disk cache and uploaded
    # in the background (chunk/writeback.py). Needs the disk cache.
    writeback: bool = False
    writeback_drain_s: float = 60.0  # at unmount: give up waiting after this long without progress
    # "HOST:PORT" of the Prometheus endpoint; empty: none.
    metrics: str = ""
