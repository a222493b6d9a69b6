"""BSD (flock) and POSIX (fcntl) locks between two processes on one mount."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
from lockprocs import LockHolder, lock_held_by_other_process


def test_flock_contention(workdir: Path) -> None:
    f = workdir / "lock"
    f.touch()
    fd = os.open(f, os.O_RDWR)
    try:
        with lock_held_by_other_process("flock", f):
            with pytest.raises(OSError) as e:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert e.value.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            with pytest.raises(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the other process
        fcntl.flock(fd, fcntl.LOCK_UN)
        with lock_held_by_other_process("flock_sh", f):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared locks coexist
            fcntl.flock(fd, fcntl.LOCK_UN)
            with pytest.raises(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_flock_blocking_waiter_gets_lock_on_release(workdir: Path) -> None:
    f = workdir / "lock"
    f.touch()
    fd = os.open(f, os.O_RDWR)
    try:
        with lock_held_by_other_process("flock", f) as holder:
            releaser = threading.Timer(0.5, holder.release)
            releaser.start()
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder lets go
            waited = time.monotonic() - start
            releaser.join()
            assert 0.3 < waited < 30
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_posix_lock_contention(workdir: Path) -> None:
    f = workdir / "plock"
    f.write_bytes(b"x" * 200)
    fd = os.open(f, os.O_RDWR)
    try:
        with lock_held_by_other_process("posix", f):
            with pytest.raises(OSError) as e:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)  # overlaps [0, 100)
            assert e.value.errno in (errno.EAGAIN, errno.EACCES)
            with pytest.raises(OSError):
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 99)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 50, 100)  # disjoint range is free
            fcntl.lockf(fd, fcntl.LOCK_UN, 50, 100)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)  # the holder exited
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
    finally:
        os.close(fd)


def test_posix_lock_released_when_holder_dies(workdir: Path) -> None:
    f = workdir / "plock"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDWR)
    holder = LockHolder("posix", f)
    try:
        with pytest.raises(OSError):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        holder.proc.kill()
        holder.proc.wait(timeout=30)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
    finally:
        holder.stop()
        os.close(fd)
