"""Light opens (``VFS.open``): a small file opened read-only is served from a snapshot taken
at open, with no open record in the engine; anything this mount does that would make the
snapshot stale turns the handle into a normal one first. A real SQLite volume and data path."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

import pytest

from loftfs.errors import FSError
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, Ctx
from loftfs.vfs import vfs as vfs_module
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import LIGHT_FILE_MAX, VFS

from .conftest import Volume


@pytest.fixture
def fs(volume: Volume) -> Iterator[VFS]:
    dp = volume.data_path()
    v = VFS(volume.meta, dp, volume.settings, MountOptions())
    yield v
    v.shutdown()


def make_file(fs: VFS, name: bytes, data: bytes) -> int:
    fh, attr = fs.create(ROOT_CTX, ROOT_INODE, name, 0o644, os.O_WRONLY)
    fs.write(fh, 0, data)
    fs.release(fh)
    fs.release_lingering()  # no record left: the next open is a first open
    return attr.inode


def read(fs: VFS, fh: int) -> bytes:
    return fs.read(fh, 0, 1 << 20)


def test_small_read_only_open_is_light_and_records_nothing(volume: Volume, fs: VFS) -> None:
    data = os.urandom(100_000)
    inode = make_file(fs, b"small", data)
    fh, _, attr = fs.open(ROOT_CTX, inode, os.O_RDONLY)
    assert attr.size == len(data)
    assert fs._files[fh].snapshot == data and inode in fs._light
    assert fs.read(fh, 10, 20) == data[10:30]
    assert fs.read(fh, len(data) - 5, 100) == data[-5:]
    assert fs.read(fh, len(data), 100) == b""
    # no open record: an unlink deletes the inode at once (a normal open would keep it,
    # nlink 0, until its release)
    fs.unlink(ROOT_CTX, ROOT_INODE, b"small")
    with pytest.raises(FSError) as e:
        volume.meta.getattr(inode)
    assert e.value.errno == errno.ENOENT
    assert read(fs, fh) == data  # the snapshot still reads
    gone = fs.getattr(inode)  # fstat on the handle still answers
    assert gone.nlink == 0 and gone.size == len(data)
    fs.release(fh)
    assert inode not in fs._light and fs._light_bytes == 0 and not fs._lingering


def test_which_opens_are_light(volume: Volume, fs: VFS) -> None:
    small = make_file(fs, b"small", b"x" * 10)
    big = make_file(fs, b"big", os.urandom(LIGHT_FILE_MAX + 1))
    empty = make_file(fs, b"empty", b"")
    for inode, flags, light in [
        (small, os.O_RDONLY, True),
        (empty, os.O_RDONLY, True),
        (big, os.O_RDONLY, False),
        (small, os.O_RDWR, False),
        (small, os.O_WRONLY, False),
    ]:
        fh, _, _ = fs.open(ROOT_CTX, inode, flags)
        assert (fs._files[fh].snapshot is not None) == light, (inode, flags)
        fs.release(fh)
        fs.release_lingering()
    # a file open normally here is opened normally again (its record is there)
    fh1, _, _ = fs.open(ROOT_CTX, small, os.O_RDWR)
    fh2, _, _ = fs.open(ROOT_CTX, small, os.O_RDONLY)
    assert fs._files[fh2].snapshot is None
    fs.release(fh1)
    fs.release(fh2)
    # permission is checked as for any open
    fs.setattr(ROOT_CTX, small, None, mode=0o600)
    with pytest.raises(FSError) as e:
        fs.open(Ctx(uid=1000, gid=1000), small, os.O_RDONLY)
    assert e.value.errno == errno.EACCES


def test_snapshots_are_bounded(volume: Volume, fs: VFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfs_module, "LIGHT_TOTAL_MAX", 250_000)
    inodes = [make_file(fs, f"f{i}".encode(), os.urandom(100_000)) for i in range(4)]
    fhs = [fs.open(ROOT_CTX, ino, os.O_RDONLY)[0] for ino in inodes]
    light = [fs._files[fh].snapshot is not None for fh in fhs]
    assert light == [True, True, False, False]
    assert fs._light_bytes == 200_000
    for fh in fhs:
        fs.release(fh)
    assert fs._light_bytes == 0


def test_a_normal_open_here_promotes_light_handles(volume: Volume, fs: VFS) -> None:
    inode = make_file(fs, b"f", b"version one")
    fh1, _, _ = fs.open(ROOT_CTX, inode, os.O_RDONLY)
    assert fs._files[fh1].snapshot is not None
    fh2, _, _ = fs.open(ROOT_CTX, inode, os.O_RDWR)
    assert fs._files[fh1].snapshot is None and inode not in fs._light
    fs.write(fh2, 0, b"VERSION TWO, longer")
    fs.flush(fh2)
    assert read(fs, fh1) == b"VERSION TWO, longer"  # not the snapshot
    fs.release(fh2)
    fs.release(fh1)
    assert not fs._inodes  # both handles released as normal ones


def test_truncate_promotes_light_handles(volume: Volume, fs: VFS) -> None:
    inode = make_file(fs, b"f", b"0123456789")
    fh, _, _ = fs.open(ROOT_CTX, inode, os.O_RDONLY)
    fs.setattr(ROOT_CTX, inode, None, size=4)
    assert read(fs, fh) == b"0123"
    fs.release(fh)


def test_a_lock_promotes_the_handle_and_is_released_with_it(volume: Volume, fs: VFS) -> None:
    inode = make_file(fs, b"f", b"locked")
    fh, _, _ = fs.open(ROOT_CTX, inode, os.O_RDONLY)
    fs.flock(ROOT_CTX, fh, 1, fcntl.F_WRLCK, False)
    assert fs._files[fh].snapshot is None
    with pytest.raises(FSError) as e:  # another owner is refused while it is held
        volume.meta.flock(ROOT_CTX, inode, 2, fcntl.F_WRLCK, False)
    assert e.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    fs.release(fh)
    fs.release_lingering()  # the lock goes with the open record
    volume.meta.flock(ROOT_CTX, inode, 2, fcntl.F_WRLCK, False)


def test_the_last_close_never_lets_the_cache_answer_an_older_size(fs: VFS) -> None:
    """While the last handle of a written file closes, a lookup (the kernel's, for the next
    open) must not be answered with the attributes the open read: the kernel would take that
    older size, and an O_APPEND write after it would land over the data just written."""
    inode = make_file(fs, b"log", b"line 0\n")
    fs.lookup_aged(ROOT_CTX, ROOT_INODE, b"log")
    fh, _, _ = fs.open(ROOT_CTX, inode, os.O_WRONLY | os.O_APPEND)  # caches the size it read
    fs.write(fh, 7, b"line 1\n")
    assert fs.flush(fh) is not None  # committed: 14 bytes
    seen: list[int] = []
    real_flush = fs.data.flush

    def flush_during_release(ino: int) -> None:  # runs after the handle stopped counting
        seen.append(fs.lookup_aged(ROOT_CTX, ROOT_INODE, b"log")[0].size)
        real_flush(ino)

    fs.data.flush = flush_during_release  # type: ignore[method-assign]
    fs.release(fh)
    fs.data.flush = real_flush  # type: ignore[method-assign]
    assert seen == [14]
