"""Extended attributes, statfs and volume quotas (capacity, inodes) through the mount."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from loftmount import Mounter, Volume, wait_until

MIB = 1 << 20


def test_xattrs_on_files_dirs_and_links(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user.big", bytes(range(256)) * 200)
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user.big") == bytes(range(256)) * 200
    assert {"user.color", "user.empty", "user.big"} <= set(os.listxattr(f))

    os.setxattr(f, "user.color", b"red")  # plain set replaces
    assert os.getxattr(f, "user.color") == b"red"
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.color", b"green", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.absent", b"v", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(f, "user.color", b"green", os.XATTR_REPLACE)
    os.setxattr(f, "user.new", b"n", os.XATTR_CREATE)
    assert os.getxattr(f, "user.color") == b"green"
    assert os.getxattr(f, "user.new") == b"n"

    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.color")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.removexattr(f, "user.color")
    assert e.value.errno == errno.ENODATA
    assert "user.color" not in os.listxattr(f)

    d = workdir / "d"
    d.mkdir()
    os.setxattr(d, "user.dir", b"on a directory")
    assert os.getxattr(d, "user.dir") == b"on a directory"

    os.link(f, workdir / "hard")
    assert os.getxattr(workdir / "hard", "user.new") == b"n"  # xattrs belong to the inode
    os.unlink(workdir / "hard")

    fd = os.open(f, os.O_RDONLY)
    try:
        os.setxattr(fd, "user.byfd", b"fd")
        assert os.getxattr(fd, "user.byfd") == b"fd"
    finally:
        os.close(fd)


def test_xattr_errors(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.getxattr(workdir / "missing", "user.a")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user." + "n" * 256, b"v")  # names are at most 255 bytes
    assert e.value.errno == errno.ERANGE
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.huge", b"v" * 65537)  # values at most 64 KiB
    assert e.value.errno in (errno.E2BIG, errno.ENOSPC, errno.ERANGE)


def test_statfs_with_capacity_and_enospc(
    new_volume: Callable[..., Volume], mounter: Mounter
) -> None:
    vol = new_volume(capacity="32M", trash_days="0")
    m = mounter.mount(vol)
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 32 * MIB
    assert st.f_bavail * st.f_frsize <= 32 * MIB

    # Fill it with 1 MiB writes. The write (or the fsync) that crosses the capacity must fail
    # with ENOSPC; an error first reported by close() would come after the writer was told
    # its data was accepted. What was accepted before the error is kept.
    chunk = os.urandom(MIB)
    written = 0
    failed: tuple[str, int | None] | None = None
    fd = os.open(m.path / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(64):
            try:
                os.write(fd, chunk)
            except OSError as e:
                failed = ("write", e.errno)
                break
            written += MIB
        else:
            try:
                os.fsync(fd)
            except OSError as e:
                failed = ("fsync", e.errno)
    finally:
        try:
            os.close(fd)
        except OSError as e:
            failed = failed or ("close", e.errno)
    assert failed is not None, "64 MiB written into a 32 MiB volume without an error"
    assert failed[1] in (errno.ENOSPC, errno.EDQUOT), failed
    assert failed[0] in ("write", "fsync"), f"ENOSPC only at {failed[0]}() after {written} bytes"
    assert 30 * MIB <= written <= 33 * MIB
    size = os.stat(m.path / "fill").st_size
    assert size >= written - 2 * MIB, f"{written} bytes accepted, {size} kept ({failed})"
    st = os.statvfs(m.path)
    assert st.f_bavail * st.f_frsize <= 2 * MIB  # (nearly) full now

    os.unlink(m.path / "fill")  # trash is off: the space comes back

    def has_room() -> bool:
        return os.statvfs(m.path).f_bavail * os.statvfs(m.path).f_frsize >= 16 * MIB

    assert wait_until(has_room, 30), "the space of a deleted file never came back"
    (m.path / "again").write_bytes(chunk * 8)
    assert (m.path / "again").read_bytes() == chunk * 8


def test_inode_quota(new_volume: Callable[..., Volume], mounter: Mounter) -> None:
    vol = new_volume(inodes="50", trash_days="0")
    m = mounter.mount(vol)
    st = os.statvfs(m.path)
    assert st.f_files == 50
    created = 0
    with pytest.raises(OSError) as e:
        for i in range(100):
            (m.path / f"f{i}").touch()
            created += 1
    assert e.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert 45 <= created <= 50  # the root directory counts (or not)
    assert os.statvfs(m.path).f_ffree == 0
    os.unlink(m.path / "f0")
    (m.path / "replacement").touch()
