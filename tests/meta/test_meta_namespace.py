"""Namespace operations: errno cases, nlink, timestamps, readdir."""

from __future__ import annotations

import errno
import os
import time

import pytest
from meta_helpers import ROOT, RW, fs_error, mkfile, names

from loftfs.meta import Meta
from loftfs.meta.types import NOW, ROOT_CTX, Attr, Ctx, FileType

C = ROOT_CTX


@pytest.mark.parametrize("peek", [False, True], ids=["lookup", "lookup_peek"])
def test_lookup(meta: Meta, peek: bool) -> None:
    def lookup(ctx: Ctx, parent: int, name: bytes) -> Attr:
        return meta.lookup_peek(ctx, parent, name)[0] if peek else meta.lookup(ctx, parent, name)

    d = meta.mkdir(C, ROOT, b"d", 0o755)
    f = mkfile(meta, d.inode, b"f")
    assert lookup(C, d.inode, b"f") == f
    assert lookup(C, d.inode, b".").inode == d.inode
    assert lookup(C, d.inode, b"..").inode == ROOT
    with fs_error(errno.ENOENT):
        lookup(C, d.inode, b"nope")
    with fs_error(errno.ENOTDIR):
        lookup(C, f.inode, b"x")
    with fs_error(errno.ENOENT):
        lookup(C, 999_999, b"x")
    with fs_error(errno.ENAMETOOLONG):
        lookup(C, d.inode, b"x" * 256)
    with fs_error(errno.ENOENT):
        meta.getattr(999_999)


def test_create_kinds(meta: Meta) -> None:
    f = meta.mknod(C, ROOT, b"f", FileType.FILE, 0o640)
    assert (f.type, f.mode, f.nlink, f.size) == (FileType.FILE, 0o640, 1, 0)
    fifo = meta.mknod(C, ROOT, b"p", FileType.FIFO, 0o600)
    assert fifo.type == FileType.FIFO and fifo.rdev == 0
    dev = meta.mknod(C, ROOT, b"c", FileType.CHR, 0o600, rdev=0x0501)
    assert dev.rdev == 0x0501 and dev.st_mode & 0o170000 == 0o020000
    sock = meta.mknod(C, ROOT, b"s", FileType.SOCK, 0o600)
    assert sock.type == FileType.SOCK
    blk = meta.mknod(C, ROOT, b"b", FileType.BLK, 0o600, rdev=7)
    assert blk.rdev == 7
    assert names(meta, ROOT) == [b"b", b"c", b"f", b"p", b"s"]
    assert all(e.attr == meta.getattr(e.attr.inode) for e in meta.readdir(C, ROOT))
    with fs_error(errno.EINVAL):
        meta.mknod(C, ROOT, b"l", FileType.SYMLINK, 0o777)


