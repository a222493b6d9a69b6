"""The data path of one mount (DESIGN 2.3): what the vfs calls to read and write file content.

It owns the shared resources (memory budget, block cache, slice-list cache, upload and fetch
thread pools) and the background workers (block gc, compaction). Reads return committed
content only; the vfs flushes a file's writer before reading it when it needs to see its own
buffered writes.
"""

from __future__ import annotations

import logging
import threading

from loftfs.chunk.budget import MemoryBudget
from loftfs.chunk.cache_mem import MemBlockCache
from loftfs.chunk.compaction import Compactor
from loftfs.chunk.gc import BlockGC
from loftfs.chunk.pool import WorkerPool
from loftfs.chunk.prefetch import ReadState
from loftfs.chunk.reader import BlockFetcher, Reader, SliceCache
from loftfs.chunk.writer import FileWriter, WriteContext
from loftfs.meta.interface import Meta
from loftfs.meta.types import VolumeSettings
from loftfs.object.interface import ObjectStore
from loftfs.vfs.options import MountOptions

log = logging.getLogger(__name__)

__all__ = ["DataPath", "FileWriter", "ReadState"]


class DataPath:
    def __init__(
        self, meta: Meta, store: ObjectStore, settings: VolumeSettings, opts: MountOptions
    ) -> None:
        self.meta = meta
        self.store = store
        self.settings = settings
        self.opts = opts
        self.block_size = settings.block_size
        self.budget = MemoryBudget(opts.buffer_size)
        # The kernel's page cache already keeps what was read; this cache only needs to hold
        # the blocks being read and read ahead, and a working set for random access. A quarter
        # of the budget leaves the rest to write buffers and keeps the resident size small.
        self.cache = MemBlockCache(self.budget, max(opts.buffer_size // 4, self.block_size))
        self.slices = SliceCache()
        self.upload_pool = WorkerPool("loft-upload", opts.upload_threads)
        self.fetch_pool = WorkerPool("loft-fetch", opts.fetch_threads)
        self.ahead_pool = WorkerPool("loft-readahead", max(1, opts.fetch_threads // 2))
        self.fetcher = BlockFetcher(store, self.cache)
        self.reader = Reader(
            meta,
            self.fetcher,
            self.slices,
            self.fetch_pool,
            self.ahead_pool,
            settings.uuid,
            settings.block_size,
            opts.readahead_blocks,
        )
        self._ctx = WriteContext(
            meta=meta,
            store=store,
            volume_uuid=settings.uuid,
            block_size=settings.block_size,
            budget=self.budget,
            pool=self.upload_pool,
            on_commit=self._on_commit,
            relieve=self._relieve,
        )
        self.compactor = Compactor(
            meta,
            store,
            self.reader,
            self.slices,
            self.budget,
            self._ctx.reserve,
            self.upload_pool,
            settings.uuid,
            settings.block_size,
        )
        self.gc = BlockGC(meta, store, settings.uuid, settings.block_size, opts.gc_interval_s)
        self._writers: dict[int, FileWriter] = {}
        self._lock = threading.Lock()
        self._closed = False

    # --- reads ------------------------------------------------------------------------------

    def new_read_state(self) -> ReadState:
        """Per open handle: tracks sequential access for readahead."""
        return ReadState()

    def read(
        self, inode: int, offset: int, size: int, file_size: int, state: ReadState | None = None
    ) -> bytes:
        """Committed content of ``[offset, min(offset + size, file_size))``; holes read as
        zeros. ``FSError(EIO)`` when a block is missing or damaged (never wrong data)."""
        return self.reader.read(inode, offset, size, file_size, state)

    def invalidate(self, inode: int) -> None:
        """Forget cached slice lists of ``inode`` (open, truncate, changes by other clients)."""
        self.slices.invalidate(inode)

    # --- writes -----------------------------------------------------------------------------

    def writer(self, inode: int) -> FileWriter:
        """The single writer of ``inode`` in this process, created on demand."""
        with self._lock:
            w = self._writers.get(inode)
            if w is None:
                w = self._writers[inode] = FileWriter(self._ctx, inode)
            return w

    def release_writer(self, inode: int) -> None:
        """The last handle of ``inode`` closed. A writer still holding data is flushed first,
        so nothing is lost even if the caller forgot to."""
        with self._lock:
            w = self._writers.pop(inode, None)
        if w is not None and w.dirty:
            log.warning("writer of inode %d released with unflushed data; flushing", inode)
            w.flush()

    def flush(self, inode: int) -> None:
        """Commit all buffered writes of ``inode``; no-op if none."""
        with self._lock:
            w = self._writers.get(inode)
        if w is not None:
            w.flush()

    def dirty_size(self, inode: int) -> int:
        """End offset of the buffered (uncommitted) data of ``inode``, 0 if none."""
        with self._lock:
            w = self._writers.get(inode)
        return w.dirty_end() if w is not None else 0

    def _on_commit(self, inode: int, index: int, count: int) -> None:
        self.slices.invalidate_chunk(inode, index)
        if self.opts.compact_threshold > 0 and count >= self.opts.compact_threshold:
            self.compactor.request(inode, index)

    def _relieve(self) -> None:
        """Memory pressure: seal every writer's partial blocks so they get uploaded."""
        with self._lock:
            writers = list(self._writers.values())
        for w in writers:
            w.seal_all(wait_for_lock=False)

    # --- maintenance ------------------------------------------------------------------------

    def compact_chunk(self, inode: int, index: int) -> bool:
        """Compact one chunk now (tests, ``loft compact``); see ``Compactor.compact_chunk``."""
        return self.compactor.compact_chunk(inode, index)

    def collect_garbage(self) -> int:
        """One gc round now; returns the number of slices whose blocks were deleted."""
        return self.gc.run_once()

    def start(self) -> None:
        """Start the background workers: block gc every ``gc_interval_s``, compaction."""
        self.gc.start()
        self.compactor.start()

    def close(self) -> None:
        """Flush every writer, stop the workers and wait for running uploads. Raises the first
        flush error after everything is shut down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writers = list(self._writers.items())
        first_error: BaseException | None = None
        for inode, w in writers:
            try:
                w.flush()
            except Exception as e:
                log.error("flush of inode %d at close failed: %s", inode, e)
                first_error = first_error or e
        self.compactor.stop()
        self.gc.stop()
        self.upload_pool.shutdown(wait=True)
        self.fetch_pool.shutdown(wait=True)
        self.ahead_pool.shutdown(wait=True)
        self.cache.clear()
        if first_error is not None:
            raise first_error
