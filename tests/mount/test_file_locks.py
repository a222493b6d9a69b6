"""BSD (flock) and POSIX (fcntl) locks between two processes on one mount."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HOLDER = r"""
import fcntl, os, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
elif kind == "flock_sh":
    fcntl.flock(fd, fcntl.LOCK_SH)
else:  # a POSIX write lock on bytes [0, 100)
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("locked", flush=True)
sys.stdin.readline()
os.close(fd)
"""


class LockHolder:
    """Another process that takes a lock of ``kind`` on ``path`` and keeps it until released."""

    def __init__(self, kind: str, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        """Tell the holder to close its file (dropping the lock) and exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@contextmanager
def lock_held_by_other_process(kind: str, path: Path) -> Iterator[LockHolder]:
    """Another process holds a lock of ``kind`` on ``path`` until the block ends."""
    holder = LockHolder(kind, path)
    try:
        yield holder
        if holder.proc.poll() is None:
            holder.release()
            assert holder.proc.wait(timeout=30) == 0
    finally:
        holder.stop()


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
