"""``VFS.readdir``: a listing is paged out by index as attribute rows; what this mount has
buffered but not committed shows in the sizes it lists, as in its getattr. A real SQLite
volume and data path."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from loftfs.meta.types import ROOT_CTX, ROOT_INODE, FileType
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
