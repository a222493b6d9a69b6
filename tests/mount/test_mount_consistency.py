"""Durability and consistency through real mounts: remounts, two mounts of one volume, crashes."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from loftmount import LOFT, MIB, Mount, Mounter, Volume, is_mounted, loft, pid_alive, wait_until

# A second mount notices names created, renamed or removed elsewhere once its kernel caches
# expire: the default entry and attribute timeouts are 1 s.
CACHE_EXPIRY_S = 5

XATTR = ("--enable-xattr",)  # the trees below carry extended attributes


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything a remount must preserve, per relative path (not inode numbers or atime)."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            entry: dict[str, Any] = {
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            if not stat.S_ISLNK(st.st_mode):
                entry["xattrs"] = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
            out[str(p.relative_to(root))] = entry
    return out


def populate(root: Path, rng: random.Random) -> None:
    """A small tree with every kind of inode and attribute a remount must keep."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"small file")
    (root / "multiblock").write_bytes(rng.randbytes(3 * MIB + 5))
    (root / "dir" / "sub" / "deep").write_bytes(rng.randbytes(70_000))
    with open(root / "sparse", "wb") as fh:
        fh.seek(65 * MIB)
        fh.write(b"end")
    os.symlink("dir/sub/deep", root / "link")
    os.link(root / "small", root / "dir" / "hardlink")
    os.mkfifo(root / "fifo")
    os.chmod(root / "small", 0o4751)
    os.chown(root / "multiblock", 1001, 1002)
    os.setxattr(root / "dir", "user.tag", b"kept")
    os.utime(root / "dir" / "sub" / "deep", ns=(123_456_789, 987_654_321_123))
    fd = os.open(root / "overwritten", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, rng.randbytes(2 * MIB))
    os.pwrite(fd, b"patched in place", MIB - 3)
    os.ftruncate(fd, 2 * MIB - 1000)
    os.close(fd)


def test_persistence_across_remount(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume, *XATTR)
    populate(m.path, random.Random(5))
    before = snapshot(m.path)
    m = mounter.remount(m)
    assert snapshot(m.path) == before

    # change things, remount again: the changes (and only they) are kept
    os.rename(m.path / "dir" / "sub", m.path / "moved")
    os.unlink(m.path / "small")
    with open(m.path / "multiblock", "r+b") as fh:
        fh.seek(MIB)
        fh.write(b"X" * 100)
    os.truncate(m.path / "sparse", 10)
    before = snapshot(m.path)
    m = mounter.remount(m)
    assert snapshot(m.path) == before
    assert os.stat(m.path / "dir" / "hardlink").st_nlink == 1


def test_clean_umount_ends_the_session(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume, *XATTR)
    (m.path / "f").write_bytes(b"x")
    status = json.loads(loft("status", volume.meta_url, "--json").stdout)
    assert [s["pid"] for s in status["sessions"]] == [m.pid]
    assert status["usage"]["inodes"] >= 1
    m.umount()
    status = json.loads(loft("status", volume.meta_url, "--json").stdout)
    assert status["sessions"] == []


def test_sigterm_unmounts_cleanly(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume, *XATTR)
    data = os.urandom(3 * MIB)
    (m.path / "f").write_bytes(data)
    m.kill(signal.SIGTERM)
    assert wait_until(lambda: not is_mounted(m.path), 30), "SIGTERM left the mount behind"
    assert not pid_alive(m.pid)
    assert json.loads(loft("status", volume.meta_url, "--json").stdout)["sessions"] == []
    m = mounter.mount(volume, *XATTR, path=m.path)
    assert (m.path / "f").read_bytes() == data


