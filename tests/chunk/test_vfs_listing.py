"""``VFS.readdir``: a listing is paged out by index as attribute rows; what this mount has
buffered but not committed shows in the sizes it lists, as in its getattr. A real SQLite
volume and data path."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import Any

import pytest

from loftfs.fuse import ll_abi as abi
from loftfs.fuse import ll_ops
from loftfs.fuse.ll_ops import LowLevelOperations, direntplus_page
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, AttrRow, FileType
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import VFS

from .conftest import Volume


@pytest.fixture
def fs(volume: Volume) -> Iterator[VFS]:
    v = VFS(volume.meta, volume.data_path(), volume.settings, MountOptions())
    yield v
    v.shutdown()


def test_pages_by_offset_are_the_listing_in_order(fs: VFS) -> None:
    made = {}
    for i in range(25):
        name = b"f%02d" % (24 - i)
        fh, attr = fs.create(ROOT_CTX, ROOT_INODE, name, 0o640, os.O_WRONLY)
        fs.release(fh)
        made[name] = attr
    fs.mkdir(ROOT_CTX, ROOT_INODE, b"sub", 0o755)
    dh = fs.opendir(ROOT_CTX, ROOT_INODE)
    whole = list(fs.readdir(ROOT_CTX, dh, 0))
    assert [n for n, _ in whole[:2]] == [b".", b".."]
    assert [n for n, _ in whole[2:]] == sorted([*made, b"sub"])
    for name, row in whole[2:]:
        if name in made:
            assert row == fs.getattr(made[name].inode).row()
        else:
            assert row[1] is FileType.DIR
    # any offset continues the same listing; a plain page's rows name the same inodes
    for off in (1, 2, 7, 26, 27, 28):
        assert list(fs.readdir(ROOT_CTX, dh, off)) == whole[off:]
        plain = list(fs.readdir(ROOT_CTX, dh, off, sizes=False))
        assert [(n, r[0], r[1]) for n, r in plain] == [(n, r[0], r[1]) for n, r in whole[off:]]
    fs.releasedir(dh)


def test_buffered_writes_show_in_listed_sizes(fs: VFS) -> None:
    fh, attr = fs.create(ROOT_CTX, ROOT_INODE, b"growing", 0o644, os.O_WRONLY)
    fs.write(fh, 0, b"x" * 5000)  # buffered here, not committed
    assert fs.meta.getattr(attr.inode).size == 0

    def listed_size() -> int:
        dh = fs.opendir(ROOT_CTX, ROOT_INODE)
        try:
            return {n: r for n, r in fs.readdir(ROOT_CTX, dh, 0)}[b"growing"][6]
        finally:
            fs.releasedir(dh)

    assert listed_size() == 5000 == fs.getattr(attr.inode).size
    fs.write(fh, 5000, b"y" * 100)
    assert listed_size() == 5100
    fs.release(fh)
    assert listed_size() == 5100 == fs.meta.getattr(attr.inode).size


class _Lib:
    """The few libfuse calls the listing handlers make, recorded (no kernel here)."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, bytes]] = []
        self.ctx = abi.FuseCtx(0, 0, 1, 0o022)

    def fuse_req_ctx(self, req: int) -> Any:
        return ctypes.pointer(self.ctx)

    def fuse_reply_open(self, req: int, fi: Any) -> int:
        return 0

    def fuse_reply_buf(self, req: int, buf: bytes, size: int) -> int:
        self.replies.append((req, bytes(buf[:size])))
        return 0

    def fuse_reply_err(self, req: int, err: int) -> int:
        self.replies.append((req, b"error %d" % err))
        return 0


def test_pages_packed_ahead_are_bounded_and_released(
    fs: VFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After answering a page the handler packs the next one; a listing read page by page
    equals the pages packed on demand; the pages packed ahead of all handles together stay
    under PAGES_AHEAD_MAX, and closing a handle gives its room back."""
    for i in range(300):
        fh, _ = fs.create(ROOT_CTX, ROOT_INODE, b"entry-%04d" % i, 0o644, os.O_WRONLY)
        fs.release(fh)
    lib = _Lib()
    ops = LowLevelOperations(lib, fs, MountOptions())  # type: ignore[arg-type]
    size = 4096

    def opened() -> Any:
        fi = ctypes.pointer(abi.FileInfo())
        ops.opendir(1, ROOT_INODE, fi)
        return fi

    def read_all(fi: Any) -> list[bytes]:
        pages, off = [], 0
        while True:
            ops.readdirplus(2, ROOT_INODE, size, off, fi)
            page = lib.replies[-1][1]
            if not page:
                return pages
            pages.append(page)
            off += len(list(_entries(page)))

    a = opened()
    ahead = read_all(a)
    assert len(ahead) > 5
    expected, off = [], 0
    while True:
        listed: list[AttrRow] = []
        page = direntplus_page(
            fs.readdir(ROOT_CTX, int(a.contents.fh), off), off + 1, size,
            (1, 0), (1, 0), (1, 0), listed,
        )  # fmt: skip
        if not page:
            break
        expected.append(page)
        off += len(listed)
    assert ahead == expected
    monkeypatch.setattr(ll_ops, "PAGES_AHEAD_MAX", size * 2)
    handles = [opened() for _ in range(3)]
    for fi in handles:
        ops.readdirplus(3, ROOT_INODE, size, 0, fi)
    kept = [ops._dir_pages[int(fi.contents.fh)].key for fi in handles]
    assert [k is not None for k in kept] == [True, True, False]  # no room for the third
    assert ops._ahead_bytes == 2 * size
    for fi in [a, *handles]:
        ops.releasedir(4, ROOT_INODE, fi)
    assert ops._ahead_bytes == 0 and not ops._dir_pages


def _entries(page: bytes) -> Iterator[bytes]:
    """Names in a READDIRPLUS page."""
    pos = 0
    while pos < len(page):
        *_, namelen, _type = ll_ops._DIRENTPLUS.unpack_from(page, pos)
        head = ll_ops._DIRENTPLUS.size
        yield page[pos + head : pos + head + namelen]
        pos += (head + namelen + 7) & ~7
