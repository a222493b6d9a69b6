"""Helper processes for lock tests: a lock is owned by a process, so contention needs others.

Imported by this folder's lock tests (the folder is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Takes a lock of ``kind`` (flock, flock_sh, or posix: a write lock on bytes [0, 100)), prints
#: ``locked`` and keeps it until a line arrives on stdin.
HOLDER = r"""
import fcntl, os, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
elif kind == "flock_sh":
    fcntl.flock(fd, fcntl.LOCK_SH)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("locked", flush=True)
sys.stdin.readline()
os.close(fd)
"""

#: Prints ``waiting``, blocks on an exclusive lock of ``kind``, then prints ``acquired``.
WAITER = r"""
import fcntl, os, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
print("waiting", flush=True)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("acquired", flush=True)
"""

#: Blocks on an exclusive lock of ``kind`` with a 0.5 s alarm; prints ``interrupted`` when the
#: signal ended the wait, ``acquired`` otherwise.
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

#: Blocks on an exclusive flock; prints the errno that ended the wait, or ``acquired``.
FLOCK_ERRNO = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX)
except OSError as e:
    print(e.errno, flush=True)
else:
    print("acquired", flush=True)
"""


class Helper:
    """A Python script in another process, talking in lines over stdin/stdout."""

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
        """Kill the process if it still runs and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class LockHolder(Helper):
    """Another process that takes a lock of ``kind`` on ``path`` and keeps it until released."""

    def __init__(self, kind: str, path: Path) -> None:
        super().__init__(HOLDER, kind, str(path))
        if self.line() != "locked":
            self.stop()
            raise AssertionError(f"the helper could not take a {kind} lock on {path}")

    def release(self) -> None:
        """Tell the holder to close its file (dropping the lock) and exit."""
        self.send()


@contextmanager
def lock_held_by_other_process(kind: str, path: Path) -> Iterator[LockHolder]:
    """Another process holds a lock of ``kind`` on ``path`` until the block ends."""
    holder = LockHolder(kind, path)
    try:
        yield holder
        if holder.proc.poll() is None:
            holder.release()
            assert holder.wait() == 0
    finally:
        holder.stop()
