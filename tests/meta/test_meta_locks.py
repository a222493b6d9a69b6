"""flock and POSIX byte-range locks: conflicts across owners and clients, split/merge."""

from __future__ import annotations

import errno
import itertools
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meta_helpers import ROOT, Backend, fs_error, mkfile

from loftfs.meta import Meta
from loftfs.meta.ops_ext import apply_range
from loftfs.meta.txn import PlockRange
from loftfs.meta.types import F_RDLCK, F_UNLCK, F_WRLCK, LOCK_EOF, ROOT_CTX

C = ROOT_CTX
UNLOCKED = (F_UNLCK, 0, 0, 0)


@pytest.fixture
def two(backend: Backend, meta: Meta) -> tuple[Meta, Meta, int]:
    other = backend.open()
    f = mkfile(meta, ROOT, b"f")
    return meta, other, f.inode


def test_flock(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.flock(C, ino, 1, F_RDLCK, False)
    a.flock(C, ino, 2, F_RDLCK, False)
    b.flock(C, ino, 1, F_RDLCK, False)  # shared locks coexist, across clients too
    with fs_error(errno.EAGAIN):
        b.flock(C, ino, 1, F_WRLCK, False)
    with fs_error(errno.EAGAIN):
        a.flock(C, ino, 3, F_WRLCK, False)
    a.flock(C, ino, 1, F_UNLCK, False)
    a.flock(C, ino, 2, F_UNLCK, False)
    b.flock(C, ino, 1, F_WRLCK, False)  # upgrade once alone
    with fs_error(errno.EAGAIN):
        a.flock(C, ino, 1, F_RDLCK, False)
    b.flock(C, ino, 1, F_RDLCK, False)  # downgrade
    a.flock(C, ino, 1, F_RDLCK, False)
    with fs_error(errno.EINVAL):
        a.flock(C, ino, 1, 7, False)
    with fs_error(errno.ENOENT):
        a.flock(C, 999_999, 1, F_RDLCK, False)


def test_flock_blocking(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.flock(C, ino, 1, F_WRLCK, False)
    granted = threading.Event()

    def waiter() -> None:
        b.flock(C, ino, 9, F_WRLCK, True)
        granted.set()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    assert not granted.is_set()
    a.flock(C, ino, 1, F_UNLCK, False)
    t.join(5)
    assert granted.is_set()
    with fs_error(errno.EAGAIN):
        a.flock(C, ino, 1, F_RDLCK, False)


def test_blocking_wait_ends_when_session_closes(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.flock(C, ino, 1, F_WRLCK, False)
    b.new_session({}, heartbeat_s=3600)
    errors: list[int] = []

    def waiter() -> None:
        try:
            b.flock(C, ino, 5, F_WRLCK, True)
        except Exception as e:
            errors.append(getattr(e, "errno", -1))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    b.close_session()
    t.join(5)
    assert errors == [errno.EINTR]


def test_release_drops_locks(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.open(C, ino, 0)
    a.flock(C, ino, 1, F_WRLCK, False)
    a.setlk(C, ino, 1, False, F_WRLCK, 0, 100, 7)
    a.release(ino)
    b.flock(C, ino, 1, F_WRLCK, False)
    assert b.getlk(C, ino, 1, F_WRLCK, 0, LOCK_EOF) == UNLOCKED


def test_posix_conflicts(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.setlk(C, ino, 1, False, F_WRLCK, 0, 99, 111)
    a.setlk(C, ino, 1, False, F_RDLCK, 200, LOCK_EOF, 111)
    assert b.getlk(C, ino, 1, F_RDLCK, 50, 60) == (F_WRLCK, 0, 99, 111)
    assert b.getlk(C, ino, 1, F_RDLCK, 100, 300) == UNLOCKED  # read vs read
    assert b.getlk(C, ino, 1, F_WRLCK, 100, 300) == (F_RDLCK, 200, LOCK_EOF, 111)
    assert a.getlk(C, ino, 1, F_WRLCK, 0, LOCK_EOF) == UNLOCKED  # own locks never conflict
    assert a.getlk(C, ino, 2, F_WRLCK, 0, 0) == (F_WRLCK, 0, 99, 111)  # other owner, same client
    with fs_error(errno.EAGAIN):
        b.setlk(C, ino, 1, False, F_RDLCK, 99, 99, 222)
    with fs_error(errno.EAGAIN):
        a.setlk(C, ino, 2, False, F_WRLCK, 500, 500, 333)
    b.setlk(C, ino, 1, False, F_RDLCK, 100, 1000, 222)
    b.setlk(C, ino, 1, False, F_UNLCK, 0, LOCK_EOF, 222)
    a.setlk(C, ino, 1, False, F_UNLCK, 50, 60, 111)  # split the write lock
    b.setlk(C, ino, 1, False, F_WRLCK, 50, 60, 222)
    assert a.getlk(C, ino, 9, F_RDLCK, 0, 49) == (F_WRLCK, 0, 49, 111)
    assert a.getlk(C, ino, 9, F_RDLCK, 61, 61) == (F_WRLCK, 61, 99, 111)
    with fs_error(errno.EINVAL):
        a.setlk(C, ino, 1, False, F_WRLCK, 10, 5, 1)
    with fs_error(errno.EINVAL):
        a.getlk(C, ino, 1, F_UNLCK, 0, 1)


def test_posix_blocking(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.setlk(C, ino, 1, False, F_WRLCK, 0, 9, 1)
    done = threading.Event()

    def waiter() -> None:
        b.setlk(C, ino, 1, True, F_WRLCK, 5, 5, 2)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert not done.is_set()
    a.setlk(C, ino, 1, False, F_UNLCK, 5, 5, 1)  # unlocking just the byte wanted is enough
    t.join(5)
    assert done.is_set()
    assert a.getlk(C, ino, 1, F_RDLCK, 5, 5) == (F_WRLCK, 5, 5, 2)


def test_split_and_merge(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    a.setlk(C, ino, 1, False, F_RDLCK, 0, 9, 1)
    a.setlk(C, ino, 1, False, F_RDLCK, 10, 19, 1)  # touching: merged
    assert b.getlk(C, ino, 1, F_WRLCK, 0, LOCK_EOF) == (F_RDLCK, 0, 19, 1)
    a.setlk(C, ino, 1, False, F_WRLCK, 5, 14, 1)  # type change in the middle: split in three
    assert b.getlk(C, ino, 1, F_WRLCK, 0, 4) == (F_RDLCK, 0, 4, 1)
    assert b.getlk(C, ino, 1, F_RDLCK, 0, LOCK_EOF) == (F_WRLCK, 5, 14, 1)
    assert b.getlk(C, ino, 1, F_WRLCK, 15, 100) == (F_RDLCK, 15, 19, 1)
    a.setlk(C, ino, 1, False, F_RDLCK, 5, 14, 1)
    assert b.getlk(C, ino, 1, F_WRLCK, 0, LOCK_EOF) == (F_RDLCK, 0, 19, 1)


def test_locks_of_closed_session_vanish(two: tuple[Meta, Meta, int]) -> None:
    a, b, ino = two
    b.setlk(C, ino, 1, False, F_WRLCK, 0, LOCK_EOF, 3)
    b.flock(C, ino, 1, F_WRLCK, False)
    b.close_session()
    a.setlk(C, ino, 1, False, F_WRLCK, 0, LOCK_EOF, 4)
    a.flock(C, ino, 1, F_WRLCK, False)


ranges = st.tuples(
    st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK]),
    st.integers(0, 40),
    st.integers(0, 10),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ranges, max_size=12))
def test_apply_range_matches_byte_model(ops: list[tuple[int, int, int]]) -> None:
    """The owner's ranges stay sorted, disjoint and merged, and say for every byte what the
    last request covering it asked for."""
    model: dict[int, int] = {}
    held: list[PlockRange] = []
    for ltype, start, n in ops:
        held = apply_range(held, ltype, start, start + n, 1)
        for byte in range(start, start + n + 1):
            if ltype == F_UNLCK:
                model.pop(byte, None)
            else:
                model[byte] = ltype
    got: dict[int, int] = {}
    for prev, cur in itertools.pairwise(held):
        assert prev.end < cur.start
        assert not (prev.end + 1 == cur.start and prev.ltype == cur.ltype)
    for r in held:
        for byte in range(r.start, r.end + 1):
            got[byte] = r.ltype
    assert got == model
