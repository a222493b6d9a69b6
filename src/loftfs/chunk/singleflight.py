"""Single-flight: concurrent requests for one key share one execution (one block download for
many readers of a cold block)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """``do(key, fn)`` runs ``fn`` unless a call for ``key`` is already running, in which case
    it waits for that call and returns its result (or raises its exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        with self._lock:
            fut = self._calls.get(key)
            leader = fut is None
            if fut is None:
                fut = self._calls[key] = Future()
        if not leader:
            return fut.result()
        try:
            result = fn()
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]

    def in_flight(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._calls
