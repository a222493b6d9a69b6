"""Extended attributes: flags, limits, namespaces and permissions."""

from __future__ import annotations

import errno
import time

from meta_helpers import ALICE, BOB, ROOT, fs_error, mkfile, shared_dir

from loftfs.meta import Meta
from loftfs.meta.types import ROOT_CTX, XATTR_CREATE, XATTR_REPLACE, FileType

C = ROOT_CTX


def test_set_get_list_remove(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    time.sleep(0.002)
    meta.setxattr(C, f.inode, b"user.a", b"1")
    assert meta.getattr(f.inode).ctime_ns > f.ctime_ns
    meta.setxattr(C, f.inode, b"user.b", b"")
    meta.setxattr(C, f.inode, b"user.a", b"\x00\xff")
    assert meta.getxattr(C, f.inode, b"user.a") == b"\x00\xff"
    assert meta.getxattr(C, f.inode, b"user.b") == b""
    assert meta.listxattr(C, f.inode) == [b"user.a", b"user.b"]
    meta.removexattr(C, f.inode, b"user.a")
    assert meta.listxattr(C, f.inode) == [b"user.b"]
    with fs_error(errno.ENODATA):
        meta.getxattr(C, f.inode, b"user.a")
    with fs_error(errno.ENODATA):
        meta.removexattr(C, f.inode, b"user.a")
    with fs_error(errno.ENOENT):
        meta.getxattr(C, 999_999, b"user.a")
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    meta.setxattr(C, d.inode, b"user.dir", b"yes")
    assert meta.listxattr(C, d.inode) == [b"user.dir"]


def test_flags(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    with fs_error(errno.ENODATA):
        meta.setxattr(C, f.inode, b"user.x", b"1", XATTR_REPLACE)
    meta.setxattr(C, f.inode, b"user.x", b"1", XATTR_CREATE)
    with fs_error(errno.EEXIST):
        meta.setxattr(C, f.inode, b"user.x", b"2", XATTR_CREATE)
    meta.setxattr(C, f.inode, b"user.x", b"3", XATTR_REPLACE)
    assert meta.getxattr(C, f.inode, b"user.x") == b"3"
    with fs_error(errno.EINVAL):
        meta.setxattr(C, f.inode, b"user.x", b"3", 4)


def test_limits(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.setxattr(C, f.inode, b"user." + b"n" * 250, b"v" * 65536)
    with fs_error(errno.ERANGE):
        meta.setxattr(C, f.inode, b"user." + b"n" * 251, b"v")
    with fs_error(errno.E2BIG):
        meta.setxattr(C, f.inode, b"user.big", b"v" * 65537)
    with fs_error(errno.ERANGE):
        meta.getxattr(C, f.inode, b"")
    with fs_error(errno.EOPNOTSUPP):
        meta.setxattr(C, f.inode, b"nonamespace", b"v")


def test_namespaces_and_permissions(meta: Meta) -> None:
    f = mkfile(meta, shared_dir(meta).inode, b"f", 0o644, ctx=ALICE)
    meta.setxattr(ALICE, f.inode, b"user.mine", b"1")
    assert meta.getxattr(BOB, f.inode, b"user.mine") == b"1"  # read permission
    with fs_error(errno.EACCES):
        meta.setxattr(BOB, f.inode, b"user.theirs", b"1")
    with fs_error(errno.EACCES):
        meta.removexattr(BOB, f.inode, b"user.mine")
    meta.setattr(ALICE, f.inode, mode=0o600)
    with fs_error(errno.EACCES):
        meta.getxattr(BOB, f.inode, b"user.mine")
    # trusted.* is root's
    meta.setxattr(C, f.inode, b"trusted.t", b"x")
    with fs_error(errno.EPERM):
        meta.setxattr(ALICE, f.inode, b"trusted.t", b"y")
    with fs_error(errno.ENODATA):
        meta.getxattr(ALICE, f.inode, b"trusted.t")
    assert meta.listxattr(ALICE, f.inode) == [b"user.mine"]
    assert meta.listxattr(C, f.inode) == [b"trusted.t", b"user.mine"]
    # security.* is written by the owner (or root)
    meta.setxattr(ALICE, f.inode, b"security.label", b"l")
    with fs_error(errno.EPERM):
        meta.setxattr(BOB, f.inode, b"security.label", b"m")
    with fs_error(errno.ENODATA):
        meta.getxattr(C, f.inode, b"system.posix_acl_access")
    with fs_error(errno.EOPNOTSUPP):
        meta.setxattr(C, f.inode, b"system.posix_acl_access", b"")


def test_user_xattrs_only_on_files_and_dirs(meta: Meta) -> None:
    link = meta.symlink(C, ROOT, b"l", b"t")
    fifo = meta.mknod(C, ROOT, b"p", FileType.FIFO, 0o666)
    for ino in (link.inode, fifo.inode):
        with fs_error(errno.EPERM):
            meta.setxattr(C, ino, b"user.x", b"1")
        with fs_error(errno.ENODATA):
            meta.getxattr(C, ino, b"user.x")
    meta.setxattr(C, link.inode, b"trusted.x", b"1")
    # in a sticky directory only its owner writes user.* attributes
    tmp = meta.mkdir(ALICE, ROOT, b"tmp", 0o1777)
    with fs_error(errno.EPERM):
        meta.setxattr(BOB, tmp.inode, b"user.x", b"1")
    meta.setxattr(ALICE, tmp.inode, b"user.x", b"1")


def test_xattrs_deleted_with_inode(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.setxattr(C, f.inode, b"user.a", b"1")
    meta.unlink(C, ROOT, b"f")
    with fs_error(errno.ENOENT):
        meta.listxattr(C, f.inode)
