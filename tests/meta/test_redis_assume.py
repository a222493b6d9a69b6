"""Commits on assumed values (``loftfs.meta.redis_assume``): a client that assumes what it
wrote last commits in one round trip, and whatever another client changed meanwhile is seen,
never overwritten: the assumption fails, nothing is applied, the transaction runs again."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meta_helpers import ROOT, fs_error, names

from loftfs.meta import open_meta, redis_txn
from loftfs.meta.redis import RedisMeta
from loftfs.meta.redis_assume import REFS, Known, apply_args, changes_nothing_remembered
from loftfs.meta.types import NOW, ROOT_CTX, FileType, Slice, VolumeSettings
from servers import RedisServer

C = ROOT_CTX


@pytest.fixture
def two(redis_server: RedisServer) -> Iterator[Callable[[], tuple[RedisMeta, RedisMeta]]]:
    """Two clients of one fresh volume."""
    made: list[RedisMeta] = []

    def make() -> tuple[RedisMeta, RedisMeta]:
        url = redis_server.url(db=7, prefix="as" + uuid.uuid4().hex[:10])
        pair = []
        for _ in range(2):
            meta = open_meta(url)
            assert isinstance(meta, RedisMeta)
            made.append(meta)
            pair.append(meta)
        pair[0].init_volume(VolumeSettings(name="assume"))
        return pair[0], pair[1]

    yield make
    for meta in made:
        meta.close()


@pytest.fixture(params=["script", "watch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a commit on assumptions is checked: inside ``LUA_APPLY``, or (a queued
    script it cannot run) by watching and reading the assumed keys first."""
    if request.param == "watch":
        monkeypatch.setattr(RedisMeta, "APPLY_SCRIPTS", {})
    return str(request.param)


def _slices(meta: RedisMeta, inode: int) -> list[Slice]:
    return meta.read_chunk(inode, 0)


def test_writes_of_another_client_are_kept(two: Callable, path: str) -> None:
    a, b = two()
    f = a.create(C, ROOT, b"f", 0o644, os.O_RDWR)
    base = a.usage()[0]
    s1, s2, s3 = a.new_slice_id(), b.new_slice_id(), a.new_slice_id()
    a.write_slice(f.inode, 0, Slice(0, s1, 100, 0, 100), NOW)  # assumed: a created f
    b.write_slice(f.inode, 0, Slice(100, s2, 400, 0, 400), NOW)  # a does not know
    a.write_slice(f.inode, 0, Slice(50, s3, 10, 0, 10), NOW)  # a's values are stale now
    want = [Slice(0, s1, 100, 0, 100), Slice(100, s2, 400, 0, 400), Slice(50, s3, 10, 0, 10)]
    assert _slices(a, f.inode) == _slices(b, f.inode) == want
    assert a.getattr(f.inode).size == b.getattr(f.inode).size == 500
    assert a.usage()[0] == base + 4096  # 500 bytes: one 4 KiB unit, counted once
    a.write_slice(f.inode, 0, Slice(500, s1, 100, 0, 100), NOW)  # assumed again, right
    assert a.getattr(f.inode).size == 600
    assert a.usage()[0] == base + 4096


def test_a_name_another_client_created_is_not_overwritten(two: Callable, path: str) -> None:
    a, b = two()
    d = a.mkdir(C, ROOT, b"d", 0o755)
    a.create(C, d.inode, b"first", 0o644, os.O_RDWR)  # a knows d's attributes now
    theirs = b.create(C, d.inode, b"x", 0o644, os.O_RDWR)
    with fs_error(17):  # EEXIST, though a assumed the name absent and d unchanged
        a.create(C, d.inode, b"x", 0o644, os.O_RDWR | os.O_EXCL)
    assert a.lookup(C, d.inode, b"x").inode == theirs.inode
    mine = a.create(C, d.inode, b"y", 0o644, os.O_RDWR)  # d changed: read again, then assumed
    assert names(b, d.inode) == [b"first", b"x", b"y"]
    assert b.lookup(C, d.inode, b"y").inode == mine.inode
    assert b.getattr(d.inode).nlink == 2
    assert a.usage()[1] == b.usage()[1] == 5  # root, d, three files


def test_a_file_another_client_removed_stays_removed(two: Callable, path: str) -> None:
    a, b = two()
    f = a.mknod(C, ROOT, b"f", FileType.FILE, 0o644)  # known to a, open nowhere
    b.unlink(C, ROOT, b"f")  # gone at once
    with fs_error(2):
        a.write_slice(f.inode, 0, Slice(0, a.new_slice_id(), 10, 0, 10), NOW)
    assert names(b, ROOT) == []
    with fs_error(2):
        b.getattr(f.inode)


def test_a_file_truncated_by_another_client(two: Callable, path: str) -> None:
    a, b = two()
    f = a.create(C, ROOT, b"f", 0o644, os.O_RDWR)
    s1, s2 = a.new_slice_id(), a.new_slice_id()
    a.write_slice(f.inode, 0, Slice(0, s1, 1000, 0, 1000), NOW)
    b.truncate(C, f.inode, 10)
    a.write_slice(f.inode, 0, Slice(20, s2, 5, 0, 5), NOW)
    assert a.getattr(f.inode).size == 25
    chunk = _slices(b, f.inode)
    assert chunk[0] == Slice(0, s1, 1000, 0, 1000) and chunk[-1] == Slice(20, s2, 5, 0, 5)
    assert len(chunk) == 3  # the hole that truncate laid over [10, end of chunk) between


def test_known_values_stay_bounded(two: Callable) -> None:
    a, _ = two()
    a._known.limit = 8
    for i in range(20):
        a.create(C, ROOT, b"f%d" % i, 0o644, os.O_RDWR)
    assert len(a._known) <= 8
    assert len(names(a, ROOT)) == 20


