"""POSIX (fcntl) and BSD (flock) locks between two mounts of one volume: each mount is its own
process and kernel connection, so only the metadata engine can arbitrate between them."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from llmount import Mount, wait_until

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
"""

WAITER = r"""
import fcntl, os, sys, time
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
print("waiting", flush=True)
start = time.monotonic()
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("acquired", time.monotonic() - start, flush=True)
"""

INTERRUPTED = r"""
import fcntl, os, signal, sys
kind, path = sys.argv[1], sys.argv[2]
class Alarm(Exception):
    pass
def on_alarm(signum, frame):
    raise Alarm()
signal.signal(signal.SIGALRM, on_alarm)
fd = os.open(path, os.O_RDWR)
signal.setitimer(signal.ITIMER_REAL, 0.5)
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    print("acquired", flush=True)
except Alarm:
    print("interrupted", flush=True)
"""


class Proc:
    """A helper process talking over stdin/stdout lines."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, text: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@contextmanager
def held(kind: str, path: Path) -> Iterator[Proc]:
    """Another process holds a lock of ``kind`` on ``path`` until it is told to exit."""
    holder = Proc(HOLDER, kind, str(path))
    try:
        assert holder.line() == "locked"
        yield holder
    finally:
        holder.stop()


@pytest.fixture
def pair(
    workdir: Path, second_mount: Callable[[], Mount], shared_mount: Mount
) -> tuple[Path, Path]:
    """The same file seen through two mounts: (path on mount A, path on mount B)."""
    other = second_mount()
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


def _getlk(fd: int, ltype: int, start: int, length: int) -> tuple[int, int, int, int]:
    raw = struct.pack("hhqqi4x", ltype, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, fcntl.F_GETLK, raw)
    l_type, _, l_start, l_len, l_pid = struct.unpack("hhqqi4x", out)
    return l_type, l_start, l_len, l_pid


def test_posix_lock_across_mounts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with held("posix", a) as holder:
        fd = os.open(b, os.O_RDWR)
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


def test_posix_lock_blocks_until_released_on_other_mount(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with held("posix", a) as holder:
        waiter = Proc(WAITER, "posix", str(b))
        try:
            assert waiter.line() == "waiting"
            time.sleep(1.0)
            assert waiter.proc.poll() is None  # still blocked
            holder.send()  # the holder exits: closing its file drops the lock
            reply = waiter.line()
            assert reply.startswith("acquired"), reply
            assert waiter.wait() == 0
        finally:
            waiter.stop()


def test_posix_lock_of_killed_process_is_released(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with held("posix", a) as holder:
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(timeout=30)
        fd = os.open(b, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        finally:
            os.close(fd)


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


def test_flock_across_mounts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with held("flock", a) as holder:
        fd = os.open(b, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            assert e.value.errno == errno.EWOULDBLOCK
            waiter = Proc(WAITER, "flock", str(b))
            try:
                assert waiter.line() == "waiting"
                time.sleep(0.5)
                assert waiter.proc.poll() is None
                holder.send()
                assert waiter.line().startswith("acquired")
                assert waiter.wait() == 0
            finally:
                waiter.stop()
            # The waiter exited; its flock ends with the (asynchronous) release of its file.
            assert wait_until(
                lambda: _try(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)), 5
            )
        finally:
            os.close(fd)


def test_shared_flocks_coexist_across_mounts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with held("flock_sh", a):
        fd = os.open(b, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            with pytest.raises(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_blocked_lock_is_interrupted_by_signal(pair: tuple[Path, Path], kind: str) -> None:
    """A signal ends a blocked lock request with EINTR; the lock is not taken behind the
    caller's back, and the mount keeps serving."""
    a, b = pair
    with held("flock" if kind == "flock" else "posix", a) as holder:
        waiter = Proc(INTERRUPTED, kind, str(b))
        try:
            assert waiter.line() == "interrupted"
            assert waiter.wait() == 0
        finally:
            waiter.stop()
        holder.send()
        assert holder.wait() == 0
    fd = os.open(b, os.O_RDWR)
    try:
        if kind == "flock":  # released with the holder's file, asynchronously
            assert wait_until(
                lambda: _try(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)), 5
            )
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
    finally:
        os.close(fd)


def test_ofd_lock_ends_with_its_file_description(pair: tuple[Path, Path]) -> None:
    """Open file description locks belong to the description: another mount sees them until
    the description's last close."""
    a, b = pair
    fa = os.open(a, os.O_RDWR)
    dup = os.dup(fa)
    fb = os.open(b, os.O_RDWR)
    try:
        raw = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
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
