"""Model-based test: random POSIX operations on a loftfs mount and on a local ext4/xfs directory.

The local file system is the reference. Every operation is applied to both; its outcome (the
return value, or the ``errno`` of the ``OSError``) must be the same, and after every step both
trees must look the same: names, types, permission bits, sizes, link counts, owners, contents
and link targets. Names come from a small pool so that operations collide (renames over
existing targets, into their own subtree, links to unlinked names, ...).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from loftmount import MIB, Mount

NAMES = ["a", "b", "c"]
MAX_OPEN_FILES = 4

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

names = st.sampled_from(NAMES)
# mostly top-level names so that operations meet each other; some nested ones
paths = st.one_of(
    names,
    names,
    st.lists(names, min_size=2, max_size=2).map("/".join),
    st.lists(names, min_size=3, max_size=3).map("/".join),
)
offsets = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 65536, MIB - 1, MIB, MIB + 1, 2 * MIB - 7]),
    st.integers(0, 2 * MIB + 100),
)
payloads = st.one_of(
    st.binary(min_size=0, max_size=64),
    st.tuples(st.integers(0, 2**32), st.integers(1, 300_000)).map(
        lambda t: random.Random(t[0]).randbytes(t[1])
    ),
)
sizes = st.one_of(
    st.sampled_from([0, 1, 4096, MIB - 1, MIB, MIB + 1]), st.integers(0, 2 * MIB + 100)
)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o640])
times_ns = st.integers(-(10**18), 4 * 10**18)
open_flags = st.sampled_from(
    [
        os.O_RDWR,
        os.O_RDWR | os.O_CREAT,
        os.O_RDWR | os.O_CREAT | os.O_TRUNC,
        os.O_RDWR | os.O_APPEND,
        os.O_RDONLY,
        os.O_RDWR | os.O_CREAT | os.O_EXCL,
    ]
)

Outcome = tuple[str, Any]


def outcome(fn: Callable[[], Any]) -> Outcome:
    """``("ok", value)`` or ``("errno", errno)``: what a caller of the operation can observe."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno or 0, e.errno))


