"""Compaction: rewrite a fragmented chunk (many slices) as one slice, so reads touch few blocks
and the slice list stays short. Runs in the background, never in the write path; the swap is a
compare-and-replace in the metadata engine, so concurrent writes are never lost."""

from __future__ import annotations

import errno
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from loftfs.chunk.budget import MemoryBudget
from loftfs.chunk.layout import block_key, overlay, slice_blocks
from loftfs.chunk.pool import WorkerPool
from loftfs.chunk.reader import Reader, SliceCache
from loftfs.errors import FSError, LoftError
from loftfs.meta.interface import Meta
from loftfs.meta.types import KIND_EXTERNAL, KIND_NATIVE, Slice
from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)

# Blocks of the new slice being uploaded at once by one compaction.
MAX_INFLIGHT_BLOCKS = 4


class Compactor:
    """``compact_chunk`` does the work; ``request`` queues a chunk for the background worker
    (started by ``start``), which handles each queued chunk once."""

    def __init__(
        self,
        meta: Meta,
        store: ObjectStore,
        reader: Reader,
        slices: SliceCache,
        budget: MemoryBudget,
        reserve: Callable[[int], None],
        pool: WorkerPool,
        volume_uuid: str,
        block_size: int,
    ) -> None:
        self.meta = meta
        self.store = store
        self.reader = reader
        self.slices = slices
        self.budget = budget
        self.reserve = reserve
        self.pool = pool
        self.uuid = volume_uuid
        self.block_size = block_size
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, int]] = deque()
        self._queued: set[tuple[int, int]] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.compacted = 0

    # --- queue ------------------------------------------------------------------------------

    def request(self, inode: int, index: int) -> None:
        with self._cond:
            if self._stopping or (inode, index) in self._queued:
                return
            self._queued.add((inode, index))
            self._queue.append((inode, index))
            self._cond.notify()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="loft-compact", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                item = self._queue.popleft()
                self._queued.discard(item)
            try:
                self.compact_chunk(*item)
            except Exception as e:
                log.warning("compaction of inode %d chunk %d failed: %s", item[0], item[1], e)

    # --- work -------------------------------------------------------------------------------

    def compact_chunk(self, inode: int, index: int, *, materialize: bool = False) -> bool:
        """Rewrite chunk ``index`` of ``inode`` as one slice covering its data (from the first
        to the last byte not in a hole; holes in between become zeros). Returns True when the
        slice list was replaced, False when there was nothing to do or the chunk changed
        meanwhile (the new blocks are then deleted).

        Chunks showing external data (imported files) are left alone, so background compaction
        never copies a source into the volume; ``materialize`` rewrites exactly those (one
        external slice is enough), copying their data into the volume's own store."""
        old = self.meta.read_chunk(inode, index)
        segs = overlay(old)
        external = any(s.id != 0 and s.kind == KIND_EXTERNAL for s in segs)
        if materialize != external or (not materialize and len(old) < 2):
            return False
        if any(s.id != 0 and s.kind not in (KIND_NATIVE, KIND_EXTERNAL) for s in segs):
            return False  # slices of a kind this client cannot read
        data = [s for s in segs if s.id != 0]
        if not data:
            new: list[Slice] = []
            keys: list[str] = []
        else:
            start, end = data[0].pos, data[-1].pos + data[-1].len
            slice_id = self.meta.new_slice_id()
            keys = self._write_slice(old, slice_id, start, end)
            new = [Slice(start, slice_id, end - start, 0, end - start)]
        try:
            replaced = self.meta.replace_slices(inode, index, old, new)
        except Exception:
            # The outcome is unknown: the blocks may be referenced now, so keep them.
            log.warning("compaction of inode %d chunk %d: replace failed", inode, index)
            raise
        if not replaced:
            log.debug("inode %d chunk %d changed during compaction; retry later", inode, index)
            self._delete(keys)
            return False
        self.slices.invalidate_chunk(inode, index)
        self.compacted += 1
        log.debug("compacted inode %d chunk %d: %d slices -> %d", inode, index, len(old), len(new))
        return True

    def _write_slice(self, old: list[Slice], slice_id: int, start: int, end: int) -> list[str]:
        """Upload ``[start, end)`` of the chunk's content as the blocks of slice ``slice_id``,
        a few blocks at a time, each drawn from the memory budget. Returns the keys written."""
        keys: list[str] = []
        inflight: deque[tuple[str, int, Future[None]]] = deque()
        error: BaseException | None = None

        def settle(entry: tuple[str, int, Future[None]]) -> None:
            nonlocal error
            key, n, fut = entry
            try:
                fut.result()
                keys.append(key)
            except BaseException as e:
                error = error or e
            finally:
                self.budget.release(n)

        try:
            pos = start
            for bi, blen in enumerate(slice_blocks(end - start, self.block_size)):
                if len(inflight) >= MAX_INFLIGHT_BLOCKS:
                    settle(inflight.popleft())
                if error is not None:
                    break
                self.reserve(blen)
                try:
                    block = self.reader.read_chunk_range(old, pos, pos + blen)
                    key = block_key(self.uuid, slice_id, bi, blen)
                    inflight.append((key, blen, self.pool.submit(self.store.put, key, block)))
                except BaseException:
                    self.budget.release(blen)
                    raise
                pos += blen
        except BaseException as e:
            error = error or e
        finally:
            while inflight:
                settle(inflight.popleft())
        if error is not None:
            self._delete(keys)
            if isinstance(error, LoftError):
                raise error
            raise FSError(errno.EIO, f"compaction upload failed: {error}") from error
        return keys

    def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self.store.delete_many(keys)
        except Exception as e:
            log.warning("could not delete %d unused blocks: %s", len(keys), e)
