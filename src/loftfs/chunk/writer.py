"""The write side of the data path.

Writes collect per file in *slices* (one contiguous range of one chunk each). Full blocks are
uploaded in the background as soon as they are complete; a slice is committed to the metadata
engine once it is sealed (no more appends) and all its blocks are durable. Slices of one chunk
are committed in the order they were written, so newer data always lands on top.

Memory: every buffered byte is drawn from the mount's ``MemoryBudget`` and given back when its
block is uploaded. A slice is sealed when it reaches the chunk's end, when a non-contiguous
write starts another slice in the same chunk, on ``flush``, or under memory pressure; so a
sequential writer holds about one partial block plus the blocks in flight, however much it
writes, and nothing can wait forever for memory held by partial blocks.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from loftfs.chunk.budget import MemoryBudget
from loftfs.chunk.layout import block_key, chunk_ranges
from loftfs.chunk.pool import WorkerPool
from loftfs.errors import FSError, LoftError
from loftfs.meta.interface import Meta
from loftfs.meta.types import CHUNK_SIZE, Attr, Slice
from loftfs.object.interface import ObjectStore
from loftfs.utils import now_ns

log = logging.getLogger(__name__)

# A large write is buffered in pieces of at most this size, each drawing from the budget on
# its own, so one huge write never needs the whole budget at once.
WRITE_PIECE = 1 << 20
# How long a writer waits for memory while uploads are running before it seals partial blocks
# (its own and other writers') to make them uploadable.
PRESSURE_WAIT_S = 1.0
# Past the quota, the part of a slice that still fits is found to this granularity.
_FIT_ALIGN = 4096
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class WriteContext:
    """What the writers of one mount share."""

    meta: Meta
    store: ObjectStore
    volume_uuid: str
    block_size: int
    budget: MemoryBudget
    pool: WorkerPool
    on_commit: Callable[[int, int, int], None]  # (inode, chunk index, slice count)
    relieve: Callable[[], None]  # seal partial blocks of every writer (memory pressure)
    uploads: UploadCounter = field(default_factory=lambda: UploadCounter())

    def reserve(self, n: int) -> None:
        """Take ``n`` bytes from the budget, waiting as long as needed (backpressure). Cached
        blocks give way first; if that is not enough, partial blocks are sealed so they get
        uploaded and their memory comes back: at once when no upload is running, else after
        ``PRESSURE_WAIT_S``."""
        if self.budget.acquire(n, timeout=0):  # evicts cached blocks if that is enough
            return
        waited = 0.0
        while True:
            if self.uploads.count == 0 or waited >= PRESSURE_WAIT_S:
                self.relieve()
                waited = 0.0
            if self.budget.acquire(n, timeout=0.1):
                return
            waited += 0.1


class UploadCounter:
    """Blocks being uploaded by all writers: while some are, memory is about to come back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


class _SliceBuffer:
    """A slice being written: ``length`` bytes at ``pos`` of chunk ``index``. Blocks before
    ``flushed`` blocks are uploaded or uploading; the first ``fill`` bytes of ``buf`` hold the
    bytes after them (``buf`` may be longer: room for the next writes, see ``_extend``)."""

    __slots__ = (
        "buf",
        "failed",
        "fill",
        "flushed",
        "id",
        "index",
        "keys",
        "length",
        "mtime_ns",
        "pending",
        "pos",
        "sealed",
    )

    def __init__(self, index: int, pos: int, slice_id: int) -> None:
        self.index = index
        self.pos = pos
        self.id = slice_id
        self.length = 0
        self.buf = bytearray()
        self.fill = 0
        self.flushed = 0  # blocks handed to the uploader
        self.pending = 0  # blocks uploading right now
        self.sealed = False
        self.failed = False
        self.keys: list[str] = []  # uploaded blocks (to delete if the slice is dropped)
        self.mtime_ns = 0

    @property
    def end(self) -> int:
        return self.pos + self.length

    @property
    def ready(self) -> bool:
        return self.sealed and self.pending == 0 and not self.failed


