"""The data path's building blocks: memory budget, single-flight, worker pool, block cache,
slice-list cache and sequential-read detection."""

from __future__ import annotations

import threading
import time

import pytest

from loftfs.chunk.budget import MemoryBudget
from loftfs.chunk.cache_mem import MemBlockCache
from loftfs.chunk.pool import WorkerPool
from loftfs.chunk.prefetch import ReadState
from loftfs.chunk.reader import SliceCache
from loftfs.chunk.singleflight import SingleFlight
from loftfs.meta.types import Slice

# --- memory budget ------------------------------------------------------------------------


def test_budget_blocks_until_released() -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(60)
    assert not budget.try_acquire(50)
    got = threading.Event()

    def waiter() -> None:
        budget.acquire(50)
        got.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not got.wait(0.1)
    budget.release(60)
    assert got.wait(5)
    t.join()
    assert budget.used == 50
    assert budget.peak == 60


def test_budget_timeout_and_oversize() -> None:
    budget = MemoryBudget(100)
    budget.acquire(100)
    assert not budget.acquire(1, timeout=0.05)
    budget.release(100)
    assert budget.acquire(500)  # bigger than everything: granted when nothing else is held
    assert not budget.try_acquire(1)
    budget.release(500)
    assert budget.used == 0
    with pytest.raises(AssertionError):
        budget.release(1)


def test_budget_reclaims_from_cache() -> None:
    budget = MemoryBudget(100)
    cache = MemBlockCache(budget, 100)
    for i in range(5):
        assert cache.put(f"k{i}", bytes(20))
    assert budget.used == 100
    assert budget.acquire(30, timeout=1)  # the cache gives up its oldest blocks
    assert "k0" not in cache and "k1" not in cache and "k4" in cache
    assert budget.used == 30 + cache.size <= 100


def test_cache_lru_and_capacity() -> None:
    budget = MemoryBudget(1000)
    cache = MemBlockCache(budget, 50)
    cache.put("a", bytes(20))
    cache.put("b", bytes(20))
    assert cache.get("a") is not None  # a is now the newest
    cache.put("c", bytes(20))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert not cache.put("huge", bytes(51))
    assert cache.size == 40 == budget.used
    cache.discard("a")
    cache.clear()
    assert budget.used == 0 and len(cache) == 0


def test_cache_does_not_cache_when_writers_hold_the_budget() -> None:
    budget = MemoryBudget(100)
    cache = MemBlockCache(budget, 100)
    budget.acquire(90)
    assert not cache.put("k", bytes(20))
    assert budget.used == 90


# --- single flight, pool ------------------------------------------------------------------


def test_single_flight_shares_one_call() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    started = threading.Event()
    release = threading.Event()

    def slow() -> int:
        nonlocal calls
        calls += 1
        started.set()
        release.wait(5)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(flight.do("k", slow)))]
    threads[0].start()
    started.wait(5)
    threads += [
        threading.Thread(target=lambda: results.append(flight.do("k", slow))) for _ in range(4)
    ]
    for t in threads[1:]:
        t.start()
    time.sleep(0.05)
    assert flight.in_flight("k")
    release.set()
    for t in threads:
        t.join()
    assert results == [42] * 5 and calls == 1
    assert not flight.in_flight("k")


def test_single_flight_shares_errors() -> None:
    flight: SingleFlight[int] = SingleFlight()

    def boom() -> int:
        raise ValueError("x")

    with pytest.raises(ValueError):
        flight.do("k", boom)
    assert flight.do("k", lambda: 1) == 1  # failures are not remembered


def test_worker_pool() -> None:
    pool = WorkerPool("test", 3)
    running = 0
    peak = 0
    lock = threading.Lock()

    def work(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return x * 2

    futures = [pool.submit(work, i) for i in range(12)]
    assert [f.result(5) for f in futures] == [i * 2 for i in range(12)]
    assert peak <= 3
    failing = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(work, 1)
    assert all(not t.is_alive() for t in threading.enumerate() if t.name.startswith("test-"))


# --- slice cache --------------------------------------------------------------------------


def test_slice_cache_invalidation_races() -> None:
    cache = SliceCache(capacity=3)
    s = [Slice(0, 1, 10, 0, 10)]
    token = cache.begin(5, 0)
    cache.invalidate(5)  # a commit happened while the list was being read
    cache.put(token, s)
    assert cache.get(5, 0) is None
    token = cache.begin(5, 0)
    cache.invalidate_chunk(5, 1)  # another chunk: irrelevant
    cache.put(token, s)
    assert cache.get(5, 0) == s
    cache.invalidate_chunk(5, 0)
    assert cache.get(5, 0) is None
    for i in range(5):
        cache.put(cache.begin(i, 0), s)
    assert cache.get(0, 0) is None and cache.get(4, 0) == s  # LRU bound
    cache.invalidate(4)
    assert cache.get(4, 0) is None


# --- sequential detection -----------------------------------------------------------------


def test_read_state_window_grows_on_sequential_reads() -> None:
    state = ReadState()
    bs = 1 << 20
    ahead = state.advance(0, 128 << 10, 100 * bs, bs, 8)
    assert ahead == (128 << 10, (128 << 10) + bs)
    windows = []
    off = 128 << 10
    for _ in range(6):
        state.advance(off, off + (128 << 10), 100 * bs, bs, 8)
        windows.append(state.window)
        off += 128 << 10
    assert windows == [2, 4, 8, 8, 8, 8]


def test_read_state_random_reads_get_no_readahead() -> None:
    state = ReadState()
    bs = 1 << 20
    assert state.advance(50 * bs, 50 * bs + 4096, 100 * bs, bs, 8) is None
    assert state.advance(7 * bs, 7 * bs + 4096, 100 * bs, bs, 8) is None
    assert state.advance(90 * bs, 90 * bs + 4096, 100 * bs, bs, 8) is None
    assert state.window == 0


def test_read_state_stops_at_end_of_file_and_when_disabled() -> None:
    state = ReadState()
    assert state.advance(0, 100, 150, 1 << 20, 8) == (100, 150)
    assert state.advance(100, 150, 150, 1 << 20, 8) is None
    assert ReadState().advance(0, 100, 1 << 30, 1 << 20, 0) is None
