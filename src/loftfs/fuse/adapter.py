"""pyfuse3 adapter: translates kernel requests to vfs calls, and serves a mount with them
(``serve_pyfuse3``). The only module that imports pyfuse3 and trio, so the binding can be
swapped without touching the vfs, and a mount on the default low-level binding never loads
either (together about 15 MiB of the mount's resident memory).

Each request runs the blocking vfs call in a worker thread bounded by a ``CapacityLimiter``
(docs/ARCHITECTURE.md: threading model). Every handler converts ``FSError`` to its errno and any
other exception to EIO with a log line: one bad request never kills the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from loftfs.errors import ConfigError, FSError, LoftError
from loftfs.fuse.common import IO_SIZE, device_number, fill_statvfs
from loftfs.meta.types import NOW, ROW_NLINK, Attr, Ctx, FileType
from loftfs.metrics import Metrics, is_failure
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import VFS

log = logging.getLogger(__name__)
T = TypeVar("T")

REPORTED_MAX = 100_000


def _ctx(ctx: pyfuse3.RequestContext | None) -> Ctx:
    if ctx is None:
        return Ctx()
    try:
        gids = tuple(pyfuse3.get_sup_groups(ctx.pid)) if ctx.uid != 0 else ()
    except Exception:  # the process may have exited already
        gids = ()
    return Ctx(uid=ctx.uid, gid=ctx.gid, gids=gids, pid=ctx.pid, umask=ctx.umask)


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, opts: MountOptions, metrics: Metrics | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.opts = opts
        self.metrics = metrics  # times every vfs call (named after the vfs method) when set
        self.limiter = trio.CapacityLimiter(max(4, opts.max_fuse_tasks))
        # (mtime_ns, size) of each file as last reported to the kernel, which caches it for
        # attr_timeout. An open that finds the file changed (by another client) invalidates that
        # cache, or the kernel would read with the old size (close-to-open). Bounded.
        self._reported: OrderedDict[int, tuple[int, int]] = OrderedDict()

    # --- plumbing --------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.metrics is None:
            return await self._call(fn, *args, **kwargs)
        start = time.perf_counter()
        failed = False
        try:
            return await self._call(fn, *args, **kwargs)
        except pyfuse3.FUSEError as e:
            failed = e.errno == errno.EIO
            raise
        except BaseException as e:
            failed = is_failure(e)
            raise
        finally:
            name = getattr(fn, "__name__", "other")
            self.metrics.observe_op(name, time.perf_counter() - start, failed)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), limiter=self.limiter
            )
        except FSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except LoftError as e:
            log.error("%s failed: %s", getattr(fn, "__name__", fn), e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _report(self, attr: Attr) -> bool:
        """Remember what the kernel is told of a file; True if it had been told otherwise."""
        now = (attr.mtime_ns, attr.size)
        before = self._reported.get(attr.inode)
        self._reported[attr.inode] = now
        self._reported.move_to_end(attr.inode)
        if len(self._reported) > REPORTED_MAX:
            self._reported.popitem(last=False)
        return before is not None and before != now

    def _entry(self, attr: Attr, age: float = 0.0) -> pyfuse3.EntryAttributes:
        """The reply to a lookup or getattr; ``age``: how long ago ``attr`` was read (an
        answer from the vfs's cache), taken off the timeouts."""
        if attr.type == FileType.FILE:
            self._report(attr)
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.inode
        e.generation = 0
        timeout = (
            self.opts.dir_entry_timeout if attr.type == FileType.DIR else self.opts.entry_timeout
        )
        e.entry_timeout = max(0.0, timeout - age)
        e.attr_timeout = max(0.0, self.opts.attr_timeout - age)
        e.st_mode = attr.st_mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = device_number(attr)
        e.st_size = attr.size
        e.st_blksize = IO_SIZE
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    # --- attributes ------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr, age = await self._run(self.vfs.lookup_aged, _ctx(ctx), parent_inode, name)
        return self._entry(attr, age)

    async def forget(self, inode_list: Any) -> None:
        return None  # inodes are kept in the metadata engine, not in memory

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(*await self._run(self.vfs.getattr_aged, inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        kw: dict[str, Any] = {}
        if fields.update_mode:
            kw["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        caller = _ctx(ctx)
        if ("atime_ns" in kw or "mtime_ns" in kw or "mode" in kw) and ctx.uid != 0:
            current = await self._run(self.vfs.getattr, inode)
            if current.uid != ctx.uid:
                # The kernel (default_permissions) has already checked this request, and lets a
                # non-owner through in two cases only, which the metadata layer's owner check
                # would refuse: times set to "now" with write permission (pyfuse3 turns
                # UTIME_NOW into an explicit time), and the removal of setuid/setgid that a
                # write by a non-owner triggers (kill-priv).
                for key in ("atime_ns", "mtime_ns"):
                    if key in kw:
                        kw[key] = NOW
                if kw.get("mode") == current.mode & ~(stat.S_ISUID | stat.S_ISGID):
                    await self._run(self.vfs.setattr, Ctx(), inode, fh, mode=kw.pop("mode"))
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        elif kw and "size" not in kw:
            kw.setdefault("ctime_ns", NOW)
        if not kw:
            return self._entry(await self._run(self.vfs.getattr, inode))
        result = await self._run(self.vfs.setattr, caller, inode, fh, **kw)
        return self._entry(result)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            await self._run(self.vfs.access, _ctx(ctx), inode, mode)
        except pyfuse3.FUSEError as e:
            if e.errno == errno.EACCES:
                return False
            raise
        return True

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self._run(self.vfs.statfs, _ctx(ctx))
        return fill_statvfs(pyfuse3.StatvfsData(), st)

    # --- namespace -------------------------------------------------------------------------------

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ftype = FileType.from_mode(mode)
        attr = await self._run(
            self.vfs.mknod, _ctx(ctx), parent_inode, name, ftype, stat.S_IMODE(mode), rdev
        )
        return self._entry(attr)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self._run(self.vfs.mkdir, _ctx(ctx), parent_inode, name, stat.S_IMODE(mode))
        return self._entry(attr)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self._run(self.vfs.symlink, _ctx(ctx), parent_inode, name, target)
        return self._entry(attr)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._run(self.vfs.readlink, _ctx(ctx), inode)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self._run(self.vfs.link, _ctx(ctx), inode, new_parent_inode, new_name)
        return self._entry(attr)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run(self.vfs.unlink, _ctx(ctx), parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run(self.vfs.rmdir, _ctx(ctx), parent_inode, name)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._run(
            self.vfs.rename,
            _ctx(ctx),
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            flags,
        )

    # --- files -----------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep, attr = await self._run(self.vfs.open, _ctx(ctx), inode, flags)
        if self._report(attr):
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError as e:  # the kernel may have forgotten the inode already
                log.debug("invalidating attributes of inode %d: %s", inode, e)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self._run(
            self.vfs.create, _ctx(ctx), parent_inode, name, stat.S_IMODE(mode), flags
        )
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False), self._entry(attr)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._run(self.vfs.read, fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._run(self.vfs.write, fh, off, buf)

    async def flush(self, fh: int) -> None:
        await self._run(self.vfs.flush, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._run(self.vfs.fsync, fh, datasync)

    async def release(self, fh: int) -> None:
        await self._run(self.vfs.release, fh)

    # --- directories -----------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self._run(self.vfs.opendir, _ctx(ctx), inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self._run(self.vfs.readdir, Ctx(), fh, start_id)
        for i, (name, row) in enumerate(entries, start=start_id + 1):
            if row[ROW_NLINK] == 0:
                continue  # removed while it was listed (see Listing): pyfuse3 cannot say so
            if not pyfuse3.readdir_reply(token, name, self._entry(Attr(*row)), i):
                break

    async def releasedir(self, fh: int) -> None:
        await self._run(self.vfs.releasedir, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # every namespace change is committed when it returns

    # --- extended attributes ---------------------------------------------------------------------

    def _xattrs_enabled(self) -> None:
        if not self.opts.enable_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._xattrs_enabled()
        await self._run(self.vfs.setxattr, _ctx(ctx), inode, name, value, 0)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._xattrs_enabled()
        return await self._run(self.vfs.getxattr, _ctx(ctx), inode, name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._xattrs_enabled()
        return await self._run(self.vfs.listxattr, _ctx(ctx), inode)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._xattrs_enabled()
        await self._run(self.vfs.removexattr, _ctx(ctx), inode, name)


# --- serving ---------------------------------------------------------------------------------


def serve_pyfuse3(
    vfs: VFS,
    opts: MountOptions,
    mountpoint: str,
    options: set[str],
    metrics: Metrics,
    *,
    on_ready: Callable[[], None],
    on_mounted: Callable[[], None],
    signals_seen: list[int],
    stop_signals: tuple[signal.Signals, ...],
) -> None:
    """Mount ``mountpoint`` through pyfuse3 and serve ``vfs`` until unmounted or one of
    ``stop_signals`` arrives (appended to ``signals_seen``, which may hold one caught before
    the loop ran: it is served at once). ``on_mounted`` runs once the kernel mount exists,
    ``on_ready`` (in a thread) once the mount answered a ``stat``. The kernel mount is gone
    when this returns; committing and closing stay with the caller, as for ``serve_lowlevel``.
    """
    try:
        pyfuse3.init(FuseOperations(vfs, opts, metrics), mountpoint, options)
    except RuntimeError as e:  # libfuse rejected an option or could not mount
        raise ConfigError(
            f"libfuse refused the mount options {', '.join(sorted(options))} ({e}); see the log"
        ) from None
    try:
        on_mounted()
        trio.run(_serve, mountpoint, opts, on_ready, signals_seen, stop_signals)
    finally:
        # After a signal the kernel mount is still there: take it down so that nothing
        # blocks on a dead process. After an external umount this is a no-op.
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:  # already gone: nothing to take down
            log.debug("pyfuse3.close: %s", e)


async def _serve(
    mountpoint: str,
    opts: MountOptions,
    on_ready: Callable[[], None],
    signals_seen: list[int],
    stop_signals: tuple[signal.Signals, ...],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, nursery.cancel_scope, signals_seen, stop_signals)
        nursery.start_soon(_announce_ready, mountpoint, on_ready)
        await pyfuse3.main(min_tasks=1, max_tasks=opts.max_fuse_tasks)
        nursery.cancel_scope.cancel()


async def _announce_ready(mountpoint: str, on_ready: Callable[[], None]) -> None:
    # A stat through the kernel proves the loop answers requests. Nothing may touch the
    # mountpoint before the loop runs: the request would wait for this very process.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    await trio.to_thread.run_sync(on_ready)


async def _watch_signals(
    scope: trio.CancelScope, signals_seen: list[int], stop_signals: tuple[signal.Signals, ...]
) -> None:
    with trio.open_signal_receiver(*stop_signals) as signals:
        if not signals_seen:  # a signal that came before the loop ran is served at once
            async for signum in signals:
                signals_seen.append(signum)
                break
        log.info("signal %s: unmounting", signal.Signals(signals_seen[0]).name)
        pyfuse3.terminate()
        scope.cancel()
