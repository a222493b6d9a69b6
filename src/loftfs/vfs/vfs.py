"""The vfs: open handles and the POSIX semantics shared by the FUSE adapter and the SDK.

Every method is blocking and thread-safe; the FUSE adapter calls them from worker threads.
Errors are ``FSError(errno)`` (the adapter maps them to the kernel); anything else is a bug that
the adapter logs and answers with EIO.

Consistency model (docs/SEMANTICS.md): close-to-open. ``open`` fetches fresh attributes and slice
lists; ``flush`` (every ``close``), ``fsync`` and ``release`` commit buffered writes, so another
client that opens the file afterwards sees them. Within one mount, reads see the mount's own
writes at once (buffered data is committed before a read of the same inode).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from loftfs.chunk.datapath import BlockSlice, DataPath, ReadState
from loftfs.errors import FSError
from loftfs.meta import perm
from loftfs.meta.interface import Meta
from loftfs.meta.ops_import import LAZY_MARK
from loftfs.meta.types import (
    FALLOC_FL_KEEP_SIZE,
    ROOT_CTX,
    ROW_RDEV,
    X_OK,
    Attr,
    AttrRow,
    Ctx,
    FileType,
    Listing,
    StatFS,
    VolumeSettings,
)
from loftfs.vfs.lazy import LazyDirs
from loftfs.vfs.metacache import MetaCache
from loftfs.vfs.options import MountOptions
from loftfs.vfs.predict import OpenPredictor
from loftfs.vfs.sweep import MAX_LISTED, SweepDetector

log = logging.getLogger(__name__)

O_ACCMODE = os.O_ACCMODE
XATTR_SIZE_MAX = 65536
SEEN_MAX = 100_000
# Deferred release: after the last close in this mount, a file's open record stays in the
# metadata engine for up to RELEASE_LINGER_S seconds (RELEASE_BATCH files at most). Opening it
# again meanwhile (the next epoch, the reader after the writer) costs a read-only transaction
# instead of a write, and the releases are committed in batches. Unlink, rename, rmdir and
# statfs commit the pending releases first, so deletions and usage are exact for this mount;
# another client deleting such a file frees its space when the release is committed.
RELEASE_LINGER_S = 2.0
ROWS_STEP = 64  # listing entries decoded at a time (a reply page holds up to about 400)
RELEASE_BATCH = 256
OPEN_LOCK_STRIPES = 256
# Light opens. A read-only open of a small file that is not open in this mount takes the
# file's whole content at once (attributes and chunk 0's slice list in one read-only
# transaction, the blocks from the caches or the store) and writes no open record: the read
# that follows is served from that snapshot, and the close costs nothing. The engine's open
# record exists to keep a file's data alive while it is open and another client deletes it;
# a snapshot needs no such protection. Close-to-open consistency holds as for any open (the
# content is the committed one at open time). Within this mount the snapshot never goes
# stale: an open of the same file by a normal handle, a truncate, and a lock taken on the
# handle first turn it into a normal handle (with its record). An unlink leaves it as it is:
# it reads its snapshot, and fstat answers (nlink 0), as for any file unlinked while open.
# Files above LIGHT_FILE_MAX, and opens beyond LIGHT_TOTAL_MAX bytes of snapshots held, take
# the normal path.
LIGHT_FILE_MAX = 256 << 10
LIGHT_TOTAL_MAX = 64 << 20


@dataclass
class FileHandle:
    inode: int
    flags: int
    read_state: ReadState | None = None
    written: bool = False
    snapshot: bytes | None = None  # a light open's content (see LIGHT_FILE_MAX)
    attr: Attr | None = None  # a light open's attributes, for fstat after a remote unlink


@dataclass
class DirHandle:
    inode: int
    entries: Listing | None = None
    self_attr: Attr | None = None
    parent_attr: Attr | None = None


@dataclass
class _InodeState:
    """What this mount knows of an inode it has open."""

    opens: int = 0
    size: int = 0  # committed size as last seen, raised by our own writes
    changed: bool = False  # written, truncated... through this mount while open
    lock: threading.Lock = field(default_factory=threading.Lock)


class VFS:
    def __init__(
        self, meta: Meta, data: DataPath, settings: VolumeSettings, opts: MountOptions
    ) -> None:
        self.meta = meta
        self.data = data
        self.settings = settings
        self.opts = opts
        # directories bound to a source prefix, listed from it when first needed
        self.lazy = LazyDirs(meta, data.external.sources)
        # names and attributes answered from memory for the rest of their kernel validity
        self.cache = MetaCache(opts.attr_timeout, opts.entry_timeout, opts.dir_entry_timeout)
        # whether lookups of small files are followed by their opens (warming at lookup)
        self._opens = OpenPredictor()
        # Preloading needs a disk cache to read ahead from, and an engine whose round trips
        # are long enough to hide that read behind (with SQLite it only cost time).
        self._preload = data.disk is not None and meta.remote
        # directories whose lookups keep missing the cache are listed into it in one go
        # (loftfs.vfs.sweep); with SQLite a lookup costs about what answering it from memory
        # does, so only for remote engines
        self.sweep: SweepDetector | None = None
        self._sweeper: ThreadPoolExecutor | None = None
        if self.cache.enabled and meta.remote:
            self.sweep = SweepDetector(min(opts.entry_timeout, opts.attr_timeout))
            self._sweeper = ThreadPoolExecutor(1, "loft-sweep")
        self._fh = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._inodes: dict[int, _InodeState] = {}
        # (mtime_ns, size) of files when the kernel's page cache was last filled: an open of an
        # unchanged file keeps that cache. Bounded, oldest forgotten first.
        self._seen: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()
        # Serialise, per inode, the first open and the last release of this mount with their
        # metadata calls: otherwise a release finishing late could drop the open record of an
        # open that overtook it (and a rename over the file would then delete its data).
        self._open_locks = [threading.RLock() for _ in range(OPEN_LOCK_STRIPES)]
        # inode -> when its last handle here closed; its open record is released later
        self._lingering: OrderedDict[int, float] = OrderedDict()
        self._releasing: set[int] = set()  # in a batch being committed now
        self._light: dict[int, set[int]] = {}  # inode -> its light handles (no open record)
        self._light_bytes = 0  # held by their snapshots
        # Set by a FUSE binding that can fill the kernel's page cache of an inode: called with
        # a light open's content under the inode's open lock, before the open's reply; True
        # when the kernel took all of it (the open then keeps the kernel's cache, and the reads
        # that follow never reach this process). See ``_light_open``.
        self.kernel_store: Callable[[int, bytes], bool] | None = None
        self._released = threading.Condition(self._lock)
        self._linger_wake = threading.Event()
        self._linger_stop = threading.Event()
        self._linger_thread = threading.Thread(
            target=self._linger_loop, name="loft-release", daemon=True
        )
        self._linger_thread.start()

    # --- helpers ---------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.opts.read_only:
            raise FSError(errno.EROFS)

    def _file(self, fh: int) -> FileHandle:
        h = self._files.get(fh)
        if h is None:
            raise FSError(errno.EBADF)
        return h

    def _with_dirty(self, attr: Attr) -> Attr:
        """Attributes as this mount sees them: buffered writes extend the size. (Directories
        still bound to a source prefix are noted on the way: see ``loftfs.vfs.lazy``.)"""
        size = self._seen_size(attr.inode, attr.type, attr.rdev, attr.size)
        if size != attr.size:
            attr = attr.copy()
            attr.size = size
        return attr

    def _seen_size(self, inode: int, kind: FileType, rdev: int, size: int) -> int:
        """The size this mount sees for an inode the engine says is ``size`` long (buffered
        writes extend it); a directory still bound to a source prefix is noted on the way."""
        if kind is FileType.FILE:
            return max(size, self.data.dirty_size(inode))
        if rdev == LAZY_MARK and kind is FileType.DIR:
            self.lazy.seen(inode)
        return size

    def _listed(self, inode: int) -> None:
        """List a directory bound to a source prefix before its first lookup or listing."""
        if self.lazy.pending(inode):
            try:
                self.lazy.populate(inode)
            finally:
                self.cache.forget(inode)

    # --- attributes and lookups ------------------------------------------------------------------

    def lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        self._listed(parent)
        return self._with_dirty(self.meta.lookup(ctx, parent, name))

    def lookup_aged(self, ctx: Ctx, parent: int, name: bytes) -> tuple[Attr, float]:
        """``lookup`` for the kernel, which may be answered from ``self.cache``: (attributes,
        their age in seconds, to be taken off the timeouts the kernel is given)."""
        cache = self.cache
        if cache.enabled:
            hit = cache.entry(parent, name)
            if hit is not None and hit[0].inode not in self._inodes:
                attr, age, pattr = hit
                perm.check(ctx, pattr, X_OK)  # as the engine's lookup does
                return self._with_dirty(attr), age
        gen, read_at = cache.generation(), time.monotonic()
        self._listed(parent)
        attr = self._engine_lookup(ctx, parent, name)
        if cache.enabled and attr.inode not in self._inodes:
            cache.put(attr, gen, read_at, parent, name)
        sweep = self.sweep
        if sweep is not None and self._sweeper is not None and sweep.missed(parent):
            try:
                self._sweeper.submit(self._list_for_lookups, parent)
            except RuntimeError:  # shut down
                sweep.done(parent, None)
        return self._with_dirty(attr), 0.0

    def _list_for_lookups(self, parent: int) -> None:
        """Read directory ``parent`` into the cache (its lookups keep missing it: see
        ``loftfs.vfs.sweep``). Entries gone meanwhile, and files open in this mount (their
        sizes move with writes), are left out."""
        assert self.sweep is not None
        cache = self.cache
        listed: bool | None = None
        try:
            gen, read_at = cache.generation(), time.monotonic()
            pattr, listing = self.meta.readdir_small(ROOT_CTX, parent, MAX_LISTED)
            listed = listing is not None
            if listing is not None:
                entries = [(e.name, e.attr) for e in listing if e.attr.nlink]
                with self._lock:
                    entries = [(n, a) for n, a in entries if a.inode not in self._inodes]
                cache.put_listing(pattr, entries, gen, read_at)
        except Exception as e:  # only a lost optimisation: the lookups go on as before
            log.debug("listing directory %d for its lookups failed: %s", parent, e)
        finally:
            self.sweep.done(parent, listed)

    def _engine_lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        """The engine's lookup. With a disk cache and a remote engine, while opens follow lookups
        (``OpenPredictor``), the engine also returns a file's slice list in the same round
        trip, and the blocks of a small file start on their way from the disk into memory
        (``DataPath.preload``), to arrive during the round trips between this lookup and the
        open's read. The slice list serves nothing else: the open reads the file afresh."""
        if not self._preload:
            return self.meta.lookup(ctx, parent, name)
        slices = None
        if self._opens.likely():
            attr, slices = self.meta.lookup_peek(ctx, parent, name)
        else:
            attr = self.meta.lookup(ctx, parent, name)
        if attr.type == FileType.FILE and 0 < attr.size <= LIGHT_FILE_MAX:
            self._opens.looked_up(attr.inode)
            if slices and attr.inode not in self._inodes:
                self.data.preload(slices, attr.size)
        return attr

    def getattr_aged(self, inode: int) -> tuple[Attr, float]:
        """``getattr`` for the kernel, which may be answered from ``self.cache``: (attributes,
        their age in seconds)."""
        cache = self.cache
        if not cache.enabled or inode in self._inodes:
            return self.getattr(inode), 0.0
        hit = cache.attr(inode)
        if hit is not None:
            return self._with_dirty(hit[0]), hit[1]
        gen, read_at = cache.generation(), time.monotonic()
        try:
            attr = self.meta.getattr(inode)
        except FSError as e:
            return self._removed(inode, e), 0.0
        if inode not in self._inodes:
            cache.put(attr, gen, read_at)
        return self._with_dirty(attr), 0.0

    def getattr(self, inode: int) -> Attr:
        try:
            return self._with_dirty(self.meta.getattr(inode))
        except FSError as e:
            return self._removed(inode, e)

    def _removed(self, inode: int, e: FSError) -> Attr:
        """The answer to a getattr the engine failed with ``e``: a directory removed while
        open, or a file another client deleted while a light handle has it, still answers
        (fstat on the handle, nlink 0); anything else raises ``e``."""
        if e.errno != errno.ENOENT:
            raise e
        with self._lock:
            attr = next((h.self_attr for h in self._dirs.values() if h.inode == inode), None)
            if attr is None and inode in self._light:
                attr = next(
                    (self._files[f].attr for f in self._light[inode] if f in self._files),
                    None,
                )
        if attr is None:
            raise e
        attr = attr.copy()
        attr.nlink = 0
        return attr

    def setattr(
        self,
        ctx: Ctx,
        inode: int,
        fh: int | None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        self._check_writable()
        attr: Attr | None = None
        if size is not None:
            if size < 0:
                raise FSError(errno.EINVAL)
            self._promote(inode)  # no light handle may keep the old content
            # A truncate through an open handle was permission-checked at open time.
            handle = self._files.get(fh) if fh is not None else None
            attr = self._truncate(ctx, inode, size, check_perm=handle is None)
        if any(v is not None for v in (mode, uid, gid, atime_ns, mtime_ns, ctime_ns)):
            if mtime_ns is not None:
                # Buffered writes must not land after an explicit mtime and overwrite it.
                self.data.flush(inode)
            try:
                attr = self.meta.setattr(
                    ctx,
                    inode,
                    mode=mode,
                    uid=uid,
                    gid=gid,
                    atime_ns=atime_ns,
                    mtime_ns=mtime_ns,
                    ctime_ns=ctime_ns,
                )
            finally:
                self.cache.forget(inode)
        if attr is None:
            attr = self.meta.getattr(inode)
        return self._with_dirty(attr)

    def _truncate(self, ctx: Ctx, inode: int, size: int, *, check_perm: bool) -> Attr:
        self.data.flush(inode)
        try:
            attr = self.meta.truncate(ctx, inode, size, check_perm=check_perm)
        finally:
            self.cache.forget(inode)
        self.data.invalidate(inode)
        st = self._inodes.get(inode)
        if st is not None:
            st.size = attr.size
            st.changed = True
        return attr

    def access(self, ctx: Ctx, inode: int, mask: int) -> None:
        self.meta.access(ctx, inode, mask)

    def statfs(self, ctx: Ctx) -> StatFS:
        self.release_lingering()
        return self.meta.statfs(ctx)

    # --- namespace -------------------------------------------------------------------------------

    def mknod(
        self, ctx: Ctx, parent: int, name: bytes, type: FileType, mode: int, rdev: int = 0
    ) -> Attr:
        if type == FileType.SYMLINK:
            raise FSError(errno.EINVAL)
        return self._add(
            parent, name, lambda: self.meta.make(ctx, parent, name, type, mode, rdev=rdev)
        )

    def mkdir(self, ctx: Ctx, parent: int, name: bytes, mode: int) -> Attr:
        return self._add(
            parent, name, lambda: self.meta.make(ctx, parent, name, FileType.DIR, mode)
        )

    def symlink(self, ctx: Ctx, parent: int, name: bytes, target: bytes) -> Attr:
        kind = FileType.SYMLINK
        return self._add(
            parent, name, lambda: self.meta.make(ctx, parent, name, kind, 0o777, target=target)
        )

    def _add(
        self,
        parent: int,
        name: bytes,
        make: Callable[[], tuple[Attr, Attr]],
        *,
        opened: bool = False,
    ) -> Attr:
        """Make a new name with ``make`` (a ``Meta.make`` call). What the commit made of it and
        of its directory is kept for the kernel (which asks for the directory's attributes right
        after), unless another change through this mount came in between; ``opened``: the new
        file is open here, so its own attributes are not kept."""
        self._check_writable()
        cache = self.cache
        gen, read_at = cache.generation(), time.monotonic()
        try:
            attr, pattr = make()
        finally:
            cache.changed_dir(parent, name)
        # ``changed_dir`` moved the generation on by one: any other change since ``gen`` was
        # taken leaves it further on, and these answers (perhaps older than it) are not kept
        cache.put(pattr, gen + 1, read_at)
        if not opened:
            cache.put(attr, gen + 1, read_at, parent, name)
        return attr

    def readlink(self, ctx: Ctx, inode: int) -> bytes:
        return self.meta.readlink(inode)

    def link(self, ctx: Ctx, inode: int, new_parent: int, new_name: bytes) -> Attr:
        self._check_writable()
        try:
            return self._with_dirty(self.meta.link(ctx, inode, new_parent, new_name))
        finally:
            self.cache.changed_dir(new_parent, new_name)
            self.cache.forget(inode)

    def unlink(self, ctx: Ctx, parent: int, name: bytes) -> None:
        self._check_writable()
        self.release_lingering()
        # A light handle of the file keeps reading its snapshot (and fstat answers, nlink 0).
        try:
            self.meta.unlink(ctx, parent, name)
        finally:
            self.cache.forget_all()

    def rmdir(self, ctx: Ctx, parent: int, name: bytes) -> None:
        self._check_writable()
        self.release_lingering()
        # a directory bound to a source prefix holds what the prefix holds: list it first, so
        # that removing one with objects is ENOTEMPTY, as its contents say
        try:
            child: Attr | None = self.meta.lookup(ctx, parent, name)
        except FSError:
            child = None  # rmdir gives the answer
        if child is not None and child.type == FileType.DIR and child.rdev == LAZY_MARK:
            self.lazy.seen(child.inode)
            self.lazy.populate(child.inode)
        try:
            self.meta.rmdir(ctx, parent, name)
        finally:
            self.cache.forget_all()

    def rename(
        self, ctx: Ctx, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._check_writable()
        self.release_lingering()
        try:
            self.meta.rename(ctx, parent, name, new_parent, new_name, flags)
        finally:
            self.cache.forget_all()

    # --- files -----------------------------------------------------------------------------------

    def _first_open(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        """The first open of ``inode`` in this mount: forget what was cached of its content
        (close-to-open), and let the engine read chunk 0's slice list with the open when it
        can (one round trip less for a small file's first read)."""
        self.data.invalidate(inode)
        token = self.data.slices.begin(inode, 0)
        try:
            attr, slices = self.meta.open_with_chunk(ctx, inode, flags)
        except BaseException:
            self.data.slices.abandon(token)
            raise
        if slices is None:
            self.data.slices.abandon(token)
        else:
            self.data.slices.put(token, slices)
        return attr

    def _register_open(self, attr: Attr, flags: int, *, fresh: bool = False) -> tuple[int, bool]:
        """Create a handle; returns (fh, keep_cache). ``fresh``: the caller already dropped
        the cached slice lists for this first open."""
        inode = attr.inode
        with self._lock:
            st = self._inodes.get(inode)
            if st is None:
                st = self._inodes[inode] = _InodeState()
            first = st.opens == 0
            st.opens += 1
            fh = next(self._fh)
            self._files[fh] = FileHandle(inode, flags, read_state=self.data.new_read_state())
        if first and not fresh:
            # Close-to-open: another client may have changed the file since we last read it.
            self.data.invalidate(inode)
        st.size = max(attr.size, st.size) if not first else attr.size
        # The kernel may keep its page cache when the file did not change since we filled it.
        keep = self._remember(inode, attr) and attr.size > 0
        return fh, keep

    def _remember(self, inode: int, attr: Attr) -> bool:
        """Record (mtime, size) of ``inode``; True when it equals what was recorded before."""
        now = (attr.mtime_ns, attr.size)
        with self._lock:
            same = self._seen.get(inode) == now
            self._seen[inode] = now
            self._seen.move_to_end(inode)
            while len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
        return same

    def open(
        self, ctx: Ctx, inode: int, flags: int, *, light: bool = True
    ) -> tuple[int, bool, Attr]:
        """Open ``inode``; returns (fh, keep_cache, attr). ``light``: a small file opened
        read-only may be opened light (see ``LIGHT_FILE_MAX``)."""
        if flags & O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._check_writable()
        if self._preload:
            self._opens.opened(inode)
        with self._open_lock(inode):
            with self._lock:
                while inode in self._releasing:  # its record is being dropped right now
                    self._released.wait()
                st = self._inodes.get(inode)
                # taken out of the deferred releases now, so no batch can drop the record
                # this open relies on
                claimed = self._lingering.pop(inode, None)
                covered = (st is not None and st.opens > 0) or claimed is not None
            read_at = time.monotonic()
            if (
                light
                and not covered
                and flags & (O_ACCMODE | os.O_TRUNC) == os.O_RDONLY
                and self._light_bytes < LIGHT_TOTAL_MAX
            ):
                opened = self._light_open(ctx, inode, flags)
                if opened is not None:
                    return opened
            if covered:  # this session's open record is already there
                try:
                    attr = self.meta.reopen(ctx, inode, flags)
                except BaseException:
                    if claimed is not None:
                        with self._lock:
                            self._lingering[inode] = claimed
                    raise
            else:  # not open here and no record left: the first open in this mount
                attr = self._first_open(ctx, inode, flags)
            self.cache.refresh(attr, read_at)  # a stat after this open shows no older attributes
            fh, keep = self._register_open(attr, flags, fresh=not covered)
            if inode in self._light:
                self._promote(inode)
        if flags & os.O_TRUNC and attr.type == FileType.FILE:
            try:
                attr = self._truncate(ctx, inode, 0, check_perm=False)
            except BaseException:
                self.release(fh)
                raise
            keep = False
        return fh, keep, self._with_dirty(attr)

    def _light_open(self, ctx: Ctx, inode: int, flags: int) -> tuple[int, bool, Attr] | None:
        """A light open (caller holds the inode's open lock, and nothing of it is open or
        lingering here); None when the file does not qualify (the caller opens it normally).
        Errors of the permission check are raised as ``open`` would."""
        read_at = time.monotonic()
        attr, slices = self.meta.peek(ctx, inode, flags)
        self.cache.refresh(attr, read_at)  # a stat after this open shows no older attributes
        if attr.type != FileType.FILE or slices is None or attr.size > LIGHT_FILE_MAX:
            return None
        try:
            data = self.data.read_snapshot(slices, attr.size) if attr.size else b""
        except FSError as e:  # e.g. a block rewritten meanwhile: the normal path retries
            log.debug("light open of inode %d fell back: %s", inode, e)
            return None
        with self._lock:
            if self._light_bytes + len(data) > LIGHT_TOTAL_MAX:
                return None
            self._light_bytes += len(data)
            fh = next(self._fh)
            self._files[fh] = FileHandle(inode, flags, snapshot=data, attr=attr)
            self._light.setdefault(inode, set()).add(fh)
        keep = self._remember(inode, attr) and attr.size > 0
        # Hand the snapshot to the kernel's page cache now, so that the READ that follows this
        # open is answered there: one request less per small file. Under the open lock, so that
        # no open for writing (nor a truncate, which promotes the light handles under it) can
        # come between the snapshot and the store; the stored bytes are this open's content,
        # so the kernel may keep them.
        store = self.kernel_store
        if data and store is not None and store(inode, data):
            keep = True
        return fh, keep, attr

    def _promote(self, inode: int) -> None:
        """Turn the light handles of ``inode`` into normal ones (each takes this session's
        open record, as a normal open would), so that none serves a snapshot that this mount
        is about to make stale. A file deleted meanwhile by another client keeps its light
        handles (their snapshots are all that is left of it)."""
        with self._open_lock(inode):
            with self._lock:
                fhs = self._light.pop(inode, set())
                handles = [(fh, self._files[fh]) for fh in fhs if fh in self._files]
            kept: list[int] = []
            for fh, h in handles:
                try:
                    nfh, _, _ = self.open(ROOT_CTX, inode, os.O_RDONLY, light=False)
                except FSError as e:
                    log.debug("inode %d: light handle %d stays light: %s", inode, fh, e)
                    kept.append(fh)
                    continue
                with self._lock:
                    alive = self._files.get(fh) is h and h.snapshot is not None
                    if alive:
                        normal = self._files.pop(nfh)
                        self._light_bytes -= len(h.snapshot or b"")
                        h.snapshot, h.attr, h.read_state = None, None, normal.read_state
                if not alive:  # closed meanwhile (as a light handle): undo the new open
                    self.release(nfh)
            if kept:
                with self._lock:
                    self._light.setdefault(inode, set()).update(kept)

    def create(self, ctx: Ctx, parent: int, name: bytes, mode: int, flags: int) -> tuple[int, Attr]:
        try:
            attr = self._add(
                parent,
                name,
                lambda: self.meta.make(ctx, parent, name, FileType.FILE, mode, open=True),
                opened=True,
            )
        except FSError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # Another client created the name since the kernel's lookup: open it instead.
            existing = self.meta.lookup(ctx, parent, name)
            fh, _, attr = self.open(ctx, existing.inode, flags & ~os.O_CREAT)
            return fh, attr
        fh, _ = self._register_open(attr, flags)
        return fh, attr

    def _file_size(self, inode: int) -> int:
        st = self._inodes.get(inode)
        if st is None:
            return self.meta.getattr(inode).size
        return st.size

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return bytes(self.read_span(fh, offset, size))

    def read_span(self, fh: int, offset: int, size: int) -> bytes | BlockSlice:
        """``read``; a range within one cached block may come back as a ``BlockSlice`` of it,
        which the FUSE reply sends without copying."""
        h = self._file(fh)
        if h.flags & O_ACCMODE == os.O_WRONLY:
            raise FSError(errno.EBADF)
        if offset < 0:
            raise FSError(errno.EINVAL)
        snap = h.snapshot
        if snap is not None:
            end = min(len(snap), offset + size)
            return BlockSlice(snap, offset, end) if offset < end else b""
        if self.data.dirty_size(h.inode):
            # Read-your-writes within this mount: commit what is buffered first.
            self.data.flush(h.inode)
            self._refresh_size(h.inode)
        return self.data.read_span(h.inode, offset, size, self._file_size(h.inode), h.read_state)

    def _refresh_size(self, inode: int) -> None:
        st = self._inodes.get(inode)
        if st is not None:
            st.size = self.meta.getattr(inode).size

    def write(self, fh: int, offset: int, buf: bytes | memoryview) -> int:
        """Buffer ``buf`` at ``offset``. ``buf`` may be a view of the caller's memory: it is
        copied before this returns and never kept."""
        h = self._file(fh)
        if h.flags & O_ACCMODE == os.O_RDONLY:
            raise FSError(errno.EBADF)
        if offset < 0:
            raise FSError(errno.EINVAL)
        if not buf:
            return 0
        self._check_writable()
        capacity = self.meta.recent_settings().capacity
        if capacity and offset + len(buf) > capacity:
            # A file can never be larger than the volume; the quota check at commit covers the
            # rest (ENOSPC surfaces at fsync/close then).
            raise FSError(errno.ENOSPC)
        self.data.writer(h.inode).write(offset, buf)
        h.written = True
        st = self._inodes.get(h.inode)
        if st is not None:
            st.changed = True
            with st.lock:
                st.size = max(st.size, offset + len(buf))
        return len(buf)

    def flush(self, fh: int) -> Attr | None:
        """Commit what the handle wrote; returns the file's attributes after the commit when
        its size is the one this mount's writes made (no other client changed it meanwhile),
        else None (also when there was nothing to commit)."""
        h = self._file(fh)
        if h.written:
            h.written = False  # set again by the next write; release need not commit again
            return self._commit(h.inode)
        return None

    def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self._file(fh)
        self._commit(h.inode)
        self.data.sync()

    def _commit(self, inode: int) -> Attr | None:
        st = self._inodes.get(inode)
        expected = st.size if st is not None else -1
        committed = self.data.flush(inode)
        if st is None:
            return None
        # what the commit just wrote, as a read right after it would return (saves that read)
        attr = committed if committed is not None else self.meta.getattr(inode)
        st.size = attr.size
        self._remember(inode, attr)
        return attr if attr.size == expected else None

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._files.pop(fh, None)
            if h is not None and h.snapshot is not None:  # a light handle: nothing recorded
                self._light_bytes -= len(h.snapshot)
                fhs = self._light.get(h.inode)
                if fhs is not None:
                    fhs.discard(fh)
                    if not fhs:
                        del self._light[h.inode]
                return
        if h is None:
            return
        inode = h.inode
        try:
            if h.written:
                self._commit(inode)
        finally:
            with self._open_lock(inode):
                with self._lock:
                    st = self._inodes.get(inode)
                    last = st is None or st.opens <= 1
                    if st is not None:
                        st.opens -= 1
                    if last:
                        if st is None or st.changed:
                            # Before the inode stops counting as open: from then on a lookup
                            # or getattr may be answered from the cache, which still holds the
                            # attributes the open read (an older size: an O_APPEND write after
                            # the kernel took it would land there, over this handle's data).
                            self.cache.forget(inode)
                        self._inodes.pop(inode, None)
                if last:
                    try:
                        self.data.flush(inode)
                    finally:
                        if st is None or st.changed:
                            self.cache.forget(inode)  # its size and times moved meanwhile
                        self.data.release_writer(inode)
                        # meta tracks opens per (session, inode): only the last handle releases,
                        # and it does so a little later, in a batch (RELEASE_LINGER_S).
                        with self._lock:
                            self._lingering[inode] = time.monotonic()
                            crowded = len(self._lingering) >= RELEASE_BATCH
                        if crowded:
                            self._linger_wake.set()

    def _linger_loop(self) -> None:
        while not self._linger_stop.is_set():
            self._linger_wake.wait(RELEASE_LINGER_S / 2)
            self._linger_wake.clear()
            try:
                self.release_lingering(older_than=RELEASE_LINGER_S)
            except Exception as e:  # retried next round; the session cleanup is the backstop
                log.warning("deferred release of open files failed: %s", e)

    def release_lingering(self, older_than: float = 0.0) -> None:
        """Commit the deferred releases of files closed at least ``older_than`` seconds ago
        (all of them when there are more than ``RELEASE_BATCH``)."""
        if not self._lingering:
            return
        now = time.monotonic()
        with self._lock:
            crowded = len(self._lingering) >= RELEASE_BATCH
            due = [ino for ino, t in self._lingering.items() if crowded or now - t >= older_than]
        for start in range(0, len(due), RELEASE_BATCH):
            self._release_batch(due[start : start + RELEASE_BATCH])

    def _release_batch(self, inodes: list[int]) -> None:
        # Opens of these inodes wait until the batch is committed (``_releasing``); opens of
        # any other inode go on.
        with self._lock:
            batch = [ino for ino in inodes if self._lingering.pop(ino, None) is not None]
            self._releasing.update(batch)
        if not batch:
            return
        try:
            self.meta.release_many(batch)
        except BaseException:
            with self._lock:
                for ino in batch:
                    self._lingering.setdefault(ino, 0.0)
            raise
        finally:
            with self._lock:
                self._releasing.difference_update(batch)
                self._released.notify_all()

    def _open_lock(self, inode: int) -> threading.RLock:
        return self._open_locks[inode % OPEN_LOCK_STRIPES]

    def fallocate(self, ctx: Ctx, fh: int, mode: int, offset: int, length: int) -> None:
        h = self._file(fh)
        if offset < 0 or length <= 0:
            raise FSError(errno.EINVAL)
        self._check_writable()
        self.data.flush(h.inode)
        try:
            attr = self.meta.fallocate(ctx, h.inode, mode, offset, length)
        finally:
            self.cache.forget(h.inode)
        self.data.invalidate(h.inode)
        st = self._inodes.get(h.inode)
        if st is not None:
            st.changed = True
            if not mode & FALLOC_FL_KEEP_SIZE:
                st.size = attr.size

    def copy_file_range(
        self, ctx: Ctx, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int
    ) -> int:
        src, dst = self._file(fh_in), self._file(fh_out)
        self._check_writable()
        self.data.flush(src.inode)
        self.data.flush(dst.inode)
        try:
            n = self.meta.copy_file_range(ctx, src.inode, off_in, dst.inode, off_out, length)
        finally:
            self.cache.forget(dst.inode)
        self.data.invalidate(dst.inode)
        st = self._inodes.get(dst.inode)
        if st is not None:
            st.changed = True
        self._refresh_size(dst.inode)
        return n

    # --- locks (reachable through the SDK; see docs/SEMANTICS.md for FUSE) ---------------------

    def _locked_inode(self, fh: int) -> int:
        """The inode of ``fh`` for a lock call: a light handle becomes a normal one first
        (locks are released with the open record)."""
        h = self._file(fh)
        if h.snapshot is not None:
            self._promote(h.inode)
        return h.inode

    def flock(self, ctx: Ctx, fh: int, owner: int, ltype: int, block: bool) -> None:
        self.meta.flock(ctx, self._locked_inode(fh), owner, ltype, block)

    def getlk(
        self, ctx: Ctx, fh: int, owner: int, ltype: int, start: int, end: int
    ) -> tuple[int, int, int, int]:
        return self.meta.getlk(ctx, self._locked_inode(fh), owner, ltype, start, end)

    def setlk(
        self,
        ctx: Ctx,
        fh: int,
        owner: int,
        block: bool,
        ltype: int,
        start: int,
        end: int,
        pid: int,
    ) -> None:
        self.meta.setlk(ctx, self._locked_inode(fh), owner, block, ltype, start, end, pid)

    # --- directories -----------------------------------------------------------------------------

    def opendir(self, ctx: Ctx, inode: int) -> int:
        attr = self._with_dirty(self.meta.getattr(inode))
        if attr.type != FileType.DIR:
            raise FSError(errno.ENOTDIR)
        if self.lazy.pending(inode):
            self._listed(inode)
            attr = self.meta.getattr(inode)
        fh = next(self._fh)
        with self._lock:
            self._dirs[fh] = DirHandle(inode, self_attr=attr)
        return fh

    def readdir(
        self, ctx: Ctx, fh: int, offset: int, *, sizes: bool = True
    ) -> Iterator[tuple[bytes, AttrRow]]:
        """Entries from index ``offset`` on, ``.`` and ``..`` first, as (name, attribute row).
        The listing is taken once per handle (at offset 0) so that paging through a changing
        directory stays stable.

        The metadata is read here; the entries are produced lazily, so a reply page that holds
        200 entries of a large directory converts 200, not the whole listing, and no ``Attr``
        is built for them (see ``Listing.rows``). ``sizes=False``: the caller uses only names,
        inodes and types (a plain page), so the sizes of files being written here are not
        looked up."""
        h = self._dirs.get(fh)
        if h is None:
            raise FSError(errno.EBADF)
        if h.entries is None or offset == 0:
            rewind = h.entries is not None
            try:
                h.entries = self.meta.readdir(ctx, h.inode)
                if rewind:  # else the attributes read by opendir, just before
                    h.self_attr = self.meta.getattr(h.inode)
            except FSError as e:
                if e.errno != errno.ENOENT:
                    raise
                return iter(())  # removed while open: empty, as on a local file system
            assert h.self_attr is not None
            # The kernel takes only the inode number and type of "." and ".." from a listing
            # (it never caches their attributes), so ".." is not read from the engine.
            parent = h.self_attr.parent or h.inode
            h.parent_attr = h.self_attr.copy()
            h.parent_attr.inode = parent
        assert h.self_attr is not None and h.parent_attr is not None
        dots = [(b".", h.self_attr.row()), (b"..", h.parent_attr.row())]
        return self._entries_from(dots[offset:], h.entries, max(0, offset - 2), sizes)

    def _entries_from(
        self, dots: list[tuple[bytes, AttrRow]], entries: Listing, start: int, sizes: bool
    ) -> Iterator[tuple[bytes, AttrRow]]:
        """Entries by index, ``ROWS_STEP`` at a time: a slice of a listing that decodes each
        entry when read would decode the rest of it for every page."""
        yield from dots
        written = self.data.written() if sizes else ()  # their sizes may be beyond the engine's
        for lo in range(start, len(entries), ROWS_STEP):
            rows = entries.rows(lo, lo + ROWS_STEP)
            if written or any(r[ROW_RDEV] == LAZY_MARK for _, r in rows):
                rows = [(name, self._row_as_seen(r, written)) for name, r in rows]
            yield from rows

    def _row_as_seen(self, r: AttrRow, written: Collection[int]) -> AttrRow:
        """``_with_dirty`` for a listed row (the size of a file not in ``written`` is the
        engine's: no lookup)."""
        ino, kind, mode, uid, gid, nlink, size, rdev, at, mt, ct = r
        if ino not in written and kind is FileType.FILE:
            return r
        seen = self._seen_size(ino, kind, rdev, size)
        return r if seen == size else (ino, kind, mode, uid, gid, nlink, seen, rdev, at, mt, ct)

    def releasedir(self, fh: int) -> None:
        with self._lock:
            self._dirs.pop(fh, None)

    # --- extended attributes ---------------------------------------------------------------------

    def getxattr(self, ctx: Ctx, inode: int, name: bytes) -> bytes:
        if name.startswith(b"system."):
            # POSIX ACLs are not supported, so system.* never exists: answered without a
            # metadata call (``ls -l`` asks for system.posix_acl_access on every entry).
            raise FSError(errno.ENODATA)
        return self.meta.getxattr(ctx, inode, name)

    def setxattr(self, ctx: Ctx, inode: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_writable()
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG)
        try:
            self.meta.setxattr(ctx, inode, name, value, flags)
        finally:
            self.cache.forget(inode)

    def listxattr(self, ctx: Ctx, inode: int) -> list[bytes]:
        return self.meta.listxattr(ctx, inode)

    def removexattr(self, ctx: Ctx, inode: int, name: bytes) -> None:
        self._check_writable()
        try:
            self.meta.removexattr(ctx, inode, name)
        finally:
            self.cache.forget(inode)

    # --- lifecycle -------------------------------------------------------------------------------

    def open_handles(self) -> int:
        return len(self._files)

    def shutdown(self) -> None:
        """Commit everything still buffered and release open-file records (at unmount)."""
        if self._sweeper is not None:
            self._sweeper.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            handles = list(self._files.values())
            self._files.clear()
            self._dirs.clear()
            inodes = {h.inode for h in handles}
            self._inodes.clear()
        for inode in inodes:
            try:
                self.data.flush(inode)
            except FSError as e:
                log.error("inode %d: buffered data could not be committed at unmount: %s", inode, e)
            finally:
                self.data.release_writer(inode)
        self._linger_stop.set()
        self._linger_wake.set()
        self._linger_thread.join(timeout=10)
        with self._lock:
            inodes |= set(self._lingering)
            self._lingering.clear()
        try:
            self.meta.release_many(sorted(inodes))
        except Exception as e:  # the session is closed next anyway
            log.warning("releasing %d open files at unmount failed: %s", len(inodes), e)
