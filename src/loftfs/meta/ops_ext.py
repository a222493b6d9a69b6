"""Extended attributes and file locks (BSD flock and POSIX byte-range locks)."""

from __future__ import annotations

import errno
import time

from loftfs.errors import FSError
from loftfs.meta import perm
from loftfs.meta.core import MAX_XATTR_VALUE, Acct, MetaCore, now_ns
from loftfs.meta.txn import PlockRange, Txn
from loftfs.meta.types import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    MAX_NAME,
    XATTR_CREATE,
    XATTR_REPLACE,
    Ctx,
)

_LOCK_TYPES = (F_RDLCK, F_WRLCK, F_UNLCK)


def _check_xattr_name(name: bytes) -> None:
    """ERANGE for an empty name or one longer than 255 bytes (as Linux)."""
    if not name or len(name) > MAX_NAME:
        raise FSError(errno.ERANGE)


def apply_range(
    ranges: list[PlockRange], ltype: int, start: int, end: int, pid: int
) -> list[PlockRange]:
    """One owner's ranges after locking (or unlocking, ``F_UNLCK``) ``[start, end]``.

    The new range replaces whatever the owner held there (splitting ranges it cuts), and
    touching or overlapping ranges of the same type merge, as the kernel does.
    """
    out: list[PlockRange] = []
    for r in ranges:
        if r.end < start or r.start > end:
            out.append(r)
            continue
        if r.start < start:
            out.append(PlockRange(r.ltype, r.start, start - 1, r.pid))
        if r.end > end:
            out.append(PlockRange(r.ltype, end + 1, r.end, r.pid))
    if ltype != F_UNLCK:
        out.append(PlockRange(ltype, start, end, pid))
    out.sort(key=lambda r: r.start)
    merged: list[PlockRange] = []
    for r in out:
        if merged and merged[-1].ltype == r.ltype and merged[-1].end + 1 >= r.start:
            last = merged[-1]
            keep_pid = pid if ltype == r.ltype else last.pid
            merged[-1] = PlockRange(r.ltype, last.start, max(last.end, r.end), keep_pid)
        else:
            merged.append(r)
    return merged


def _conflicts(a: int, b: int) -> bool:
    return a == F_WRLCK or b == F_WRLCK


