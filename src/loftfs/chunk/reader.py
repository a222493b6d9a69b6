"""The read side of the data path: slice lists (cached per chunk), blocks (cached, fetched once
per concurrent miss, verified), readahead on sequential access."""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

from loftfs.chunk.cache_mem import MemBlockCache
from loftfs.chunk.external import ext_block_key
from loftfs.chunk.layout import Segment, block_key, chunk_ranges, overlay
from loftfs.chunk.pool import WorkerPool
from loftfs.chunk.prefetch import ReadState
from loftfs.chunk.singleflight import SingleFlight
from loftfs.errors import FSError, ObjectCorrupted, ObjectNotFound, ObjectStoreError
from loftfs.meta.interface import Meta
from loftfs.meta.types import CHUNK_SIZE, KIND_EXTERNAL, KIND_NATIVE, Slice
from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)


class BlockUnavailable(FSError):
    """A block could not be read intact. ``missing``: the object does not exist (the slice list
    used may be stale: another client rewrote the file and its old blocks were collected)."""

    def __init__(self, key: str, why: str, *, missing: bool = False) -> None:
        super().__init__(errno.EIO, f"block {key}: {why}")
        self.key = key
        self.missing = missing


# --- slice lists ----------------------------------------------------------------------------


@dataclass
class _Pending:
    inode: int
    index: int
    valid: bool = True


