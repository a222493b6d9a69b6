"""Fault injection for tests: make any store fail, truncate or stall at a chosen rate, so the
data path's error handling is exercised against the real code paths users run."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Collection, Iterable, Iterator

from loftfs.errors import ObjectTransientError
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper

ALL_OPS = frozenset({"get", "put", "delete", "head", "list"})


class FaultInjectingStore(ObjectStoreWrapper):
    """Before each operation named in ``ops``: sleep ``delay_s``, then raise
    ``ObjectTransientError`` with probability ``error_rate``. A ``get`` that succeeds returns a
    truncated body with probability ``truncate_rate``. ``seed`` makes a run reproducible.
    The rates are plain attributes and may be changed while the store is in use."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        error_rate: float = 0.0,
        delay_s: float = 0.0,
        truncate_rate: float = 0.0,
        seed: int | None = None,
        ops: Collection[str] = ALL_OPS,
    ) -> None:
        super().__init__(inner)
        unknown = set(ops) - ALL_OPS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)} (known: {sorted(ALL_OPS)})")
        self.error_rate = error_rate
        self.delay_s = delay_s
        self.truncate_rate = truncate_rate
        self.ops = frozenset(ops)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.errors_injected = 0
        self.truncations_injected = 0

    def describe(self) -> str:
        return f"{self.inner.describe()} (fault injection)"

    def _roll(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def _before(self, op: str, key: str) -> None:
        if op not in self.ops:
            return
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if self._roll(self.error_rate):
            with self._lock:
                self.errors_injected += 1
            raise ObjectTransientError(f"injected fault: {op} {key!r}")

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        self._before("get", key)
        return self._maybe_truncated(self.inner.get(key, offset, limit))

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        self._before("get", key)
        return self._maybe_truncated(self.inner.get_checked(key, etag, offset, limit))

    def _maybe_truncated(self, data: bytes) -> bytes:
        if "get" in self.ops and data and self._roll(self.truncate_rate):
            with self._lock:
                self.truncations_injected += 1
                cut = self._rng.randrange(len(data))
            return data[:cut]
        return data

    def put(self, key: str, data: bytes) -> None:
        self._before("put", key)
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self._before("delete", key)
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def head(self, key: str) -> ObjectInfo:
        self._before("head", key)
        return self.inner.head(key)

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        self._before("list", prefix)
        return self.inner.list(prefix, start_after, delimiter, limit)
