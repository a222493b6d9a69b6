"""External object records (``ExtObject``, imported data read in place): the ``Txn``
primitives of every engine, their reference counting through external slices, and volumes
formatted before the records existed."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import psycopg.errors
import pytest
from meta_helpers import ROOT, Backend, mkfile

from loftfs.errors import NotFormatted
from loftfs.meta import Meta
from loftfs.meta.base import BaseMeta
from loftfs.meta.redis import RedisMeta
from loftfs.meta.sql import SQLMeta
from loftfs.meta.txn import Txn
from loftfs.meta.types import (
    CHUNK_SIZE,
    KIND_EXTERNAL,
    NOW,
    ROOT_CTX,
    ExtObject,
    Slice,
)

C = ROOT_CTX

# keys as object stores allow them: unicode, spaces, control characters, the longest (1024
# bytes), with ETags of every shape (quoted MD5, multipart, a version id, none)
RECORDS = [
    ExtObject(1, "photos/2024/a b  c.jpg", '"9b2cf535f27731c974343645a3985328"', 0, 1000),
    ExtObject(1, "ünïcødé/文件 名.txt", '"d41d8cd98f00b204e9800998ecf8427e-3"', CHUNK_SIZE, CHUNK_SIZE),
    ExtObject(2, "é" * 512, "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo", 1 << 62, 0),
    ExtObject(7, "line\nbreak\ttab %2F+?#", "", 5, 1),
]  # fmt: skip


def engine(meta: Meta) -> BaseMeta:
    """The shared implementation, for its transaction runner (what the importer uses)."""
    assert isinstance(meta, BaseMeta)
    return meta


def put(meta: Meta, records: dict[int, ExtObject]) -> None:
    def fn(tx: Txn) -> None:
        for sid, rec in records.items():
            tx.put_ext(sid, rec)

    engine(meta)._transaction(fn, True)


def delete(meta: Meta, ids: list[int]) -> None:
    engine(meta)._transaction(lambda tx: tx.del_ext(ids), True)


def new_ids(meta: Meta, n: int) -> list[int]:
    return [meta.new_slice_id() for _ in range(n)]


def test_put_get_delete_count(backend: Backend, meta: Meta) -> None:
    ids = new_ids(meta, len(RECORDS))
    missing = max(ids) + 1000
    put(meta, dict(zip(ids, RECORDS, strict=True)))
    expected = dict(zip(ids, RECORDS, strict=True))
    assert meta.get_ext([*ids, missing, ids[0]]) == expected  # missing left out, repeats once
    assert meta.get_ext([missing]) == {}
    assert meta.get_ext([]) == {}
    assert backend.open().get_ext(ids) == expected  # another client sees them
    assert [meta.count_ext(s) for s in (0, 1, 2, 7)] == [0, 2, 1, 1]

    delete(meta, [ids[0], missing])  # a missing id is no error
    assert meta.get_ext(ids) == {i: expected[i] for i in ids[1:]}
    assert meta.count_ext(1) == 1
    replaced = ExtObject(3, "moved", "e2", 10, 20)
    put(meta, {ids[1]: replaced})  # put replaces a record
    assert meta.get_ext([ids[1]]) == {ids[1]: replaced}
    assert (meta.count_ext(1), meta.count_ext(3)) == (0, 1)
    delete(meta, ids)
    assert meta.get_ext(ids) == {}
    assert [meta.count_ext(s) for s in (1, 2, 3, 7)] == [0, 0, 0, 0]


def test_many_records(meta: Meta) -> None:
    """More records than one statement, command or scan step takes."""
    ids = new_ids(meta, 2500)
    records = {sid: ExtObject(n % 5, f"bucket/dir {n // 100}/object-{n:05d}", f"e{n}", n, n % 7)
               for n, sid in enumerate(ids)}  # fmt: skip
    put(meta, records)
    assert meta.get_ext([*ids, max(ids) + 1]) == records
    assert [meta.count_ext(s) for s in range(6)] == [500, 500, 500, 500, 500, 0]
    delete(meta, ids[::2])
    assert meta.get_ext(ids) == {sid: records[sid] for sid in ids[1::2]}
    assert sum(meta.count_ext(s) for s in range(5)) == 1250


def _interference(backend: Backend, other: Meta) -> Callable[[], None]:
    """What makes the first attempt of a write transaction (that read the root's attributes)
    fail as a conflict would: on Redis another client's commit to the root (the WATCH fails),
    on SQL engines the conflict errors their drivers raise (a real one needs a second
    connection that the first, holding the write lock or row locks, would wait for in this
    very thread)."""
    if backend.name == "redis":
        return lambda: other.mkdir(C, ROOT, b"meanwhile", 0o755) and None

    def conflict() -> None:
        if backend.name == "postgres":
            raise psycopg.errors.SerializationFailure("could not serialize access")
        raise sqlite3.OperationalError("database is locked")

    return conflict


def test_retried_write_transaction_applies_only_its_last_attempt(
    backend: Backend, meta: Meta
) -> None:
    first, gone, kept = new_ids(meta, 3)
    put(meta, {gone: RECORDS[0], kept: RECORDS[1]})
    interfere = _interference(backend, backend.open())
    attempts: list[dict[int, ExtObject]] = []

    def fn(tx: Txn) -> None:
        assert tx.get_attr(ROOT) is not None  # watched on Redis, locked on PostgreSQL
        attempts.append(tx.get_ext([gone, kept]))
        if len(attempts) == 1:
            tx.put_ext(first, RECORDS[2])  # queued or executed, then thrown away
        tx.put_ext(kept, RECORDS[3])
        tx.del_ext([gone])
        if len(attempts) == 1:
            interfere()

    engine(meta)._transaction(fn, True)
    assert len(attempts) == 2
    assert attempts[0] == attempts[1] == {gone: RECORDS[0], kept: RECORDS[1]}
    assert meta.get_ext([first, gone, kept]) == {kept: RECORDS[3]}


def test_concurrent_record_writes_do_not_conflict(backend: Backend, meta: Meta) -> None:
    """Records never change, so reading some does not make a write transaction conflict
    with clients adding or removing others (importers, gc) meanwhile."""
    if backend.name.startswith("sqlite"):
        pytest.skip("SQLite runs one write transaction at a time: none can interleave")
    read, added, removed, written = new_ids(meta, 4)
    put(meta, {read: RECORDS[0], removed: RECORDS[1]})
    other = backend.open()
    attempts: list[dict[int, ExtObject]] = []

    def fn(tx: Txn) -> None:
        attempts.append(tx.get_ext([read]))
        if len(attempts) == 1:
            put(other, {added: RECORDS[2]})
            delete(other, [removed])
        tx.put_ext(written, RECORDS[3])

    engine(meta)._transaction(fn, True)
    assert attempts == [{read: RECORDS[0]}]
    assert meta.get_ext([read, added, removed, written]) == {
        read: RECORDS[0],
        added: RECORDS[2],
        written: RECORDS[3],
    }


def test_external_slice_is_reference_counted(meta: Meta) -> None:
    """An external slice counts its references like a native one; when gc forgets it, its
    record goes in the same transaction, and only its record."""
    sid, other = new_ids(meta, 2)
    rec = ExtObject(1, "imports/big file.bin", '"abc"', 3 * CHUNK_SIZE, 1000)
    put(meta, {sid: rec, other: RECORDS[0]})
    f = mkfile(meta, ROOT, b"imported").inode
    external = Slice(0, sid, 1000, 0, 1000, kind=KIND_EXTERNAL)
    assert meta.write_slice(f, 0, external, NOW).slices == 1
    assert meta.read_chunk(f, 0) == [external]
    native = meta.new_slice_id()
    meta.write_slice(f, 1, Slice(0, native, 10, 0, 10), NOW)
    g = mkfile(meta, ROOT, b"copy").inode
    assert meta.copy_file_range(C, f, 100, g, 0, 500) == 500
    assert meta.read_chunk(g, 0) == [Slice(0, sid, 1000, 100, 500, KIND_EXTERNAL)]

    meta.unlink(C, ROOT, b"imported")
    assert dict(meta.deleted_slices()) == {native: 10}  # the copy still uses the external one
    meta.unlink(C, ROOT, b"copy")
    assert dict(meta.deleted_slices()) == {native: 10, sid: 1000}
    assert meta.get_ext([sid]) == {sid: rec}  # kept until gc forgets the slice
    meta.forget_deleted_slices([native, sid])
    assert meta.deleted_slices() == []
    assert meta.get_ext([sid, other]) == {other: RECORDS[0]}
    assert meta.count_ext(1) == 1


def test_external_slice_in_the_trash(meta: Meta) -> None:
    """A trashed file keeps its external slice (and record) until the trash is purged."""
    settings = meta.load_settings()
    settings.trash_days = 1
    meta.update_settings(settings)
    (sid,) = new_ids(meta, 1)
    put(meta, {sid: RECORDS[1]})
    f = mkfile(meta, ROOT, b"f").inode
    meta.write_slice(f, 2, Slice(5, sid, CHUNK_SIZE, 7, 100, KIND_EXTERNAL), NOW)
    meta.unlink(C, ROOT, b"f")
    assert meta.deleted_slices() == []
    assert meta.get_ext([sid]) == {sid: RECORDS[1]}
    assert engine(meta).cleanup_trash(now=1 << 62) == 1
    assert meta.deleted_slices() == [(sid, CHUNK_SIZE)]
    meta.forget_deleted_slices([sid])
    assert meta.get_ext([sid]) == {}


def _drop_ext_storage(meta: Meta) -> None:
    """Make the volume look formatted by a release without external objects."""
    if isinstance(meta, SQLMeta):
        meta._run(lambda cur: cur.execute("DROP TABLE loft_ext"), True)
    else:
        assert isinstance(meta, RedisMeta)
        key = meta.keys.ext
        meta._run(lambda tx: tx.server_call([("DEL", key)]), True)


def _ext_storage_exists(meta: Meta) -> bool:
    if isinstance(meta, SQLMeta):
        try:
            meta._run(lambda cur: cur.execute("SELECT 1 FROM loft_ext"), False)
        except NotFormatted:
            return False
        return True
    assert isinstance(meta, RedisMeta)
    key = meta.keys.ext
    return bool(meta._run(lambda tx: tx.server_call([("EXISTS", key)]), False)[0])


def test_volume_formatted_before_external_objects(backend: Backend, meta: Meta) -> None:
    """A volume without the records' table (SQL) gets it at the first statement that needs
    it: the gc of native slices keeps working, and external objects can be stored."""
    put(meta, {meta.new_slice_id(): RECORDS[0]})
    _drop_ext_storage(meta)
    client = backend.open()  # a client of the new release opens the old volume
    f = mkfile(client, ROOT, b"f").inode
    sid = client.new_slice_id()
    client.write_slice(f, 0, Slice(0, sid, 10, 0, 10), NOW)
    client.unlink(C, ROOT, b"f")
    assert client.deleted_slices() == [(sid, 10)]
    client.forget_deleted_slices([sid])
    assert client.deleted_slices() == []
    assert client.count_ext(1) == 0
    ext = client.new_slice_id()
    put(client, {ext: RECORDS[1]})
    assert client.get_ext([ext]) == {ext: RECORDS[1]}
    assert meta.get_ext([ext]) == {ext: RECORDS[1]}  # the first client sees the new table
    assert meta.count_ext(1) == 1


def test_destroyed_volume_gets_no_ext_storage(backend: Backend, meta: Meta) -> None:
    """On a volume that is gone, the ext calls say so and create nothing."""
    meta.destroy_volume()
    client = backend.open()
    for call in (
        lambda: client.get_ext([5]),
        lambda: client.count_ext(1),
        lambda: client.forget_deleted_slices([5]),
    ):
        with pytest.raises(NotFormatted):
            call()
    assert not _ext_storage_exists(client)
    with pytest.raises(NotFormatted):
        client.load_settings()
