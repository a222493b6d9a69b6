"""A metadata server or the object store dies while a mount writes: the writer gets EIO within
a bounded time, never a hang; the mount process survives; once the server is back the same mount
works again without a remount, and everything fsynced before the failure is intact.

Each test starts servers of its own (``*_factory`` fixtures) so it can kill them; the engines'
retry budget is shortened through their URL so a test takes seconds, not the default 30 s.
The server fixtures come before ``mounter`` in each test's arguments: pytest tears fixtures
down in reverse, so the mounts go while their servers still run (an unmount with its engine
gone waits out the retries of every pending call: over a minute).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loftmount import MIB, Mounter, Stack, Volume, loft

# These tests build their own stacks: run them once, in the default run of the folder.
pytestmark = pytest.mark.skipif(
    os.environ.get("LOFT_TEST_STACK", "sqlite+file") != "sqlite+file"
    or os.environ.get("LOFT_FUSE_BINDING", "lowlevel") != "lowlevel",
    reason="runs in the default pass of tests/mount only (it starts servers of its own)",
)

# How long a server may be gone before the engine gives up (seconds, in the metadata URL).
RETRY_S = 6
# The writer's error must come within this bound (retry budget + object-store retries + slack).
EIO_WITHIN_S = 60


def _volume(tmp_path: Path, stack: Stack) -> Volume:
    volume = Volume(tmp_path / "vol", "faultvol", MIB, stack=stack)
    volume.root.mkdir(parents=True, exist_ok=True)
    if stack.storage == "file":
        volume.bucket.mkdir(parents=True, exist_ok=True)
    sep = "&" if "?" in volume.meta_url else "?"
    volume.meta_url += f"{sep}retry_timeout={RETRY_S}"
    loft("format", volume.meta_url, volume.name, *volume.storage_flags(), "--block-size", "1M")
    return volume


def _write_fsync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempt(fn: Callable[[], Any], timeout: float) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised, None on success. A call still running
    after ``timeout`` fails the test (a hang is the bug this file looks for)."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the file system call hung for more than {timeout:.0f}s")
    return box[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scenario(mounter: Mounter, volume: Volume, server: Any) -> None:
    mount = mounter.mount(volume)
    safe = os.urandom(3 * MIB + 123)
    _write_fsync(mount.path / "safe", safe)
    (mount.path / "dir").mkdir()
    server.kill()
    try:
        started = time.monotonic()
        err = _attempt(
            lambda: _write_fsync(mount.path / "dir" / "during", os.urandom(2 * MIB)), EIO_WITHIN_S
        )
        assert isinstance(err, OSError), f"writing with the server down succeeded: {err!r}"
        assert err.errno == errno.EIO, err
        assert time.monotonic() - started < EIO_WITHIN_S
        assert mount.alive(), mount.log_tail()
    finally:
        server.start()
    # The same mount works again once the server is back (no remount).
    deadline = time.monotonic() + 60
    while True:
        err = _attempt(lambda: _write_fsync(mount.path / "dir" / "after", b"back"), EIO_WITHIN_S)
        if err is None:
            break
        assert time.monotonic() < deadline, f"the mount did not recover: {err!r}"
        time.sleep(1)
    assert (mount.path / "dir" / "after").read_bytes() == b"back"
    assert _sha(mount.path / "safe") == hashlib.sha256(safe).hexdigest()
    assert mount.alive()
    # What was fsynced before the failure is intact for a fresh client too.
    other = mounter.mount(volume)
    assert _sha(other.path / "safe") == hashlib.sha256(safe).hexdigest()
    assert "during" not in os.listdir(other.path / "dir") or (
        (other.path / "dir" / "during").stat().st_size in (0, 2 * MIB)
    )


def test_redis_dies_during_writes(
    tmp_path: Path, redis_factory: Any, seaweed_server: Any, mounter: Mounter
) -> None:
    redis = redis_factory()
    volume = _volume(tmp_path, Stack("redis+s3", redis=redis, seaweed=seaweed_server))
    _scenario(mounter, volume, redis)


def test_postgres_dies_during_writes(
    tmp_path: Path, postgres_factory: Any, seaweed_server: Any, mounter: Mounter
) -> None:
    pg = postgres_factory()
    stack = Stack("postgres+s3", postgres=pg, pg_db=pg.new_database(), seaweed=seaweed_server)
    _scenario(mounter, _volume(tmp_path, stack), pg)


def test_object_store_dies_during_writes(
    tmp_path: Path, redis_server: Any, seaweed_factory: Any, mounter: Mounter
) -> None:
    seaweed = seaweed_factory()
    volume = _volume(tmp_path, Stack("redis+s3", redis=redis_server, seaweed=seaweed))
    _scenario(mounter, volume, seaweed)
