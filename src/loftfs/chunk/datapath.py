"""The data path of one mount (DESIGN 2.3): what the vfs calls to read and write file content.

It owns the shared resources (memory budget, block cache, slice-list cache, upload and fetch
thread pools) and the background workers (block gc, compaction). Reads return committed
content only; the vfs flushes a file's writer before reading it when it needs to see its own
buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from concurrent.futures import Future

from loftfs.chunk.blocks import CachedBlockStore
from loftfs.chunk.budget import MemoryBudget
from loftfs.chunk.cache_disk import DiskCache
from loftfs.chunk.cache_mem import MemBlockCache
from loftfs.chunk.compaction import Compactor
from loftfs.chunk.external import ExternalReads
from loftfs.chunk.gc import BlockGC
from loftfs.chunk.layout import overlay
from loftfs.chunk.pool import WorkerPool
from loftfs.chunk.prefetch import ReadState
from loftfs.chunk.reader import BlockFetcher, BlockSlice, Reader, SliceCache
from loftfs.chunk.writeback import WriteBack
from loftfs.chunk.writer import FileWriter, WriteContext
from loftfs.errors import ConfigError, FSError
from loftfs.meta.interface import Meta
from loftfs.meta.types import CHUNK_SIZE, KIND_EXTERNAL, Attr, Slice, VolumeSettings
from loftfs.metrics import Metrics
from loftfs.object.interface import ObjectStore
from loftfs.sources import SourceStores
from loftfs.vfs.options import MountOptions

log = logging.getLogger(__name__)

# With a disk cache, blocks shorter than this (small files, tails) are not kept in memory.
SMALL_BLOCK = 256 << 10
# Bytes of blocks queued for writing into the disk cache (dropped, not waited for, past it).
DISK_PUT_QUEUE = 32 << 20

__all__ = ["BlockSlice", "DataPath", "FileWriter", "ReadState"]


class DataPath:
    def __init__(
        self, meta: Meta, store: ObjectStore, settings: VolumeSettings, opts: MountOptions
    ) -> None:
        self.meta = meta
        self.settings = settings
        self.disk: DiskCache | None = None
        self.writeback: WriteBack | None = None
        self._cache_lock_fds: list[int] = []
        if opts.cache_size > 0 and opts.cache_dirs:
            self._cache_lock_fds = lock_cache_dirs(opts.cache_dirs, settings.uuid)
            if self._cache_lock_fds:
                self.disk = DiskCache(
                    opts.cache_dirs,
                    opts.cache_size,
                    volume_uuid=settings.uuid,
                    free_ratio=opts.free_space_ratio,
                    # blocks waiting to be written to the cache: bounded apart from the budget
                    max_pending_bytes=DISK_PUT_QUEUE,
                )
            elif opts.writeback:
                raise ConfigError(
                    f"the cache directory {', '.join(opts.cache_dirs)} is in use by another "
                    "mount of this volume; write-back needs a --cache-dir of its own"
                )
        if opts.writeback and not opts.read_only:
            if self.disk is None:
                raise ConfigError("--writeback needs the disk cache (a --cache-size above 0)")
            self.writeback = WriteBack(self.disk, store, opts.upload_threads)
        # Blocks of imported files come from their sources (ranged GETs, version-checked).
        self.external = ExternalReads(
            store, meta, SourceStores(meta, store, settings.uuid), settings.block_size
        )
        # What the writers, compaction, gc and the fetcher use: the disk cache and write-back
        # in front of the volume's store (and of the sources).
        self.store = store = CachedBlockStore(
            self.external, self.disk, self.writeback, settings.block_size
        )
        self.opts = opts
        self.block_size = settings.block_size
        self.budget = MemoryBudget(opts.buffer_size)
        # The kernel's page cache already keeps what was read; this cache only needs to hold
        # the blocks being read and read ahead, and a working set for random access: a quarter
        # of the budget, an eighth with a disk cache (which holds the working set; random reads
        # take ranges from it), leaving the rest to write buffers and the resident size small.
        share = 8 if self.disk is not None else 4
        self.cache = MemBlockCache(self.budget, max(opts.buffer_size // share, self.block_size))
        self.slices = SliceCache()
        self.upload_pool = WorkerPool("loft-upload", opts.upload_threads)
        self.fetch_pool = WorkerPool("loft-fetch", opts.fetch_threads)
        self.ahead_pool = WorkerPool("loft-readahead", max(1, opts.fetch_threads // 2))
        self.fetcher = BlockFetcher(
            store, self.cache, min_cached=SMALL_BLOCK if self.disk is not None else 0
        )
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
        self.remaining_uploads = 0  # write-back blocks left staged at close

    # --- reads ------------------------------------------------------------------------------

    def new_read_state(self) -> ReadState:
        """Per open handle: tracks sequential access for readahead."""
        return ReadState()

    def read(
        self, inode: int, offset: int, size: int, file_size: int, state: ReadState | None = None
    ) -> bytes:
        """Committed content of ``[offset, min(offset + size, file_size))``; holes read as
        zeros. ``FSError(EIO)`` when a block is missing or damaged (never wrong data)."""
        data = self.reader.read(inode, offset, size, file_size, state)
        assert isinstance(data, bytes)
        return data

    def read_span(
        self, inode: int, offset: int, size: int, file_size: int, state: ReadState | None = None
    ) -> bytes | BlockSlice:
        """``read``, but a range within one cached block comes back as a ``BlockSlice`` of it
        (no copy), for the FUSE reply."""
        return self.reader.read(inode, offset, size, file_size, state, span_ok=True)

    def read_snapshot(self, slices: list[Slice], size: int) -> bytes:
        """The whole content of a file of ``size`` bytes (within chunk 0) whose chunk 0 has
        ``slices``. ``FSError(EIO)`` when a block is missing or damaged."""
        return self.reader.read_slices(slices, size)

    def preload(self, slices: list[Slice], size: int) -> None:
        """Start reading the first ``size`` bytes (within chunk 0) of a file with ``slices``
        from the disk cache into memory, without waiting (``Reader.preload``): a read
        expected soon finds them there."""
        try:
            self.reader.preload(slices, size)
        except Exception:  # a hint: never the reason a lookup fails
            log.warning("preloading failed", exc_info=True)

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

    def flush(self, inode: int) -> Attr | None:
        """Commit all buffered writes of ``inode``; no-op if none. Returns the attributes
        the last commit of this call wrote (None when it made none)."""
        with self._lock:
            w = self._writers.get(inode)
        return w.flush() if w is not None else None

    def dirty_size(self, inode: int) -> int:
        """End offset of the buffered (uncommitted) data of ``inode``, 0 if none."""
        with self._lock:
            w = self._writers.get(inode)
        return w.dirty_end() if w is not None else 0

    def written(self) -> frozenset[int]:
        """The inodes that have a writer here (those whose ``dirty_size`` may be non-zero)."""
        with self._lock:
            return frozenset(self._writers)

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
        """Start the background workers: the disk cache's index scan and writer, write-back
        uploads (first those an earlier mount left staged), block gc, compaction."""
        if self.disk is not None:
            self.disk.start()
        if self.writeback is not None:
            self.writeback.start()
        self.gc.start()
        self.compactor.start()

    # --- cache warmup -------------------------------------------------------------------------

    def warm(self, inode: int, file_size: int) -> tuple[int, int]:
        """Fetch every block of ``inode``'s content into the disk cache (into memory when there
        is no disk cache), up to ``fetch_threads`` blocks at a time. Returns (bytes fetched
        from the object store, bytes that were already cached). Raises the first failure."""
        fetched = cached = 0
        inflight: list[tuple[int, Future[None]]] = []
        window = max(1, self.opts.fetch_threads)
        try:
            for index in range((file_size + CHUNK_SIZE - 1) // CHUNK_SIZE):
                for key, length in self.reader.chunk_blocks(inode, index):
                    if self.disk.contains(key) if self.disk is not None else key in self.cache:
                        cached += length
                        continue
                    if len(inflight) >= window:
                        n, fut = inflight.pop(0)
                        fut.result()
                        fetched += n
                    inflight.append((length, self.fetch_pool.submit(self._warm_block, key, length)))
            for n, fut in inflight:
                fut.result()
                fetched += n
        finally:
            for _, fut in inflight:
                fut.cancel()
        return fetched, cached

    def materialize(self, inode: int, file_size: int) -> tuple[int, int]:
        """Copy the external data of ``inode`` (an imported file) into the volume's own store,
        chunk by chunk (each swap a compare-and-replace, so concurrent writes win; a chunk that
        changed meanwhile is tried again). Returns (bytes copied, bytes already native).
        Raises the first failure (what was done stays done: running it again resumes)."""
        copied = native = 0
        for index in range((file_size + CHUNK_SIZE - 1) // CHUNK_SIZE):
            for _attempt in range(5):
                segs = overlay(self.meta.read_chunk(inode, index))
                ext = sum(s.len for s in segs if s.id and s.kind == KIND_EXTERNAL)
                if not ext:
                    native += sum(s.len for s in segs if s.id)
                    break
                if self.compactor.compact_chunk(inode, index, materialize=True):
                    copied += ext
                    break
            else:
                raise FSError(
                    errno.EAGAIN, f"chunk {index} kept changing while it was materialized"
                )
        return copied, native

    def _warm_block(self, key: str, length: int) -> None:
        if self.disk is not None:
            self.store.warm_block(key, length)
        else:
            self.reader.fetcher.get(key, length)

    def register_metrics(self, metrics: Metrics) -> None:
        """Publish the caches', buffers' and uploads' figures (``loft stats``, Prometheus)."""
        cache, budget = self.cache, self.budget
        metrics.register_source(
            "mem_cache",
            lambda: {
                "hits": cache.hits,
                "misses": cache.misses,
                "used_bytes": cache.size,
                "capacity_bytes": cache.capacity,
                "blocks": len(cache),
            },
        )
        metrics.register_source(
            "buffer", lambda: {"used_bytes": budget.used, "total_bytes": budget.total}
        )
        metrics.register_source("source", self.external.figures)
        reader = self.reader
        metrics.register_source("preload", lambda: {"blocks_total": reader.preloaded})
        if self.disk is not None:
            metrics.register_source("disk_cache", self.disk.stats)
        if self.writeback is not None:
            metrics.register_source("writeback", self.writeback.stats)
        metrics.register_source("gc", self.gc.figures)
        self.gc.activity = metrics.requests_served  # background gc yields to FUSE traffic

    def sync(self) -> None:
        """Make every block uploaded so far durable in the object store (``fsync()``)."""
        self.store.sync()

    def pending_uploads(self) -> tuple[int, int]:
        """(blocks, bytes) written but not yet in the object store (write-back)."""
        return self.writeback.pending() if self.writeback is not None else (0, 0)

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
        if self.writeback is not None:
            self.remaining_uploads = self.writeback.drain(self.opts.writeback_drain_s)
            self.writeback.close()
        try:
            self.store.sync()  # "umount returned" means the data is on stable storage
        except Exception as e:
            log.error("syncing the object store at unmount failed: %s", e)
            first_error = first_error or e
        if self.disk is not None:
            self.disk.close()
        for fd in self._cache_lock_fds:
            os.close(fd)
        self._cache_lock_fds = []
        self.cache.clear()
        if first_error is not None:
            raise first_error


def lock_cache_dirs(dirs: list[str], volume_uuid: str) -> list[int]:
    """Take an exclusive lock on ``<dir>/<uuid>`` of every cache directory, so that two mounts
    of one volume on one machine never share (and double-count, or double-upload) one cache.
    The lock files sit next to the volume's cache directories (``<dir>/<uuid>.lock``).
    Returns the lock file descriptors, or [] when another mount holds one of the locks or a
    directory cannot be used (the mount then runs without a disk cache)."""
    fds: list[int] = []
    try:
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"{volume_uuid}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            log.warning(
                "cache directory %s is used by another mount of this volume: "
                "this mount runs without a disk cache",
                ", ".join(dirs),
            )
        else:
            log.warning("disk cache disabled: %s", e)
        return []
    return fds
