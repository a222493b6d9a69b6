"""rename(2): replacement rules, directories between parents, flags, errno cases."""

from __future__ import annotations

import errno
import time

from meta_helpers import ROOT, RW, fs_error, mkfile, names

from loftfs.meta import Meta
from loftfs.meta.types import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_CTX, FileType

C = ROOT_CTX


def test_rename_file(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"a")
    time.sleep(0.002)
    meta.rename(C, ROOT, b"a", ROOT, b"b")
    assert names(meta, ROOT) == [b"b"]
    moved = meta.lookup(C, ROOT, b"b")
    assert moved.inode == f.inode and moved.ctime_ns > f.ctime_ns
    assert moved.mtime_ns == f.mtime_ns


def test_rename_over_file(meta: Meta) -> None:
    a = mkfile(meta, ROOT, b"a")
    b = mkfile(meta, ROOT, b"b")
    used = meta.usage()
    meta.rename(C, ROOT, b"a", ROOT, b"b")
    assert names(meta, ROOT) == [b"b"]
    assert meta.lookup(C, ROOT, b"b").inode == a.inode
    with fs_error(errno.ENOENT):
        meta.getattr(b.inode)
    assert meta.usage()[1] == used[1] - 1


def test_rename_over_linked_file(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    b = mkfile(meta, ROOT, b"b")
    meta.link(C, b.inode, ROOT, b"b2")
    time.sleep(0.002)
    meta.rename(C, ROOT, b"a", ROOT, b"b")
    left = meta.getattr(b.inode)
    assert left.nlink == 1 and left.ctime_ns > b.ctime_ns


def test_rename_over_open_file(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    b = meta.create(C, ROOT, b"b", 0o644, RW)
    meta.rename(C, ROOT, b"a", ROOT, b"b")
    assert meta.getattr(b.inode).nlink == 0
    meta.release(b.inode)
    with fs_error(errno.ENOENT):
        meta.getattr(b.inode)


def test_rename_dir_between_parents(meta: Meta) -> None:
    p1 = meta.mkdir(C, ROOT, b"p1", 0o755)
    p2 = meta.mkdir(C, ROOT, b"p2", 0o755)
    d = meta.mkdir(C, p1.inode, b"d", 0o755)
    mkfile(meta, d.inode, b"inner")
    time.sleep(0.002)
    meta.rename(C, p1.inode, b"d", p2.inode, b"e")
    assert meta.getattr(p1.inode).nlink == 2
    assert meta.getattr(p2.inode).nlink == 3
    moved = meta.getattr(d.inode)
    assert moved.parent == p2.inode and moved.ctime_ns > d.ctime_ns
    assert meta.lookup(C, d.inode, b"..").inode == p2.inode
    assert names(meta, d.inode) == [b"inner"]
    for p in (p1, p2):
        now = meta.getattr(p.inode)
        assert now.mtime_ns > p.mtime_ns and now.ctime_ns > p.ctime_ns
    assert meta.getattr(ROOT).nlink == 4


def test_rename_dir_over_empty_dir(meta: Meta) -> None:
    p1 = meta.mkdir(C, ROOT, b"p1", 0o755)
    p2 = meta.mkdir(C, ROOT, b"p2", 0o755)
    d = meta.mkdir(C, p1.inode, b"d", 0o755)
    t = meta.mkdir(C, p2.inode, b"t", 0o755)
    meta.rename(C, p1.inode, b"d", p2.inode, b"t")
    with fs_error(errno.ENOENT):
        meta.getattr(t.inode)
    assert meta.lookup(C, p2.inode, b"t").inode == d.inode
    assert meta.getattr(p1.inode).nlink == 2
    assert meta.getattr(p2.inode).nlink == 3
    # same parent
    meta.mkdir(C, p2.inode, b"u", 0o755)
    meta.rename(C, p2.inode, b"u", p2.inode, b"t")
    assert meta.getattr(p2.inode).nlink == 3
    assert names(meta, p2.inode) == [b"t"]


def test_rename_type_errors(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    meta.mkdir(C, ROOT, b"full", 0o755)
    mkfile(meta, ROOT, b"full/x".split(b"/")[0] + b"_")  # unrelated file
    full = meta.lookup(C, ROOT, b"full")
    mkfile(meta, full.inode, b"x")
    mkfile(meta, ROOT, b"f")
    with fs_error(errno.ENOTEMPTY):
        meta.rename(C, ROOT, b"d", ROOT, b"full")
    with fs_error(errno.EISDIR):
        meta.rename(C, ROOT, b"f", ROOT, b"d")
    with fs_error(errno.ENOTDIR):
        meta.rename(C, ROOT, b"d", ROOT, b"f")
    with fs_error(errno.ENOENT):
        meta.rename(C, ROOT, b"missing", ROOT, b"y")
    with fs_error(errno.ENOTDIR):
        meta.rename(C, ROOT, b"f", meta.lookup(C, ROOT, b"f").inode, b"y")
    with fs_error(errno.ENAMETOOLONG):
        meta.rename(C, ROOT, b"f", ROOT, b"y" * 256)
    with fs_error(errno.EBUSY):
        meta.rename(C, ROOT, b".", ROOT, b"y")
    assert meta.lookup(C, ROOT, b"d").inode == d.inode


def test_rename_into_own_subtree(meta: Meta) -> None:
    a = meta.mkdir(C, ROOT, b"a", 0o755)
    b = meta.mkdir(C, a.inode, b"b", 0o755)
    c = meta.mkdir(C, b.inode, b"c", 0o755)
    with fs_error(errno.EINVAL):
        meta.rename(C, ROOT, b"a", c.inode, b"a")
    with fs_error(errno.EINVAL):
        meta.rename(C, ROOT, b"a", a.inode, b"x")
    with fs_error(errno.ENOTEMPTY):  # target is an ancestor of the source
        meta.rename(C, b.inode, b"c", ROOT, b"a")
    assert meta.getattr(a.inode).parent == ROOT


def test_rename_noreplace(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    mkfile(meta, ROOT, b"b")
    with fs_error(errno.EEXIST):
        meta.rename(C, ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    meta.rename(C, ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    assert names(meta, ROOT) == [b"b", b"c"]
    with fs_error(errno.EINVAL):
        meta.rename(C, ROOT, b"b", ROOT, b"d", RENAME_NOREPLACE | RENAME_EXCHANGE)
    with fs_error(errno.EINVAL):
        meta.rename(C, ROOT, b"b", ROOT, b"d", 0x80)


def test_rename_exchange(meta: Meta) -> None:
    p1 = meta.mkdir(C, ROOT, b"p1", 0o755)
    p2 = meta.mkdir(C, ROOT, b"p2", 0o755)
    d = meta.mkdir(C, p1.inode, b"d", 0o755)
    f = mkfile(meta, p2.inode, b"f")
    meta.rename(C, p1.inode, b"d", p2.inode, b"f", RENAME_EXCHANGE)
    assert meta.lookup(C, p1.inode, b"d").inode == f.inode
    assert meta.lookup(C, p2.inode, b"f").inode == d.inode
    assert meta.getattr(d.inode).parent == p2.inode
    assert meta.getattr(p1.inode).nlink == 2
    assert meta.getattr(p2.inode).nlink == 3
    with fs_error(errno.ENOENT):
        meta.rename(C, p1.inode, b"d", p2.inode, b"none", RENAME_EXCHANGE)
    # two directories swap parents: both parents keep their counts
    e = meta.mkdir(C, p1.inode, b"e", 0o755)
    meta.rename(C, p1.inode, b"e", p2.inode, b"f", RENAME_EXCHANGE)
    assert meta.getattr(e.inode).parent == p2.inode
    assert meta.getattr(d.inode).parent == p1.inode
    assert meta.getattr(p1.inode).nlink == 3
    assert meta.getattr(p2.inode).nlink == 3
    # exchanging a directory with its own descendant
    sub = meta.mkdir(C, e.inode, b"sub", 0o755)
    with fs_error(errno.EINVAL):
        meta.rename(C, p2.inode, b"f", e.inode, b"sub", RENAME_EXCHANGE)
    with fs_error(errno.EINVAL):
        meta.rename(C, e.inode, b"sub", p2.inode, b"f", RENAME_EXCHANGE)
    assert meta.getattr(sub.inode).parent == e.inode


def test_rename_hard_links_is_noop(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"a")
    meta.link(C, f.inode, ROOT, b"b")
    meta.rename(C, ROOT, b"a", ROOT, b"b")
    assert names(meta, ROOT) == [b"a", b"b"]
    assert meta.getattr(f.inode).nlink == 2
    meta.rename(C, ROOT, b"a", ROOT, b"a")
    assert names(meta, ROOT) == [b"a", b"b"]


def test_rename_symlink_and_special(meta: Meta) -> None:
    s = meta.symlink(C, ROOT, b"l", b"x")
    p = meta.mknod(C, ROOT, b"p", FileType.FIFO, 0o600)
    meta.rename(C, ROOT, b"l", ROOT, b"p")
    assert meta.lookup(C, ROOT, b"p").inode == s.inode
    with fs_error(errno.ENOENT):
        meta.getattr(p.inode)
    assert meta.readlink(s.inode) == b"x"
