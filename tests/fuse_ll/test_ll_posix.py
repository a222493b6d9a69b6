"""POSIX behaviour through the low-level binding: everyday file and directory operations,
large sequential I/O, errno values, times and permissions as an unprivileged user."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from llmount import MIB, NOBODY, Mount, run_as


def test_file_and_directory_operations(workdir: Path) -> None:
    d = workdir / "dir"
    d.mkdir(0o750)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    f = d / "file"
    f.write_bytes(b"hello world")
    assert f.read_bytes() == b"hello world"
    assert f.stat().st_size == 11
    with open(f, "r+b") as fh:
        fh.seek(6)
        fh.write(b"loft!")
    assert f.read_bytes() == b"hello loft!"
    os.truncate(f, 5)
    assert f.read_bytes() == b"hello"
    os.truncate(f, 8)
    assert f.read_bytes() == b"hello\0\0\0"
    with open(f, "wb") as fh:  # O_TRUNC through open
        fh.write(b"new")
    assert f.read_bytes() == b"new"

    f.chmod(0o600)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    os.chown(f, 1234, 5678)
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)

    os.link(f, d / "hard")
    assert f.stat().st_nlink == 2
    os.symlink("file", d / "sym")
    assert os.readlink(d / "sym") == "file"
    assert (d / "sym").read_bytes() == b"new"

    os.rename(f, d / "renamed")
    assert not f.exists()
    assert (d / "renamed").read_bytes() == b"new"
    assert sorted(os.listdir(d)) == ["hard", "renamed", "sym"]
    entries = {e.name: e for e in os.scandir(d)}
    assert entries["sym"].is_symlink()
    assert entries["hard"].stat().st_size == 3

    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO((d / "fifo").lstat().st_mode)
    for name in ("hard", "renamed", "sym", "fifo"):
        os.unlink(d / name)
    d.rmdir()
    assert not d.exists()


def test_many_entries_list_in_pages(workdir: Path) -> None:
    """A listing larger than one readdirplus buffer comes back complete, each name once."""
    names = {f"entry-with-a-longish-name-{i:05d}" for i in range(600)}
    for name in names:
        (workdir / name).write_bytes(b"")
    assert sorted(os.listdir(workdir)) == sorted(names)
    assert {e.name for e in os.scandir(workdir) if e.stat().st_size == 0} == names


def test_statvfs(workdir: Path) -> None:
    st = os.statvfs(workdir)
    assert st.f_bsize == 4096
    assert st.f_namemax == 255


def test_xattrs(workdir: Path) -> None:
    f = workdir / "x"
    f.write_bytes(b"")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.big", b"v" * 5000)
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(f, "user.big") == b"v" * 5000
    assert sorted(os.listxattr(f)) == ["user.a", "user.big"]
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    os.removexattr(f, "user.a")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.a")
    assert e.value.errno == errno.ENODATA


@pytest.mark.timeout(240)
def test_large_sequential_write_and_read(workdir: Path) -> None:
    """80 MiB in 1 MiB writes (more than one 64 MiB chunk), read back with a checksum."""
    f = workdir / "big"
    written = hashlib.sha256()
    block = bytearray(MIB)
    with open(f, "wb", buffering=0) as fh:
        for i in range(80):
            block[:8] = i.to_bytes(8, "little")
            block[-8:] = (i * 7).to_bytes(8, "little")
            written.update(block)
            assert fh.write(block) == MIB
    assert f.stat().st_size == 80 * MIB
    read = hashlib.sha256()
    with open(f, "rb", buffering=0) as fh:
        while chunk := fh.read(MIB):
            read.update(chunk)
    assert read.hexdigest() == written.hexdigest()
    with open(f, "rb") as fh:  # a read across the chunk boundary
        fh.seek(64 * MIB - 4)
        assert fh.read(16)[4:12] == (64).to_bytes(8, "little")


def _err(fn: object, *args: object) -> int:
    assert callable(fn)
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno or 0


def test_errno_mapping(workdir: Path) -> None:
    (workdir / "f").write_bytes(b"x")
    (workdir / "d").mkdir()
    (workdir / "d" / "inner").write_bytes(b"")
    assert _err(os.stat, workdir / "missing") == errno.ENOENT
    assert _err(os.mkdir, workdir / "d") == errno.EEXIST
    assert _err(os.rmdir, workdir / "d") == errno.ENOTEMPTY
    assert _err(os.listdir, workdir / "f") == errno.ENOTDIR
    assert _err(os.open, workdir / "f" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert _err(os.unlink, workdir / "d") == errno.EISDIR
    assert _err(os.open, workdir / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert _err(os.open, workdir / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert _err(os.getxattr, workdir / "f", "user.none") == errno.ENODATA
    assert _err(os.rename, workdir / "d", workdir / "d" / "sub") == errno.EINVAL

    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(-100, bytes(workdir / "f"), -100, bytes(workdir / "d"), 1)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST  # RENAME_NOREPLACE

    (workdir / "private").mkdir(0o700)
    assert _err(run_as, NOBODY, NOBODY, lambda: os.listdir(workdir / "private")) == errno.EACCES
    assert _err(run_as, NOBODY, NOBODY, lambda: os.chmod(workdir / "f", 0o777)) == errno.EPERM


def test_utime_now_by_non_owner_with_write_permission(workdir: Path) -> None:
    f = workdir / "shared"
    f.write_bytes(b"")
    f.chmod(0o666)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    before = time.time()

    run_as(NOBODY, NOBODY, lambda: os.utime(f))  # UTIME_NOW: write permission is enough
    st = f.stat()
    assert st.st_mtime >= before - 1 and st.st_atime >= before - 1

    # Explicit times need ownership, and "now" needs write permission.
    assert _err(run_as, NOBODY, NOBODY, lambda: os.utime(f, (5, 5))) == errno.EPERM
    f.chmod(0o644)
    assert _err(run_as, NOBODY, NOBODY, lambda: os.utime(f)) == errno.EACCES


def test_write_by_non_owner_clears_setuid_and_setgid(workdir: Path) -> None:
    """The kernel clears S_ISUID (and S_ISGID with group exec) when another user writes."""
    for mode, expected in ((0o4777, 0o777), (0o2777, 0o777), (0o6777, 0o777), (0o2767, 0o2767)):
        f = workdir / f"suid-{mode:o}"
        f.write_bytes(b"")
        f.chmod(mode)

        def write(f: Path = f) -> int:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, b"x")
                return stat.S_IMODE(os.fstat(fd).st_mode)
            finally:
                os.close(fd)

        assert run_as(NOBODY, NOBODY, write) == expected
        assert stat.S_IMODE(f.stat().st_mode) == expected
        assert f.read_bytes() == b"x"


def test_create_applies_umask_as_other_user(workdir: Path) -> None:
    def create() -> tuple[int, int]:
        os.umask(0o027)
        (workdir / "u").write_bytes(b"x")
        os.mkdir(workdir / "ud", 0o777)
        return (
            stat.S_IMODE(os.stat(workdir / "u").st_mode),
            stat.S_IMODE(os.stat(workdir / "ud").st_mode),
        )

    assert run_as(NOBODY, NOBODY, create) == (0o640, 0o750)
    assert (workdir / "u").stat().st_uid == NOBODY


def test_close_to_open_across_mounts(
    workdir: Path, shared_mount: Mount, second_mount: Callable[[], Mount]
) -> None:
    """A file rewritten and closed on one mount reads back exactly on the other at its next
    open, although the other mount's kernel cached the old size and pages."""
    other = second_mount()
    a = workdir / "c2o"
    b = other.path / a.relative_to(shared_mount.path)
    rng = random.Random(7)
    data = rng.randbytes(2 * MIB + 3)
    a.write_bytes(data)
    for _ in range(6):
        assert b.read_bytes() == data
        assert b.stat().st_size == len(data)
        data = rng.randbytes(rng.choice([MIB + 7, 3 * MIB - 1, 100, 2 * MIB + 3]))
        a.write_bytes(data)
        assert b.read_bytes() == data
