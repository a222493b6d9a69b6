"""Helpers for the tests of the low-level FUSE binding: volumes, mount processes, other users.

Imported by this folder's conftest and tests (the folder is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SERVE = Path(__file__).with_name("llserve.py")
LOFT = [sys.executable, "-m", "loftfs.cli.main"]
MIB = 1 << 20
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
NOBODY = 65534


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        from loftfs.fuse import ll_abi

        ll_abi.load()
    except Exception as e:
        return f"libfuse3 cannot be loaded: {e}"
    return None


@dataclass
class Volume:
    root: Path
    name: str

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.root / 'meta.db'}"

    @property
    def bucket(self) -> Path:
        return self.root / "bucket"

    def block_files(self) -> list[Path]:
        return [p for p in self.bucket.rglob("*") if p.is_file() and "/chunks/" in str(p)]


def make_volume(root: Path, name: str = "llvol", block_size: int = MIB) -> Volume:
    volume = Volume(root, name)
    volume.bucket.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            *LOFT,
            "format",
            volume.meta_url,
            name,
            "--storage",
            "file",
            "--bucket",
            str(volume.bucket),
            "--block-size",
            f"{block_size // 1024}K",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"loft format failed: {proc.stderr[-2000:]}")
    return volume


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: never asks the file system, so it cannot hang."""
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as fh:
        return any(line.split(b" ")[4] == target for line in fh)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class Mount:
    """One ``llserve.py`` process serving ``volume`` at ``path``."""

    volume: Volume
    path: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None and is_mounted(self.path)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig`` and wait for the process; returns its exit status (None if it hangs)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def force_cleanup(self) -> None:
        if self.stop() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Mounter:
    """Starts mount processes; ``cleanup`` unmounts all of them whatever state they are in."""

    base: Path
    mounts: list[Mount] = field(default_factory=list)

    def mount(self, volume: Volume, **opts: Any) -> Mount:
        path = Path(tempfile.mkdtemp(prefix="llmnt-", dir=self.base))
        path.chmod(0o755)
        log = volume.root / f"{path.name}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(SERVE), volume.meta_url, str(path), json.dumps(opts)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        mount = Mount(volume, path, log, proc)
        self.mounts.append(mount)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"READY" or not is_mounted(path):
            pytest.fail(f"mount did not become ready (got {line!r})\n{mount.log_text()[-4000:]}")
        return mount

    def kill_all(self) -> None:
        for mount in self.mounts:
            if mount.proc.poll() is None:
                mount.proc.kill()

    def cleanup(self) -> list[str]:
        """Unmount everything; returns the log lines that reveal a bug in a handler (an
        unexpected exception answered with EIO) or a crash."""
        problems = []
        for mount in reversed(self.mounts):
            mount.force_cleanup()
            with contextlib.suppress(OSError):
                mount.path.rmdir()
            bad = [
                line
                for line in mount.log_text().splitlines()
                if "unexpected error" in line or "Fatal Python error" in line
            ]
            if bad:
                problems.append(f"{mount.path}:\n" + "\n".join(bad[:20]))
        self.mounts.clear()
        return problems


def run_as(uid: int, gid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child as ``uid``/``gid``; an ``OSError`` it raises is raised here
    again with its errno, any other exception fails the test."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            payload: tuple[str, Any] = ("ok", fn())
        except OSError as e:
            payload = ("oserror", (e.errno, e.strerror))
        except BaseException as e:
            payload = ("error", repr(e))
        with os.fdopen(wfd, "wb") as out:
            pickle.dump(payload, out)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value[0], value[1])
    if kind == "error":
        pytest.fail(f"child as uid {uid} raised {value}")
    return value
