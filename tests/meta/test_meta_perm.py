"""Permissions as non-root callers: mode bits, groups, sticky bit, setgid, chmod/chown."""

from __future__ import annotations

import errno
import os

from meta_helpers import ALICE, BOB, CAROL, ROOT, fs_error, mkfile, shared_dir

from loftfs.meta import Meta
from loftfs.meta.types import NOW, ROOT_CTX, Ctx, FileType

C = ROOT_CTX


def test_owner_group_other_bits(meta: Meta) -> None:
    d = shared_dir(meta)
    f = mkfile(meta, d.inode, b"f", 0o640, ctx=ALICE)
    assert (f.uid, f.gid) == (ALICE.uid, ALICE.gid)
    meta.open(ALICE, f.inode, os.O_RDWR)
    meta.open(CAROL, f.inode, os.O_RDONLY)  # supplementary group 1000
    with fs_error(errno.EACCES):
        meta.open(CAROL, f.inode, os.O_WRONLY)
    with fs_error(errno.EACCES):
        meta.open(BOB, f.inode, os.O_RDONLY)
    with fs_error(errno.EACCES):
        meta.open(CAROL, f.inode, os.O_RDONLY | os.O_TRUNC)
    meta.setattr(ALICE, f.inode, mode=0o604)
    meta.open(BOB, f.inode, os.O_RDONLY)
    with fs_error(errno.EACCES):  # the group class applies, not other
        meta.open(CAROL, f.inode, os.O_RDONLY)
    meta.setattr(ALICE, f.inode, mode=0o046)
    with fs_error(errno.EACCES):  # the owner class applies, not group
        meta.open(ALICE, f.inode, os.O_RDONLY)
    meta.open(C, f.inode, os.O_RDWR)  # root reads and writes anything


def test_directory_permissions(meta: Meta) -> None:
    d = meta.mkdir(ALICE, shared_dir(meta).inode, b"private", 0o700)
    mkfile(meta, d.inode, b"f", ctx=ALICE)
    with fs_error(errno.EACCES):
        meta.lookup(BOB, d.inode, b"f")
    with fs_error(errno.EACCES):
        meta.readdir(BOB, d.inode)
    with fs_error(errno.EACCES):
        mkfile(meta, d.inode, b"g", ctx=BOB)
    with fs_error(errno.EACCES):
        meta.unlink(BOB, d.inode, b"f")
    meta.setattr(ALICE, d.inode, mode=0o711)  # search only
    assert meta.lookup(BOB, d.inode, b"f").uid == ALICE.uid
    with fs_error(errno.EACCES):
        meta.readdir(BOB, d.inode)
    meta.setattr(ALICE, d.inode, mode=0o755)
    assert [e.name for e in meta.readdir(BOB, d.inode)] == [b"f"]
    with fs_error(errno.EACCES):
        meta.mkdir(BOB, d.inode, b"sub", 0o755)
    closed = meta.mkdir(ALICE, ROOT, b"closed", 0o700)
    with fs_error(errno.EACCES):
        meta.open(BOB, closed.inode, os.O_RDONLY)
    with fs_error(errno.EISDIR):
        meta.open(ALICE, d.inode, os.O_RDWR)


def test_root_exec_rule(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o600)
    d = meta.mkdir(C, ROOT, b"d", 0o000)
    with fs_error(errno.EACCES):
        meta.access(C, f.inode, os.X_OK)
    meta.access(C, d.inode, os.X_OK | os.R_OK | os.W_OK)
    meta.setattr(C, f.inode, mode=0o610)
    meta.access(C, f.inode, os.X_OK)
    with fs_error(errno.EACCES):
        meta.access(ALICE, f.inode, os.X_OK)


def test_sticky_directory(meta: Meta) -> None:
    tmp = shared_dir(meta, b"tmp", 0o1777)
    mkfile(meta, tmp.inode, b"a", ctx=ALICE)
    mkfile(meta, tmp.inode, b"b", ctx=BOB)
    meta.mkdir(ALICE, tmp.inode, b"adir", 0o777)
    with fs_error(errno.EPERM):
        meta.unlink(BOB, tmp.inode, b"a")
    with fs_error(errno.EPERM):
        meta.rename(BOB, tmp.inode, b"a", tmp.inode, b"stolen")
    with fs_error(errno.EPERM):  # replacing someone else's file
        meta.rename(BOB, tmp.inode, b"b", tmp.inode, b"a")
    with fs_error(errno.EPERM):
        meta.rmdir(BOB, tmp.inode, b"adir")
    meta.rename(ALICE, tmp.inode, b"a", tmp.inode, b"a2")
    meta.unlink(C, tmp.inode, b"b")  # root may
    meta.unlink(ALICE, tmp.inode, b"a2")
    meta.rmdir(ALICE, tmp.inode, b"adir")
    # the directory's owner may remove anything in it
    own = meta.mkdir(ALICE, ROOT, b"own", 0o1777)
    mkfile(meta, own.inode, b"x", ctx=BOB)
    meta.unlink(ALICE, own.inode, b"x")


