"""Life of a mount process: clean unmount on signals and on an external umount, failures
answered without killing the mount, bounded per-thread resources, rejected mount options."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess

import pytest
from loftmount import (
    MIB,
    Mount,
    Mounter,
    Volume,
    fuse_binding,
    is_mounted,
    loft,
    lowlevel_only,
    pid_alive,
    wait_until,
)

#: What the mount process logs once it has unmounted cleanly.
UNMOUNTED = "unmounted from"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_and_commits_buffered_data(
    mounter: Mounter, volume: Volume, sig: int
) -> None:
    m = mounter.mount(volume)
    f = m.path / "unflushed"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * (3 * MIB + 5))  # stays in the mount's buffer: no close, no fsync
        assert m.stop(sig), f"{signal.Signals(sig).name} did not unmount\n{m.log_tail()}"
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the connection is gone
            assert e.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV)
    assert UNMOUNTED in m.log_text(), m.log_tail()
    again = mounter.mount(volume)
    assert (again.path / "unflushed").read_bytes() == b"a" * (3 * MIB + 5)


def test_umount_from_outside_ends_the_process(mount: Mount) -> None:
    (mount.path / "f").write_bytes(b"x")
    mount.expected_dead = True
    subprocess.run(["umount", str(mount.path)], check=True, capture_output=True, timeout=60)
    assert wait_until(lambda: not pid_alive(mount.pid), 60), mount.log_tail()
    assert not is_mounted(mount.path)
    assert UNMOUNTED in mount.log_text(), mount.log_tail()


def test_failures_do_not_kill_the_mount(mounter: Mounter, volume: Volume) -> None:
    """Damaged data is answered with EIO, never wrong data; out-of-range requests get errors;
    the mount keeps serving and logs no unexpected exception (checked in teardown)."""
    writer = mounter.mount(volume)
    (writer.path / "damaged").write_bytes(os.urandom(2 * MIB))
    blocks = volume.block_files()
    assert blocks
    for block in blocks:
        volume.delete_block(block)  # the data is gone from the object store
    # Another mount (no cached copy) finds the blocks missing.
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

    assert m.alive(), m.log_tail()
    (m.path / "after").write_bytes(b"still serving")
    assert (m.path / "after").read_bytes() == b"still serving"
    m.umount()


@lowlevel_only("serve requests in libfuse's own worker threads")
def test_worker_threads_keep_their_metadata_connection(mount: Mount) -> None:
    """Every libfuse worker keeps one Python thread state, so the SQLite engine's per-thread
    connection is reused across requests instead of opened per request."""
    for i in range(300):
        (mount.path / f"f{i}").write_bytes(b"x")
        (mount.path / f"f{i}").stat()
    pid = mount.pid
    threads = len(os.listdir(f"/proc/{pid}/task"))
    db = str(mount.volume.meta_db)
    connections = sum(
        1 for fd in os.listdir(f"/proc/{pid}/fd") if _readlink(f"/proc/{pid}/fd/{fd}") == db
    )
    assert 0 < connections <= threads


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_rejected_mount_option_is_an_error(mounter: Mounter, volume: Volume) -> None:
    path = mounter.mountpoint()
    log = volume.root / "rejected.log"
    # registered so that the fixture's cleanup unmounts it should the mount succeed after all
    mounter.mounts.append(Mount(volume, path, log, -1, expected_dead=True))
    proc = loft(
        "mount", volume.meta_url, str(path), "-d", "--log", str(log), "-o", "no_such_option_here",
        check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert wait_until(lambda: not is_mounted(path), 5)
    if fuse_binding() == "lowlevel":
        told = proc.stderr + (log.read_text(errors="replace") if log.exists() else "")
        assert "refused the mount options" in told, told
