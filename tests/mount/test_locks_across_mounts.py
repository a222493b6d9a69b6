"""POSIX (fcntl), OFD and BSD (flock) locks between two mounts of one volume.

Each mount is its own process and kernel connection, so only the metadata engine can arbitrate
between them: the low-level binding forwards lock requests to it, the pyfuse3 binding has no
lock handlers (docs/SEMANTICS.md: the kernel then arbitrates per mount).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lockprocs import FLOCK_ERRNO, INTERRUPTED, WAITER, Helper, lock_held_by_other_process
from loftmount import Mount, Mounter, Volume, fuse_binding, lowlevel_only, wait_until

CROSS_MOUNT = lowlevel_only("forward lock requests, so locks are not shared between mounts")
#: ``struct flock`` on 64-bit Linux: type, whence, start, len, pid.
FLOCK_STRUCT = "hhqqi4x"


@pytest.fixture
def pair(workdir: Path, shared_mount: Mount, mounter: Mounter) -> tuple[Path, Path]:
    """The same file seen through two mounts: (path on the shared mount, path on another)."""
    other = mounter.mount(shared_mount.volume)
    a = workdir / "locked"
    a.write_bytes(b"0" * 1000)
    b = other.path / a.relative_to(shared_mount.path)
    assert b.read_bytes() == b"0" * 1000
    return a, b


def _try(fn: Callable[[], None]) -> bool:
    """True when ``fn`` succeeds, False on a lock conflict."""
    try:
        fn()
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def _free(path: Path, kind: str) -> bool:
    """Whether an exclusive lock of ``kind`` (flock, or posix: bytes [0, 100)) on ``path`` can
    be taken now; it is dropped again at once."""
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "flock":
            return _try(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))
        return _try(lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0))
    finally:
        os.close(fd)


def _getlk(fd: int, ltype: int, start: int, length: int) -> tuple[int, int, int, int]:
    """``F_GETLK``: (type, start, len, pid) of a lock that would block ``ltype`` on the range."""
    raw = struct.pack(FLOCK_STRUCT, ltype, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, fcntl.F_GETLK, raw)
    l_type, _, l_start, l_len, l_pid = struct.unpack(FLOCK_STRUCT, out)
    return l_type, l_start, l_len, l_pid


@pytest.mark.xfail(
    fuse_binding() == "pyfuse3",
    strict=True,
    reason="docs/SEMANTICS.md: with the pyfuse3 binding locks are not shared between mounts "
    "(it has no lock handlers, so the kernel arbitrates them per mount)",
)
def test_posix_lock_across_mounts(mounter: Mounter, volume: Volume) -> None:
    """A POSIX lock taken through one mount conflicts with one on another mount, and is seen
    by F_GETLK there with its range and its owner's pid.

    This test also runs with the pyfuse3 binding, where it must fail: locks are documented as
    per mount there.
    """
    a = mounter.mount(volume)
    b = mounter.mount(volume)
    (a.path / "locked").write_bytes(b"0" * 1000)
    with lock_held_by_other_process("posix", a.path / "locked") as holder:
        fd = os.open(b.path / "locked", os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
            assert e.value.errno in (errno.EAGAIN, errno.EACCES)
            with pytest.raises(OSError):
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 99)  # one byte overlaps
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)  # [100, 200) is free
            l_type, l_start, l_len, l_pid = _getlk(fd, fcntl.F_RDLCK, 50, 0)
            assert (l_type, l_start, l_len) == (fcntl.F_WRLCK, 0, 100)
            assert l_pid == holder.proc.pid
            assert _getlk(fd, fcntl.F_WRLCK, 500, 10)[0] == fcntl.F_UNLCK
        finally:
            os.close(fd)


@CROSS_MOUNT
def test_posix_lock_blocks_until_released_on_other_mount(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with lock_held_by_other_process("posix", a) as holder:
        waiter = Helper(WAITER, "posix", str(b))
        try:
            assert waiter.line() == "waiting"
            time.sleep(1.0)
            assert waiter.proc.poll() is None  # still blocked
            holder.release()  # the holder closes its file: that drops the lock
            assert waiter.line() == "acquired"
            assert waiter.wait() == 0
        finally:
            waiter.stop()


@CROSS_MOUNT
def test_posix_lock_of_killed_process_is_released(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with lock_held_by_other_process("posix", a) as holder:
        holder.proc.send_signal(signal.SIGKILL)
        holder.wait()
        assert _free(b, "posix")


@CROSS_MOUNT
def test_unlock_and_relock_range(pair: tuple[Path, Path]) -> None:
    a, b = pair
    fa = os.open(a, os.O_RDWR)
    fb = os.open(b, os.O_RDWR)
    try:
        fcntl.lockf(fa, fcntl.LOCK_EX, 0, 0)  # the whole file, to EOF and beyond
        with pytest.raises(OSError):
            fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 1 << 40)
        fcntl.lockf(fa, fcntl.LOCK_UN, 0, 100)  # [100, EOF) unlocked: [0, 100) stays locked
        fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)
        with pytest.raises(OSError):
            fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    finally:
        os.close(fa)
        os.close(fb)


@CROSS_MOUNT
def test_flock_across_mounts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with lock_held_by_other_process("flock", a) as holder:
        fd = os.open(b, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            assert e.value.errno == errno.EWOULDBLOCK
            waiter = Helper(WAITER, "flock", str(b))
            try:
                assert waiter.line() == "waiting"
                time.sleep(0.5)
                assert waiter.proc.poll() is None
                holder.release()
                assert waiter.line() == "acquired"
                assert waiter.wait() == 0
            finally:
                waiter.stop()
            # The waiter exited; its flock ends with the (asynchronous) release of its file.
            assert wait_until(
                lambda: _try(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)), 5
            )
        finally:
            os.close(fd)


@CROSS_MOUNT
def test_shared_flocks_coexist_across_mounts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with lock_held_by_other_process("flock_sh", a):
        fd = os.open(b, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            with pytest.raises(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


@CROSS_MOUNT
@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_blocked_lock_is_interrupted_by_signal(pair: tuple[Path, Path], kind: str) -> None:
    """A signal ends a blocked lock request with EINTR; the lock is not taken behind the
    caller's back, and the mount keeps serving."""
    a, b = pair
    with lock_held_by_other_process(kind, a):
        waiter = Helper(INTERRUPTED, kind, str(b))
        try:
            assert waiter.line() == "interrupted"
            assert waiter.wait() == 0
        finally:
            waiter.stop()
    # A flock ends with the (asynchronous) release of the holder's file, a POSIX lock at once.
    assert wait_until(lambda: _free(b, kind), 5 if kind == "flock" else 0)