class SliceCache:
    """Slice lists by (inode, chunk index), LRU-bounded. A list fetched while the chunk was
    invalidated is not stored, so a reader racing a commit never caches the older list."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._lists: OrderedDict[tuple[int, int], list[Slice]] = OrderedDict()
        self._by_inode: dict[int, set[int]] = {}
        self._pending: dict[int, list[_Pending]] = {}

    def get(self, inode: int, index: int) -> list[Slice] | None:
        with self._lock:
            slices = self._lists.get((inode, index))
            if slices is not None:
                self._lists.move_to_end((inode, index))
            return slices

    def begin(self, inode: int, index: int) -> _Pending:
        """Call before reading the list from the metadata engine; pass the token to ``put``."""
        token = _Pending(inode, index)
        with self._lock:
            self._pending.setdefault(inode, []).append(token)
        return token

    def put(self, token: _Pending, slices: list[Slice]) -> None:
        with self._lock:
            self._retire_locked(token)
            if not token.valid:
                return
            key = (token.inode, token.index)
            self._lists[key] = slices
            self._lists.move_to_end(key)
            self._by_inode.setdefault(token.inode, set()).add(token.index)
            while len(self._lists) > self.capacity:
                (ino, idx), _ = self._lists.popitem(last=False)
                self._forget_index(ino, idx)

    def abandon(self, token: _Pending) -> None:
        """The list ``begin`` announced will not be ``put`` (its read failed)."""
        with self._lock:
            self._retire_locked(token)

    def _retire_locked(self, token: _Pending) -> None:
        waiting = self._pending.get(token.inode, [])
        if token in waiting:
            waiting.remove(token)
        if not waiting:
            self._pending.pop(token.inode, None)

    def _forget_index(self, inode: int, index: int) -> None:
        indexes = self._by_inode.get(inode)
        if indexes is not None:
            indexes.discard(index)
            if not indexes:
                del self._by_inode[inode]

    def invalidate(self, inode: int) -> None:
        with self._lock:
            for index in self._by_inode.pop(inode, ()):
                self._lists.pop((inode, index), None)
            for token in self._pending.get(inode, ()):
                token.valid = False

    def invalidate_chunk(self, inode: int, index: int) -> None:
        with self._lock:
            if self._lists.pop((inode, index), None) is not None:
                self._forget_index(inode, index)
            for token in self._pending.get(inode, ()):
                if token.index == index:
                    token.valid = False


# --- blocks ---------------------------------------------------------------------------------

# A random read of at most 1/RANGED_FRACTION of a block reads just its range from the disk
# cache; a larger one loads the whole block into memory (it is likely read again).
RANGED_FRACTION = 8


@dataclass(frozen=True, slots=True)
class _Piece:
    """Part of a read: ``b - a`` bytes at ``a`` of block ``key`` (``length`` bytes), or zeros
    when ``key`` is empty."""

    key: str
    length: int
    a: int
    b: int


class BlockFetcher:
    """Whole-block reads through the memory cache; concurrent misses of one block share a
    single download; every block is checked against the length its key names."""

    def __init__(self, store: ObjectStore, cache: MemBlockCache, *, min_cached: int = 0) -> None:
        self.store = store
        self.cache = cache
        # Blocks shorter than this stay out of the memory cache (with a disk cache, small
        # files are served from it and from the kernel's page cache: holding them in memory
        # too only grew the mount by their total size).
        self.min_cached = min_cached
        self._flight: SingleFlight[bytes] = SingleFlight()

    def get(self, key: str, length: int, *, cache: bool = True) -> bytes:
        data = self.cache.get(key)
        if data is not None:
            return data
        return self._flight.do(key, lambda: self._fetch(key, length, cache))

    def get_range(self, key: str, length: int, a: int, b: int) -> bytes | None:
        """Bytes ``[a, b)`` of a block from the memory or disk cache, without fetching it whole;
        None when neither has it. Random small reads of a disk-cached file take this path, so
        each costs one local read of a few segments instead of a whole block."""
        data = self.cache.get(key)
        if data is not None:
            return data[a:b]
        ranged = getattr(self.store, "get_cached_range", None)
        if ranged is None:
            return None
        part: bytes | None = ranged(key, a, b - a)
        return part

    def prewarm(self, key: str) -> bool:
        """Start reading a block of the disk cache into memory in the background; False when
        there is no disk cache or it does not hold the block."""
        prewarm = getattr(self.store, "prewarm", None)
        return prewarm is not None and bool(prewarm(key))

    def busy(self, key: str) -> bool:
        """True when the block is cached or being fetched (no need to prefetch it)."""
        return key in self.cache or self._flight.in_flight(key)

    def _fetch(self, key: str, length: int, cache: bool) -> bytes:
        data = self.cache.get(key)
        if data is not None:
            return data
        for attempt in (1, 2):  # one retry: a short or garbled transfer may not repeat
            try:
                data = self.store.get(key)
            except ObjectNotFound as e:
                log.error("block %s is missing in %s", key, self.store.describe())
                raise BlockUnavailable(key, "missing", missing=True) from e
            except ObjectCorrupted as e:
                if attempt == 1:
                    continue
                log.error("block %s is corrupted: %s", key, e)
                raise BlockUnavailable(key, "corrupted") from e
            except ObjectStoreError as e:
                log.error("block %s could not be read: %s", key, e)
                raise BlockUnavailable(key, str(e)) from e
            if len(data) == length:
                if cache and length >= self.min_cached:
                    self.cache.put(key, data)
                return data
            if attempt == 2:
                log.error("block %s: read %d bytes, expected %d", key, len(data), length)
        raise BlockUnavailable(key, "corrupted (wrong length)")


# --- reader ---------------------------------------------------------------------------------


class BlockSlice(NamedTuple):
    """Bytes ``[start, end)`` of a cached block, for the FUSE reply to send without copying
    them first (a read within one block is the common case of sequential reads)."""

    block: bytes
    start: int
    end: int

    def __len__(self) -> int:  # type: ignore[override]
        return self.end - self.start

    def __bytes__(self) -> bytes:
        return self.block[self.start : self.end]


class Reader:
    """Maps file ranges to blocks and assembles the bytes; holes read as zeros."""

    def __init__(
        self,
        meta: Meta,
        fetcher: BlockFetcher,
        slices: SliceCache,
        pool: WorkerPool,
        ahead_pool: WorkerPool,
        volume_uuid: str,
        block_size: int,
        readahead_blocks: int,
    ) -> None:
        self.meta = meta
        self.fetcher = fetcher
        self.slices = slices
        self.pool = pool  # demand fetches
        self.ahead_pool = ahead_pool  # readahead: its own threads never delay demand reads
        self.uuid = volume_uuid
        self.block_size = block_size
        self.readahead_blocks = readahead_blocks
        self._ahead_lock = threading.Lock()
        self._ahead: set[str] = set()  # blocks queued for readahead
        self.preloaded = 0  # blocks ``preload`` started reading from the disk cache

    # slice lists

    def chunk_slices(self, inode: int, index: int) -> list[Slice]:
        slices = self.slices.get(inode, index)
        if slices is None:
            token = self.slices.begin(inode, index)
            slices = self.meta.read_chunk(inode, index)
            self.slices.put(token, slices)
        return slices

    def chunk_blocks(self, inode: int, index: int) -> list[tuple[str, int]]:
        """(key, length) of every distinct block the visible content of a chunk uses."""
        seen: dict[str, int] = {}
        for seg in overlay(self.chunk_slices(inode, index), 0, CHUNK_SIZE):
            for p in self.segment_pieces(seg):
                if p.key:
                    seen.setdefault(p.key, p.length)
        return list(seen.items())

    # planning

    def segment_pieces(self, seg: Segment) -> list[_Piece]:
        """The block pieces (or a zero piece) making up one visible segment."""
        if seg.id == 0:
            return [_Piece("", 0, 0, seg.len)]
        key_of: Callable[[str, int, int, int], str]
        if seg.kind == KIND_NATIVE:
            key_of = block_key
        elif seg.kind == KIND_EXTERNAL:
            key_of = ext_block_key
        else:
            log.error("slice %d has kind %d, which this client cannot read", seg.id, seg.kind)
            raise FSError(errno.EIO, f"slice {seg.id}: unsupported kind {seg.kind}")
        if seg.off < 0 or seg.off + seg.len > seg.size:
            log.error(
                "slice %d: range %d+%d exceeds its size %d", seg.id, seg.off, seg.len, seg.size
            )
            raise FSError(errno.EIO, f"slice {seg.id}: invalid range")
        bs = self.block_size
        pieces = []
        off, end = seg.off, seg.off + seg.len
        while off < end:
            bi = off // bs
            base = bi * bs
            blen = min(bs, seg.size - base)
            stop = min(end, base + blen)
            pieces.append(
                _Piece(key_of(self.uuid, seg.id, bi, blen), blen, off - base, stop - base)
            )
            off = stop
        return pieces

    def _plan(self, inode: int, start: int, end: int) -> list[_Piece]:
        pieces: list[_Piece] = []
        for index, pos, n in chunk_ranges(start, end - start):
            pieces.extend(self._slice_pieces(self.chunk_slices(inode, index), pos, pos + n))
        return pieces

    def _slice_pieces(self, slices: list[Slice], start: int, end: int) -> list[_Piece]:
        """The pieces of ``[start, end)`` of a chunk whose slice list is ``slices``."""
        pieces: list[_Piece] = []
        for seg in overlay(slices, start, end):
            pieces.extend(self.segment_pieces(seg))
        return pieces

    def assemble(self, pieces: list[_Piece], *, cache: bool = True, ranged: bool = False) -> bytes:
        """Fetch the blocks of ``pieces`` (in parallel when several miss) and join the bytes.
        ``ranged``: a random read; pieces that are a small part of their block are read from
        the caches alone when there (``BlockFetcher.get_range``)."""
        data = self._assemble(pieces, cache=cache, ranged=ranged, span_ok=False)
        assert isinstance(data, bytes)
        return data

    def _assemble(
        self, pieces: list[_Piece], *, cache: bool, ranged: bool, span_ok: bool
    ) -> bytes | BlockSlice:
        """``assemble``; with ``span_ok`` a range of a single block is returned as a
        ``BlockSlice`` of it instead of a copy."""
        blocks: dict[str, bytes] = {}
        missing: dict[str, int] = {}
        parts: dict[int, bytes] = {}
        for i, p in enumerate(pieces):
            if ranged and p.key and (p.b - p.a) * RANGED_FRACTION <= p.length:
                part = self.fetcher.get_range(p.key, p.length, p.a, p.b)
                if part is not None and len(part) == p.b - p.a:
                    parts[i] = part
                    continue
            if p.key and p.key not in blocks and p.key not in missing:
                data = self.fetcher.cache.get(p.key) if cache else None
                if data is not None:
                    blocks[p.key] = data
                else:
                    missing[p.key] = p.length
        if missing:
            items = list(missing.items())
            futures: list[tuple[str, Future[bytes]]] = [
                (k, self.pool.submit(self._fetch, k, n, cache)) for k, n in items[1:]
            ]
            first_error: BaseException | None = None
            try:
                key, length = items[0]
                blocks[key] = self.fetcher.get(key, length, cache=cache)
            except BaseException as e:
                first_error = e
            for key, fut in futures:
                try:
                    blocks[key] = fut.result()
                except BaseException as e:
                    first_error = first_error or e
            if first_error is not None:
                raise first_error
        if span_ok and len(pieces) == 1 and not parts and pieces[0].key:
            p = pieces[0]
            return BlockSlice(blocks[p.key], p.a, p.b)
        out = []
        for i, p in enumerate(pieces):
            part = parts.get(i)
            if part is not None:
                out.append(memoryview(part))
            elif p.key:
                out.append(memoryview(blocks[p.key])[p.a : p.b])
            else:
                out.append(memoryview(bytes(p.b - p.a)))
        return b"".join(out)

    def _fetch(self, key: str, length: int, cache: bool) -> bytes:
        return self.fetcher.get(key, length, cache=cache)

    # reads

    def read(
        self,
        inode: int,
        offset: int,
        size: int,
        file_size: int,
        state: ReadState | None,
        span_ok: bool = False,
    ) -> bytes | BlockSlice:
        end = min(offset + size, file_size)
        if size <= 0 or offset >= end:
            return b""
        for attempt in (1, 2):
            pieces = self._plan(inode, offset, end)
            if attempt == 1 and state is not None:
                ahead = state.advance(
                    offset, end, file_size, self.block_size, self.readahead_blocks
                )
                if ahead is not None:
                    self._read_ahead(inode, *ahead)
            try:
                return self._assemble(
                    pieces,
                    cache=True,
                    ranged=state is not None and state.window == 0,
                    span_ok=span_ok,
                )
            except BlockUnavailable as e:
                if not e.missing or attempt == 2:
                    raise
                # The list may predate a rewrite by another client: ask the engine again.
                self.slices.invalidate(inode)
        raise AssertionError("unreachable")

    def read_slices(self, slices: list[Slice], size: int) -> bytes:
        """The first ``size`` bytes of chunk 0 given its slice list, through the block caches
        (a light open's snapshot: ``VFS.open``). ``size`` must not exceed the chunk."""
        return self.assemble(self._slice_pieces(slices, 0, size))

    def read_chunk_range(self, slices: list[Slice], start: int, end: int) -> bytes:
        """Visible content of ``[start, end)`` of a chunk with the given slice list, bypassing
        the block cache (used by compaction, whose reads should not evict hot blocks)."""
        return self.assemble(self._slice_pieces(slices, start, end), cache=False)

    def preload(self, slices: list[Slice], size: int) -> None:
        """Start reading the blocks of the first ``size`` bytes of a chunk with ``slices``
        from the disk cache into the page cache, without waiting (``DiskCache.prewarm``): the
        read that follows soon finds them in memory. Blocks not in the disk cache are left
        alone (fetching them ahead on a readahead thread measured no faster: the hand-off
        costs what the overlap saves). Best effort: a bad slice list is only logged."""
        try:
            pieces = self._slice_pieces(slices, 0, size)
        except FSError as e:
            log.debug("preloading skipped: %s", e)
            return
        for p in pieces:
            if p.key and not self.fetcher.busy(p.key) and self.fetcher.prewarm(p.key):
                self.preloaded += 1

    # readahead

    def _read_ahead(self, inode: int, start: int, end: int) -> None:
        try:
            self.ahead_pool.submit(self._plan_ahead, inode, start, end)
        except RuntimeError:
            pass  # shutting down

    def _plan_ahead(self, inode: int, start: int, end: int) -> None:
        try:
            pieces = self._plan(inode, start, end)
        except Exception as e:
            log.debug("readahead of inode %d [%d, %d) skipped: %s", inode, start, end, e)
            return
        for p in pieces:
            if not p.key or self.fetcher.busy(p.key):
                continue
            with self._ahead_lock:
                if p.key in self._ahead:
                    continue
                self._ahead.add(p.key)
            try:
                self.ahead_pool.submit(self._fetch_ahead, p.key, p.length)
            except RuntimeError:
                with self._ahead_lock:
                    self._ahead.discard(p.key)
                return

    def _fetch_ahead(self, key: str, length: int) -> None:
        try:
            self.fetcher.get(key, length)
        except Exception as e:
            log.debug("readahead of block %s failed: %s", key, e)
        finally:
            with self._ahead_lock:
                self._ahead.discard(key)
