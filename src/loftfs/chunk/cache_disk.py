"""Local disk cache of blocks, and the staging area of write-back.

Blocks are immutable, so a cached block is never stale: the cache only has to return exactly
the bytes that were put, stay within its budget of disk, and never get in the callers' way.

Layout. Each cache directory holds ``<dir>/<volume_uuid>/raw/`` (blocks that are in the object
store, evictable) and ``<dir>/<volume_uuid>/staging/`` (write-back blocks not uploaded yet,
never evicted). A block is kept in one directory, chosen by a stable 60-bit hash of its key
(blake2b): ``dirs[h % len(dirs)]``; inside it the file is ``XX/YY/<h as 15 hex digits>`` with
``XX``/``YY`` taken from the hash's top 12 bits (64 x 64 subdirectories: 250 files each at a
million blocks, created as needed). Files are named by hash rather than by key so that the
in-memory index can be keyed by a small int and still name the file to evict.

File format (little-endian)::

    magic "LFBC" | version u16 | key length u16 | segment size u32 | data length u64
    | header crc32 u32 (of everything before it, the key and the segment sums)
    | key (utf-8) | checksum of each segment of the data (u32 each) | data

The segment checksum is the low 32 bits of XXH3-64 (version 2), or crc32 in files of version
1, which are still read (a staged block written by an older release must survive an upgrade).

The key in the header makes a hash collision, or a file put in the wrong place, a miss rather
than wrong data. A file whose header, key, length or checksums do not match is deleted and
reported as a miss: the cache never returns wrong bytes. Checksums per segment (64 KiB by
default) let ``get_range`` verify only what it reads; XXH3 runs at about 25 GB/s here (crc32,
version 1: 4.5 GB/s), so a whole 4 MiB block costs about 0.15 ms to check. Files are written
to a temporary name and renamed into place without fsync: a torn file fails its checksums. Staged files are fsynced (file and
directory) before ``stage`` returns, since they are the only copy of acknowledged data.

Index. One dict per directory maps the key hash to ``access time << 28 | file size`` (both
ints below 2**60, so 32 bytes each), plus a list of hashes to sample victims from: 115 bytes
per block measured (``bench/cache_startup.py``: 109 MiB for a million blocks; an
``OrderedDict`` for exact LRU measured about 60 bytes more per block). The index is rebuilt at
``start`` by a background scan, so a mount with millions of cached blocks serves at once:
until the scan has reached a block, ``get`` finds it by opening its file directly, and
eviction works on what has been indexed so far. Measured with a million cached blocks on two
busy cores: ``start`` returns in 1 to 10 ms, a first ``get`` during the scan takes 0.1 ms
(2 to 5 ms after dropping the page cache), the scan takes 4 s (10 to 12 s cold). A hit of a
4 MiB block takes 1.7 ms (read and verify), of a tiny one 15 us; a miss 2 us.

Temporary files left by a crash are removed by the scan. A cache directory must be used by one
process at a time (the mount takes a lock on it: ``datapath.lock_cache_dirs``); changing the
list of directories drops the cached blocks that now belong to another one (staged blocks are
moved there).

Eviction is sampled LRU: draw ``SAMPLE`` (16) random indexed blocks of the directory that needs
room and evict the least recently used of them; with 16 or fewer blocks it is exact LRU.
``bench/cache_startup.py --policy`` replays skewed traces (Zipf, Zipf with one-off scans, a
moving hot set) against exact LRU: 16 samples are within 0.1 percentage point of its hit
ratio (0.599 / 0.402 / 0.592 against 0.600 / 0.402 / 0.593), 8 lose 0.4 points, 32 gain
nothing measurable and cost twice as much: choosing a victim among a million blocks takes
21 us with 16 samples (memory latency: every sample is a cache miss). Access times live only
in memory; after a restart a block's recency is the time its file was written, so scanned
blocks need no ordering and are older than anything used since.

Disk space. The cache stays within ``capacity`` bytes (file sizes; split evenly over the
directories) and keeps ``free_ratio`` of each file system free: the free space is read with
``statvfs`` every second (or after writing a 256th of the file system), and estimated from the
cache's own writes and deletions in between. Staged blocks count toward the capacity but are
never evicted; ``stage`` fails rather than going over.

Failures never reach the callers: a failed write is counted, logged (at most every 10 s per
directory and kind) and dropped; after ``FAIL_LIMIT`` consecutive failures a directory is
skipped for ``retry_after_s`` (30 s) for writes (or reads, counted separately), then retried.
A failed read is a miss. ``stage`` returns False so that the caller uploads synchronously.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import random
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import xxhash

from loftfs.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"LFBC"
FORMAT_VERSION = 2  # written; 1 and 2 are read (they differ in the segment checksum only)


def _xxh3_32(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


SEGMENT_SUMS: dict[int, Callable[[bytes | memoryview], int]] = {1: zlib.crc32, 2: _xxh3_32}
_FIXED = struct.Struct("<4sHHIQ")  # magic, version, key length, segment size, data length
_HCRC = struct.Struct("<I")
HEAD_SIZE = _FIXED.size + _HCRC.size  # 24
MIN_SEGMENT = 1 << 10
MAX_SEGMENT = 64 << 20

SIZE_BITS = 28  # file sizes below 256 MiB (blocks are at most 64 MiB)
_SIZE_MASK = (1 << SIZE_BITS) - 1
_EPOCH_S = 1_577_836_800  # 2020-01-01: access times are seconds (or ticks) since then

SAMPLE = 16  # eviction candidates drawn per victim (bench/cache_startup.py --policy)
FAIL_LIMIT = 3  # consecutive failures before a directory is skipped
HEAD_CACHE = 4096  # verified headers kept in memory for ranged reads (~300 bytes each)
# Block files kept open for reads: an open per read costs a path walk of three directory
# levels (a disk read each once the kernel dropped its dentries) and a close.
FD_CACHE = 256
SPACE_CHECK_S = 1.0  # statvfs at most this often (unless a 256th of the disk was written)
LOG_EVERY_S = 10.0
_FANOUT_BITS = 6  # 64 x 64 subdirectories


def key_hash(key: str) -> int:
    """The 60-bit hash naming a key's file and choosing its directory (stable across runs)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 4