def test_create_errors(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    with fs_error(errno.EEXIST):
        mkfile(meta, ROOT, b"f")
    with fs_error(errno.EEXIST):
        meta.mkdir(C, ROOT, b"f", 0o755)
    with fs_error(errno.EEXIST):
        meta.mkdir(C, ROOT, b".", 0o755)
    with fs_error(errno.EEXIST):
        meta.create(C, ROOT, b"f", 0o644, RW)
    with fs_error(errno.ENOTDIR):
        mkfile(meta, f.inode, b"x")
    with fs_error(errno.ENOENT):
        mkfile(meta, 424242, b"x")
    with fs_error(errno.ENAMETOOLONG):
        mkfile(meta, ROOT, b"n" * 256)
    mkfile(meta, ROOT, b"n" * 255)
    with fs_error(errno.EINVAL):
        mkfile(meta, ROOT, b"a/b")
    with fs_error(errno.EINVAL):
        mkfile(meta, ROOT, b"")


def test_create_opens(meta: Meta) -> None:
    f = meta.create(C, ROOT, b"f", 0o000, RW)  # the creator may write whatever the mode
    assert f.type == FileType.FILE and f.mode == 0
    meta.unlink(C, ROOT, b"f")
    assert meta.getattr(f.inode).nlink == 0  # still open
    meta.release(f.inode)
    with fs_error(errno.ENOENT):
        meta.getattr(f.inode)


def test_make_returns_what_its_commit_left(meta: Meta) -> None:
    """``make``: the new node's attributes and the parent's, each equal to a read right after
    (the vfs keeps both for the kernel, which asks for the directory's right away)."""
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    kinds = [
        (b"f", FileType.FILE, {"open": True}),
        (b"sub", FileType.DIR, {}),
        (b"l", FileType.SYMLINK, {"target": b"f"}),
        (b"p", FileType.FIFO, {}),
        (b"c", FileType.CHR, {"rdev": 0x0102}),
    ]
    for name, kind, kw in kinds:
        time.sleep(0.002)  # a later commit, later times
        before = meta.getattr(d.inode)
        attr, pattr = meta.make(C, d.inode, name, kind, 0o640, **kw)  # type: ignore[arg-type]
        assert attr == meta.lookup(C, d.inode, name) and attr.type == kind
        assert pattr == meta.getattr(d.inode) and pattr.mtime_ns > before.mtime_ns
        assert pattr.nlink == before.nlink + (kind == FileType.DIR)
    assert meta.readlink(meta.lookup(C, d.inode, b"l").inode) == b"f"
    assert meta.lookup(C, d.inode, b"l").mode == 0o777
    meta.unlink(C, d.inode, b"f")
    assert meta.getattr(meta.lookup(C, d.inode, b"c").inode).rdev == 0x0102
    with fs_error(errno.ENOENT):
        meta.make(C, d.inode, b"l2", FileType.SYMLINK, 0o777)  # no target
    with fs_error(errno.EEXIST):
        meta.make(C, d.inode, b"sub", FileType.FILE, 0o644)


def test_mkdir_nlink(meta: Meta) -> None:
    a = meta.mkdir(C, ROOT, b"a", 0o755)
    assert a.nlink == 2 and a.size == 4096 and a.parent == ROOT
    assert meta.getattr(ROOT).nlink == 3
    b = meta.mkdir(C, a.inode, b"b", 0o700)
    mkfile(meta, a.inode, b"f")
    assert meta.getattr(a.inode).nlink == 3  # files do not count
    assert meta.lookup(C, b.inode, b"..").inode == a.inode
    meta.rmdir(C, a.inode, b"b")
    assert meta.getattr(a.inode).nlink == 2
    with fs_error(errno.ENOENT):
        meta.getattr(b.inode)


def test_parent_times(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    t0 = meta.getattr(d.inode)
    time.sleep(0.002)
    f = mkfile(meta, d.inode, b"f")
    t1 = meta.getattr(d.inode)
    assert t1.mtime_ns > t0.mtime_ns and t1.ctime_ns == t1.mtime_ns
    assert t1.atime_ns == t0.atime_ns  # no atime updates (noatime)
    assert f.mtime_ns == f.ctime_ns == f.atime_ns
    time.sleep(0.002)
    meta.link(C, f.inode, d.inode, b"g")
    t2 = meta.getattr(d.inode)
    assert t2.mtime_ns > t1.mtime_ns
    linked = meta.getattr(f.inode)
    assert linked.nlink == 2 and linked.ctime_ns > f.ctime_ns and linked.mtime_ns == f.mtime_ns
    time.sleep(0.002)
    meta.unlink(C, d.inode, b"g")
    t3 = meta.getattr(d.inode)
    assert t3.mtime_ns > t2.mtime_ns
    after = meta.getattr(f.inode)
    assert after.nlink == 1 and after.ctime_ns > linked.ctime_ns
    meta.readdir(C, d.inode)
    meta.lookup(C, d.inode, b"f")
    assert meta.getattr(d.inode) == t3  # reads change nothing


def test_symlink(meta: Meta) -> None:
    s = meta.symlink(C, ROOT, b"l", b"target/path")
    assert s.type == FileType.SYMLINK and s.size == len(b"target/path") and s.mode == 0o777
    assert meta.readlink(s.inode) == b"target/path"
    f = mkfile(meta, ROOT, b"f")
    with fs_error(errno.EINVAL):
        meta.readlink(f.inode)
    with fs_error(errno.ENOENT):
        meta.symlink(C, ROOT, b"empty", b"")
    with fs_error(errno.ENAMETOOLONG):
        meta.symlink(C, ROOT, b"long", b"x" * 4097)
    meta.symlink(C, ROOT, b"max", b"x" * 4096)
    with fs_error(errno.EEXIST):
        meta.symlink(C, ROOT, b"f", b"t")
    meta.unlink(C, ROOT, b"l")
    with fs_error(errno.ENOENT):
        meta.readlink(s.inode)


def test_link(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    f = mkfile(meta, ROOT, b"f")
    a = meta.link(C, f.inode, d.inode, b"f2")
    assert a.inode == f.inode and a.nlink == 2
    assert meta.lookup(C, d.inode, b"f2").nlink == 2
    with fs_error(errno.EPERM):
        meta.link(C, d.inode, ROOT, b"dlink")
    with fs_error(errno.EEXIST):
        meta.link(C, f.inode, ROOT, b"d")
    with fs_error(errno.ENOTDIR):
        meta.link(C, f.inode, f.inode, b"x")
    with fs_error(errno.ENOENT):
        meta.link(C, 999_999, ROOT, b"x")
    meta.unlink(C, ROOT, b"f")
    meta.unlink(C, d.inode, b"f2")
    with fs_error(errno.ENOENT):
        meta.link(C, f.inode, ROOT, b"again")


def test_link_to_open_unlinked_file(meta: Meta) -> None:
    f = meta.create(C, ROOT, b"f", 0o644, RW)
    meta.unlink(C, ROOT, b"f")
    with fs_error(errno.ENOENT):
        meta.link(C, f.inode, ROOT, b"back")
    meta.release(f.inode)


def test_unlink(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    with fs_error(errno.EISDIR):
        meta.unlink(C, ROOT, b"d")
    with fs_error(errno.ENOENT):
        meta.unlink(C, ROOT, b"missing")
    with fs_error(errno.ENOTDIR):
        meta.unlink(C, mkfile(meta, ROOT, b"f").inode, b"x")
    with fs_error(errno.EISDIR):
        meta.unlink(C, d.inode, b".")
    meta.unlink(C, ROOT, b"f")
    assert names(meta, ROOT) == [b"d"]


def test_rmdir(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    sub = meta.mkdir(C, d.inode, b"sub", 0o755)
    mkfile(meta, ROOT, b"f")
    with fs_error(errno.ENOTEMPTY):
        meta.rmdir(C, ROOT, b"d")
    with fs_error(errno.ENOTDIR):
        meta.rmdir(C, ROOT, b"f")
    with fs_error(errno.ENOENT):
        meta.rmdir(C, ROOT, b"missing")
    with fs_error(errno.EINVAL):
        meta.rmdir(C, d.inode, b".")
    with fs_error(errno.ENOTEMPTY):
        meta.rmdir(C, sub.inode, b"..")
    meta.rmdir(C, d.inode, b"sub")
    meta.rmdir(C, ROOT, b"d")
    assert meta.getattr(ROOT).nlink == 2
    assert names(meta, ROOT) == [b"f"]


def test_create_in_removed_directory(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    meta.open(C, d.inode, os.O_RDONLY)  # an open directory handle keeps the inode
    meta.rmdir(C, ROOT, b"d")
    assert meta.getattr(d.inode).nlink == 0
    with fs_error(errno.ENOENT):
        mkfile(meta, d.inode, b"f")
    assert meta.readdir(C, d.inode) == []
    meta.release(d.inode)
    with fs_error(errno.ENOENT):
        meta.getattr(d.inode)


def test_readdir(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    for n in (b"b", b"a", b"c\xff", b"\x01"):
        mkfile(meta, d.inode, n)
    meta.mkdir(C, d.inode, b"z", 0o755)
    entries = meta.readdir(C, d.inode)
    assert [e.name for e in entries] == sorted([b"b", b"a", b"c\xff", b"\x01", b"z"])
    assert {e.name: e.attr.type for e in entries}[b"z"] == FileType.DIR
    # rows (what listing pages are packed from) say what the entries say, by index
    assert entries.rows(0, 10) == [(e.name, e.attr.row()) for e in entries]
    assert entries.rows(2, 4) == [(e.name, e.attr.row()) for e in entries[2:4]]
    assert entries.rows(5, 9) == []
    for e in entries:
        assert e.attr == meta.getattr(e.attr.inode)
    assert entries[1:3] == list(entries)[1:3]
    with fs_error(errno.ENOTDIR):
        meta.readdir(C, entries[0].attr.inode)


def test_readdir_small(meta: Meta) -> None:
    """The whole listing of a directory within the limit; None past it; read permission
    needed either way."""
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    attr, empty = meta.readdir_small(C, d.inode, 0)
    assert empty is not None and len(empty) == 0 and attr == meta.getattr(d.inode)
    for i in range(5):
        mkfile(meta, d.inode, b"f%d" % i)
    meta.mkdir(C, d.inode, b"sub", 0o755)
    full = list(meta.readdir(C, d.inode))
    for limit in (6, 100):
        attr, small = meta.readdir_small(C, d.inode, limit)
        assert small is not None and list(small) == full
        assert attr == meta.getattr(d.inode) and attr.nlink == 3
    for limit in (0, 5):
        attr, small = meta.readdir_small(C, d.inode, limit)
        assert small is None and attr == meta.getattr(d.inode)
    closed = meta.mkdir(C, ROOT, b"closed", 0o311)
    other = Ctx(uid=1000, gid=1000, pid=1)
    for limit in (0, 10):
        with fs_error(errno.EACCES):
            meta.readdir_small(other, closed.inode, limit)
    with fs_error(errno.ENOTDIR):
        meta.readdir_small(C, full[0].attr.inode, 10)


def test_setattr(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o644)
    time.sleep(0.002)
    a = meta.setattr(C, f.inode, mode=0o4755)
    assert a.mode == 0o4755 and a.ctime_ns > f.ctime_ns and a.mtime_ns == f.mtime_ns
    assert meta.getattr(f.inode) == a
    b = meta.setattr(C, f.inode, uid=5, gid=6)
    assert (b.uid, b.gid) == (5, 6)
    assert b.mode == 0o755  # chown clears setuid, even by root
    c = meta.setattr(C, f.inode, atime_ns=1_000, mtime_ns=2_000)
    assert (c.atime_ns, c.mtime_ns) == (1_000, 2_000)
    before = time.time_ns()
    d = meta.setattr(C, f.inode, atime_ns=NOW, mtime_ns=NOW)
    assert d.atime_ns >= before and d.mtime_ns >= before
    e = meta.setattr(C, f.inode, ctime_ns=12345)
    assert e.ctime_ns == 12345
    g = meta.setattr(C, f.inode, mode=0o2750, gid=7)
    assert g.mode == 0o2750 and g.gid == 7
    h = meta.setattr(C, f.inode, uid=-1, gid=-1)
    assert (h.uid, h.gid) == (5, 7)
    with fs_error(errno.ENOENT):
        meta.setattr(C, 999_999, mode=0o644)


def test_chown_keeps_setgid_without_group_exec(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o2644)
    assert meta.setattr(C, f.inode, gid=9).mode == 0o2644  # mandatory-locking style: kept
    d = meta.mkdir(C, ROOT, b"d", 0o3775)
    assert meta.setattr(C, d.inode, uid=3).mode == 0o3775  # directories keep their bits


def test_access(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o644)
    meta.access(C, f.inode, os.R_OK | os.W_OK)
    with fs_error(errno.EACCES):
        meta.access(C, f.inode, os.X_OK)  # root needs an x bit to execute
    meta.setattr(C, f.inode, mode=0o654)
    meta.access(C, f.inode, os.X_OK)
    meta.access(C, f.inode, 0)
    with fs_error(errno.ENOENT):
        meta.access(C, 999_999, 0)


@pytest.mark.parametrize("n", [1, 130])
def test_inode_numbers_unique(meta: Meta, n: int) -> None:
    inodes = {mkfile(meta, ROOT, b"f%d" % i).inode for i in range(n)}
    assert len(inodes) == n and ROOT not in inodes
