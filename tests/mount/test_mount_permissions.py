"""Permission checks through the mount, exercised by unprivileged users (forked, setresuid)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loftmount import NOBODY, run_as

OTHER = 65533


def errno_as(uid: int, fn: Callable[[], Any]) -> int | None:
    """The errno of ``fn`` run as ``uid`` (gid equal to uid); fails if it succeeds."""
    with pytest.raises(OSError) as e:
        run_as(uid, uid, fn)
    return e.value.errno


def test_mode_bits_of_files(workdir: Path) -> None:
    public = workdir / "public"
    public.write_bytes(b"everyone may read")
    public.chmod(0o644)
    secret = workdir / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    group = workdir / "group"
    group.write_bytes(b"group may read")
    group.chmod(0o640)
    os.chown(group, 0, NOBODY)

    assert run_as(NOBODY, NOBODY, public.read_bytes) == b"everyone may read"
    assert errno_as(NOBODY, lambda: public.write_bytes(b"x")) == errno.EACCES
    assert errno_as(NOBODY, secret.read_bytes) == errno.EACCES
    assert run_as(NOBODY, NOBODY, group.read_bytes) == b"group may read"
    assert errno_as(OTHER, group.read_bytes) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.open(group, os.O_WRONLY)) == errno.EACCES
    assert run_as(NOBODY, NOBODY, lambda: os.access(public, os.R_OK)) is True
    assert run_as(NOBODY, NOBODY, lambda: os.access(public, os.W_OK)) is False
    assert run_as(NOBODY, NOBODY, lambda: os.access(secret, os.R_OK)) is False

    script = workdir / "script"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    assert run_as(NOBODY, NOBODY, lambda: os.access(script, os.X_OK)) is False
    script.chmod(0o755)
    assert run_as(NOBODY, NOBODY, lambda: os.access(script, os.X_OK)) is True


def test_mode_bits_of_directories(workdir: Path) -> None:
    closed = workdir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inside").write_bytes(b"x")
    readonly = workdir / "readonly"
    readonly.mkdir(mode=0o755)
    (readonly / "f").write_bytes(b"x")
    noread = workdir / "noread"
    noread.mkdir()
    noread.chmod(0o711)
    (noread / "known").write_bytes(b"reachable by name")

    assert errno_as(NOBODY, lambda: os.listdir(closed)) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.stat(closed / "inside")) == errno.EACCES
    assert run_as(NOBODY, NOBODY, lambda: sorted(os.listdir(readonly))) == ["f"]
    assert errno_as(NOBODY, lambda: (readonly / "new").touch()) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.unlink(readonly / "f")) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.mkdir(readonly / "d")) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.rename(readonly / "f", workdir / "g")) == errno.EACCES
    assert errno_as(NOBODY, lambda: os.listdir(noread)) == errno.EACCES
    assert run_as(NOBODY, NOBODY, (noread / "known").read_bytes) == b"reachable by name"


def test_owner_only_operations(workdir: Path) -> None:
    f = workdir / "rootfile"
    f.write_bytes(b"x")
    f.chmod(0o666)
    assert errno_as(NOBODY, lambda: os.chmod(f, 0o777)) == errno.EPERM
    assert errno_as(NOBODY, lambda: os.chown(f, NOBODY, NOBODY)) == errno.EPERM
    assert errno_as(NOBODY, lambda: os.utime(f, ns=(1, 1))) == errno.EPERM
    run_as(NOBODY, NOBODY, lambda: os.utime(f))  # "now" needs write permission only
    run_as(NOBODY, NOBODY, lambda: f.write_bytes(b"written by nobody"))
    assert f.read_bytes() == b"written by nobody"

    def own_file() -> tuple[int, int, int]:
        mine = workdir / "mine"
        mine.write_bytes(b"m")
        os.chmod(mine, 0o600)
        st = os.stat(mine)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert run_as(NOBODY, NOBODY, own_file) == (NOBODY, NOBODY, 0o600)
    assert errno_as(NOBODY, lambda: os.chown(workdir / "mine", 0, -1)) == errno.EPERM
    assert (workdir / "mine").read_bytes() == b"m"  # root reads anything


def test_sticky_directory(workdir: Path) -> None:
    shared = workdir / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    (shared / "rootfile").write_bytes(b"r")
    (shared / "rootfile").chmod(0o666)

    def create_own() -> None:
        (shared / "nobodyfile").write_bytes(b"n")
        os.mkdir(shared / "nobodydir")

    run_as(NOBODY, NOBODY, create_own)
    assert errno_as(NOBODY, lambda: os.unlink(shared / "rootfile")) == errno.EPERM
    assert (
        errno_as(NOBODY, lambda: os.rename(shared / "rootfile", shared / "stolen")) == errno.EPERM
    )
    assert errno_as(OTHER, lambda: os.unlink(shared / "nobodyfile")) == errno.EPERM
    assert errno_as(OTHER, lambda: os.rmdir(shared / "nobodydir")) == errno.EPERM
    assert (
        errno_as(OTHER, lambda: os.rename(shared / "rootfile", shared / "nobodyfile"))
        == errno.EPERM
    )
    run_as(NOBODY, NOBODY, lambda: (shared / "rootfile").write_bytes(b"writable is not deletable"))
    run_as(NOBODY, NOBODY, lambda: os.rename(shared / "nobodyfile", shared / "renamed"))
    run_as(NOBODY, NOBODY, lambda: os.unlink(shared / "renamed"))
    run_as(NOBODY, NOBODY, lambda: os.rmdir(shared / "nobodydir"))
    os.unlink(shared / "rootfile")  # root may
    assert os.listdir(shared) == []


def test_setgid_directory_inheritance(workdir: Path) -> None:
    d = workdir / "sgid"
    d.mkdir()
    os.chown(d, 0, 4242)
    d.chmod(0o2777)

    def create() -> tuple[int, int, bool]:
        (d / "f").write_bytes(b"x")
        os.mkdir(d / "sub")
        return (
            os.stat(d / "f").st_gid,
            os.stat(d / "sub").st_gid,
            bool(os.stat(d / "sub").st_mode & stat.S_ISGID),
        )

    assert run_as(NOBODY, NOBODY, create) == (4242, 4242, True)


def test_umask_applies_to_create(workdir: Path) -> None:
    def create() -> tuple[int, int]:
        os.umask(0o027)
        (workdir / "u").write_bytes(b"x")
        os.mkdir(workdir / "ud", 0o777)
        return stat.S_IMODE(os.stat(workdir / "u").st_mode), stat.S_IMODE(
            os.stat(workdir / "ud").st_mode
        )

    assert run_as(NOBODY, NOBODY, create) == (0o640, 0o750)


def test_write_by_non_owner_clears_setuid_and_setgid(workdir: Path) -> None:
    """Linux drops S_ISUID (and S_ISGID with group exec) when someone else writes the file;
    S_ISGID without group exec (mandatory locking) stays."""
    for mode, expected in ((0o4777, 0o777), (0o2777, 0o777), (0o6777, 0o777), (0o2767, 0o2767)):
        f = workdir / f"suid-{mode:o}"
        f.write_bytes(b"")
        f.chmod(mode)

        def write(f: Path = f) -> int:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, b"x")
                return stat.S_IMODE(os.fstat(fd).st_mode)
            finally:
                os.close(fd)

        assert run_as(NOBODY, NOBODY, write) == expected
        assert stat.S_IMODE(os.stat(f).st_mode) == expected
        assert f.read_bytes() == b"x"