class ExtOps(MetaCore):
    """Extended attributes and locks."""

    # --- extended attributes ------------------------------------------------------------------

    def getxattr(self, ctx: Ctx, inode: int, name: bytes) -> bytes:
        _check_xattr_name(name)

        def fn(tx: Txn) -> bytes:
            attr = self._get(tx, inode)
            perm.check_xattr(ctx, attr, name, write=False)
            value = tx.get_xattr(inode, name)
            if value is None:
                raise FSError(errno.ENODATA)
            return value

        return self._read(fn)

    def setxattr(self, ctx: Ctx, inode: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise FSError(errno.EINVAL)
        _check_xattr_name(name)
        if len(value) > MAX_XATTR_VALUE:
            raise FSError(errno.E2BIG)

        def fn(tx: Txn, acct: Acct) -> None:
            attr = self._get(tx, inode)
            perm.check_xattr(ctx, attr, name, write=True)
            present = tx.get_xattr(inode, name) is not None
            if flags & XATTR_CREATE and present:
                raise FSError(errno.EEXIST)
            if flags & XATTR_REPLACE and not present:
                raise FSError(errno.ENODATA)
            tx.put_xattr(inode, name, bytes(value))
            new = attr.copy()
            new.ctime_ns = now_ns()
            tx.put_attr(new)

        self._write(fn)

    def listxattr(self, ctx: Ctx, inode: int) -> list[bytes]:
        def fn(tx: Txn) -> list[bytes]:
            self._get(tx, inode)
            return [n for n in tx.list_xattrs(inode) if perm.xattr_visible(ctx, n)]

        return self._read(fn)

    def removexattr(self, ctx: Ctx, inode: int, name: bytes) -> None:
        _check_xattr_name(name)

        def fn(tx: Txn, acct: Acct) -> None:
            attr = self._get(tx, inode)
            perm.check_xattr(ctx, attr, name, write=True)
            if tx.get_xattr(inode, name) is None:
                raise FSError(errno.ENODATA)
            tx.del_xattr(inode, name)
            new = attr.copy()
            new.ctime_ns = now_ns()
            tx.put_attr(new)

        self._write(fn)

    # --- locks --------------------------------------------------------------------------------

    def _wait_lock(self, try_once: object, block: bool) -> None:
        """Call ``try_once()`` until it grants the lock; EAGAIN at once when not blocking,
        EINTR when this client closes its session meanwhile."""
        assert callable(try_once)
        delay = self.LOCK_POLL_MIN_S
        sid = self._sid
        while True:
            if try_once():
                return
            if not block:
                raise FSError(errno.EAGAIN)
            time.sleep(delay)
            delay = min(delay * 2, self.LOCK_POLL_MAX_S)
            if self._closed or self._sid != sid:
                raise FSError(errno.EINTR)

    def flock(self, ctx: Ctx, inode: int, owner: int, ltype: int, block: bool) -> None:
        """A failed upgrade (shared to exclusive) keeps the shared lock."""
        if ltype not in _LOCK_TYPES:
            raise FSError(errno.EINVAL)
        sid = self._session_id()

        def fn(tx: Txn, acct: Acct) -> bool:
            self._get(tx, inode)
            if ltype == F_UNLCK:
                tx.del_flock(inode, sid, owner)
                return True
            mine = None
            for rec in tx.get_flocks(inode):
                if (rec.sid, rec.owner) == (sid, owner):
                    mine = rec.ltype
                elif _conflicts(ltype, rec.ltype):
                    return False
            if mine != ltype:
                tx.put_flock(inode, sid, owner, ltype)
            return True

        self._wait_lock(lambda: self._write(fn), block)

    def getlk(
        self, ctx: Ctx, inode: int, owner: int, ltype: int, start: int, end: int
    ) -> tuple[int, int, int, int]:
        if ltype not in (F_RDLCK, F_WRLCK) or start < 0 or end < start:
            raise FSError(errno.EINVAL)
        sid = self._sid

        def fn(tx: Txn) -> tuple[int, int, int, int]:
            self._get(tx, inode)
            found: PlockRange | None = None
            for key, ranges in tx.get_plocks(inode).items():
                if key == (sid, owner) and sid:
                    continue
                for r in ranges:
                    if r.end >= start and r.start <= end and _conflicts(ltype, r.ltype):
                        if found is None or r.start < found.start:
                            found = r
                        break
            if found is None:
                return (F_UNLCK, 0, 0, 0)
            return (found.ltype, found.start, found.end, found.pid)

        return self._read(fn)

    def setlk(
        self,
        ctx: Ctx,
        inode: int,
        owner: int,
        block: bool,
        ltype: int,
        start: int,
        end: int,
        pid: int,
    ) -> None:
        if ltype not in _LOCK_TYPES or start < 0 or end < start:
            raise FSError(errno.EINVAL)
        sid = self._session_id()

        def fn(tx: Txn, acct: Acct) -> bool:
            self._get(tx, inode)
            locks = tx.get_plocks(inode)
            if ltype != F_UNLCK:
                for key, ranges in locks.items():
                    if key == (sid, owner):
                        continue
                    for r in ranges:
                        if r.end >= start and r.start <= end and _conflicts(ltype, r.ltype):
                            return False
            mine = locks.get((sid, owner), [])
            new = apply_range(mine, ltype, start, end, pid)
            if new != mine:
                tx.put_plocks(inode, sid, owner, new)
            return True

        self._wait_lock(lambda: self._write(fn), block)
