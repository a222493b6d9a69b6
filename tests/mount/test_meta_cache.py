"""The mount's memory of names and attributes (``loftfs.vfs.metacache``) through real mounts:
answers after the kernel dropped its caches come from it, this mount's own changes show at
once, another mount's within the timeouts, and close-to-open holds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from loftmount import Mount, Mounter, Volume, loft

LONG = ("--attr-timeout", "60", "--entry-timeout", "60", "--dir-entry-timeout", "60")
NONE = ("--attr-timeout", "0", "--entry-timeout", "0", "--dir-entry-timeout", "0")


def drop_kernel_caches() -> None:
    """Dentries and inodes (what the kernel asks the mount for again)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def cache_figures(m: Mount) -> dict[str, Any]:
    out = loft("stats", str(m.path), "--json").stdout
    return dict(json.loads(out)["sources"]["meta_cache"])


def names(root: Path) -> list[str]:
    """Every path under ``root``, relative to it."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [str((Path(dirpath) / n).relative_to(root)) for n in dirnames + filenames]
    return sorted(out)


def stats(root: Path, paths: list[str]) -> dict[str, tuple[int, ...]]:
    """What ``stat`` says of each of ``paths`` (access times left out): path by path, so that
    each name the kernel does not hold is a lookup (a listing would hand it the attributes)."""
    out: dict[str, tuple[int, ...]] = {}
    for rel in paths:
        st = os.lstat(root / rel)
        out[rel] = (
            st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns,
        )  # fmt: skip
    return out


def test_stats_after_the_kernel_dropped_its_caches_come_from_memory(
    mounter: Mounter, volume: Volume
) -> None:
    m = mounter.mount(volume, *LONG)
    d = m.path / "d"
    d.mkdir()
    for i in range(200):
        (d / f"f{i}").write_bytes(b"x" * i)
    paths = names(m.path)
    before = stats(m.path, paths)
    drop_kernel_caches()
    assert stats(m.path, paths) == before  # looked up: kept by the mount
    hits = cache_figures(m)["hits_total"]
    drop_kernel_caches()
    assert stats(m.path, paths) == before
    assert cache_figures(m)["hits_total"] >= hits + len(paths)


def test_a_directory_swept_by_stat_is_read_in_one_go(mounter: Mounter, volume: Volume) -> None:
    """Stat of every file of a directory, name by name, with nothing cached: on a remote
    engine the mount lists the directory once its lookups keep missing (``loftfs.vfs.sweep``)
    and answers the rest from memory, with the same answers."""
    m = mounter.mount(volume)
    d = m.path / "d"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"x" * i)
    paths = [f"d/f{i:03d}" for i in range(300)]
    before = stats(m.path, paths)
    m = mounter.remount(m)  # nothing in the mount's memory
    drop_kernel_caches()
    assert stats(m.path, paths) == before
    sources = json.loads(loft("stats", str(m.path), "--json").stdout)["sources"]
    if volume.stack.meta_kind == "sqlite":
        assert "dir_sweep" not in sources  # a local engine: lookups are as cheap
        return
    assert sources["dir_sweep"]["listings_total"] >= 1, sources
    assert sources["meta_cache"]["hits_total"] >= 200, sources


def test_this_mounts_changes_show_at_once(mounter: Mounter, volume: Volume) -> None:
    """Every kind of change through a mount whose answers stay valid for a minute: after the
    kernel drops its caches, what the mount says equals what a mount with no caching at all
    says (same volume, same inode numbers)."""
    a = mounter.mount(volume, *LONG, "--enable-xattr")
    fresh = mounter.mount(volume, *NONE, "--enable-xattr")
    (a.path / "d").mkdir()
    (a.path / "d" / "f").write_bytes(b"0123456789")
    (a.path / "g").write_bytes(b"g")
    os.link(a.path / "g", a.path / "d" / "g2")

    def chmod() -> None:
        os.chmod(a.path / "d" / "f", 0o600)

    def chown() -> None:
        os.chown(a.path / "g", 1234, 5678)

    def utime() -> None:
        os.utime(a.path / "d" / "f", ns=(1, 2_000_000_000))

    def truncate() -> None:
        os.truncate(a.path / "d" / "f", 3)

    def rewrite() -> None:
        (a.path / "d" / "f").write_bytes(b"longer than before")

    def append() -> None:
        with open(a.path / "g", "ab") as fh:
            fh.write(b"more")

    def xattr() -> None:
        os.setxattr(a.path / "g", "user.k", b"v")

    def link() -> None:
        os.link(a.path / "d" / "f", a.path / "f2")

    def unlink() -> None:
        os.unlink(a.path / "d" / "g2")

    def rename() -> None:
        os.rename(a.path / "d" / "f", a.path / "moved")

    def rename_over() -> None:
        os.rename(a.path / "moved", a.path / "g")

    def mkdir() -> None:
        (a.path / "d" / "sub").mkdir()

    def rmdir() -> None:
        (a.path / "d" / "sub").rmdir()

    def symlink() -> None:
        os.symlink("g", a.path / "d" / "s")

    def create() -> None:
        (a.path / "d" / "new").write_bytes(b"")

    changes = [chmod, chown, utime, truncate, rewrite, append, xattr, link, unlink, rename]
    changes += [rename_over, mkdir, rmdir, symlink, create]
    hits = cache_figures(a)["hits_total"]
    for change in changes:
        paths = names(fresh.path)
        drop_kernel_caches()
        assert stats(a.path, paths) == stats(fresh.path, paths), f"before {change.__name__}"
        time.sleep(0.002)  # a change in the next nanoseconds shows in the times
        change()
        drop_kernel_caches()
        paths = names(fresh.path)
        assert stats(a.path, paths) == stats(fresh.path, paths), f"after {change.__name__}"
    assert cache_figures(a)["hits_total"] > hits + len(changes)  # it did answer meanwhile


def test_another_mounts_changes_show_within_the_timeouts(mounter: Mounter, volume: Volume) -> None:
    a = mounter.mount(volume)  # the default timeouts: 1 s
    b = mounter.mount(volume)
    (b.path / "f").write_bytes(b"old")
    (b.path / "d").mkdir()
    assert os.stat(a.path / "f").st_size == 3
    assert os.stat(a.path / "d").st_mode & 0o777 == 0o755
    (b.path / "f").write_bytes(b"new and longer")
    os.chmod(b.path / "d", 0o700)
    time.sleep(1.2)
    drop_kernel_caches()
    assert os.stat(a.path / "f").st_size == 14
    assert os.stat(a.path / "d").st_mode & 0o777 == 0o700


def test_an_open_sees_another_mounts_close_whatever_is_cached(
    mounter: Mounter, volume: Volume
) -> None:
    """Close-to-open with a minute of validity for everything a has read: a's open still reads
    b's new content, and a's stat after that open shows the new size."""
    a = mounter.mount(volume, *LONG)
    b = mounter.mount(volume)
    for size in (10, 300_000):  # opened light (a snapshot) and opened normally
        p = f"f{size}"
        (b.path / p).write_bytes(b"a" * size)
        assert os.stat(a.path / p).st_size == size
        assert (a.path / p).read_bytes() == b"a" * size
        (b.path / p).write_bytes(b"b" * (size + 5))
        drop_kernel_caches()
        assert (a.path / p).read_bytes() == b"b" * (size + 5)
        assert os.stat(a.path / p).st_size == size + 5


def test_no_cache_without_timeouts(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume, *NONE)
    (m.path / "f").write_bytes(b"x")
    for _ in range(3):
        os.stat(m.path / "f")
        drop_kernel_caches()
    figures = cache_figures(m)
    assert figures["hits_total"] == 0 and figures["attrs"] == 0
