"""The object store as the data path sees it: the volume's store with the local disk cache and
write-back in front (DESIGN 2.3).

Writers, compaction and gc talk to this wrapper like to any ``ObjectStore``:

- ``put`` stages the block for write-back when that is on (and the disk can take it), else
  uploads it and then caches it on disk when it is smaller than a full block (small files and
  the tails of large ones, which are read back most often). Full blocks of large sequential
  writes are not cached on write: writing them twice to local disks halved the write
  throughput of a 1 GiB file (bench/suite.py), and a reader finds them in the page cache or
  caches them on its first read;
- ``get`` of a whole block is served from the disk cache (staged blocks included) when it is
  there; a miss is fetched from the store and cached on disk asynchronously;
- ``delete``/``delete_many`` drop the blocks from the cache and from the write-back queue
  first, so a deleted file's block is never uploaded after its deletion.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from loftfs.chunk.cache_disk import DiskCache
from loftfs.chunk.layout import block_length
from loftfs.chunk.writeback import WriteBack
from loftfs.errors import ObjectCorrupted
from loftfs.object.interface import ObjectStore, ObjectStoreWrapper

log = logging.getLogger(__name__)


class CachedBlockStore(ObjectStoreWrapper):
    def __init__(
        self,
        inner: ObjectStore,
        disk: DiskCache | None,
        writeback: WriteBack | None,
        block_size: int,
    ) -> None:
        super().__init__(inner)
        self.disk = disk
        self.writeback = writeback
        self.block_size = block_size

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        length = block_length(key)
        if self.disk is None or offset != 0 or limit != -1 or length <= 0:
            return self.inner.get(key, offset, limit)
        data = self.disk.get(key, length)
        if data is not None:
            return data
        data = self.inner.get(key)
        if len(data) == length:  # a wrong length is the fetcher's to report, never cached
            self.disk.put(key, data)
        return data

    def prewarm(self, key: str) -> bool:
        """Start reading a block of the disk cache into memory (``DiskCache.prewarm``); False
        when the disk cache does not hold it."""
        length = block_length(key)
        return self.disk is not None and length > 0 and self.disk.prewarm(key, length)

    def get_cached_range(self, key: str, offset: int, size: int) -> bytes | None:
        """``size`` bytes at ``offset`` of a block from the disk cache only; None on a miss."""
        length = block_length(key)
        if self.disk is None or length <= 0:
            return None
        return self.disk.get_range(key, length, offset, size)

    def warm_block(self, key: str, length: int) -> None:
        """Fetch a block into the disk cache (warmup), bypassing the memory cache so that hot
        blocks stay there. ``ObjectCorrupted`` when the object has the wrong length."""
        data = self.inner.get(key)
        if len(data) != length:
            raise ObjectCorrupted(f"block {key}: {len(data)} bytes, expected {length}")
        if self.disk is not None and not self.disk.put_sync(key, data):
            log.warning("warmup: block %s could not be stored in the disk cache", key)

    def put(self, key: str, data: bytes) -> None:
        if self.writeback is not None and self.writeback.stage(key, data):
            return
        self.inner.put(key, data)
        if self.disk is not None and len(data) < self.block_size:
            self.disk.put(key, data)

    def _forget(self, keys: list[str]) -> None:
        if self.writeback is not None:
            self.writeback.forget(keys)
        if self.disk is not None:
            for key in keys:
                self.disk.discard(key)

    def delete(self, key: str) -> None:
        self._forget([key])
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        self._forget(batch)
        self.inner.delete_many(batch)