def _extend(s: _SliceBuffer, data: memoryview, block_size: int) -> None:
    """Append ``data`` to ``s``'s buffer, growing it ahead of need.

    Growing by doubling (exact sizes, up to a block) rather than by each write: ``bytearray``
    over-allocates an eighth and reallocates on nearly every 128 KiB write, copying the buffer
    each time once it lives on the heap (``fuse.mount._tune_malloc``). A buffer is never more
    than twice what it holds (or the write that made it grow), so memory stays within twice the
    budget's count of buffered bytes; a small file's buffer is the size of what was written."""
    need = s.fill + len(data)
    if need > len(s.buf):
        cap = max(need, min(block_size, 2 * len(s.buf)))
        if s.fill == 0:
            s.buf = bytearray(cap)
        else:
            s.buf += bytes(cap - len(s.buf))
    s.buf[s.fill : need] = data
    s.fill = need


#: An upload to run: the slice, the block's key, its bytes.
_Upload = tuple["_SliceBuffer", str, "bytes | bytearray"]


class FileWriter:
    """The single writer of one inode in this process. Thread-safe."""

    def __init__(self, ctx: WriteContext, inode: int) -> None:
        self.ctx = ctx
        self.inode = inode
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._commit_lock = threading.Lock()
        self._slices: list[_SliceBuffer] = []  # uncommitted, in write order
        self._uploading = 0
        self._error: LoftError | None = None
        # the attributes the last commit wrote, and when (monotonic): what ``flush`` returns
        self._committed: tuple[Attr, float] | None = None
        # small enough that several pieces fit in the budget at once
        self._piece_size = max(4096, min(WRITE_PIECE, ctx.budget.total // 4))

    # --- state ------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        with self._lock:
            return bool(self._slices)

    def dirty_end(self) -> int:
        """End offset in the file of the buffered (uncommitted) data, 0 if none."""
        with self._lock:
            return max((s.index * CHUNK_SIZE + s.end for s in self._slices), default=0)

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            code = error.errno if isinstance(error, FSError) else errno.EIO
            raise FSError(code, f"an earlier write of inode {self.inode} failed: {error}")

    # --- write ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Buffer ``data`` at file ``offset`` (copied: a view of the caller's memory is never
        kept). Blocks while the memory budget is exhausted."""
        if offset < 0:
            raise FSError(errno.EINVAL, "negative offset")
        with self._lock:
            self._raise_if_failed()
        view = memoryview(data).cast("B")
        step = self._piece_size
        done = 0
        for index, pos, n in chunk_ranges(offset, len(view)):
            for p in range(0, n, step):
                k = min(step, n - p)
                piece = view[done + p : done + p + k]
                self.ctx.reserve(k)
                used = 0
                try:
                    with self._lock:
                        self._raise_if_failed()
                        used = self._write_locked(index, pos + p, piece)
                finally:
                    self.ctx.budget.release(k - used)
            done += n

    def _write_locked(self, index: int, pos: int, data: memoryview) -> int:
        """Apply one piece within chunk ``index``; returns the bytes newly buffered."""
        s = self._newest(index)
        bs = self.ctx.block_size
        if (
            s is not None
            and not s.sealed
            and s.pos <= pos <= s.end
            and pos - s.pos >= s.flushed * bs
        ):
            # Contiguous with (or overlapping the still-buffered tail of) the newest slice of
            # this chunk: patch and append in place. Newest means nothing can cover it later.
            rel = pos - s.pos - s.flushed * bs
            overlap = min(len(data), s.fill - rel)
            if overlap > 0:
                s.buf[rel : rel + overlap] = data[:overlap]
            added = data[max(overlap, 0) :]
            _extend(s, added, bs)
            s.length += len(added)
            used = len(added)
        else:
            if s is not None and not s.sealed:
                self._seal_locked(s)
            s = _SliceBuffer(index, pos, self.ctx.meta.new_slice_id())
            self._slices.append(s)
            _extend(s, data, bs)
            s.length = len(data)
            used = len(data)
        s.mtime_ns = now_ns()
        while s.fill >= bs:
            block: bytes | bytearray
            if s.fill == bs and len(s.buf) == bs:  # the usual case: the buffer itself goes
                block, s.buf, s.fill = s.buf, bytearray(), 0
            else:
                with memoryview(s.buf) as mv:
                    block = bytes(mv[:bs])
                    rest = s.fill - bs
                    mv[:rest] = mv[bs : s.fill]
                s.fill = rest
            self._upload_locked(s, block)
        if s.end >= CHUNK_SIZE:
            self._seal_locked(s)
        return used

    def _newest(self, index: int) -> _SliceBuffer | None:
        for s in reversed(self._slices):
            if s.index == index:
                return s
        return None

    # --- upload and commit ------------------------------------------------------------------

    def _seal_locked(self, s: _SliceBuffer, here: list[_Upload] | None = None) -> None:
        """No more data for ``s``: upload its tail (into ``here`` instead of the pool when
        given: the caller runs it) and commit once its blocks are stored."""
        s.sealed = True
        if s.fill:
            tail: bytes | bytearray
            if s.fill == len(s.buf):
                tail = s.buf
            else:
                with memoryview(s.buf) as mv:
                    tail = bytes(mv[: s.fill])
            s.buf, s.fill = bytearray(), 0
            self._upload_locked(s, tail, here)
        elif s.pending == 0:
            self._schedule_commit()

    def _upload_locked(
        self, s: _SliceBuffer, block: bytes | bytearray, here: list[_Upload] | None = None
    ) -> None:
        # ``block`` may be the slice's former buffer: nothing writes to it any more, and every
        # store takes any bytes-like object.
        key = block_key(self.ctx.volume_uuid, s.id, s.flushed, len(block))
        s.flushed += 1
        s.pending += 1
        self._uploading += 1
        self.ctx.uploads.add(1)
        if here is not None:
            here.append((s, key, block))
        else:
            self._submit_locked(s, key, block)

    def _submit_locked(self, s: _SliceBuffer, key: str, block: bytes | bytearray) -> None:
        try:
            self.ctx.pool.submit(self._upload, s, key, block)
        except RuntimeError:  # pool shut down: fail like an upload would
            self.ctx.uploads.add(-1)
            self._uploading -= 1
            s.pending -= 1
            s.failed = True
            self.ctx.budget.release(len(block))
            self._fail_locked(FSError(errno.EIO, "data path is closed"))

    def _upload(self, s: _SliceBuffer, key: str, block: bytes | bytearray) -> None:
        error: Exception | None = None
        try:
            self.ctx.store.put(key, cast(bytes, block))
        except Exception as e:
            error = e
            log.error("upload of block %s (inode %d) failed: %s", key, self.inode, e)
        finally:
            self.ctx.budget.release(len(block))
            self.ctx.uploads.add(-1)
        with self._lock:
            s.pending -= 1
            self._uploading -= 1
            if error is None:
                s.keys.append(key)
            else:
                s.failed = True
                self._fail_locked(FSError(errno.EIO, f"upload of block {key} failed: {error}"))
            self._cond.notify_all()
            commit = error is None and s.sealed and s.pending == 0
        if commit:
            self._commit_ready()

    def _fail_locked(self, error: LoftError) -> None:
        if self._error is None:
            self._error = error

    def _schedule_commit(self) -> None:
        try:
            self.ctx.pool.submit(self._commit_ready)
        except RuntimeError:
            pass  # closing: flush commits what is left

    def _commit_ready(self) -> None:
        """Commit sealed, uploaded slices; within a chunk strictly in write order."""
        with self._commit_lock:
            while True:
                with self._lock:
                    if self._error is not None:
                        return
                    s = self._next_ready_locked()
                    if s is None:
                        return
                rec = Slice(s.pos, s.id, s.length, 0, s.length)
                try:
                    done = self.ctx.meta.write_slice(self.inode, s.index, rec, s.mtime_ns)
                except Exception as e:
                    log.error("commit of slice %d of inode %d failed: %s", s.id, self.inode, e)
                    error = e if isinstance(e, LoftError) else FSError(errno.EIO, str(e))
                    kept, count = 0, 0
                    if isinstance(e, FSError) and e.errno in _NO_SPACE:
                        kept, count = self._commit_what_fits(s)
                    with self._lock:
                        if kept:
                            self._slices.remove(s)  # its blocks are referenced now: keep them
                        self._fail_locked(error)
                        self._cond.notify_all()
                    if kept:
                        self.ctx.on_commit(self.inode, s.index, count)
                    return
                with self._lock:
                    self._slices.remove(s)
                    self._committed = (done.attr, time.monotonic())
                    self._cond.notify_all()
                self.ctx.on_commit(self.inode, s.index, done.slices)

    def _commit_what_fits(self, s: _SliceBuffer) -> tuple[int, int]:
        """The slice does not fit in the quota: commit as much of its beginning as does, so data
        written before the volume filled up is kept, like on a local disk. Binary search over
        ``write_slice`` calls (a failed one changes nothing); each success appends one record
        of the same stored slice. Returns (bytes kept, chunk slice count)."""
        lo, hi, count = 0, s.length, 0  # [0, lo) is committed; committing [lo, hi) fails
        while hi - lo > _FIT_ALIGN:
            mid = lo + max(_FIT_ALIGN, (hi - lo) // 2 // _FIT_ALIGN * _FIT_ALIGN)
            rec = Slice(s.pos + lo, s.id, s.length, lo, mid - lo)
            try:
                count = self.ctx.meta.write_slice(self.inode, s.index, rec, s.mtime_ns).slices
            except FSError as e:
                if e.errno not in _NO_SPACE:
                    break
                hi = mid
            except Exception:
                break
            else:
                lo = mid
        if lo:
            log.warning(
                "inode %d: kept %d of %d bytes of a write past the quota", self.inode, lo, s.length
            )
        return lo, count

    def _next_ready_locked(self) -> _SliceBuffer | None:
        blocked: set[int] = set()
        for s in self._slices:
            if s.index in blocked:
                continue
            if s.ready:
                return s
            blocked.add(s.index)
        return None

    # --- flush ------------------------------------------------------------------------------

    def seal_all(self, *, wait_for_lock: bool = True) -> bool:
        """Seal every open slice so its partial block is uploaded. Returns False when the lock
        was busy and ``wait_for_lock`` is False."""
        if not self._lock.acquire(blocking=wait_for_lock):
            return False
        try:
            if self._error is None:  # a failed writer uploads nothing more
                for s in self._slices:
                    if not s.sealed:
                        self._seal_locked(s)
        finally:
            self._lock.release()
        return True

    def flush(self) -> Attr | None:
        """Upload what is buffered, wait, and commit it. Raises ``FSError(EIO)`` when a block
        could not be uploaded (the unwritten data is dropped, nothing more is committed) and
        the metadata engine's error (e.g. ENOSPC) when a commit failed. Returns the file's
        attributes as the last commit made during this call left them (None when it made
        none: nothing was buffered, or it was committed before)."""
        started = time.monotonic()
        tails: list[_Upload] = []
        here: _Upload | None = None
        with self._lock:
            if self._error is None:
                for s in self._slices:
                    if not s.sealed:
                        self._seal_locked(s, tails)
            if len(tails) == 1 and self._uploading == 1:
                # the only upload left (a small file's close): store and commit it in this
                # thread, which would only wait for a pool thread to do it (two handoffs)
                here = tails.pop()
            for upload in tails:
                self._submit_locked(*upload)
        if here is not None:
            self._upload(*here)
        with self._lock:
            while self._uploading:
                self._cond.wait()
        self._commit_ready()
        with self._lock:
            error = self._error
            if error is None:
                done = self._committed
                return done[0] if done is not None and done[1] >= started else None
            dropped = self._slices
            self._slices = []
            self._error = None
            for s in dropped:
                self.ctx.budget.release(s.fill)
                s.buf, s.fill = bytearray(), 0
        self._drop_blocks(dropped)
        log.error("data of inode %d could not be saved: %s", self.inode, error)
        if isinstance(error, FSError):
            raise error
        raise FSError(errno.EIO, str(error)) from error

    def _drop_blocks(self, slices: list[_SliceBuffer]) -> None:
        """Delete blocks of slices that will never be committed (nothing references them)."""
        keys = [k for s in slices for k in s.keys]
        if not keys:
            return
        try:
            self.ctx.store.delete_many(keys)
        except Exception as e:
            log.warning("could not delete %d blocks of dropped slices: %s", len(keys), e)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no upload of this writer is running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._uploading:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True
