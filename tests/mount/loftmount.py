"""Helpers for tests through real FUSE mounts: volumes, mount processes, other users.

Imported by this folder's conftest and tests (the folder is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
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

from servers import fuse_daemon_pids

LOFT = [sys.executable, "-m", "loftfs.cli.main"]
MIB = 1 << 20
MOUNT_TIMEOUT_S = 60
UMOUNT_TIMEOUT_S = 120
NOBODY = 65534
#: Log lines of a mount process that reveal a bug: a handler's unexpected exception (answered
#: with EIO) or a crash of the interpreter.
BUG_MARKERS = ("unexpected error", "Fatal Python error")


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` itself: glibc's posix_fallocate would hide EOPNOTSUPP by writing zeros."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fuse_binding() -> str:
    """The FUSE binding ``loft mount`` uses in this run (CI runs this folder with each)."""
    return os.environ.get("LOFT_FUSE_BINDING") or "lowlevel"


def lowlevel_only(why: str) -> pytest.MarkDecorator:
    """Skip a test under the pyfuse3 binding: ``why`` names what only the low-level one does."""
    return pytest.mark.skipif(
        fuse_binding() == "pyfuse3", reason=f"the pyfuse3 binding does not {why}"
    )


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def loft(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one ``loft`` command; with ``check``, a non-zero exit fails the test with its stderr."""
    proc = subprocess.run(
        [*LOFT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"loft {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


@dataclass
class Stack:
    """The metadata engine and object store the mount tests run on.

    CI runs this folder on ``sqlite+file`` (the embedded default) and again on ``redis+s3`` and
    ``postgres+s3`` (``LOFT_TEST_STACK``), with the servers of ``tests/servers.py``; the
    session fixture in ``conftest.py`` fills in the servers.
    """

    name: str = "sqlite+file"
    redis: Any = None
    postgres: Any = None
    pg_db: str = ""
    seaweed: Any = None

    @property
    def meta_kind(self) -> str:
        return self.name.split("+")[0]

    @property
    def storage(self) -> str:
        return self.name.split("+")[1]

    def meta_url(self, root: Path, tag: str) -> str:
        if self.meta_kind == "sqlite":
            return f"sqlite3://{root / 'meta.db'}"
        if self.meta_kind == "redis":
            return str(self.redis.url(prefix=tag))
        if self.meta_kind == "postgres":
            return str(self.postgres.url(self.pg_db, schema=tag))
        raise AssertionError(self.name)

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.seaweed.endpoint,
            aws_access_key_id=self.seaweed.access_key,
            aws_secret_access_key=self.seaweed.secret_key,
            region_name="us-east-1",
        )


STACKS = tuple(f"{m}+{o}" for m in ("sqlite", "redis", "postgres") for o in ("file", "s3"))
STACK = Stack()  # replaced by the session fixture when LOFT_TEST_STACK names another stack


@dataclass
class Volume:
    """A formatted volume: its metadata URL and its bucket (a directory or an S3 bucket)."""

    root: Path
    name: str
    block_size: int
    stack: Stack = field(default_factory=lambda: STACK)
    tag: str = ""
    meta_url: str = ""

    def __post_init__(self) -> None:
        self.tag = self.tag or f"v{os.urandom(5).hex()}"
        self.meta_url = self.meta_url or self.stack.meta_url(self.root, self.tag)

    @property
    def meta_db(self) -> Path:
        """The SQLite file (``sqlite+file`` stack only)."""
        if self.stack.meta_kind != "sqlite":
            pytest.skip(f"needs the SQLite metadata file (stack {self.stack.name})")
        return self.root / "meta.db"

    @property
    def bucket(self) -> Path:
        """The bucket directory (``file`` storage only)."""
        if self.stack.storage != "file":
            pytest.skip(f"needs a bucket directory (stack {self.stack.name})")
        return self.root / "bucket"

    @property
    def s3_bucket(self) -> str:
        return f"loft-{self.tag}"

    def storage_flags(self) -> list[str]:
        if self.stack.storage == "file":
            return ["--storage", "file", "--bucket", str(self.bucket)]
        sw = self.stack.seaweed
        return [
            "--storage", "s3", "--bucket", f"{sw.endpoint}/{self.s3_bucket}",
            "--access-key", sw.access_key, "--secret-key", sw.secret_key,
        ]  # fmt: skip

    def block_files(self) -> list[str]:
        """The keys of the data blocks in the bucket."""
        if self.stack.storage == "file":
            base = self.bucket
            return [
                str(p.relative_to(base))
                for p in base.rglob("*")
                if p.is_file() and "/chunks/" in str(p)
            ]
        client = self.stack.s3_client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.s3_bucket):
            keys += [o["Key"] for o in page.get("Contents", []) if "/chunks/" in o["Key"]]
        return keys

    def delete_block(self, key: str) -> None:
        if self.stack.storage == "file":
            (self.bucket / key).unlink()
        else:
            self.stack.s3_client().delete_object(Bucket=self.s3_bucket, Key=key)

    def read_block(self, key: str) -> bytes:
        if self.stack.storage == "file":
            return (self.bucket / key).read_bytes()
        body = self.stack.s3_client().get_object(Bucket=self.s3_bucket, Key=key)["Body"]
        return bytes(body.read())

    def write_block(self, key: str, data: bytes) -> None:
        """Overwrite a stored object behind loftfs's back (to damage it)."""
        if self.stack.storage == "file":
            (self.bucket / key).write_bytes(data)
        else:
            self.stack.s3_client().put_object(Bucket=self.s3_bucket, Key=key, Body=data)