@CROSS_MOUNT
def test_ofd_lock_ends_with_its_file_description(pair: tuple[Path, Path]) -> None:
    """Open file description locks belong to the description: another mount sees them until
    the description's last close."""
    a, b = pair
    fa = os.open(a, os.O_RDWR)
    dup = os.dup(fa)
    fb = os.open(b, os.O_RDWR)
    try:
        raw = struct.pack(FLOCK_STRUCT, fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
        fcntl.fcntl(fa, fcntl.F_OFD_SETLK, raw)
        with pytest.raises(OSError):
            fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        os.close(fa)  # the description lives on in ``dup``: still locked
        with pytest.raises(OSError):
            fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        os.close(dup)
        dup = -1
        # The kernel sends the release of a description after close() returns.
        assert wait_until(lambda: _try(lambda: fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)), 5)
    finally:
        if dup >= 0:
            os.close(dup)
        os.close(fb)


@CROSS_MOUNT
def test_stop_answers_a_blocked_lock_request(mounter: Mounter, volume: Volume) -> None:
    """A process blocked on a lock when its mount stops gets an error instead of hanging, and
    the mount process still ends."""
    a = mounter.mount(volume)
    b = mounter.mount(volume)
    (a.path / "l").write_bytes(b"")
    holder = os.open(a.path / "l", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiter = Helper(FLOCK_ERRNO, str(b.path / "l"))
        try:
            time.sleep(1.0)
            assert waiter.proc.poll() is None
            assert b.stop(), b.log_tail()
            assert waiter.line() in {str(errno.ENOLCK), str(errno.ENOTCONN)}
        finally:
            waiter.stop()
    finally:
        os.close(holder)