# --- the pieces, without a server ---------------------------------------------------------------


def test_apply_args_encode_assumptions_and_commands() -> None:
    assumed = {"P:i5": b"attr", "P:c5_0": None, ("P:d1", b"name"): None}
    queued = [("SET", "P:i5", b"new"), ("EVAL", "refs script", 2, "P:refs", "P:dead", 7, 100, 1)]
    keys, argv = apply_args(assumed, queued, {"refs script": REFS})  # type: ignore[misc]
    assert keys == ["P:i5", "P:c5_0", "P:d1"]
    assert argv[:9] == ["s", "", b"attr", "S", "", b"", "H", b"name", b""]
    assert argv[9:] == [3, "SET", "P:i5", b"new", 6, REFS, "P:refs", "P:dead", 7, 100, 1]
    assert apply_args(assumed, queued, {}) is None  # a script it cannot run


FAMILIES = ("P:i", "P:c", "P:d")


def _del_chunks(cmd: tuple) -> list[str]:
    return [cmd[4]]


def test_known_learns_what_a_commit_wrote() -> None:
    known = Known(FAMILIES, "P:c")
    known.put("P:c5_0", b"old")
    queued = [
        ("SET", "P:i5", b"attr"),
        ("APPEND", "P:c5_0", b"+rec"),
        ("APPEND", "P:c6_0", b"rec"),  # not read: unknown afterwards
        ("HSET", "P:d1", b"x", b"15"),
        ("HDEL", "P:d1", b"y"),
        ("DEL", "P:i7"),
        ("SADD", "P:ck5", 0),
        ("SET", "P:other", b"v"),  # not a remembered key
    ]
    scripts = {"del chunks": _del_chunks, "refs": changes_nothing_remembered}
    known.learn(queued, {"P:c5_0": b"old"}, scripts)
    assert known.get("P:i5") == (True, b"attr")
    assert known.get("P:c5_0") == (True, b"old+rec")
    assert known.get("P:c6_0") == (False, None)
    assert known.get(("P:d1", b"x")) == (True, b"15")
    assert known.get(("P:d1", b"y")) == (True, None)
    assert known.get("P:i7") == (True, None)
    assert known.get("P:other") == (False, None)
    # appends in one transaction build on each other; a SET or DEL is their new base
    known.learn(
        [("APPEND", "P:c5_0", b"+2"), ("APPEND", "P:c5_0", b"+3"), ("DEL", "P:c6_0"),
         ("APPEND", "P:c6_0", b"new")],
        {"P:c5_0": b"old+rec"},
        scripts,
    )  # fmt: skip
    assert known.get("P:c5_0") == (True, b"old+rec+2+3")
    assert known.get("P:c6_0") == (True, b"new")
    known.put("P:c5_1", b"c1")
    known.put("P:c55_0", b"another inode")
    # a script forgets what its table entry says: the chunks of one inode
    known.learn([("EVAL", "del chunks", 1, "P:ck5", "P:c5_")], {}, scripts)
    assert known.get("P:c5_0") == known.get("P:c5_1") == (False, None)
    assert known.get("P:c55_0") == (True, b"another inode")
    known.learn([("EVAL", "refs", 2, "P:refs", "P:dead", 1, 2, 3)], {}, scripts)
    assert known.get("P:i5") == (True, b"attr")
    # a commit of unknown outcome forgets what it touched, a hash with its fields
    known.forget([("HSET", "P:d1", b"z", b"1"), ("SET", "P:i5", b"x")], scripts)
    assert known.get(("P:d1", b"x")) == (False, None)
    assert known.get("P:i5") == (False, None)
    assert known.get("P:i7") == (True, None)
    # a script it does not know: everything
    known.learn([("EVAL", "something else", 0)], {}, scripts)
    assert len(known) == 0


def test_known_indexes_fields_and_chunks() -> None:
    """Forgetting a key, its fields or an inode's chunks does not walk every known value
    (each write transaction does it: measured 0.68x JuiceFS on deletes when it did)."""
    known = Known(FAMILIES, "P:c", limit=50_000)
    for i in range(20_000):
        known.put(f"P:i{i}", b"a")
        known.put(f"P:c{i}_0", b"c")
        known.put((f"P:d{i % 100}", b"n%d" % i), b"e")
    assert len(known) == 50_000  # the oldest went first
    assert known.get("P:i0") == (False, None) and known.get("P:i19999") == (True, b"a")
    assert known._fields.keys() <= {f"P:d{i}" for i in range(100)}
    assert sum(len(v) for v in known._fields.values()) + sum(
        len(v) for v in known._chunks.values()
    ) == len([w for w in known._values if isinstance(w, tuple) or w.startswith("P:c")])
    known.forget([("HSET", "P:d7", b"x", b"1")], {})
    assert "P:d7" not in known._fields
    known.learn([("EVAL", "del", 1, "P:ck19999", "P:c19999_")], {}, {"del": _del_chunks})
    assert known.get("P:c19999_0") == (False, None) and "P:c19999_" not in known._chunks


def test_every_queued_script_says_what_it_changes() -> None:
    """A script missing from ``SCRIPT_EFFECTS`` makes every commit that queues it forget
    every known value: list each one (and what it deletes among remembered keys)."""
    source = Path(redis_txn.__file__).read_text()
    queued = set(re.findall(r'"EVAL",\s*(LUA_\w+)', source))
    assert queued >= {"LUA_SLICE_REFS", "LUA_DEL_INDEXED"}
    for name in queued:
        assert getattr(redis_txn, name) in RedisMeta.SCRIPT_EFFECTS, name
