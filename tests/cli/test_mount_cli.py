"""``loft mount -d``, ``loft info`` and ``loft umount`` through real FUSE mounts.

Each test cleans up whatever happens: a lazy ``fusermount3 -uz`` and SIGKILL of the mount
process in teardown, so a failing test never leaves a mount or a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loftcli import Volume, bucket_files, check_clean_error, loft_process, mount_processes, ok

pytestmark = pytest.mark.mount


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


if _fuse_unavailable():
    pytest.skip(_fuse_unavailable() or "", allow_module_level=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mount_pid(mountpoint: Path) -> int | None:
    from loftfs.fuse.mount import read_mount_record

    record = read_mount_record(str(mountpoint))
    return record.pid if record else None


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    pids = set(mount_processes(path))
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)
    for pid in pids:
        if not _wait(lambda p=pid: not _alive(p), 20):  # type: ignore[misc]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait(lambda p=pid: not _alive(p), 10)  # type: ignore[misc]


def _read(path: Path, expected_len: int) -> bytes:
    """Read at most one byte more than expected: a broken size can never exhaust memory."""
    with open(path, "rb") as f:
        return f.read(expected_len + 1)


@pytest.fixture
def fs_volume(tmp_path: Path) -> Volume:
    meta_url = f"sqlite3://{tmp_path / 'meta.db'}"
    bucket = tmp_path / "bucket"
    ok(loft_process("format", meta_url, "mvol", "--bucket", str(bucket), "--block-size", "1M"))
    return Volume(meta_url, bucket, "mvol")


def _mount(volume: Volume, mountpoint: Path, *args: str) -> int:
    log = mountpoint.parent / "mount.log"
    run = loft_process("mount", "-d", volume.meta_url, str(mountpoint), "--log", str(log), *args)
    assert run.code == 0, f"{run.stderr}\n{log.read_text() if log.exists() else ''}"
    assert "Mounted at" in run.stdout
    assert os.path.ismount(mountpoint)
    pid = _mount_pid(mountpoint)
    assert pid is not None and _alive(pid)
    return pid


def test_mount_write_info_status_umount(fs_volume: Volume, mountpoint: Path) -> None:
    pid = _mount(fs_volume, mountpoint)
    data = os.urandom((2 << 20) + 123)
    (mountpoint / "dir").mkdir()
    (mountpoint / "dir" / "weights.bin").write_bytes(data)
    assert _read(mountpoint / "dir" / "weights.bin", len(data)) == data

    status = json.loads(ok(loft_process("status", fs_volume.meta_url, "--json")).stdout)
    (session,) = status["sessions"]
    assert session["pid"] == pid
    assert session["mountpoint"] == str(mountpoint)
    assert session["stale"] is False

    info = json.loads(
        ok(loft_process("info", str(mountpoint / "dir" / "weights.bin"), "--json")).stdout
    )
    assert info["type"] == "file"
    assert info["size"] == len(data)
    assert info["volume"] == "mvol"
    assert info["mountpoint"] == str(mountpoint)
    assert info["inode"] == os.stat(mountpoint / "dir" / "weights.bin").st_ino
    keys = [k for c in info["chunks"] for s in c["slices"] for k in s["blocks"]]
    assert keys, info
    stored = bucket_files(fs_volume.bucket)
    assert all(k in stored for k in keys)
    assert sum((fs_volume.bucket / k).stat().st_size for k in keys) >= len(data)

    table = ok(loft_process("info", str(mountpoint / "dir" / "weights.bin")))
    assert "Chunk 0" in table.stdout and keys[0].rsplit("/", 1)[1] in table.stdout
    assert (
        json.loads(ok(loft_process("info", str(mountpoint / "dir"), "--json")).stdout)["entries"]
        == 1
    )

    ok(loft_process("umount", str(mountpoint)))
    assert not os.path.ismount(mountpoint)
    assert not _alive(pid), "loft umount returned before the mount process exited"
    assert (
        json.loads(ok(loft_process("status", fs_volume.meta_url, "--json")).stdout)["sessions"]
        == []
    )


def test_umount_of_a_busy_mount(fs_volume: Volume, mountpoint: Path) -> None:
    pid = _mount(fs_volume, mountpoint)
    holder = subprocess.Popen(["sleep", "60"], cwd=mountpoint)
    try:
        line = check_clean_error(loft_process("umount", str(mountpoint)))
        assert "busy" in line
        assert os.path.ismount(mountpoint) and _alive(pid)
    finally:
        holder.kill()
        holder.wait()
    ok(loft_process("umount", str(mountpoint)))
    assert not _alive(pid)


def test_forced_umount_detaches_while_busy(fs_volume: Volume, mountpoint: Path) -> None:
    pid = _mount(fs_volume, mountpoint)
    (mountpoint / "f").write_bytes(b"data")
    holder = subprocess.Popen(["sleep", "60"], cwd=mountpoint)
    try:
        line = check_clean_error(
            loft_process("umount", "--force", "--timeout", "1", str(mountpoint))
        )
        assert "still open" in line
        assert not os.path.ismount(mountpoint)
        assert _alive(pid)
    finally:
        holder.kill()
        holder.wait()
    assert _wait(lambda: not _alive(pid), 30)


def test_mount_errors_are_one_line(fs_volume: Volume, mountpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    log = str(tmp_path / "mount.log")
    line = check_clean_error(
        loft_process("mount", "-d", fs_volume.meta_url, str(missing), "--log", log)
    )
    assert "does not exist" in line
    unformatted = f"sqlite3://{tmp_path / 'empty.db'}"
    check_clean_error(loft_process("mount", "-d", unformatted, str(mountpoint), "--log", log))
    assert not os.path.ismount(mountpoint)
    # foreground: the same error, no background process involved
    line = check_clean_error(loft_process("mount", fs_volume.meta_url, str(missing)))
    assert "does not exist" in line
    # the background errors went to the log too, with their time
    assert "does not exist" in Path(log).read_text()


def test_mount_twice_and_umount_of_non_mounts(
    fs_volume: Volume, mountpoint: Path, tmp_path: Path
) -> None:
    _mount(fs_volume, mountpoint)
    line = check_clean_error(
        loft_process(
            "mount", "-d", fs_volume.meta_url, str(mountpoint), "--log", str(tmp_path / "2.log")
        )
    )
    assert "already" in line
    (mountpoint / "sub").mkdir()
    line = check_clean_error(loft_process("umount", str(mountpoint / "sub")))
    assert "inside the loftfs mount" in line
    line = check_clean_error(loft_process("umount", str(tmp_path)))
    assert "not a loftfs mount" in line
    ok(loft_process("umount", str(mountpoint)))


def test_sigterm_of_the_mount_process_unmounts(fs_volume: Volume, mountpoint: Path) -> None:
    pid = _mount(fs_volume, mountpoint)
    (mountpoint / "f").write_bytes(b"hello")
    os.kill(pid, signal.SIGTERM)
    assert _wait(lambda: not _alive(pid), 30)
    assert not os.path.ismount(mountpoint)
    _mount(fs_volume, mountpoint)
    assert _read(mountpoint / "f", 5) == b"hello"
    ok(loft_process("umount", str(mountpoint)))


def test_relative_sqlite_url(tmp_path: Path, mountpoint: Path) -> None:
    """A relative database path means the caller's directory, for the background process and
    for later commands run elsewhere (``info`` finds the volume through the mount record)."""
    work = tmp_path / "work"
    work.mkdir()
    bucket = work / "bucket"
    ok(loft_process("format", "sqlite3://meta.db", "relvol", "--bucket", "bucket", cwd=work))
    run = loft_process(
        "mount", "-d", "sqlite3://meta.db", str(mountpoint), "--log", "m.log", cwd=work
    )
    assert run.code == 0, run.stderr
    (mountpoint / "f").write_bytes(b"x" * 10)
    info = json.loads(
        ok(loft_process("info", str(mountpoint / "f"), "--json", cwd=Path("/"))).stdout
    )
    assert info["volume"] == "relvol" and info["size"] == 10
    ok(loft_process("umount", str(mountpoint), cwd=Path("/")))
    assert bucket_files(bucket)


def test_mount_not_ready_in_time_leaves_nothing(
    fs_volume: Volume, mountpoint: Path, tmp_path: Path
) -> None:
    """When -d gives up waiting, the child is stopped and its mount (if any) detached."""
    run = loft_process(
        "mount", "-d", fs_volume.meta_url, str(mountpoint), "--ready-timeout", "0.01",
        "--log", str(tmp_path / "m.log"),
    )  # fmt: skip
    line = check_clean_error(run)
    assert "not ready after" in line
    assert _wait(lambda: not os.path.ismount(mountpoint), 10)
    assert _wait(lambda: not mount_processes(mountpoint), 10)


def test_umount_of_a_dead_mount(fs_volume: Volume, mountpoint: Path) -> None:
    pid = _mount(fs_volume, mountpoint)
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not _alive(pid), 10)
    from loftfs.fuse.mount import find_mount_root

    assert find_mount_root(str(mountpoint)) == str(mountpoint)  # still attached, no server
    ok(loft_process("umount", str(mountpoint)))
    assert not os.path.ismount(mountpoint)
    _mount(fs_volume, mountpoint)
    ok(loft_process("umount", str(mountpoint)))
