"""Namespace operations: lookup, attributes, create/link/unlink/rmdir/rename, readdir, open."""

from __future__ import annotations

import errno

from loftfs.errors import FSError
from loftfs.meta import perm
from loftfs.meta.core import (
    DIR_SIZE,
    Acct,
    MetaCore,
    check_name,
    now_ns,
    space_of,
    time_arg,
)
from loftfs.meta.txn import LAZY_MARK, Txn, lazy_setting
from loftfs.meta.types import (
    MAX_NAME,
    MAX_SYMLINK,
    NOW,
    R_OK,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    W_OK,
    X_OK,
    Attr,
    Ctx,
    FileType,
    Listing,
    Slice,
)

_DOTS = (b".", b"..")


class NamespaceOps(MetaCore):
    """POSIX namespace semantics over the transaction primitives."""

    # --- lookup and attributes ----------------------------------------------------------------

    def lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        return self._read(lambda tx: self._lookup_in(tx, ctx, parent, name))

    def lookup_peek(self, ctx: Ctx, parent: int, name: bytes) -> tuple[Attr, list[Slice] | None]:
        def fn(tx: Txn) -> tuple[Attr, list[Slice] | None]:
            self._with_chunk0(tx)
            attr = self._lookup_in(tx, ctx, parent, name)
            return attr, tx.get_chunk(attr.inode, 0) if attr.type == FileType.FILE else None

        return self._read(fn)

    def _with_chunk0(self, tx: Txn) -> None:
        """Called before a ``lookup_peek`` reads the entry: an engine may read the chunk 0
        of the inode it names in the same query (``SQLMeta``)."""

    def _lookup_in(self, tx: Txn, ctx: Ctx, parent: int, name: bytes) -> Attr:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        pattr = self._get_dir(tx, parent)
        perm.check(ctx, pattr, X_OK)
        if name == b".":
            return pattr
        if name == b"..":
            if parent == ROOT_INODE or not pattr.parent:
                return pattr
            return self._get(tx, pattr.parent)
        entry = tx.get_entry(parent, name)
        if entry is None:
            raise FSError(errno.ENOENT)
        return self._get(tx, entry[0])

    def getattr(self, inode: int) -> Attr:
        return self._read(lambda tx: self._get(tx, inode))

    def setattr(
        self,
        ctx: Ctx,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        def fn(tx: Txn, acct: Acct) -> Attr:
            attr = self._get(tx, inode)
            new = attr.copy()
            now = now_ns()
            if (uid is not None and uid != -1) or (gid is not None and gid != -1):
                new.uid, new.gid, new.mode = perm.chown(ctx, attr, uid, gid)
            if mode is not None:
                new.mode = perm.chmod(ctx, _with_gid(attr, new.gid), mode)
            if atime_ns is not None or mtime_ns is not None:
                explicit = any(t is not None and t != NOW for t in (atime_ns, mtime_ns))
                perm.check_utimes(ctx, attr, explicit=explicit)
                if atime_ns is not None:
                    new.atime_ns = time_arg(atime_ns, now)
                if mtime_ns is not None:
                    new.mtime_ns = time_arg(mtime_ns, now)
            if ctime_ns is not None and ctime_ns != NOW:
                if not perm.is_owner(ctx, attr):
                    raise FSError(errno.EPERM)
                new.ctime_ns = ctime_ns
            else:
                new.ctime_ns = now
            tx.put_attr(new)
            return new

        return self._write(fn)

    def access(self, ctx: Ctx, inode: int, mask: int) -> None:
        attr = self.getattr(inode)
        perm.check(ctx, attr, mask)

    # --- creating -----------------------------------------------------------------------------

    def make(
        self,
        ctx: Ctx,
        parent: int,
        name: bytes,
        type: FileType,
        mode: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
        open: bool = False,
    ) -> tuple[Attr, Attr]:
        """Create one node (any type) in ``parent``; ``open`` also records a regular file as
        open in this session. Returns its attributes and the parent's, as the commit left
        them."""
        type = FileType(type)
        if type == FileType.SYMLINK:
            if not target:
                raise FSError(errno.ENOENT)
            if len(target) > MAX_SYMLINK or b"\0" in target:
                raise FSError(errno.ENAMETOOLONG if len(target) > MAX_SYMLINK else errno.EINVAL)
            mode = 0o777
        open_sid = self._session_id() if open and type == FileType.FILE else 0
        check_name(name)
        if name in _DOTS:
            raise FSError(errno.EEXIST)
        inode = self._alloc_inode()

        def fn(tx: Txn, acct: Acct) -> tuple[Attr, Attr]:
            tx.prefetch(attrs=[parent], entries=[(parent, name)], assume=True)
            pattr = self._get_dir(tx, parent)
            perm.check(ctx, pattr, W_OK | X_OK)
            if pattr.nlink == 0:
                raise FSError(errno.ENOENT)
            if tx.get_entry(parent, name) is not None:
                raise FSError(errno.EEXIST)
            size = DIR_SIZE if type == FileType.DIR else len(target)
            self._check_inodes(tx, 1)
            self._check_space(tx, space_of(type, size))
            fmode, uid, gid = perm.new_owner(ctx, pattr, type, mode)
            now = now_ns()
            attr = Attr(
                inode=inode,
                type=type,
                mode=fmode,
                uid=uid,
                gid=gid,
                nlink=2 if type == FileType.DIR else 1,
                size=size,
                rdev=rdev if type in (FileType.CHR, FileType.BLK) else 0,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
                parent=parent if type == FileType.DIR else 0,
            )
            tx.put_attr(attr)
            tx.put_entry(parent, name, inode, type)
            if type == FileType.SYMLINK:
                tx.put_symlink(inode, target)
            new_parent = pattr.copy()
            new_parent.mtime_ns = new_parent.ctime_ns = now
            if type == FileType.DIR:
                new_parent.nlink += 1
            tx.put_attr(new_parent)
            if open_sid:
                tx.add_open(open_sid, inode)
            acct.space += space_of(type, size)
            acct.inodes += 1
            return attr, new_parent

        return self._write(fn)

    def mknod(
        self, ctx: Ctx, parent: int, name: bytes, type: FileType, mode: int, rdev: int = 0
    ) -> Attr:
        if type == FileType.SYMLINK:
            raise FSError(errno.EINVAL)
        return self.make(ctx, parent, name, type, mode, rdev=rdev)[0]

    def create(self, ctx: Ctx, parent: int, name: bytes, mode: int, flags: int) -> Attr:
        """The creator may open the new file with any access mode, whatever ``mode`` says."""
        return self.make(ctx, parent, name, FileType.FILE, mode, open=True)[0]

    def mkdir(self, ctx: Ctx, parent: int, name: bytes, mode: int) -> Attr:
        return self.make(ctx, parent, name, FileType.DIR, mode)[0]

    def symlink(self, ctx: Ctx, parent: int, name: bytes, target: bytes) -> Attr:
        return self.make(ctx, parent, name, FileType.SYMLINK, 0o777, target=target)[0]

    def readlink(self, inode: int) -> bytes:
        def fn(tx: Txn) -> bytes:
            attr = self._get(tx, inode)
            if attr.type != FileType.SYMLINK:
                raise FSError(errno.EINVAL)
            target = tx.get_symlink(inode)
            if target is None:
                raise FSError(errno.EIO)
            return target

        return self._read(fn)

    def link(self, ctx: Ctx, inode: int, new_parent: int, new_name: bytes) -> Attr:
        check_name(new_name)
        if new_name in _DOTS:
            raise FSError(errno.EEXIST)

        def fn(tx: Txn, acct: Acct) -> Attr:
            attr = self._get(tx, inode)
            pattr = self._get_dir(tx, new_parent)
            perm.check(ctx, pattr, X_OK)
            if tx.get_entry(new_parent, new_name) is not None:
                raise FSError(errno.EEXIST)
            perm.check(ctx, pattr, W_OK | X_OK)
            if attr.type == FileType.DIR:
                raise FSError(errno.EPERM)
            if attr.nlink == 0 or pattr.nlink == 0:
                raise FSError(errno.ENOENT)
            now = now_ns()
            new = attr.copy()
            new.nlink += 1
            new.ctime_ns = now
            tx.put_attr(new)
            tx.put_entry(new_parent, new_name, inode, attr.type)
            pnew = pattr.copy()
            pnew.mtime_ns = pnew.ctime_ns = now
            tx.put_attr(pnew)
            return new

        return self._write(fn)

    # --- removing -----------------------------------------------------------------------------

    def unlink(self, ctx: Ctx, parent: int, name: bytes) -> None:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        if name in _DOTS:
            raise FSError(errno.EISDIR)

        def fn(tx: Txn, acct: Acct) -> None:
            pattr = self._get_dir(tx, parent)
            perm.check(ctx, pattr, X_OK)
            entry = tx.get_entry(parent, name)
            if entry is None:
                raise FSError(errno.ENOENT)
            attr = self._get(tx, entry[0])
            perm.check(ctx, pattr, W_OK | X_OK)
            perm.check_sticky(ctx, pattr, attr)
            if attr.type == FileType.DIR:
                raise FSError(errno.EISDIR)
            now = now_ns()
            tx.del_entry(parent, name)
            pnew = pattr.copy()
            pnew.mtime_ns = pnew.ctime_ns = now
            tx.put_attr(pnew)
            self._unlink_inode(tx, acct, attr, now)

        self._write(fn)

    def rmdir(self, ctx: Ctx, parent: int, name: bytes) -> None:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        if name == b".":
            raise FSError(errno.EINVAL)
        if name == b"..":
            raise FSError(errno.ENOTEMPTY)

        def fn(tx: Txn, acct: Acct) -> None:
            pattr = self._get_dir(tx, parent)
            perm.check(ctx, pattr, X_OK)
            entry = tx.get_entry(parent, name)
            if entry is None:
                raise FSError(errno.ENOENT)
            attr = self._get(tx, entry[0])
            perm.check(ctx, pattr, W_OK | X_OK)
            perm.check_sticky(ctx, pattr, attr)
            if attr.type != FileType.DIR:
                raise FSError(errno.ENOTDIR)
            if tx.has_entries(attr.inode):
                raise FSError(errno.ENOTEMPTY)
            if attr.rdev == LAZY_MARK:
                tx.del_setting(lazy_setting(attr.inode))  # bound to a source prefix, unlisted
            now = now_ns()
            tx.del_entry(parent, name)
            pnew = pattr.copy()
            pnew.nlink -= 1
            pnew.mtime_ns = pnew.ctime_ns = now
            tx.put_attr(pnew)
            self._remove_dir_inode(tx, acct, attr, now)

        self._write(fn)

    # --- rename -------------------------------------------------------------------------------

    @staticmethod
    def _is_ancestor(tx: Txn, ancestor: int, inode: int) -> bool:
        """Whether directory ``ancestor`` is ``inode`` or one of its ancestors."""
        seen = 0
        while True:
            if inode == ancestor:
                return True
            if inode == ROOT_INODE or seen > 100_000:
                return False
            attr = tx.get_attr(inode)
            if attr is None or not attr.parent:
                return False
            inode = attr.parent
            seen += 1

    def rename(
        self, ctx: Ctx, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FSError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)
        for n in (name, new_name):
            if len(n) > MAX_NAME:
                raise FSError(errno.ENAMETOOLONG)
            if n in _DOTS:
                raise FSError(errno.EBUSY)
            if not n or b"/" in n or b"\0" in n:
                raise FSError(errno.EINVAL if n else errno.ENOENT)
        exchange = bool(flags & RENAME_EXCHANGE)

        def fn(tx: Txn, acct: Acct) -> None:
            sp = self._get_dir(tx, parent)
            dp = sp if new_parent == parent else self._get_dir(tx, new_parent)
            perm.check(ctx, sp, X_OK)
            perm.check(ctx, dp, X_OK)
            sentry = tx.get_entry(parent, name)
            if sentry is None:
                raise FSError(errno.ENOENT)
            src = self._get(tx, sentry[0])
            dentry = tx.get_entry(new_parent, new_name)
            dst = self._get(tx, dentry[0]) if dentry is not None else None
            if dst is None:
                if exchange:
                    raise FSError(errno.ENOENT)
                if dp.nlink == 0:
                    raise FSError(errno.ENOENT)
            elif flags & RENAME_NOREPLACE:
                raise FSError(errno.EEXIST)
            if src.type == FileType.DIR and self._is_ancestor(tx, src.inode, new_parent):
                raise FSError(errno.EINVAL)
            if (
                dst is not None
                and dst.type == FileType.DIR
                and self._is_ancestor(tx, dst.inode, parent)
            ):
                raise FSError(errno.EINVAL if exchange else errno.ENOTEMPTY)
            if dst is not None and dst.inode == src.inode:
                return  # two links of one inode: rename(2) does nothing
            perm.check(ctx, sp, W_OK | X_OK)
            perm.check_sticky(ctx, sp, src)
            perm.check(ctx, dp, W_OK | X_OK)
            if dst is not None:
                perm.check_sticky(ctx, dp, dst)
                if not exchange:
                    if src.type == FileType.DIR and dst.type != FileType.DIR:
                        raise FSError(errno.ENOTDIR)
                    if src.type != FileType.DIR and dst.type == FileType.DIR:
                        raise FSError(errno.EISDIR)
            if parent != new_parent:
                if src.type == FileType.DIR:
                    perm.check(ctx, src, W_OK)
                if exchange and dst is not None and dst.type == FileType.DIR:
                    perm.check(ctx, dst, W_OK)
            if (
                not exchange
                and dst is not None
                and dst.type == FileType.DIR
                and tx.has_entries(dst.inode)
            ):
                raise FSError(errno.ENOTEMPTY)

            now = now_ns()
            snew = sp.copy()
            snew.mtime_ns = snew.ctime_ns = now
            dnew = snew if parent == new_parent else dp.copy()
            dnew.mtime_ns = dnew.ctime_ns = now
            moved = src.copy()
            moved.ctime_ns = now
            moving_dirs = parent != new_parent
            if exchange:
                assert dst is not None
                other = dst.copy()
                other.ctime_ns = now
                tx.put_entry(parent, name, dst.inode, dst.type)
                tx.put_entry(new_parent, new_name, src.inode, src.type)
                if moving_dirs and src.type == FileType.DIR:
                    moved.parent = new_parent
                    snew.nlink -= 1
                    dnew.nlink += 1
                if moving_dirs and dst.type == FileType.DIR:
                    other.parent = parent
                    dnew.nlink -= 1
                    snew.nlink += 1
                tx.put_attr(other)
            else:
                tx.del_entry(parent, name)
                tx.put_entry(new_parent, new_name, src.inode, src.type)
                if dst is not None:
                    if dst.type == FileType.DIR:
                        dnew.nlink -= 1
                        self._remove_dir_inode(tx, acct, dst, now)
                    else:
                        self._unlink_inode(tx, acct, dst, now)
                if moving_dirs and src.type == FileType.DIR:
                    moved.parent = new_parent
                    snew.nlink -= 1
                    dnew.nlink += 1
            tx.put_attr(moved)
            tx.put_attr(snew)
            if dnew is not snew:
                tx.put_attr(dnew)

        self._write(fn)

    # --- listing ------------------------------------------------------------------------------

    def readdir(self, ctx: Ctx, inode: int) -> Listing:
        def fn(tx: Txn) -> Listing:
            # listed first: an engine may read the directory's attributes with its entries
            listing = self._listing(tx, inode)
            attr = self._get_dir(tx, inode)
            perm.check(ctx, attr, R_OK)
            return listing

        return self._read(fn)

    def readdir_small(self, ctx: Ctx, inode: int, limit: int) -> tuple[Attr, Listing | None]:
        def fn(tx: Txn) -> tuple[Attr, Listing | None]:
            small = tx.count_entries(inode, limit + 1) <= limit
            listing = self._listing(tx, inode) if small else None
            attr = self._get_dir(tx, inode)  # after the listing: it may come with it
            perm.check(ctx, attr, R_OK)
            return attr, listing

        return self._read(fn)

    def _listing(self, tx: Txn, inode: int) -> Listing:
        """What ``readdir`` returns; an engine may have it read attributes as it is read."""
        return tx.list_dir(inode)

    # --- open files ---------------------------------------------------------------------------

    def open(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        sid = self._session_id()
        mask = perm.open_mask(flags)

        def fn(tx: Txn, acct: Acct) -> Attr:
            attr = self._get(tx, inode)
            perm.check_open(ctx, attr, mask)
            tx.add_open(sid, inode)
            return attr

        return self._write(fn)

    def reopen(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        mask = perm.open_mask(flags)

        def fn(tx: Txn) -> Attr:
            attr = self._get(tx, inode)
            perm.check_open(ctx, attr, mask)
            return attr

        return self._read(fn)

    def peek(self, ctx: Ctx, inode: int, flags: int) -> tuple[Attr, list[Slice] | None]:
        mask = perm.open_mask(flags)

        def fn(tx: Txn) -> tuple[Attr, list[Slice] | None]:
            attr = self._get(tx, inode)
            perm.check_open(ctx, attr, mask)
            return attr, tx.get_chunk(inode, 0) if attr.type == FileType.FILE else None

        return self._read(fn)

    def release(self, inode: int) -> None:
        self.release_many([inode])

    def release_many(self, inodes: list[int]) -> None:
        sid = self._sid
        if not sid or not inodes:
            return

        def fn(tx: Txn, acct: Acct) -> None:
            for inode in inodes:
                self._release_in(tx, acct, sid, inode)

        self._write(fn)

    def _release_in(self, tx: Txn, acct: Acct, sid: int, inode: int) -> None:
        attr = tx.get_attr(inode)
        holders = tx.open_sessions(inode)
        tx.del_open(sid, inode)
        tx.del_locks(sid, inode)
        if attr is None or attr.nlink > 0 or any(s != sid for s in holders):
            return
        if sid not in holders:
            return  # not ours: it was already dropped (or never opened here)
        self._drop_unreferenced(tx, acct, attr, now_ns())


def _with_gid(attr: Attr, gid: int) -> Attr:
    new = attr.copy()
    new.gid = gid
    return new