def renameat2(old: Path, new: Path, flags: int) -> None:
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """What must match between the two trees, per relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            fields: tuple[Any, ...] = (
                stat.S_IFMT(st_.st_mode),
                oct(stat.S_IMODE(st_.st_mode)),
                st_.st_nlink,
                st_.st_uid,
                st_.st_gid,
            )
            if stat.S_ISREG(st_.st_mode):
                fields += (st_.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st_.st_mode):
                fields += (st_.st_size, os.readlink(p))
            out[str(p.relative_to(root))] = fields
    return out


class OpenFile:
    """The same file opened on both sides: a pair of descriptors."""

    def __init__(self, mount_fd: int, local_fd: int, path: str, flags: int) -> None:
        self.fds = (mount_fd, local_fd)
        self.path = path
        self.flags = flags
        self.closed = False

    def __repr__(self) -> str:
        return f"OpenFile({self.path!r}, flags={self.flags:#o})"


class PosixModel(RuleBasedStateMachine):
    """Applies each rule to the loftfs directory and to the local reference directory."""

    mount_base: Path
    local_base: Path
    counter = itertools.count()

    files = Bundle("files")

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.roots = (self.mount_base / f"ex{n}", self.local_base / f"ex{n}")
        for root in self.roots:
            root.mkdir()
        self.open_files: list[OpenFile] = []

    # --- helpers ------------------------------------------------------------------------------

    def pick(self, data: st.DataObject, label: str, existing_share: int = 7) -> str:
        """A path: one that exists now (in the reference tree) ``existing_share`` times out of
        ten, else one from the pool of names."""
        existing = sorted(
            str(Path(dirpath, name).relative_to(self.roots[1]))
            for dirpath, dirnames, filenames in os.walk(self.roots[1])
            for name in dirnames + filenames
        )
        if existing and data.draw(st.integers(0, 9), label=f"{label} exists?") < existing_share:
            return data.draw(st.sampled_from(existing), label=label)
        return data.draw(paths, label=label)

    def both(self, op: Callable[[Path], Any]) -> Any:
        """Run ``op(root)`` on both sides; the outcomes must be equal; return the mount's."""
        mine = outcome(lambda: op(self.roots[0]))
        ref = outcome(lambda: op(self.roots[1]))
        assert mine == ref, f"loftfs gave {mine!r}, the local file system {ref!r}"
        return mine

    def both_fd(self, f: OpenFile, op: Callable[[int], Any]) -> Any:
        mine = outcome(lambda: op(f.fds[0]))
        ref = outcome(lambda: op(f.fds[1]))
        assert mine == ref, f"on {f}: loftfs gave {mine!r}, the local file system {ref!r}"
        return mine

    # --- path operations ----------------------------------------------------------------------

    @initialize(
        kinds=st.lists(st.sampled_from(["file", "dir", "link", "none"]), min_size=3, max_size=3),
        payload=payloads,
    )
    def populate(self, kinds: list[str], payload: bytes) -> None:
        """Start from a small tree, so that the first steps already meet existing entries."""

        def op(root: Path) -> None:
            for name, kind in zip(NAMES, kinds, strict=True):
                if kind == "file":
                    (root / name).write_bytes(payload)
                elif kind == "dir":
                    (root / name).mkdir()
                    (root / name / NAMES[0]).write_bytes(payload[:100])
                elif kind == "link":
                    os.symlink(NAMES[0], root / name)

        self.both(op)

    @rule(data=st.data(), offset=offsets, payload=payloads, trunc=st.booleans())
    def write_file(self, data: st.DataObject, offset: int, payload: bytes, trunc: bool) -> None:
        path = self.pick(data, "path", existing_share=5)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)

        def op(root: Path) -> int:
            fd = os.open(root / path, flags, 0o644)
            try:
                return os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)

        self.both(op)

    @rule(data=st.data(), offset=offsets, size=st.integers(0, 2 * MIB))
    def read_file(self, data: st.DataObject, offset: int, size: int) -> None:
        path = self.pick(data, "path")

        def op(root: Path) -> str:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return hashlib.sha256(os.pread(fd, size, offset)).hexdigest()
            finally:
                os.close(fd)

        self.both(op)

    @rule(data=st.data(), size=sizes)
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.truncate(root / path, size))

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src = self.pick(data, "src")
        dst = self.pick(data, "dst", existing_share=5)
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(data=st.data(), flags=st.sampled_from([RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename2(self, data: st.DataObject, flags: int) -> None:
        src = self.pick(data, "src")
        dst = self.pick(data, "dst")
        self.both(lambda root: renameat2(root / src, root / dst, flags))

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src = self.pick(data, "src")
        dst = self.pick(data, "dst", existing_share=3)
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.unlink(root / path))

    @rule(data=st.data())
    def symlink(self, data: st.DataObject) -> None:
        link_target = self.pick(data, "link_target", existing_share=9)
        path = self.pick(data, "path", existing_share=3)
        self.both(lambda root: os.symlink(link_target, root / path))

    @rule(data=st.data())
    def readlink(self, data: st.DataObject) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.readlink(root / path))

    @rule(data=st.data(), mode=st.sampled_from([0o755, 0o700, 0o2755]))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        path = self.pick(data, "path", existing_share=3)
        self.both(lambda root: os.mkdir(root / path, mode))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.rmdir(root / path))

    @rule(data=st.data(), mode=modes)
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.chmod(root / path, mode))

    @rule(data=st.data(), uid=st.sampled_from([0, 1000, 65534]), gid=st.sampled_from([-1, 0, 1000]))
    def chown(self, data: st.DataObject, uid: int, gid: int) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: os.chown(root / path, uid, gid, follow_symlinks=False))

    @rule(data=st.data(), atime=times_ns, mtime=times_ns)
    def utime(self, data: st.DataObject, atime: int, mtime: int) -> None:
        path = self.pick(data, "path")

        def op(root: Path) -> tuple[int, int]:
            os.utime(root / path, ns=(atime, mtime))
            st_ = os.stat(root / path)
            return st_.st_mtime_ns, st_.st_atime_ns

        kind, value = self.both(op)
        if kind == "ok":
            assert value == (mtime, atime)

    @rule(data=st.data())
    def listdir(self, data: st.DataObject) -> None:
        path = self.pick(data, "path")
        self.both(lambda root: sorted(os.listdir(root / path)))

    @rule(data=st.data())
    def stat_path(self, data: st.DataObject) -> None:
        path = self.pick(data, "path")

        def op(root: Path) -> tuple[int, ...]:
            st_ = os.stat(root / path)  # follows symlinks, unlike the invariant
            size = st_.st_size if stat.S_ISREG(st_.st_mode) else -1
            return (st_.st_mode, st_.st_nlink, size)

        self.both(op)

    # --- open files ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.open_files) < MAX_OPEN_FILES)
    @rule(target=files, data=st.data(), flags=open_flags)
    def open_file(self, data: st.DataObject, flags: int) -> Any:
        path = self.pick(data, "path")
        fds: list[int] = []

        def op(root: Path) -> bool:
            fds.append(os.open(root / path, flags, 0o644))
            return True

        mine = outcome(lambda: op(self.roots[0]))
        ref = outcome(lambda: op(self.roots[1]))
        try:
            assert mine == ref, (
                f"open {path!r}: loftfs gave {mine!r}, the local file system {ref!r}"
            )
        except AssertionError:
            for fd in fds:
                os.close(fd)
            raise
        if mine[0] != "ok":
            return multiple()  # nothing to add: the open failed on both sides alike
        f = OpenFile(fds[0], fds[1], path, flags)
        self.open_files.append(f)
        return f

    @rule(f=files, offset=offsets, payload=payloads)
    def fd_write(self, f: OpenFile, offset: int, payload: bytes) -> None:
        if f.closed:
            return
        if f.flags & os.O_APPEND:
            self.both_fd(f, lambda fd: os.write(fd, payload))
        else:
            self.both_fd(f, lambda fd: os.pwrite(fd, payload, offset))

    @rule(f=files, offset=offsets, size=st.integers(0, MIB + 10))
    def fd_read(self, f: OpenFile, offset: int, size: int) -> None:
        if not f.closed:
            self.both_fd(f, lambda fd: hashlib.sha256(os.pread(fd, size, offset)).hexdigest())

    @rule(f=files, size=sizes)
    def fd_truncate(self, f: OpenFile, size: int) -> None:
        if not f.closed:
            self.both_fd(f, lambda fd: os.ftruncate(fd, size))

    @rule(f=files)
    def fd_stat(self, f: OpenFile) -> None:
        if not f.closed:
            self.both_fd(f, lambda fd: (os.fstat(fd).st_size, os.fstat(fd).st_nlink))

    @rule(f=files)
    def fd_fsync(self, f: OpenFile) -> None:
        if not f.closed:
            self.both_fd(f, os.fsync)

    @rule(f=consumes(files))
    def close_file(self, f: OpenFile) -> None:
        if not f.closed:
            self.both_fd(f, os.close)
            f.closed = True
            self.open_files.remove(f)

    # --- checks -------------------------------------------------------------------------------

    @invariant()
    def trees_match(self) -> None:
        mine, ref = tree(self.roots[0]), tree(self.roots[1])
        if mine != ref:
            diff = {
                k: (mine.get(k), ref.get(k))
                for k in sorted(set(mine) | set(ref))
                if mine.get(k) != ref.get(k)
            }
            raise AssertionError(f"trees differ (path: (loftfs, local)): {diff}")

    def teardown(self) -> None:
        for f in self.open_files:
            for fd in f.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.open_files.clear()
        for root in self.roots:
            shutil.rmtree(root)


@pytest.mark.timeout(900)
def test_posix_model(shared_mount: Mount, tmp_path: Path) -> None:
    mount_base = shared_mount.path / "model"
    mount_base.mkdir()
    local_base = tmp_path / "model"
    local_base.mkdir()

    class Machine(PosixModel):
        pass

    Machine.mount_base = mount_base
    Machine.local_base = local_base
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=int(os.environ.get("LOFT_MODEL_EXAMPLES", "120")),
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            derandomize=os.environ.get("LOFT_MODEL_RANDOM") is None,
        ),
    )
    assert shared_mount.alive(), shared_mount.log_tail()
    assert os.listdir(mount_base) == []
