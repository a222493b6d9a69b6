"""The vfs's memory of names and attributes (``loftfs.vfs.metacache``): validity, generations,
bounds. Through real mounts: tests/mount/test_meta_cache.py."""

from __future__ import annotations

import time

import pytest

from loftfs.meta.types import Attr, FileType
from loftfs.vfs import metacache
from loftfs.vfs.metacache import MetaCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(metacache.time, "monotonic", c)
    return c


def attr(inode: int, kind: FileType = FileType.FILE, size: int = 0) -> Attr:
    return Attr(inode=inode, type=kind, mode=0o644, uid=0, gid=0, size=size)


def test_an_answer_lasts_its_timeout_from_when_it_was_read(clock: Clock) -> None:
    c = MetaCache(attr_ttl=1.0, entry_ttl=2.0, dir_entry_ttl=0.5)
    read_at = clock.now
    c.put(attr(1, FileType.DIR), c.generation(), read_at + 0.5)  # the parent, read later
    clock.now += 0.1  # the engine took that long to answer
    c.put(attr(5), c.generation(), read_at, parent=1, name=b"f")
    got = c.entry(1, b"f")
    assert got is not None and got[0] == attr(5) and got[1] == pytest.approx(0.1)
    assert got[2] == attr(1, FileType.DIR)
    clock.now = read_at + 0.99
    assert c.attr(5) is not None and c.entry(1, b"f") is not None
    clock.now = read_at + 1.0  # the attributes expired: so did the answer to the lookup
    assert c.attr(5) is None and c.entry(1, b"f") is None
    assert c.entry(1, b"g") is None and c.entry(2, b"f") is None
    c.put(attr(5), c.generation(), clock.now, parent=1, name=b"f")
    clock.now = read_at + 1.6  # the parent's attributes (for the permission check) expired
    assert c.attr(5) is not None and c.entry(1, b"f") is None


def test_a_directorys_name_lasts_the_directory_timeout(clock: Clock) -> None:
    c = MetaCache(attr_ttl=1.0, entry_ttl=1.0, dir_entry_ttl=0.25)
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    c.put(attr(7, FileType.DIR), c.generation(), clock.now, parent=1, name=b"d")
    assert c.entry(1, b"d") is not None
    clock.now += 0.3
    assert c.entry(1, b"d") is None
    assert c.attr(7) is not None  # the attributes themselves are still valid


def test_an_answer_read_before_a_change_is_not_kept(clock: Clock) -> None:
    c = MetaCache(1.0, 1.0, 1.0)
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    gen = c.generation()  # a lookup starts reading...
    c.forget(9)  # ...a change through this mount lands meanwhile (any inode)...
    c.put(attr(5), gen, clock.now, parent=1, name=b"f")  # ...its answer may predate it
    assert c.entry(1, b"f") is None and c.attr(5) is None
    c.put(attr(5), c.generation(), clock.now, parent=1, name=b"f")
    assert c.entry(1, b"f") is not None


def test_changes_forget_what_they_touch(clock: Clock) -> None:
    c = MetaCache(1.0, 1.0, 1.0)
    for ino, name in ((5, b"a"), (6, b"b")):
        c.put(attr(ino), c.generation(), clock.now, parent=1, name=name)
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    c.forget(5)
    assert c.attr(5) is None and c.entry(1, b"a") is None and c.entry(1, b"b") is not None
    c.changed_dir(1, b"c")  # a name created in directory 1: its attributes changed
    assert c.attr(1) is None and c.entry(1, b"b") is None and c.attr(6) is not None
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    assert c.entry(1, b"b") is not None
    c.changed_dir(1, b"b")  # (re)created: the name itself is forgotten too
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    assert c.entry(1, b"b") is None
    c.forget_all()
    assert c.attr(6) is None and c.figures()["attrs"] == 0 and c.figures()["entries"] == 0


def test_refresh_replaces_and_stops_older_answers(clock: Clock) -> None:
    c = MetaCache(1.0, 1.0, 1.0)
    c.put(attr(5, size=10), c.generation(), clock.now, parent=1, name=b"f")
    gen = c.generation()  # a getattr starts reading the old attributes...
    clock.now += 0.5
    c.refresh(attr(5, size=99), clock.now)  # ...an open reads the new ones first
    c.put(attr(5, size=10), gen, clock.now - 0.5)
    got = c.attr(5)
    assert got is not None and got[0].size == 99 and got[1] == 0.0
    # an unchanged refresh renews the validity without stopping anything in flight
    gen = c.generation()
    clock.now += 0.9
    c.refresh(attr(5, size=99), clock.now)
    assert c.generation() == gen
    clock.now += 0.5
    assert c.attr(5) is not None


def test_bounded_oldest_first(clock: Clock) -> None:
    c = MetaCache(10.0, 10.0, 10.0, max_items=3)
    for ino in range(10, 15):
        clock.now += 0.01
        c.put(attr(ino), c.generation(), clock.now, parent=1, name=b"n%d" % ino)
    figures = c.figures()
    assert figures["attrs"] == 3 and figures["entries"] == 3
    assert c.attr(11) is None and c.attr(12) is not None and c.attr(14) is not None


def test_off_without_an_attribute_timeout() -> None:
    c = MetaCache(attr_ttl=0.0, entry_ttl=1.0, dir_entry_ttl=1.0)
    c.put(attr(5), c.generation(), time.monotonic(), parent=1, name=b"f")
    assert not c.enabled and c.attr(5) is None and c.entry(1, b"f") is None
    assert c.figures() == {"hits_total": 0, "misses_total": 0, "attrs": 0, "entries": 0}


def test_hits_and_misses_are_counted(clock: Clock) -> None:
    c = MetaCache(1.0, 1.0, 1.0)
    c.put(attr(1, FileType.DIR), c.generation(), clock.now)
    c.put(attr(5), c.generation(), clock.now, parent=1, name=b"f")
    c.entry(1, b"f")
    c.attr(5)
    c.entry(1, b"nope")
    figures = c.figures()
    assert (figures["hits_total"], figures["misses_total"]) == (2, 1)


def test_expired_answers_are_dropped_as_new_ones_come(clock: Clock) -> None:
    c = MetaCache(attr_ttl=1.0, entry_ttl=2.0, dir_entry_ttl=2.0)
    for ino in range(10, 20):
        c.put(attr(ino), c.generation(), clock.now, parent=1, name=b"n%d" % ino)
    clock.now += 1.5  # the attributes expired, the names not yet
    c.put(attr(30), c.generation(), clock.now, parent=1, name=b"late")
    assert (c.figures()["attrs"], c.figures()["entries"]) == (1, 11)
    clock.now += 1.0
    c.put(attr(31), c.generation(), clock.now, parent=1, name=b"later")
    assert (c.figures()["attrs"], c.figures()["entries"]) == (2, 2)
