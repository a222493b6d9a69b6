"""Retries with exponential backoff and jitter, as a wrapper: only ``ObjectTransientError`` is
retried (timeouts, throttling, 5xx); other errors are answers, not accidents."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from loftfs.errors import ObjectTransientError
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryStore(ObjectStoreWrapper):
    """Up to ``attempts`` tries per operation, sleeping ``backoff_s * 2**n`` (capped at
    ``max_backoff_s``, with jitter) between them. A listing interrupted half-way resumes after
    the last entry it returned."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        attempts: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        super().__init__(inner)
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def _sleep(self, attempt: int) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        time.sleep(delay * (0.5 + random.random() / 2))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except ObjectTransientError as e:
                if attempt + 1 >= self.attempts:
                    raise
                log.debug("%s failed (%s), retrying", what, e)
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key, offset, limit))

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get_checked(key, etag, offset, limit))

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", lambda: self.inner.put(key, data))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        self._call("delete_many", lambda: self.inner.delete_many(batch))

    def head(self, key: str) -> ObjectInfo:
        return self._call(f"head {key}", lambda: self.inner.head(key))

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        after, returned, failures, progress_mark = start_after, 0, 0, 0
        while True:
            remaining = limit - returned if limit else 0
            try:
                for info in self.inner.list(prefix, after, delimiter, remaining):
                    yield info
                    after = info.key
                    returned += 1
                return
            except ObjectTransientError as e:
                # count consecutive failures only: a long listing may hit several
                failures = 1 if returned > progress_mark else failures + 1
                progress_mark = returned
                if failures >= self.attempts:
                    raise
                log.debug("list %s failed (%s), resuming after %r", prefix, e, after)
                self._sleep(failures - 1)
