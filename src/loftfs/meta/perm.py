"""Permission rules of the namespace, shared by every engine (Linux semantics).

Every function is pure: it looks at attributes and credentials and either returns the outcome or
raises ``FSError``. Engines call them inside their transactions, so a check and the change it
guards are atomic.
"""

from __future__ import annotations

import errno
import stat

from loftfs.errors import FSError
from loftfs.meta.types import R_OK, W_OK, X_OK, Attr, Ctx, FileType

_ANY_X = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def is_root(ctx: Ctx) -> bool:
    return ctx.uid == 0


def permitted(ctx: Ctx, attr: Attr, mask: int) -> bool:
    """True when ``ctx`` may access ``attr`` with ``mask`` (R_OK|W_OK|X_OK).

    Root may read and write anything, and execute a file only if some x bit is set
    (directories are always searchable by root). Others get exactly one class of bits:
    owner, else group (primary or supplementary), else other.
    """
    mask &= R_OK | W_OK | X_OK
    if mask == 0:
        return True
    if is_root(ctx):
        # root executes only what someone may execute
        return not (mask & X_OK and attr.type != FileType.DIR and not attr.mode & _ANY_X)
    if ctx.uid == attr.uid:
        bits = (attr.mode >> 6) & 7
    elif ctx.in_group(attr.gid):
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return bits & mask == mask


def check(ctx: Ctx, attr: Attr, mask: int) -> None:
    """Raise EACCES unless ``permitted``."""
    if not permitted(ctx, attr, mask):
        raise FSError(errno.EACCES)


def is_owner(ctx: Ctx, attr: Attr) -> bool:
    """Owner or root (CAP_FOWNER)."""
    return is_root(ctx) or ctx.uid == attr.uid


def check_sticky(ctx: Ctx, dir_attr: Attr, victim: Attr) -> None:
    """In a sticky directory only the victim's owner, the directory's owner or root may
    remove or rename an entry: EPERM otherwise (as Linux ``may_delete``)."""
    if (
        dir_attr.mode & stat.S_ISVTX
        and not is_root(ctx)
        and ctx.uid != victim.uid
        and ctx.uid != dir_attr.uid
    ):
        raise FSError(errno.EPERM)


def new_owner(ctx: Ctx, parent: Attr, type: FileType, mode: int) -> tuple[int, int, int]:
    """(mode, uid, gid) of a new inode created by ``ctx`` in ``parent``.

    A setgid parent gives its gid to everything created in it and its setgid bit to new
    directories. A non-directory that would be setgid and group-executable in such a parent
    loses S_ISGID unless the creator belongs to that group or is root (Linux mode_strip_sgid).
    """
    mode &= 0o7777
    gid = ctx.gid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if type == FileType.DIR:
            mode |= stat.S_ISGID
        elif (
            mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
            and not is_root(ctx)
            and not ctx.in_group(gid)
        ):
            mode &= ~stat.S_ISGID
    return mode, ctx.uid, gid


def chmod(ctx: Ctx, attr: Attr, mode: int) -> int:
    """The mode ``chmod`` stores: EPERM unless owner or root; a non-root caller outside the
    file's group cannot set S_ISGID (it is silently cleared, as Linux does)."""
    if not is_owner(ctx, attr):
        raise FSError(errno.EPERM)
    mode &= 0o7777
    if mode & stat.S_ISGID and not is_root(ctx) and not ctx.in_group(attr.gid):
        mode &= ~stat.S_ISGID
    return mode


def chown(ctx: Ctx, attr: Attr, uid: int | None, gid: int | None) -> tuple[int, int, int]:
    """(uid, gid, mode) after ``chown``.

    Only root changes the owner (the owner may "change" it to itself); the owner may change the
    group to one it belongs to. For non-directories S_ISUID is cleared and S_ISGID too when
    group-executable, whoever the caller is (Linux ``chown_common``).
    """
    uid_given = uid is not None and uid != -1
    gid_given = gid is not None and gid != -1
    new_uid = uid if uid_given and uid is not None else attr.uid
    new_gid = gid if gid_given and gid is not None else attr.gid
    if not is_root(ctx):
        if uid_given and (ctx.uid != attr.uid or new_uid != attr.uid):
            raise FSError(errno.EPERM)
        if gid_given and (
            ctx.uid != attr.uid or (new_gid != attr.gid and not ctx.in_group(new_gid))
        ):
            raise FSError(errno.EPERM)
    mode = attr.mode
    if attr.type != FileType.DIR:
        mode &= ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
    return new_uid, new_gid, mode


def check_utimes(ctx: Ctx, attr: Attr, *, explicit: bool) -> None:
    """Setting times explicitly needs ownership (EPERM); setting them to "now" needs ownership
    or write permission (EACCES), as utimensat(2)."""
    if is_owner(ctx, attr):
        return
    if explicit:
        raise FSError(errno.EPERM)
    check(ctx, attr, W_OK)


def open_mask(flags: int) -> int:
    """The access mask ``open`` needs for ``flags`` (O_TRUNC implies write)."""
    import os

    acc = flags & os.O_ACCMODE
    mask = {os.O_RDONLY: R_OK, os.O_WRONLY: W_OK, os.O_RDWR: R_OK | W_OK}.get(acc, R_OK | W_OK)
    if flags & os.O_TRUNC:
        mask |= W_OK
    return mask


def check_open(ctx: Ctx, attr: Attr, mask: int) -> None:
    """May ``ctx`` open ``attr`` with ``mask`` (``open_mask``)? A directory never for writing
    (EISDIR), anything else by its permission bits."""
    if attr.type == FileType.DIR and mask & W_OK:
        raise FSError(errno.EISDIR)
    check(ctx, attr, mask)


def check_xattr(ctx: Ctx, attr: Attr, name: bytes, write: bool) -> None:
    """Namespace rules for extended attributes (Linux ``xattr_permission``).

    ``user.*`` needs read/write permission and exists only on regular files and directories
    (in a sticky directory only its owner may write them); ``trusted.*`` is root-only
    (EPERM to write, ENODATA to read); ``security.*`` is open; ``system.*`` is unsupported and
    unknown namespaces raise EOPNOTSUPP.
    """
    if name.startswith(b"user."):
        if attr.type not in (FileType.FILE, FileType.DIR):
            raise FSError(errno.EPERM if write else errno.ENODATA)
        if (
            write
            and attr.type == FileType.DIR
            and attr.mode & stat.S_ISVTX
            and not is_owner(ctx, attr)
        ):
            raise FSError(errno.EPERM)
        check(ctx, attr, W_OK if write else R_OK)
    elif name.startswith(b"trusted."):
        if not is_root(ctx):
            raise FSError(errno.EPERM if write else errno.ENODATA)
    elif name.startswith(b"security."):
        if write and not is_owner(ctx, attr):
            raise FSError(errno.EPERM)
    elif name.startswith(b"system."):
        raise FSError(errno.EOPNOTSUPP if write else errno.ENODATA)
    else:
        raise FSError(errno.EOPNOTSUPP)


def xattr_visible(ctx: Ctx, name: bytes) -> bool:
    """Whether ``listxattr`` shows ``name`` to ``ctx`` (trusted.* only to root)."""
    return not name.startswith(b"trusted.") or is_root(ctx)