def rel_path(h: int) -> str:
    """``XX/YY/<hash>``: the file of hash ``h`` below ``raw/`` or ``staging/``."""
    return f"{h >> 54:02x}/{(h >> 48) & 63:02x}/{h:015x}"


def file_size(key_len: int, data_len: int, segment_size: int) -> int:
    return HEAD_SIZE + key_len + 4 * (-(-data_len // segment_size)) + data_len


def encode_head(
    key: bytes, data: bytes | memoryview, segment_size: int, version: int = FORMAT_VERSION
) -> bytes:
    """Everything of a cache file before its data: header, key and segment checksums."""
    mv = memoryview(data)
    seg_sum = SEGMENT_SUMS[version]
    crcs = struct.pack(
        f"<{-(-len(mv) // segment_size)}I",
        *(seg_sum(mv[i : i + segment_size]) for i in range(0, len(mv), segment_size)),
    )
    fixed = _FIXED.pack(MAGIC, version, len(key), segment_size, len(mv))
    hcrc = zlib.crc32(crcs, zlib.crc32(key, zlib.crc32(fixed)))
    return fixed + _HCRC.pack(hcrc) + key + crcs


# (segment size, packed segment checksums, offset of the data, the checksum function)
Head = tuple[int, bytes, int, Callable[[bytes | memoryview], int]]


def pick_victim(index: dict[int, int], keys: list[int], sample: int = SAMPLE) -> int | None:
    """Sampled LRU: of ``sample`` random entries of ``index`` (drawn from ``keys``, which may
    also hold hashes no longer indexed), the one with the oldest access time (the high bits
    of the value); exact LRU when ``index`` has at most ``sample`` entries. None when every
    hash drawn was stale. ``index`` must not be empty."""
    if len(index) <= sample:
        return min(index, key=index.__getitem__)
    best, best_v = None, -1
    for h in random.choices(keys, k=sample):
        v = index.get(h)
        if v is not None and (best_v < 0 or v < best_v):
            best, best_v = h, v
    return best


class CorruptBlock(Exception):
    """A cache file that does not hold what its name promises (internal: becomes a miss)."""


def _read_head(fd: int, key: bytes, length: int, segment_size: int, buf: bytes = b"") -> Head:
    """Read and verify the header of an open cache file of ``key`` holding ``length`` bytes.
    ``buf``: the start of the file, already read (what it holds is not read again)."""
    if not buf:
        buf = os.pread(fd, file_size(len(key), length, segment_size) - length, 0)
    if len(buf) < HEAD_SIZE:
        raise CorruptBlock(f"short header ({len(buf)} bytes)")
    magic, version, key_len, seg, data_len = _FIXED.unpack_from(buf)
    seg_sum = SEGMENT_SUMS.get(version)
    if magic != MAGIC or seg_sum is None:
        raise CorruptBlock("bad magic or format version")
    if key_len != len(key) or data_len != length:
        raise CorruptBlock(f"header names a {data_len}-byte block, expected {length}")
    if not MIN_SEGMENT <= seg <= MAX_SEGMENT:
        raise CorruptBlock(f"bad segment size {seg}")
    head_len = file_size(key_len, data_len, seg) - data_len
    if head_len > len(buf):  # written with another segment size: read the rest
        buf += os.pread(fd, head_len - len(buf), len(buf))
    if len(buf) < head_len:
        raise CorruptBlock("short header")
    (hcrc,) = _HCRC.unpack_from(buf, _FIXED.size)
    body = memoryview(buf)[HEAD_SIZE:head_len]
    if zlib.crc32(body, zlib.crc32(memoryview(buf)[: _FIXED.size])) != hcrc:
        raise CorruptBlock("header checksum mismatch")
    if body[:key_len] != key:
        raise CorruptBlock("file holds another key")
    return seg, bytes(body[key_len:]), head_len, seg_sum


def read_block(
    fd: int,
    key: bytes,
    length: int,
    off: int,
    end: int,
    segment_size: int,
    head: Head | None = None,
) -> tuple[bytes, int]:
    """Bytes ``[off, end)`` of the block in cache file ``fd``, verifying every segment they
    touch (all of them when the range is the whole block, which must then end the file).
    Returns (data, file size). ``CorruptBlock`` on any mismatch. ``head``: the header as
    ``read_head`` returned it earlier for this file (saves a read; the data is still checked
    against its segment checksums)."""
    whole = off == 0 and end == length
    span: bytes | None = None
    if head is None and whole:
        # the whole file in one read (one wait for the disk when it is not in the page cache)
        size = file_size(len(key), length, segment_size)
        buf = os.pread(fd, size + 1, 0)
        head = _read_head(fd, key, length, segment_size, buf[: size - length])
        if head[2] == size - length:  # else written with another segment size: read again
            span = buf[head[2] :]
    seg, crcs, data_off, seg_sum = (
        head if head is not None else _read_head(fd, key, length, segment_size)
    )
    first = off // seg
    last = -(-end // seg) if end > off else first
    span_start, span_end = first * seg, min(last * seg, length)
    if span is None:
        span = os.pread(fd, span_end - span_start + (1 if whole else 0), data_off + span_start)
    if len(span) != span_end - span_start:
        raise CorruptBlock(
            "trailing bytes after the data" if len(span) > span_end - span_start else "truncated"
        )
    mv = memoryview(span)
    for i in range(first, last):
        a = (i - first) * seg
        if seg_sum(mv[a : a + seg]) != int.from_bytes(crcs[4 * i : 4 * i + 4], "little"):
            raise CorruptBlock(f"checksum mismatch in segment {i}")
    size = data_off + length
    if whole:
        return span, size
    return bytes(mv[off - span_start : end - span_start]), size


def _peek(fd: int) -> tuple[int, int]:
    """(key length, data length) from a header not verified yet (bounded, to size reads)."""
    buf = os.pread(fd, _FIXED.size, 0)
    if len(buf) < _FIXED.size:
        raise CorruptBlock("short header")
    _, _, key_len, _, data_len = _FIXED.unpack(buf)
    if data_len > _SIZE_MASK:
        raise CorruptBlock(f"bad data length {data_len}")
    return key_len, data_len


def read_file_key(path: str) -> str:
    """The key a cache file holds, from its verified header (the data is not checked)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        key_len, data_len = _peek(fd)
        buf = os.pread(fd, key_len, HEAD_SIZE)
        try:
            key = buf.decode()
        except UnicodeDecodeError as e:
            raise CorruptBlock("undecodable key") from e
        _read_head(fd, buf, data_len, MIN_SEGMENT)
        return key
    finally:
        os.close(fd)


def _write_all(fd: int, head: bytes, data: bytes) -> None:
    n = os.writev(fd, [head, data])
    if n == len(head) + len(data):
        return
    rest = memoryview(head + data)[n:]  # a short write: rare, finish it plainly
    while rest:
        rest = rest[os.write(fd, rest) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> OSError | None:
    """Remove a file; a missing one is fine. Returns the error, if any."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e
    return None


class _Area:
    """One cache directory (``<dir>/<volume_uuid>``): its index, staging table, space
    estimate, failure state and write queue. Guarded by the cache's lock."""

    def __init__(self, no: int, base: str, capacity: int, lock: threading.Lock) -> None:
        self.no = no
        self.base = base
        self.raw = os.path.join(base, "raw")
        self.staging = os.path.join(base, "staging")
        self.capacity = capacity
        self.index: dict[int, int] = {}  # key hash -> atime << SIZE_BITS | file size
        self.keys: list[int] = []  # hashes to sample victims from (may hold stale ones)
        self.indexed_bytes = 0
        self.staged: dict[str, int] = {}  # key -> file size
        self.staged_bytes = 0
        self.inflight = 0  # bytes reserved by writes in progress
        self.scanned = False  # the index holds every raw file: a key not in it is a miss
        self.scan_removed: set[int] = set()  # removed while the scan runs: not to be re-added
        # One operation at a time on a file: (staging?, hash) being written, hashes being
        # removed (evicted or discarded), and hashes discarded while being written.
        self.writing: set[tuple[bool, int]] = set()
        self.removing: set[int] = set()
        self.doomed: set[int] = set()
        self.min_free = 0
        self.free_est = 1 << 62  # until the first statvfs
        self.block = 4096  # file system block size, for the free-space estimate
        self.next_space_check = 0.0
        self.written_since_check = 0
        self.check_every = 1 << 62
        self.write_failures = 0
        self.write_disabled_until = 0.0
        self.read_failures = 0
        self.read_disabled_until = 0.0
        self.pending: OrderedDict[str, bytes] = OrderedDict()
        self.cond = threading.Condition(lock)
        self.thread: threading.Thread | None = None

    @property
    def used(self) -> int:
        return self.indexed_bytes + self.staged_bytes + self.inflight

    def usage(self, size: int) -> int:
        """Disk space a file of ``size`` bytes takes (whole file-system blocks)."""
        return -(-size // self.block) * self.block


class _OpenFile:
    """A kept block file descriptor and the reads using it (see ``FD_CACHE``)."""

    __slots__ = ("dropped", "fd", "refs")

    def __init__(self, fd: int, refs: int = 0) -> None:
        self.fd = fd
        self.refs = refs
        self.dropped = False  # out of the cache: closed when the last read gives it back


class DiskCache:
    """Blocks on local disk, shared by the FUSE threads; see the module docstring.

    ``dirs``: cache directories (each gets ``<dir>/<volume_uuid>/``); ``capacity``: bytes of
    cache files in all (staged included); ``free_ratio``: share of each file system kept
    free; ``segment_size``: bytes per checksum; ``max_pending_bytes``: data waiting for the
    background writer, beyond which ``put`` drops blocks; ``retry_after_s``: how long a
    failing directory is skipped."""

    def __init__(
        self,
        dirs: list[str],
        capacity: int,
        *,
        volume_uuid: str,
        free_ratio: float = 0.1,
        segment_size: int = 16 << 10,
        max_pending_bytes: int = 64 << 20,
        retry_after_s: float = 30.0,
    ) -> None:
        paths = list(dict.fromkeys(os.path.abspath(os.path.expanduser(d)) for d in dirs))
        if not paths:
            raise ConfigError("the disk cache needs at least one directory")
        if not volume_uuid or "/" in volume_uuid or volume_uuid in (".", ".."):
            raise ConfigError(f"invalid volume uuid {volume_uuid!r} for the disk cache")
        if capacity < 0:
            raise ConfigError(f"invalid disk cache size {capacity}")
        if not 0.0 <= free_ratio < 1.0:
            raise ConfigError(f"invalid free space ratio {free_ratio}: must be in [0, 1)")
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise ConfigError(
                f"invalid checksum segment size {segment_size}: must be between "
                f"{MIN_SEGMENT} and {MAX_SEGMENT}"
            )
        self.dirs = paths
        self.capacity = capacity
        self.volume_uuid = volume_uuid
        self.free_ratio = free_ratio
        self.segment_size = segment_size
        self.max_pending_bytes = max_pending_bytes
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        # Verified headers of recently read blocks, for ranged reads: a random 4 KiB read then
        # costs one disk read (its segment) instead of two (header, segment). Blocks never
        # change, so a remembered header stays right; it is dropped with the file.
        self._heads: OrderedDict[int, Head] = OrderedDict()
        self._fds: OrderedDict[int, _OpenFile] = OrderedDict()  # by hash, least recent first
        share, extra = divmod(capacity, len(paths))
        self._areas = [
            _Area(i, os.path.join(d, volume_uuid), share + (1 if i < extra else 0), self._lock)
            for i, d in enumerate(paths)
        ]
        # Session clock: starts at wall-clock seconds (so blocks indexed from their mtime
        # are older than anything accessed now) and ticks once per access.
        self._clock = int(time.time()) - _EPOCH_S
        self._token = secrets.token_hex(4)  # marks this instance's temporary files
        self._seq = itertools.count()
        self._pending_bytes = 0
        self._started = False
        self._closed = False
        self._close_deadline = 0.0
        self._stop = threading.Event()
        self._scan_thread: threading.Thread | None = None
        self._last_log: dict[tuple[int, str], float] = {}
        self._suppressed: dict[tuple[int, str], int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt = 0
        self.errors = 0
        self.dropped_puts = 0
        self.skipped_puts = 0

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Create the directories, load the staging tables (small, and needed at once to
        resume uploads), then start the index scan and the writers in the background."""
        if self._started:
            return
        self._started = True
        for area in self._areas:
            try:
                created = not os.path.isdir(area.base)
                for path in (area.raw, area.staging):
                    os.makedirs(path, exist_ok=True)
                if created:
                    _fsync_dir(os.path.dirname(area.base))
                self._check_space(area, force=True)
                self._load_staging(area)
            except OSError as e:
                self._count_failure(area, "write", area.base, e)
        self._scan_thread = threading.Thread(target=self._scan, name="loft-cache-scan", daemon=True)
        self._scan_thread.start()
        for area in self._areas:
            area.thread = threading.Thread(
                target=self._writer, args=(area,), name=f"loft-cache-write-{area.no}", daemon=True
            )
            area.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background threads. Queued puts are written until ``timeout`` seconds
        have passed, and dropped after that."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_deadline = time.monotonic() + timeout
            for area in self._areas:
                area.cond.notify_all()
        self._stop.set()
        for area in self._areas:
            if area.thread is not None:
                area.thread.join(max(0.0, self._close_deadline - time.monotonic()) + 1.0)
        with self._lock:  # never started, or a writer stuck on a hung disk
            for area in self._areas:
                self._drop_pending_locked(area)
        if self._scan_thread is not None:
            self._scan_thread.join(max(0.0, self._close_deadline - time.monotonic()) + 1.0)
        with self._lock:
            for f in self._fds.values():
                self._drop_fd_locked(f)
            self._fds.clear()

    # --- cached blocks ----------------------------------------------------------------------

    def get(self, key: str, length: int) -> bytes | None:
        """The whole block, every segment verified; None on a miss."""
        return self._read(key, length, 0, length)

    def get_range(self, key: str, length: int, off: int, n: int) -> bytes | None:
        """Bytes ``[off, off + n)`` of the block (cut at its end), verifying only the
        segments that hold them; None on a miss."""
        if off < 0 or n < 0:
            raise ValueError(f"invalid range {off}+{n}")
        off = min(off, length)
        return self._read(key, length, off, min(off + n, length))

    def prewarm(self, key: str, length: int) -> bool:
        """Start reading a cached block's file into the page cache without waiting for the
        disk (``posix_fadvise(WILLNEED)``), so that a read of it soon after finds it in
        memory. False when the block is not cached here (or reads of its directory fail)."""
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            if key in area.pending:  # not written yet: a read takes it from memory
                return True
            if (
                self._closed
                or not 0 < length <= _SIZE_MASK
                or (area.scanned and h not in area.index)
                or area.read_disabled_until > time.monotonic()
            ):
                return False
        try:
            kept = self._open_kept(area, h, os.path.join(area.raw, rel_path(h)))
        except OSError:
            return False
        try:
            os.posix_fadvise(kept.fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            return False
        finally:
            self._release_kept(kept)
        return True

    def contains(self, key: str) -> bool:
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            if h in area.index or key in area.staged:
                return True
            if area.scanned:
                return False
        return os.path.exists(os.path.join(area.raw, rel_path(h)))

    def put(self, key: str, data: bytes) -> None:
        """Cache a block that is in the object store, in the background. Never blocks: the
        block is dropped when ``max_pending_bytes`` are already waiting."""
        h = key_hash(key)
        area = self._area(h)
        data = bytes(data)
        with self._lock:
            if self._closed:
                return
            if h in area.index:
                area.index[h] = self._touch_locked(area.index[h])
                return
            if key in area.staged or key in area.pending:
                return
            if area.write_disabled_until > time.monotonic():
                self.skipped_puts += 1
                return
            if self._pending_bytes + len(data) > self.max_pending_bytes:
                self.dropped_puts += 1
                return
            area.pending[key] = data
            self._pending_bytes += len(data)
            area.cond.notify()

    def put_sync(self, key: str, data: bytes) -> bool:
        """Cache a block now; False when it could not be stored."""
        return self._store(self._area(key_hash(key)), key, bytes(data), staging=False)

    def discard(self, key: str) -> None:
        """Forget a cached block (its object was deleted)."""
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            data = area.pending.pop(key, None)
            if data is not None:
                self._pending_bytes -= len(data)
            if (False, h) in area.writing:  # the writer removes it when done
                area.doomed.add(h)
                return
            known = self._forget_locked(area, h)
            if (not known and area.scanned) or h in area.removing:
                return
            area.removing.add(h)
        self._remove_files(area, [h])

    # --- write-back staging -------------------------------------------------------------------

    def stage(self, key: str, data: bytes) -> bool:
        """Store a block that is not in the object store yet, durably (fsynced) and never
        evicted; False when it cannot be (full, failing or over capacity)."""
        return self._store(self._area(key_hash(key)), key, bytes(data), staging=True)

    def read_staged(self, key: str) -> bytes | None:
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            size = area.staged.get(key)
        if size is None:
            return None
        path = os.path.join(area.staging, rel_path(h))
        try:
            return self._read_file(area, h, key, path, None)
        except FileNotFoundError:
            with self._lock:
                if area.staged.pop(key, None) is not None:
                    area.staged_bytes -= size
                    area.free_est += area.usage(size)
            log.error("disk cache: staged block %s (%s) is missing", path, key)
            return None

    def staged_keys(self) -> list[str]:
        with self._lock:
            return [k for area in self._areas for k in area.staged]

    def unstage(self, key: str) -> None:
        """The block was uploaded: move it into the cache (a rename, no copy)."""
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            size = area.staged.get(key)
        if size is None:
            return
        rel = rel_path(h)
        src, dst = os.path.join(area.staging, rel), os.path.join(area.raw, rel)
        moved = False
        try:
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                if not os.path.exists(src):
                    raise
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.rename(src, dst)
            moved = True
        except OSError as e:
            self._count_failure(area, "write", dst, e)
            _unlink(src)
        with self._lock:
            dropped = area.staged.pop(key, None) is None  # by drop_staged meanwhile
            if not dropped:
                area.staged_bytes -= size
            if dropped or not moved:
                area.free_est += area.usage(size)
        if dropped or not moved:
            if dropped and moved:
                _unlink(dst)
            return
        with self._lock:
            old = area.index.get(h)
            if old is None:
                area.keys.append(h)
            else:  # replaced a cached copy
                area.indexed_bytes -= old & _SIZE_MASK
                area.free_est += area.usage(old & _SIZE_MASK)
                self._forget_fd_locked(h)
            area.index[h] = self._touch_locked(size)
            area.indexed_bytes += size

    def drop_staged(self, key: str) -> None:
        """The block is not needed any more: delete it without uploading."""
        h = key_hash(key)
        area = self._area(h)
        with self._lock:
            size = area.staged.pop(key, None)
            if size is None:
                return
            area.staged_bytes -= size
            area.free_est += area.usage(size)
        err = _unlink(os.path.join(area.staging, rel_path(h)))
        if err is not None:
            self._count_failure(area, "write", area.staging, err)

    # --- figures ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            areas = self._areas
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "corrupt": self.corrupt,
                "errors": self.errors,
                "used_bytes": sum(a.used for a in areas),
                "blocks": sum(len(a.index) for a in areas),
                "staged_blocks": sum(len(a.staged) for a in areas),
                "staged_bytes": sum(a.staged_bytes for a in areas),
                "capacity": self.capacity,
                "pending_put_bytes": self._pending_bytes,
                "dropped_puts": self.dropped_puts,
                "skipped_puts": self.skipped_puts,
                "disabled_dirs": sum(1 for a in areas if a.write_disabled_until > time.monotonic()),
                "scanning": int(not all(a.scanned for a in areas)),
            }

    # --- internals: reads -----------------------------------------------------------------

    def _area(self, h: int) -> _Area:
        return self._areas[h % len(self._areas)]

    def _touch_locked(self, value: int) -> int:
        """``value`` (a packed index entry or a bare size) with a new access time."""
        self._clock += 1
        return self._clock << SIZE_BITS | (value & _SIZE_MASK)

    def _read(self, key: str, length: int, off: int, end: int) -> bytes | None:
        h = key_hash(key)
        area = self._area(h)
        rel = rel_path(h)
        with self._lock:
            if not 0 <= length <= _SIZE_MASK:  # no such block is ever cached
                self.misses += 1
                return None
            pending = area.pending.get(key)
            if pending is not None and len(pending) == length:  # not written yet: from memory
                self.hits += 1
                return pending if off == 0 and end == length else pending[off:end]
            staged = key in area.staged
            v = area.index.get(h)
            if (
                not staged and v is None and area.scanned
            ) or area.read_disabled_until > time.monotonic():
                self.misses += 1
                return None
        paths = [os.path.join(area.raw, rel)]
        if staged:  # from staging; from the cache if it was unstaged meanwhile
            paths.insert(0, os.path.join(area.staging, rel))
        for path in paths:
            try:
                return self._read_file(area, h, key, path, (length, off, end))
            except FileNotFoundError:
                continue
        with self._lock:
            self.misses += 1
            if v is not None and area.index.get(h) == v:  # indexed but gone: fix the count
                self._forget_locked(area, h)
        return None

    def _read_file(
        self, area: _Area, h: int, key: str, path: str, want: tuple[int, int, int] | None
    ) -> bytes | None:
        """Read and verify one file: the data, or None (corrupt or unreadable: counted and
        logged). ``want`` is (length, off, end) for a cache read (counted as a hit or a miss),
        or None for ``read_staged``: the whole block, of the length its header gives.
        ``FileNotFoundError`` passes through."""
        staging = path.startswith(area.staging + os.sep)
        lookup = want is not None
        kept: _OpenFile | None = None
        try:
            if lookup and not staging:
                kept = self._open_kept(area, h, path)
                fd = kept.fd
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            self._read_failed(area, path, e, lookup)
            return None
        try:
            if want is None:
                length = _peek(fd)[1]
                want = (length, 0, length)
            length, off, end = want
            kb = key.encode()
            head: Head | None = None
            if off != 0 or end != length:
                with self._lock:
                    head = self._heads.get(h)
                if head is None:
                    head = _read_head(fd, kb, length, self.segment_size)
                    with self._lock:
                        self._heads[h] = head
                        while len(self._heads) > HEAD_CACHE:
                            self._heads.popitem(last=False)
            data, size = read_block(fd, kb, length, off, end, self.segment_size, head)
        except CorruptBlock as e:
            with self._lock:
                self._heads.pop(h, None)
            self._drop_corrupt(area, h, key, path, staging, str(e), lookup)
            return None
        except OSError as e:
            with self._lock:
                self._forget_fd_locked(h)
            self._read_failed(area, path, e, lookup)
            return None
        finally:
            if kept is not None:
                self._release_kept(kept)
            else:
                os.close(fd)
        with self._lock:
            if lookup:
                self.hits += 1
            area.read_failures = 0
            if not staging:
                v = area.index.get(h)
                if v is not None:
                    area.index[h] = self._touch_locked(v)
                elif not area.scanned and h not in area.scan_removed:
                    area.index[h] = self._touch_locked(size)  # found before the scan did
                    area.keys.append(h)
                    area.indexed_bytes += size
        return data

    def _read_failed(self, area: _Area, path: str, e: OSError, lookup: bool) -> None:
        if lookup:
            with self._lock:
                self.misses += 1
        self._count_failure(area, "read", path, e)

    def _drop_corrupt(
        self, area: _Area, h: int, key: str, path: str, staging: bool, why: str, lookup: bool
    ) -> None:
        _unlink(path)
        with self._lock:
            self.corrupt += 1
            if lookup:
                self.misses += 1
            if staging:
                size = area.staged.pop(key, None)
                if size is not None:
                    area.staged_bytes -= size
                    area.free_est += area.usage(size)
            else:
                self._forget_locked(area, h)
        if staging:
            log.error("disk cache: removed corrupt staged block %s (%s): %s", path, key, why)
        else:
            log.warning("disk cache: removed corrupt block %s (%s): %s", path, key, why)

    def _open_kept(self, area: _Area, h: int, path: str) -> _OpenFile:
        """A read's descriptor of a cached block file, from ``FD_CACHE`` or opened (and kept
        while the block stays indexed). Give it back with ``_release_kept``."""
        with self._lock:
            f = self._fds.get(h)
            if f is not None:
                f.refs += 1
                self._fds.move_to_end(h)
                return f
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            f = self._fds.get(h)
            if f is not None:  # another read opened it meanwhile
                os.close(fd)
                f.refs += 1
                return f
            f = _OpenFile(fd, refs=1)
            if self._closed or (area.scanned and h not in area.index):
                f.dropped = True  # evicted meanwhile (or closing): not kept
                return f
            self._fds[h] = f
            while len(self._fds) > FD_CACHE:
                self._drop_fd_locked(self._fds.popitem(last=False)[1])
            return f

    def _release_kept(self, f: _OpenFile) -> None:
        with self._lock:
            f.refs -= 1
            if f.dropped and f.refs == 0:
                os.close(f.fd)

    def _drop_fd_locked(self, f: _OpenFile) -> None:
        """Close ``f`` now or, while a read uses it, when that read gives it back (a number
        closed under a reader could be reused by another file)."""
        f.dropped = True
        if f.refs == 0:
            os.close(f.fd)

    def _forget_fd_locked(self, h: int) -> None:
        f = self._fds.pop(h, None)
        if f is not None:
            self._drop_fd_locked(f)

    def _forget_locked(self, area: _Area, h: int) -> bool:
        """Drop ``h`` from the index (the caller removes the file). True if it was there."""
        self._heads.pop(h, None)
        self._forget_fd_locked(h)  # an evicted file's space is freed once it is closed
        if not area.scanned:
            area.scan_removed.add(h)
        v = area.index.pop(h, None)
        if v is None:
            return False
        size = v & _SIZE_MASK
        area.indexed_bytes -= size
        area.free_est += area.usage(size)
        return True

    # --- internals: writes and eviction -----------------------------------------------------

    def _store(self, area: _Area, key: str, data: bytes, *, staging: bool) -> bool:
        """Write one block file (cached or staged); False when it was not stored."""
        kb = key.encode()
        h = key_hash(key)
        size = file_size(len(kb), len(data), self.segment_size)
        now = time.monotonic()
        if size > _SIZE_MASK or len(kb) > 0xFFFF or area.write_disabled_until > now:
            with self._lock:
                self.skipped_puts += 1
            return False
        self._check_space(area)
        job = (staging, h)
        with self._lock:
            if key in area.staged:
                return True
            if not staging and h in area.index:
                area.index[h] = self._touch_locked(area.index[h])
                return True
            if job in area.writing or h in area.removing:
                return False  # the same file is being written or removed right now
            victims = self._make_room_locked(area, size)
            if victims is None:
                self.skipped_puts += 1
                return False
            area.writing.add(job)
            area.inflight += size
            area.free_est -= area.usage(size)
            area.written_since_check += size
        self._remove_files(area, victims)
        base = area.staging if staging else area.raw
        path = os.path.join(base, rel_path(h))
        try:
            self._write_file(base, path, encode_head(kb, data, self.segment_size), data, staging)
        except OSError as e:
            with self._lock:
                area.writing.discard(job)
                area.doomed.discard(h)
                area.inflight -= size
                area.free_est += area.usage(size)
                if e.errno == errno.ENOSPC:
                    area.free_est = 0
                    area.next_space_check = 0.0
            self._count_failure(area, "write", path, e)
            return False
        with self._lock:
            area.writing.discard(job)
            area.inflight -= size
            area.write_failures = 0
            doomed = not staging and h in area.doomed
            if doomed:  # discarded while it was written
                area.doomed.discard(h)
                area.removing.add(h)
                area.free_est += area.usage(size)
            elif staging:
                area.staged[key] = size
                area.staged_bytes += size
            else:
                old = area.index.get(h)  # indexed by the scan or a read since the rename
                if old is None:
                    area.keys.append(h)
                else:
                    area.indexed_bytes -= old & _SIZE_MASK
                area.index[h] = self._touch_locked(size)
                area.indexed_bytes += size
        if doomed:
            self._remove_files(area, [h])
            return False
        return True

    def _write_file(self, base: str, path: str, head: bytes, data: bytes, durable: bool) -> None:
        """Temporary file + rename; ``durable``: fsync the file, then its directory (and the
        directories created for it)."""
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{self._token}-{next(self._seq)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            if durable:  # the new directories must survive a crash too
                _fsync_dir(os.path.dirname(folder))
                _fsync_dir(base)
            fd = os.open(tmp, flags, 0o600)
        try:
            try:
                _write_all(fd, head, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        if durable:
            _fsync_dir(folder)

    def _make_room_locked(
        self, area: _Area, size: int, *, best_effort: bool = False
    ) -> list[int] | None:
        """Evict from the index until ``size`` more bytes fit within the capacity and the
        free-space floor. Returns the hashes whose files to remove, or None (nothing evicted)
        when even an empty index would not make room, unless ``best_effort``: then it
        evicts all it can."""
        over = area.used + size - area.capacity
        short = area.min_free + area.usage(size) - area.free_est
        if over <= 0 and short <= 0:
            return []
        if not best_effort and (
            over > area.indexed_bytes or short > area.indexed_bytes + area.block * len(area.index)
        ):
            return None
        victims: list[int] = []
        while (over > 0 or short > 0) and area.index:
            h = self._pick_victim_locked(area)
            n = area.index[h] & _SIZE_MASK
            self._forget_locked(area, h)
            self.evictions += 1
            area.removing.add(h)
            victims.append(h)
            over -= n
            short -= area.usage(n)
        return victims

    def _pick_victim_locked(self, area: _Area) -> int:
        if len(area.keys) > 2 * len(area.index) + SAMPLE:  # mostly stale: rebuild
            area.keys = list(area.index)
        h = pick_victim(area.index, area.keys)
        if h is None:  # only stale hashes drawn
            area.keys = list(area.index)
            h = pick_victim(area.index, area.keys)
        assert h is not None
        return h

    def _remove_files(self, area: _Area, victims: list[int]) -> None:
        """Unlink the files of hashes the caller put in ``area.removing``."""
        for h in victims:
            err = _unlink(os.path.join(area.raw, rel_path(h)))
            if err is not None:
                self._count_failure(area, "write", area.raw, err)
        if victims:
            with self._lock:
                area.removing.difference_update(victims)

    def _check_space(self, area: _Area, *, force: bool = False) -> None:
        """Refresh the free-space figures from ``statvfs`` when they are due."""
        now = time.monotonic()
        if (
            not force
            and now < area.next_space_check
            and (area.written_since_check < area.check_every)
        ):
            return
        try:
            st = os.statvfs(area.base)
        except OSError:
            with self._lock:
                area.next_space_check = now + SPACE_CHECK_S
            return
        total = st.f_blocks * st.f_frsize
        with self._lock:
            area.min_free = int(total * self.free_ratio)
            area.free_est = st.f_bavail * st.f_frsize - area.inflight  # not on disk yet
            area.block = st.f_bsize or 4096
            area.check_every = max(total // 256, 1)
            area.written_since_check = 0
            area.next_space_check = now + SPACE_CHECK_S

    # --- internals: failures --------------------------------------------------------------

    def _count_failure(self, area: _Area, kind: str, path: str, e: OSError) -> None:
        """Count a failed ``kind`` ("read" or "write") operation; after ``FAIL_LIMIT`` in a
        row the directory is skipped for that kind of operation for ``retry_after_s``."""
        disabled = False
        with self._lock:
            self.errors += 1
            if kind == "read":
                area.read_failures += 1
                if area.read_failures >= FAIL_LIMIT:
                    area.read_failures = 0
                    area.read_disabled_until = time.monotonic() + self.retry_after_s
                    disabled = True
            else:
                area.write_failures += 1
                if area.write_failures >= FAIL_LIMIT:
                    area.write_failures = 0
                    area.write_disabled_until = time.monotonic() + self.retry_after_s
                    disabled = True
        if disabled:
            log.warning(
                "disk cache: %s failures in %s (the last: %s); no %ss there for %.0f s",
                kind,
                area.base,
                e,
                kind,
                self.retry_after_s,
            )
        else:
            self._log_limited(area, kind, "disk cache: %s %s failed: %s", kind, path, e)

    def _log_limited(self, area: _Area, kind: str, msg: str, *args: object) -> None:
        """Log a warning at most every ``LOG_EVERY_S`` per directory and kind of failure,
        saying how many were left out."""
        now = time.monotonic()
        slot = (area.no, kind)
        with self._lock:
            if now - self._last_log.get(slot, -LOG_EVERY_S) < LOG_EVERY_S:
                self._suppressed[slot] = self._suppressed.get(slot, 0) + 1
                return
            self._last_log[slot] = now
            left_out = self._suppressed.pop(slot, 0)
        if left_out:
            msg += f" ({left_out} more since the last report)"
        log.warning(msg, *args)

    # --- internals: background threads ---------------------------------------------------

    def _writer(self, area: _Area) -> None:
        """Write queued puts; when idle, keep the directory within its space limits."""
        while True:
            with self._lock:
                if not area.pending and not self._closed:
                    area.cond.wait(SPACE_CHECK_S)
                if self._closed and (not area.pending or time.monotonic() > self._close_deadline):
                    self._drop_pending_locked(area)
                    return
                item = area.pending.popitem(last=False) if area.pending else None
            if item is None:
                self._maintain(area)
                continue
            key, data = item
            try:
                self._store(area, key, data, staging=False)
            except Exception:
                log.exception("disk cache: writing %s failed", key)
            finally:
                with self._lock:
                    self._pending_bytes -= len(data)

    def _drop_pending_locked(self, area: _Area) -> None:
        self.dropped_puts += len(area.pending)
        self._pending_bytes -= sum(len(d) for d in area.pending.values())
        area.pending.clear()

    def _maintain(self, area: _Area) -> None:
        """Evict what is over the limits: the disk filled up from elsewhere, or the scan
        found more than the capacity (a smaller cache size than last time)."""
        try:
            self._check_space(area)
            with self._lock:
                victims = self._make_room_locked(area, 0, best_effort=True) or []
            self._remove_files(area, victims)
        except Exception:
            log.exception("disk cache: maintenance of %s failed", area.base)

    # --- internals: startup scan -------------------------------------------------------------

    def _leaf_dirs(self, top: str) -> Iterator[tuple[int, str]]:
        """(top 12 bits of the hash, path) of every ``XX/YY`` directory below ``top``."""
        for first in _subdirs(top):
            for second in _subdirs(first[1]):
                yield first[0] << _FANOUT_BITS | second[0], second[1]

    def _is_stale_temp(self, name: str) -> bool:
        """A temporary file of another instance: left by a crash (the directory is used by
        one process at a time), so it can go."""
        return name.startswith(".") and name.endswith(".tmp") and f".{self._token}-" not in name

    def _parse_name(self, prefix: int, name: str) -> int | None:
        """The hash a block file name stands for; None if it is no block file name or the
        file is in the wrong subdirectory."""
        if len(name) != 15:
            return None
        try:
            h = int(name, 16)
        except ValueError:
            return None
        return h if h >> 48 == prefix else None

    def _load_staging(self, area: _Area) -> None:
        """Find the staged blocks an earlier run left (their keys come from the headers)."""
        for prefix, leaf in self._leaf_dirs(area.staging):
            for entry in _entries(leaf):
                name = entry.name
                if self._is_stale_temp(name):
                    _unlink(entry.path)
                    continue
                h = self._parse_name(prefix, name)
                if h is None:
                    continue
                if h % len(self._areas) != area.no:  # the list of directories changed
                    self._move_staged(area, entry.path)
                    continue
                try:
                    key = read_file_key(entry.path)
                    if key_hash(key) != h:
                        raise CorruptBlock("file holds another key")
                    size = entry.stat(follow_symlinks=False).st_size
                except CorruptBlock as e:
                    _unlink(entry.path)
                    with self._lock:
                        self.corrupt += 1
                    log.error("disk cache: removed corrupt staged block %s: %s", entry.path, e)
                    continue
                except OSError as e:
                    self._count_failure(area, "read", entry.path, e)
                    continue
                with self._lock:
                    if key not in area.staged:
                        area.staged[key] = size
                        area.staged_bytes += size

    def _move_staged(self, area: _Area, path: str) -> None:
        """Stage again, in the directory that now owns it, a staged block found in another
        one (the cache directories changed while blocks waited for upload)."""
        try:
            key = read_file_key(path)
            owner = self._area(key_hash(key))
            with open(path, "rb") as f:
                fd = f.fileno()
                length = _peek(fd)[1]
                data, _ = read_block(fd, key.encode(), length, 0, length, self.segment_size)
        except CorruptBlock as e:
            _unlink(path)
            with self._lock:
                self.corrupt += 1
            log.error("disk cache: removed corrupt staged block %s: %s", path, e)
            return
        except OSError as e:
            self._count_failure(area, "read", path, e)
            return
        if owner is area or not self._store(owner, key, data, staging=True):
            log.error(
                "disk cache: staged block %s (%s) could not be moved to %s; it stays there "
                "and is not uploaded until the cache directories are as before",
                path,
                key,
                owner.staging,
            )
            return
        _unlink(path)

    def _scan(self) -> None:
        for area in self._areas:
            if self._stop.is_set():
                return
            try:
                if not self._scan_area(area):
                    return  # closing
            except Exception:
                log.exception(
                    "disk cache: scanning %s failed; blocks not found by it are "
                    "still read, but not counted or evicted",
                    area.raw,
                )
                continue
            with self._lock:
                area.scanned = True
                area.scan_removed.clear()
            self._maintain(area)

    def _scan_area(self, area: _Area) -> bool:
        """Index the cached files of one directory, a leaf directory at a time; remove the
        temporary files of crashed writers and files in the wrong place. False if stopped."""
        now_s = int(time.time()) - _EPOCH_S
        for prefix, leaf in self._leaf_dirs(area.raw):
            if self._stop.is_set():
                return False
            found: list[tuple[int, int, int]] = []
            for entry in _entries(leaf):
                name = entry.name
                if name[0] == ".":
                    if self._is_stale_temp(name):
                        _unlink(entry.path)
                    continue
                h = self._parse_name(prefix, name)
                if h is None or h % len(self._areas) != area.no:
                    if len(name) == 15:  # the list of directories changed: never found here
                        _unlink(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not HEAD_SIZE <= st.st_size <= _SIZE_MASK:
                    _unlink(entry.path)
                    continue
                found.append((h, st.st_size, min(int(st.st_mtime) - _EPOCH_S, now_s)))
            if not found:
                continue
            with self._lock:
                index, removed = area.index, area.scan_removed
                added = 0
                for h, size, atime in found:
                    if h in index or h in removed:
                        continue
                    index[h] = max(atime, 0) << SIZE_BITS | size
                    area.keys.append(h)
                    added += size
                area.indexed_bytes += added
                over = area.used > area.capacity
            if over:
                self._maintain(area)
        return True


def _subdirs(top: str) -> Iterator[tuple[int, str]]:
    """(number, path) of the ``00``..``3f`` subdirectories of ``top``."""
    for entry in _entries(top):
        name = entry.name
        if len(name) == 2:
            try:
                n = int(name, 16)
            except ValueError:
                continue
            if n < 1 << _FANOUT_BITS and entry.is_dir(follow_symlinks=False):
                yield n, entry.path


def _entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []
