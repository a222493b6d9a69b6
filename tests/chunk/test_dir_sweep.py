"""Directory sweeps (``loftfs.vfs.sweep``): a directory whose lookups keep missing the cache is
listed into it in one go, and the lookups after that are answered from memory, never longer
than an answer of the engine would be. A real SQLite volume, taken for a remote engine (the
sweep is on for remote engines only)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator

import pytest

from loftfs.errors import FSError
from loftfs.meta.types import ROOT_CTX, ROOT_INODE
from loftfs.vfs import sweep as sweep_module
from loftfs.vfs import vfs as vfs_module
from loftfs.vfs.options import MountOptions
from loftfs.vfs.sweep import SWEEP_MISSES, SweepDetector
from loftfs.vfs.vfs import VFS

from .conftest import Volume, wait_until

TTL = 1.0


@pytest.fixture
def fs(volume: Volume) -> Iterator[VFS]:
    volume.meta.remote = True  # type: ignore[misc]
    v = VFS(volume.meta, volume.data_path(), volume.settings, MountOptions())
    yield v
    v.shutdown()


def make_dir(volume: Volume, files: int) -> int:
    """A directory of ``files`` files (made by the engine directly: nothing cached)."""
    d = volume.meta.mkdir(ROOT_CTX, ROOT_INODE, b"d", 0o755).inode
    for i in range(files):
        volume.meta.create(ROOT_CTX, d, b"f%03d" % i, 0o644, os.O_RDWR)
        volume.meta.release(volume.meta.lookup(ROOT_CTX, d, b"f%03d" % i).inode)
    return d


def sweep_of(fs: VFS) -> SweepDetector:
    assert fs.sweep is not None
    return fs.sweep


def test_a_swept_directory_is_answered_from_memory(volume: Volume, fs: VFS) -> None:
    d = make_dir(volume, 100)
    ages = [fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)[1] for i in range(SWEEP_MISSES)]
    assert ages == [0.0] * SWEEP_MISSES  # each from the engine
    wait_until(lambda: sweep_of(fs).listings == 1)
    for i in range(SWEEP_MISSES, 100):
        attr, age = fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)
        assert 0 < age < TTL  # from the listing, with what is left of its validity
        assert attr == volume.meta.getattr(attr.inode)
    assert sweep_of(fs).listings == 1


def test_listed_answers_expire_like_any_other(volume: Volume, fs: VFS) -> None:
    """Another client's changes: a new name is looked up in the engine at once; a removed one
    is answered from the listing at most ``--entry-timeout`` after it was read."""
    d = make_dir(volume, 40)
    for i in range(SWEEP_MISSES):
        fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)
    wait_until(lambda: sweep_of(fs).listings == 1)
    listed_at = time.monotonic()
    volume.meta.create(ROOT_CTX, d, b"new", 0o644, os.O_RDWR)
    assert fs.lookup_aged(ROOT_CTX, d, b"new")[1] == 0.0
    volume.meta.unlink(ROOT_CTX, d, b"f039")
    try:
        assert fs.lookup_aged(ROOT_CTX, d, b"f039")[1] > 0  # still within its validity
    except FSError:
        assert time.monotonic() - listed_at >= TTL  # a slow machine: it expired already
    time.sleep(TTL)
    with pytest.raises(FSError) as e:
        fs.lookup_aged(ROOT_CTX, d, b"f039")
    assert e.value.errno == errno.ENOENT


def test_changes_through_the_mount_show_at_once(volume: Volume, fs: VFS) -> None:
    d = make_dir(volume, 40)
    for i in range(SWEEP_MISSES):
        fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)
    wait_until(lambda: sweep_of(fs).listings == 1)
    fs.unlink(ROOT_CTX, d, b"f030")
    with pytest.raises(FSError):
        fs.lookup_aged(ROOT_CTX, d, b"f030")
    fh, _ = fs.create(ROOT_CTX, d, b"f031x", 0o644, os.O_WRONLY)
    fs.write(fh, 0, b"abc")
    fs.rename(ROOT_CTX, d, b"f031x", d, b"f031")
    assert fs.lookup_aged(ROOT_CTX, d, b"f031")[0].size == 3  # open here: buffered size
    fs.release(fh)


def test_files_open_here_are_left_out(volume: Volume, fs: VFS) -> None:
    d = make_dir(volume, 40)
    target = volume.meta.lookup(ROOT_CTX, d, b"f035").inode
    fh, _, _ = fs.open(ROOT_CTX, target, os.O_WRONLY, light=False)
    fs.write(fh, 0, b"x" * 5000)
    for i in range(SWEEP_MISSES):
        fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)
    wait_until(lambda: sweep_of(fs).listings == 1)
    assert fs.lookup_aged(ROOT_CTX, d, b"f034")[1] > 0
    attr, age = fs.lookup_aged(ROOT_CTX, d, b"f035")
    assert age == 0.0 and attr.size == 5000
    fs.release(fh)


def test_a_big_directory_is_not_listed(
    volume: Volume, fs: VFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vfs_module, "MAX_LISTED", 30)
    d = make_dir(volume, 40)
    for i in range(SWEEP_MISSES):
        fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)
    wait_until(lambda: sweep_of(fs).too_big == 1)
    assert [fs.lookup_aged(ROOT_CTX, d, b"f%03d" % i)[1] for i in range(20, 40)] == [0.0] * 20
    assert sweep_of(fs).listings == 0 and sweep_of(fs).too_big == 1  # not tried again


def test_no_sweep_for_a_local_engine(volume: Volume) -> None:
    v = VFS(volume.meta, volume.data_path(), volume.settings, MountOptions())
    try:
        assert v.sweep is None
    finally:
        v.shutdown()


def test_detector_counts_misses_per_directory_within_a_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(sweep_module.time, "monotonic", lambda: now[0])
    s = SweepDetector(window_s=1.0, misses=3)
    assert not s.missed(1) and not s.missed(2) and not s.missed(1)
    now[0] += 1.5  # the window passed: counting starts again
    assert not s.missed(1) and not s.missed(1)
    assert s.missed(1)  # third miss in one window
    assert not s.missed(2) and not s.missed(2)  # one listing at a time
    s.done(1, True)
    assert [s.missed(1) for _ in range(5)] == [False] * 5  # listed: held while valid
    assert s.missed(2)
    s.done(2, False)  # too big: held for long
    now[0] += 2
    assert [s.missed(1) for _ in range(3)] == [False, False, True]
    s.done(1, None)
    now[0] += 30
    assert [s.missed(2) for _ in range(4)] == [False] * 4
    assert s.figures() == {"listings_total": 1, "too_big_total": 1}
