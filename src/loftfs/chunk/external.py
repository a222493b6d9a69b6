"""Reads of external slices: imported data read in place from its source bucket.

An external slice (``KIND_EXTERNAL``) is read like a native one: the reader cuts it into
blocks of the volume's block size and asks for them by key, through the same memory cache,
disk cache, single-flight and readahead. Only the keys differ
(``<uuid>/ext/<record id>_<block index>_<length>``, never stored anywhere) and so does the
place a missing block comes from: ``ExternalReads``, under the disk cache, turns such a key into
a ranged GET of the source object the record names, checked against the version recorded at
import (so bytes of two versions of an object are never mixed, and a changed or deleted object
reads as an error with a line that says so). Records never change, so cached blocks of
external data are as coherent as native ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from loftfs.errors import ObjectChanged, ObjectNotFound, ObjectStoreError
from loftfs.meta.interface import Meta
from loftfs.meta.types import ExtObject
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper
from loftfs.sources import SourceStores

RECORD_CACHE = 100_000  # external records kept in memory (about 200 bytes each)
_MARK = "/ext/"


def ext_block_key(volume_uuid: str, ext_id: int, index: int, length: int) -> str:
    """Cache key of block ``index`` (``length`` bytes) of external record ``ext_id``."""
    return f"{volume_uuid}{_MARK}{ext_id}_{index}_{length}"


def parse_ext_key(key: str) -> tuple[int, int, int] | None:
    """(record id, block index, length) of an ``ext_block_key``; None for any other key."""
    cut = key.find(_MARK)
    if cut < 0:
        return None
    try:
        ext_id, index, length = key[cut + len(_MARK) :].split("_")
        return int(ext_id), int(index), int(length)
    except ValueError:
        return None


class ExternalReads(ObjectStoreWrapper):
    """The volume's store, with the blocks of external slices read from their sources.

    Nothing is ever written to or deleted from a source through it: a ``put`` of an external
    key is refused and a ``delete`` is a no-op (the GC drops records, not source objects)."""

    def __init__(
        self, inner: ObjectStore, meta: Meta, sources: SourceStores, block_size: int
    ) -> None:
        super().__init__(inner)
        self.meta = meta
        self.sources = sources
        self.block_size = block_size
        self._lock = threading.Lock()
        self._records: OrderedDict[int, ExtObject] = OrderedDict()
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.changed = 0

    def figures(self) -> dict[str, int | float]:
        """For ``Metrics.register_source``: GETs sent to sources, bytes received, failures,
        and reads refused because the source object changed or vanished."""
        return {
            "requests_total": self.requests,
            "bytes_total": self.bytes,
            "errors_total": self.errors,
            "changed_total": self.changed,
        }

    def _count(
        self, *, requests: int = 0, nbytes: int = 0, errors: int = 0, changed: int = 0
    ) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.errors += errors
            self.changed += changed

    def record(self, ext_id: int) -> ExtObject:
        with self._lock:
            rec = self._records.get(ext_id)
            if rec is not None:
                self._records.move_to_end(ext_id)
                return rec
        found = self.meta.get_ext([ext_id]).get(ext_id)
        if found is None:
            raise ObjectStoreError(f"external slice {ext_id} has no record in the metadata")
        with self._lock:
            self._records[ext_id] = found
            while len(self._records) > RECORD_CACHE:
                self._records.popitem(last=False)
        return found

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        parsed = parse_ext_key(key)
        if parsed is None:
            return self.inner.get(key, offset, limit)
        ext_id, index, length = parsed
        rec = self.record(ext_id)
        start = index * self.block_size + offset
        if offset < 0 or start + max(0, length - offset) > rec.length:
            raise ObjectStoreError(f"block {key} lies outside external record {ext_id}")
        want = length - offset if limit < 0 else min(limit, length - offset)
        source, store = self.sources.get(rec.source)
        where = f"source {source.name!r} object {rec.key!r}"
        self._count(requests=1)
        try:
            data = store.get_checked(rec.key, rec.etag, rec.offset + start, want)
        except ObjectNotFound:
            self._count(errors=1, changed=1)
            raise ObjectChanged(
                f"{where} was deleted after it was imported: the file cannot be read "
                "(`loft import` again reports it as vanished)"
            ) from None
        except ObjectChanged as e:
            self._count(errors=1, changed=1)
            raise ObjectChanged(
                f"{where} changed after it was imported ({e}); its data is not mixed with the "
                "new version: run `loft import` again to refresh the file"
            ) from None
        except ObjectStoreError:
            self._count(errors=1)
            raise
        self._count(nbytes=len(data))
        if len(data) != want:
            self._count(changed=1)
            raise ObjectChanged(
                f"{where} is shorter than when it was imported ({len(data)} of {want} bytes "
                f"at {rec.offset + start}): run `loft import` again to refresh the file"
            )
        return data

    def put(self, key: str, data: bytes) -> None:
        if parse_ext_key(key) is not None:
            raise ObjectStoreError(f"{key}: external data is never written")
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        if parse_ext_key(key) is None:
            self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(k for k in keys if parse_ext_key(k) is None)

    def head(self, key: str) -> ObjectInfo:
        parsed = parse_ext_key(key)
        if parsed is None:
            return self.inner.head(key)
        return ObjectInfo(key=key, size=parsed[2])

    def close(self) -> None:
        self.sources.close()
        self.inner.close()