def test_foreground_mount_stops_on_sigint(mounter: Mounter, volume: Volume) -> None:
    path = mounter.mountpoint()
    log = volume.root / "foreground.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*LOFT, "mount", volume.meta_url, str(path)], stdout=out, stderr=out
        )
    # registered so that the fixture's cleanup and the hang watchdog know about it
    mounter.mounts.append(Mount(volume, path, log, proc.pid, expected_dead=True))
    try:
        assert wait_until(lambda: is_mounted(path) or proc.poll() is not None, 60)
        assert is_mounted(path), f"foreground mount failed:\n{log.read_text()}"
        (path / "f").write_bytes(b"foreground")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert not is_mounted(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    m = mounter.mount(volume, *XATTR, path=path)
    assert (m.path / "f").read_bytes() == b"foreground"


def test_two_mounts_close_to_open(mounter: Mounter, volume: Volume) -> None:
    a = mounter.mount(volume, *XATTR)
    b = mounter.mount(volume, *XATTR)
    assert a.pid != b.pid

    data = os.urandom(2 * MIB + 3)
    (a.path / "new").write_bytes(data)  # closed: visible to any later open
    assert (b.path / "new").read_bytes() == data

    # b has the content cached (data, size, attributes); a rewrites it with another size and
    # closes: b's next open must see exactly the new content, right away (several rounds:
    # a stale cached size shows up only now and then)
    rng = random.Random(4)
    for round_ in range(8):
        assert (b.path / "new").read_bytes() == data
        data = rng.randbytes(rng.choice([MIB + 7, 3 * MIB - 1, 100, 2 * MIB + 3]))
        (a.path / "new").write_bytes(data)
        got = (b.path / "new").read_bytes()
        assert got == data, f"round {round_}: read {len(got)} bytes, expected {len(data)}"
    data2 = data

    with open(b.path / "new", "ab") as fh:
        fh.write(b"appended by b")
    assert (a.path / "new").read_bytes() == data2 + b"appended by b"

    # fsync publishes too, without a close
    fd = os.open(a.path / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"fsynced, still open")
        os.fsync(fd)
        assert (b.path / "synced").read_bytes() == b"fsynced, still open"
    finally:
        os.close(fd)


def test_two_mounts_see_namespace_changes(mounter: Mounter, volume: Volume) -> None:
    a = mounter.mount(volume, *XATTR)
    b = mounter.mount(volume, *XATTR)
    (a.path / "d").mkdir()
    (a.path / "d" / "f").write_bytes(b"content")
    assert sorted(os.listdir(b.path / "d")) == ["f"]

    os.rename(a.path / "d" / "f", a.path / "g")
    assert wait_until(lambda: not (b.path / "d" / "f").exists(), CACHE_EXPIRY_S)
    assert (b.path / "g").read_bytes() == b"content"

    os.rename(b.path / "d", b.path / "d2")
    assert wait_until(lambda: sorted(os.listdir(a.path)) == ["d2", "g"], CACHE_EXPIRY_S)
    (b.path / "d2" / "x").mkdir()
    assert wait_until(lambda: (a.path / "d2" / "x").is_dir(), CACHE_EXPIRY_S)

    os.unlink(b.path / "g")
    assert wait_until(lambda: not (a.path / "g").exists(), CACHE_EXPIRY_S)
    os.chmod(a.path / "d2", 0o700)
    assert wait_until(lambda: stat.S_IMODE(os.stat(b.path / "d2").st_mode) == 0o700, CACHE_EXPIRY_S)


def test_two_mounts_unlink_while_open_elsewhere(mounter: Mounter, volume: Volume) -> None:
    a = mounter.mount(volume, *XATTR)
    b = mounter.mount(volume, *XATTR)
    data = os.urandom(3 * MIB)
    (a.path / "f").write_bytes(data)
    with open(b.path / "f", "rb") as held:
        os.unlink(a.path / "f")
        assert wait_until(lambda: not (b.path / "f").exists(), CACHE_EXPIRY_S)
        assert held.read() == data  # b still holds it open: the data must stay readable
    assert os.listdir(a.path) == []
    # a small file opened read-only is opened light (a snapshot, no open record): the same
    small = os.urandom(100_000)
    (a.path / "s").write_bytes(small)
    fd = os.open(b.path / "s", os.O_RDONLY | os.O_DIRECT)  # every read reaches the mount
    try:
        os.unlink(a.path / "s")
        assert wait_until(lambda: not (b.path / "s").exists(), CACHE_EXPIRY_S)
        buf = mmap.mmap(-1, 128 << 10)  # O_DIRECT wants an aligned buffer
        assert os.preadv(fd, [buf], 0) == len(small) and buf[: len(small)] == small
        assert os.fstat(fd).st_size == len(small)
    finally:
        os.close(fd)


def test_light_handles_see_this_mounts_changes(mounter: Mounter, volume: Volume) -> None:
    """A small file opened read-only is served from a snapshot; whatever this mount does to
    the file afterwards (a write through another handle, a truncate) is still what the first
    handle reads: O_DIRECT, so every read reaches the mount."""
    m = mounter.mount(volume)
    p = m.path / "f"
    p.write_bytes(b"version one")
    buf = mmap.mmap(-1, 4096)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == 11 and buf[:11] == b"version one"
        with open(p, "r+b") as w:
            w.write(b"VERSION TWO")
        assert os.preadv(fd, [buf], 0) == 11 and buf[:11] == b"VERSION TWO"
        os.truncate(p, 4)
        assert os.preadv(fd, [buf], 0) == 4 and buf[:4] == b"VERS"
    finally:
        os.close(fd)


WRITER = r"""
import os, sys
path, seed = sys.argv[1], int(sys.argv[2])
block = bytes((seed + i) % 255 + 1 for i in range(65536))  # never zero
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
print("writing", flush=True)
try:
    while True:
        os.write(fd, block)
except OSError:
    pass
"""


def _check_pattern(data: bytes, seed: int) -> None:
    """Every 64 KiB piece of a crashed writer's file is its pattern or (a hole) zeros."""
    block = bytes((seed + i) % 255 + 1 for i in range(65536))
    for off in range(0, len(data), 65536):
        piece = data[off : off + 65536]
        assert piece in (block[: len(piece)], bytes(len(piece))), f"garbage at offset {off}"


def test_kill9_keeps_fsynced_data(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume, *XATTR)
    durable = os.urandom(5 * MIB + 1)
    fd = os.open(m.path / "durable", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, durable)
    os.fsync(fd)
    closed = os.urandom(MIB)
    (m.path / "closed").write_bytes(closed)  # close commits, too
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(m.path / "inflight"), "7"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        time.sleep(1.0)
        m.kill(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    try:
        os.close(fd)  # the connection is gone: the flush may fail, the fd is released anyway
    except OSError:
        pass
    m.detach()
    assert not is_mounted(m.path)

    m2 = mounter.mount(volume, *XATTR, path=m.path)
    assert (m2.path / "durable").read_bytes() == durable
    assert (m2.path / "closed").read_bytes() == closed
    if (m2.path / "inflight").exists():
        _check_pattern((m2.path / "inflight").read_bytes(), 7)
    # the volume stays fully usable
    (m2.path / "after").write_bytes(b"after the crash")
    m2 = mounter.remount(m2)
    assert (m2.path / "after").read_bytes() == b"after the crash"
    assert (m2.path / "durable").read_bytes() == durable


@pytest.mark.timeout(400)
def test_kill9_session_is_cleaned(mounter: Mounter, volume: Volume) -> None:
    """The session of a killed mount disappears from ``loft status`` (at the latest after the
    stale-session timeout), taking its open-file records along: a file unlinked while open
    there is purged."""
    m = mounter.mount(volume, *XATTR)
    (m.path / "held").write_bytes(os.urandom(2 * MIB))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os,sys,time\n"
            "fd=os.open(sys.argv[1], os.O_RDONLY)\n"
            "os.unlink(sys.argv[1])\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            str(m.path / "held"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        inodes_held = usage_inodes(volume)
        dead_pid = m.pid
        m.kill(signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    m.detach()

    def sessions() -> list[dict[str, Any]]:
        out = json.loads(loft("status", volume.meta_url, "--json").stdout)
        return out["sessions"]  # type: ignore[no-any-return]

    # listed while no live mount runs (the next mount's first heartbeat, 1 s in, cleans it)
    assert dead_pid in [s["pid"] for s in sessions()]
    m2 = mounter.mount(volume, "--heartbeat", "1", path=m.path)
    assert wait_until(lambda: [s["pid"] for s in sessions()] == [m2.pid], 300, interval=2), (
        f"the dead session is still listed: {sessions()}"
    )
    assert wait_until(lambda: usage_inodes(volume) == inodes_held - 1, 30), (
        "the file unlinked while open in the dead session was not purged"
    )


def usage_inodes(volume: Volume) -> int:
    return int(json.loads(loft("status", volume.meta_url, "--json").stdout)["usage"]["inodes"])