def make_volume(root: Path, *, name: str = "testvol", block_size: int = MIB, **opts: str) -> Volume:
    """Format a volume under ``root`` on the current stack; ``opts`` become ``--key value``
    flags of ``loft format``."""
    root.mkdir(parents=True, exist_ok=True)
    volume = Volume(root, name, block_size)
    if volume.stack.storage == "file":
        volume.bucket.mkdir(parents=True, exist_ok=True)
    flags = ["--block-size", f"{block_size // 1024}K"]
    for key, value in opts.items():
        flags += [f"--{key.replace('_', '-')}", value]
    loft("format", volume.meta_url, name, *volume.storage_flags(), *flags)
    return volume


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mountpoint, from /proc/self/mountinfo: unlike ``os.path.ismount``
    this never asks the file system, so it cannot hang on a stuck mount process."""
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            point = line.split(b" ")[4]
            if point == target or _unescape(point) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass
class Mount:
    """One ``loft mount -d`` process serving ``path``."""

    volume: Volume
    path: Path
    log: Path
    pid: int
    args: tuple[str, ...] = ()
    expected_dead: bool = False
    hung: bool = False  # killed by the hang watchdog

    def alive(self) -> bool:
        return pid_alive(self.pid) and is_mounted(self.path)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:]) or "(no log)"

    def bug_lines(self) -> list[str]:
        return [
            line for line in self.log_text().splitlines() if any(m in line for m in BUG_MARKERS)
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> bool:
        """Stop the mount process with ``sig``; True when it ended and left nothing mounted."""
        self.expected_dead = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        return wait_until(lambda: not pid_alive(self.pid) and not is_mounted(self.path), timeout)

    def umount(self) -> None:
        """Unmount with ``loft umount`` and check that the mount process is gone afterwards."""
        loft("umount", str(self.path), timeout=UMOUNT_TIMEOUT_S)
        self.expected_dead = True
        assert not is_mounted(self.path), f"{self.path} still mounted after loft umount"
        assert wait_until(lambda: not pid_alive(self.pid), 10), (
            f"mount process {self.pid} still running after loft umount returned"
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the mount process (the mountpoint stays, disconnected, until detached)."""
        self.expected_dead = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        wait_until(lambda: not pid_alive(self.pid), 10)

    def detach(self) -> None:
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)

    def daemon_pids(self) -> set[int]:
        return {p for p in (self.pid, *fuse_daemon_pids(self.path)) if p > 0 and pid_alive(p)}

    def kill_all(self) -> None:
        """SIGKILL every process serving this mount: a stuck connection is aborted with it,
        so system calls blocked on it return (ENOTCONN) instead of hanging forever."""
        for pid in self.daemon_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.daemon_pids(), 10)

    def force_cleanup(self) -> None:
        """Whatever state the mount is in: make sure nothing is mounted or running afterwards.

        ``loft umount`` first (it must work), then a kill of the mount process if it is stuck,
        then a lazy detach of whatever is left.
        """
        if is_mounted(self.path) and self.daemon_pids():
            try:
                loft("umount", str(self.path), check=False, timeout=UMOUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        if not wait_until(lambda: not self.daemon_pids(), 10):
            self.kill_all()
        if is_mounted(self.path):
            self.detach()


@dataclass
class Mounter:
    """Mounts volumes at fresh mountpoints and unmounts all of them in ``cleanup``."""

    base: Path
    mounts: list[Mount] = field(default_factory=list)

    def __post_init__(self) -> None:
        ACTIVE_MOUNTERS.append(self)

    def mountpoint(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.base))
        path.chmod(0o755)
        return path

    def mount(self, volume: Volume, *args: str, path: Path | None = None) -> Mount:
        """``loft mount -d`` the volume (extra ``args`` as given) and wait until it serves."""
        path = path or self.mountpoint()
        log = volume.root / f"mount-{path.name}-{len(self.mounts)}.log"
        mount = Mount(volume, path, log, -1, args)
        self.mounts.append(mount)  # cleaned up whatever happens next
        try:
            proc = loft(
                "mount", volume.meta_url, str(path), "-d", "--log", str(log), *args,
                check=False, timeout=MOUNT_TIMEOUT_S,
            )  # fmt: skip
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, stderr = None, f"(loft mount still running after {e.timeout}s)"
        pids: list[int] = []

        def served() -> bool:
            pids[:] = fuse_daemon_pids(path)
            return bool(pids)

        ok = code == 0 and wait_until(served, 10)
        mount.pid = max(pids) if pids else -1
        if not ok or not is_mounted(path):
            mount.expected_dead = True  # reported here, not again as a crash in cleanup
            pytest.fail(
                f"loft mount exited {code}; mounted={is_mounted(path)} pids={pids}\n"
                f"stderr: {stderr[-3000:]}\nlog:\n{mount.log_tail()}"
            )
        return mount

    def remount(self, mount: Mount) -> Mount:
        """Unmount ``mount`` cleanly and mount its volume again at the same place."""
        mount.umount()
        return self.mount(mount.volume, *mount.args, path=mount.path)

    def kill_all(self) -> None:
        for mount in self.mounts:
            mount.kill_all()

    def cleanup(self) -> list[str]:
        """Unmount everything; return a message for each mount whose process died unexpectedly
        or logged a bug (see ``BUG_MARKERS``)."""
        crashed = []
        for mount in reversed(self.mounts):
            if mount.hung:
                crashed.append(
                    f"the mount of {mount.path} stopped answering; the hang watchdog killed "
                    f"its process {mount.pid}\n{mount.log_tail()}"
                )
            elif not mount.expected_dead and not mount.alive():
                crashed.append(
                    f"mount process {mount.pid} of {mount.path} died during the test\n"
                    f"{mount.log_tail()}"
                )
            mount.force_cleanup()
            bugs = mount.bug_lines()
            if bugs:
                crashed.append(f"the mount of {mount.path} logged bugs:\n" + "\n".join(bugs[:20]))
        for mount in self.mounts:
            with contextlib.suppress(OSError):
                mount.path.rmdir()
        self.mounts.clear()
        with contextlib.suppress(ValueError):
            ACTIVE_MOUNTERS.remove(self)
        return crashed


#: Every mounter with mounts that may still exist, for the hang watchdog (see conftest).
ACTIVE_MOUNTERS: list[Mounter] = []


def kill_all_mounts() -> None:
    """Abort every mount the tests made (kill their processes): unblocks a hung test."""
    for mounter in list(ACTIVE_MOUNTERS):
        for mount in mounter.mounts:
            if mount.daemon_pids():
                mount.hung = True
        mounter.kill_all()


def run_as(uid: int, gid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with real, effective and saved ids set to ``uid``/``gid``.

    Returns what ``fn`` returned; an ``OSError`` raised by ``fn`` is raised here again (with its
    errno), any other exception fails the test.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            payload: tuple[str, Any] = ("ok", fn())
        except OSError as e:
            payload = ("oserror", (e.errno, e.strerror, e.filename))
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
        raise OSError(value[0], value[1], value[2])
    if kind == "error":
        pytest.fail(f"child as uid {uid} raised {value}")
    return value
