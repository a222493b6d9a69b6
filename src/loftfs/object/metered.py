"""Request counts, failures, latency and bytes of an object store, as a wrapper feeding a
``Metrics``.

Where it sits in the stack decides what it measures. Right above the backend (below retries,
compression and encryption) it sees every request the store is sent, each retry included, and
the bytes as they travel; that is the position a mount uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from loftfs.errors import ObjectNotFound
from loftfs.metrics import Metrics
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper


class MeteredStore(ObjectStoreWrapper):
    """Records each call into ``metrics`` (``Metrics.observe_request``).

    A call that raises is a failure, except ``ObjectNotFound`` from ``head`` and ``delete``:
    "no such object" is what those are asked to find out. A ``get`` of a missing object is a
    failure (a block the metadata points to is gone). A listing is one request whose time is
    what the consumer waited for the store (its own work between entries is not counted).
    """

    def __init__(self, inner: ObjectStore, metrics: Metrics) -> None:
        super().__init__(inner)
        self.metrics = metrics

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        start = time.perf_counter()
        try:
            data = self.inner.get(key, offset, limit)
        except BaseException:
            self.metrics.observe_request("get", time.perf_counter() - start, True)
            raise
        self.metrics.observe_request("get", time.perf_counter() - start, False, len(data))
        return data

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        start = time.perf_counter()
        try:
            data = self.inner.get_checked(key, etag, offset, limit)
        except BaseException:
            self.metrics.observe_request("get", time.perf_counter() - start, True)
            raise
        self.metrics.observe_request("get", time.perf_counter() - start, False, len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        start = time.perf_counter()
        try:
            self.inner.put(key, data)
        except BaseException:
            self.metrics.observe_request("put", time.perf_counter() - start, True)
            raise
        self.metrics.observe_request("put", time.perf_counter() - start, False, len(data))

    def delete(self, key: str) -> None:
        start = time.perf_counter()
        failed = True
        try:
            self.inner.delete(key)
            failed = False
        except ObjectNotFound:
            failed = False
            raise
        finally:
            self.metrics.observe_request("delete", time.perf_counter() - start, failed)

    def delete_many(self, keys: Iterable[str]) -> None:
        start = time.perf_counter()
        failed = True
        try:
            self.inner.delete_many(keys)
            failed = False
        finally:
            self.metrics.observe_request("delete_many", time.perf_counter() - start, failed)

    def head(self, key: str) -> ObjectInfo:
        start = time.perf_counter()
        failed = True
        try:
            info = self.inner.head(key)
            failed = False
            return info
        except ObjectNotFound:
            failed = False
            raise
        finally:
            self.metrics.observe_request("head", time.perf_counter() - start, failed)

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        waited = 0.0
        failed = True
        try:
            start = time.perf_counter()
            entries = iter(self.inner.list(prefix, start_after, delimiter, limit))
            waited += time.perf_counter() - start
            while True:
                start = time.perf_counter()
                try:
                    info = next(entries)
                except StopIteration:
                    waited += time.perf_counter() - start
                    failed = False
                    return
                waited += time.perf_counter() - start
                yield info
        except GeneratorExit:  # the consumer stopped early: the listing did not fail
            failed = False
            raise
        finally:
            self.metrics.observe_request("list", waited, failed)