def test_setgid_directory(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"proj", 0o2777)
    meta.setattr(C, d.inode, gid=500, mode=0o2777)
    f = mkfile(meta, d.inode, b"f", 0o644, ctx=ALICE)
    assert f.gid == 500 and f.mode == 0o644
    sub = meta.mkdir(ALICE, d.inode, b"sub", 0o755)
    assert sub.gid == 500 and sub.mode == 0o2755  # subdirectories inherit the bit
    # a setgid+group-exec file created by a non-member loses S_ISGID
    g = mkfile(meta, d.inode, b"g", 0o2755, ctx=ALICE)
    assert g.gid == 500 and g.mode == 0o755
    member = Ctx(uid=1003, gid=1003, gids=(500,))
    h = mkfile(meta, d.inode, b"h", 0o2755, ctx=member)
    assert h.mode == 0o2755
    r = mkfile(meta, d.inode, b"r", 0o2755)
    assert r.mode == 0o2755  # root keeps it
    # outside setgid directories the creator's group is used
    plain = mkfile(meta, ROOT, b"plain", 0o2755, ctx=ALICE)
    assert plain.gid == ALICE.gid and plain.mode == 0o2755


def test_chmod_rules(meta: Meta) -> None:
    f = mkfile(meta, shared_dir(meta).inode, b"f", 0o644, ctx=ALICE)
    with fs_error(errno.EPERM):
        meta.setattr(BOB, f.inode, mode=0o777)
    assert meta.setattr(ALICE, f.inode, mode=0o4755).mode == 0o4755
    meta.setattr(C, f.inode, gid=777)
    # owner outside the file's group cannot set S_ISGID: silently cleared
    assert meta.setattr(ALICE, f.inode, mode=0o2755).mode == 0o755
    assert meta.setattr(C, f.inode, mode=0o2755).mode == 0o2755


def test_chown_rules(meta: Meta) -> None:
    f = mkfile(meta, shared_dir(meta).inode, b"f", 0o4755, ctx=CAROL)
    with fs_error(errno.EPERM):
        meta.setattr(CAROL, f.inode, uid=ALICE.uid)
    with fs_error(errno.EPERM):
        meta.setattr(BOB, f.inode, gid=BOB.gid)
    with fs_error(errno.EPERM):  # not a member of 1001
        meta.setattr(CAROL, f.inode, gid=1001)
    a = meta.setattr(CAROL, f.inode, gid=1000)  # a supplementary group
    assert a.gid == 1000 and a.mode == 0o755
    assert meta.setattr(CAROL, f.inode, uid=CAROL.uid).uid == CAROL.uid  # to itself: allowed
    assert meta.setattr(C, f.inode, uid=BOB.uid).uid == BOB.uid


def test_utimes_rules(meta: Meta) -> None:
    f = mkfile(meta, shared_dir(meta).inode, b"f", 0o666, ctx=ALICE)
    meta.setattr(BOB, f.inode, atime_ns=NOW, mtime_ns=NOW)  # write permission suffices
    with fs_error(errno.EPERM):
        meta.setattr(BOB, f.inode, mtime_ns=5)
    meta.setattr(ALICE, f.inode, mode=0o644)
    with fs_error(errno.EACCES):
        meta.setattr(BOB, f.inode, mtime_ns=NOW)
    assert meta.setattr(ALICE, f.inode, mtime_ns=5).mtime_ns == 5


def test_rename_permissions(meta: Meta) -> None:
    src = meta.mkdir(ALICE, ROOT, b"src", 0o755)
    dst = meta.mkdir(BOB, ROOT, b"dst", 0o777)
    mkfile(meta, src.inode, b"f", ctx=ALICE)
    with fs_error(errno.EACCES):
        meta.rename(BOB, src.inode, b"f", dst.inode, b"f")
    meta.rename(ALICE, src.inode, b"f", dst.inode, b"f")
    # moving a directory to another parent needs write permission on it (for "..")
    d = meta.mkdir(BOB, dst.inode, b"ro", 0o555)
    open_dir = meta.mkdir(C, ROOT, b"open", 0o777)
    with fs_error(errno.EACCES):
        meta.rename(ALICE, dst.inode, b"ro", open_dir.inode, b"ro")
    meta.rename(ALICE, dst.inode, b"ro", dst.inode, b"ro2")  # same parent: fine
    with fs_error(errno.EACCES):  # even its owner, without the w bit
        meta.rename(BOB, dst.inode, b"ro2", open_dir.inode, b"ro")
    meta.rename(C, dst.inode, b"ro2", open_dir.inode, b"ro")
    assert meta.getattr(d.inode).parent == open_dir.inode
    meta.rename(C, open_dir.inode, b"ro", dst.inode, b"ro2")
    assert meta.getattr(d.inode).parent == dst.inode


def test_link_and_symlink_permissions(meta: Meta) -> None:
    d = meta.mkdir(ALICE, ROOT, b"d", 0o755)
    f = mkfile(meta, ROOT, b"f", 0o644)
    with fs_error(errno.EACCES):
        meta.link(BOB, f.inode, d.inode, b"l")
    with fs_error(errno.EACCES):
        meta.symlink(BOB, d.inode, b"s", b"t")
    s = meta.symlink(ALICE, d.inode, b"s", b"t")
    assert (s.uid, s.gid) == (ALICE.uid, ALICE.gid)
    with fs_error(errno.EACCES):
        meta.mknod(BOB, d.inode, b"p", FileType.FIFO, 0o644)


def test_truncate_permission(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o644)
    with fs_error(errno.EACCES):
        meta.truncate(ALICE, f.inode, 10)
    assert meta.truncate(ALICE, f.inode, 10, check_perm=False).size == 10
