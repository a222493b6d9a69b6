"""Helpers of the metadata conformance suite (this folder is on ``sys.path`` under pytest)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from loftfs.errors import FSError
from loftfs.meta import Meta, open_meta
from loftfs.meta.core import MetaCore
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, Attr, Ctx, FileType

ROOT = ROOT_INODE
ALICE = Ctx(uid=1000, gid=1000, gids=(1000,))
BOB = Ctx(uid=1001, gid=1001, gids=(1001,))
CAROL = Ctx(uid=1002, gid=1002, gids=(1002, 1000))  # also in alice's group
RW = os.O_RDWR


@contextmanager
def fs_error(code: int) -> Iterator[None]:
    """Expect ``FSError`` with errno ``code``."""
    with pytest.raises(FSError) as info:
        yield
    got = info.value.errno
    assert got == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(got, got)}"


def names(meta: Meta, inode: int, ctx: Ctx = ROOT_CTX) -> list[bytes]:
    return [e.name for e in meta.readdir(ctx, inode)]


def mkfile(meta: Meta, parent: int, name: bytes, mode: int = 0o644, ctx: Ctx = ROOT_CTX) -> Attr:
    return meta.mknod(ctx, parent, name, FileType.FILE, mode)


def shared_dir(meta: Meta, name: bytes = b"shared", mode: int = 0o777) -> Attr:
    """A directory everybody may write to (root owns it)."""
    attr = meta.mkdir(ROOT_CTX, ROOT, name, mode)
    meta.setattr(ROOT_CTX, attr.inode, mode=mode)
    return meta.getattr(attr.inode)


@dataclass
class Backend:
    """One engine instance under test: its URL and the clients opened on it."""

    name: str
    url: str
    batched: bool = False
    clients: list[Meta] = field(default_factory=list)

    def open(self) -> Meta:
        """A new client of the volume (as another mount would be)."""
        meta = open_meta(self.url)
        if self.batched and isinstance(meta, MetaCore):
            meta.COUNTERS_IN_TXN = False  # usage counters accumulated in memory
        self.clients.append(meta)
        return meta

    def close_all(self) -> None:
        for meta in self.clients:
            meta.close()
