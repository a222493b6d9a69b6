"""Life of a mount served by the low-level binding: clean unmount on signals and on umount,
failures answered without killing the mount, bounded per-thread resources."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmount import MIB, SERVE, Mount, Mounter, Volume, is_mounted, wait_until


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_and_commits_buffered_data(
    mounter: Mounter, volume: Volume, sig: int
) -> None:
    m = mounter.mount(volume)
    f = m.path / "unflushed"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"a" * (3 * MIB + 5))  # stays in the mount's buffer: no close, no fsync
    assert m.stop(sig) == 0, m.log_text()[-3000:]
    assert not is_mounted(m.path)
    try:
        os.close(fd)
    except OSError as e:  # the connection is gone
        assert e.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV)
    again = mounter.mount(volume)
    assert (again.path / "unflushed").read_bytes() == b"a" * (3 * MIB + 5)


def test_umount_from_outside_ends_the_process(mount: Mount) -> None:
    (mount.path / "f").write_bytes(b"x")
    subprocess.run(["umount", str(mount.path)], check=True, capture_output=True)
    assert mount.proc.wait(timeout=60) == 0
    assert "unmounted" in mount.log_text()


def test_stop_answers_a_blocked_lock_request(mounter: Mounter, volume: Volume) -> None:
    """A process blocked on a lock when the mount stops gets an error instead of hanging, and
    the mount process still ends."""
    a = mounter.mount(volume)
    b = mounter.mount(volume)
    (a.path / "l").write_bytes(b"")
    holder = os.open(a.path / "l", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n"
            "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n"
            "else:\n"
            "    print('acquired')\n",
            str(b.path / "l"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        assert waiter.poll() is None
        assert b.stop() == 0, b.log_text()[-3000:]
        out, _ = waiter.communicate(timeout=30)
        assert out.strip() in {str(errno.ENOLCK), str(errno.ENOTCONN)}
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        os.close(holder)


def test_failures_do_not_kill_the_mount(mounter: Mounter, volume: Volume) -> None:
    writer = mounter.mount(volume)
    (writer.path / "damaged").write_bytes(os.urandom(2 * MIB))
    for block in volume.block_files():
        block.unlink()  # the data is gone from the object store
    # Another mount (no cached copy) finds the blocks missing: EIO, never wrong data.
    m = mounter.mount(volume)
    with pytest.raises(OSError) as e:
        (m.path / "damaged").read_bytes()
    assert e.value.errno == errno.EIO

    odd = m.path / "odd"
    fd = os.open(odd, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for call in (
            lambda: os.truncate(odd, 1 << 62),
            lambda: os.pwrite(fd, b"x", (1 << 62) - 1),
            lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, (1 << 62)),
            lambda: os.copy_file_range(fd, fd, 1 << 40, 0, 1 << 50),
            lambda: os.setxattr(odd, "user." + "n" * 250, b"v"),
            lambda: os.setxattr(odd, "user.big", b"v" * 70000),
        ):
            try:
                call()
            except OSError:
                pass
    finally:
        os.close(fd)

    assert m.alive()
    (m.path / "after").write_bytes(b"still serving")
    assert (m.path / "after").read_bytes() == b"still serving"
    assert m.stop() == 0


def test_worker_threads_keep_their_metadata_connection(mount: Mount) -> None:
    """Every libfuse worker keeps one Python thread state, so the SQLite engine's
    per-thread connection is reused across requests instead of opened per request."""
    for i in range(300):
        (mount.path / f"f{i}").write_bytes(b"x")
        (mount.path / f"f{i}").stat()
    pid = mount.proc.pid
    threads = len(os.listdir(f"/proc/{pid}/task"))
    db = str(mount.volume.root / "meta.db")
    fds = os.listdir(f"/proc/{pid}/fd")
    connections = sum(1 for fd in fds if _readlink(f"/proc/{pid}/fd/{fd}") == db)
    assert 0 < connections <= threads


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_rejected_mount_option_is_an_error(volume: Volume, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(SERVE),
            volume.meta_url,
            str(mp),
            json.dumps({"fuse_options": ["no_such_option_here"]}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "refused the mount options" in proc.stderr
    assert wait_until(lambda: not is_mounted(mp), 5)
