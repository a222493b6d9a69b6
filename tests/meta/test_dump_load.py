"""Metadata dump and load (``loftfs.meta.dump``): round trips between engines, the data read
back through the real data path, malformed dumps, and bounded memory.

The Redis and PostgreSQL cases need those engines registered in ``loftfs.meta._ENGINES``:
until they are, the cases fail with a message saying so (they are never skipped).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loftfs.chunk.datapath import DataPath
from loftfs.errors import LoftError, NotFormatted, VolumeExists
from loftfs.meta import dump, engine_schemes
from loftfs.meta.base import BaseMeta
from loftfs.meta.dump import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOAD_MARKER,
    DumpFormatError,
    InodeSet,
    dump_meta,
    load_meta,
)
from loftfs.meta.interface import Meta
from loftfs.meta.ops_import import LAZY_MARK, lazy_setting
from loftfs.meta.txn import SETTING_SOURCES, Txn
from loftfs.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KIND_EXTERNAL,
    ROOT_CTX,
    ROOT_INODE,
    Attr,
    ExtObject,
    FileType,
    ImportOwner,
    Slice,
    VolumeSettings,
)
from loftfs.object.file import FileObjectStore
from loftfs.vfs.options import MountOptions

BLOCK = 64 << 10
BLOCK_SPACE = 4096  # usage charged to a small file
C = ROOT_CTX


# --- engines ---------------------------------------------------------------------------------


def _engine_url(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty metadata URL of engine ``name``; fails the test when the engine is not
    registered yet (it is never skipped)."""
    tag = uuid.uuid4().hex[:10]
    if name == "sqlite":
        return f"sqlite3://{tmp_path}/target-{tag}.db"
    scheme = {"redis": "redis", "postgres": "postgres"}[name]
    if scheme not in engine_schemes():
        pytest.fail(
            f"metadata engine {scheme!r} is not registered in loftfs.meta._ENGINES yet "
            f"(registered: {', '.join(engine_schemes())}): this round trip cannot run",
            pytrace=False,
        )
    if name == "redis":
        server = request.getfixturevalue("redis_server")
        return str(server.url(prefix=f"dump{tag}"))
    server = request.getfixturevalue("postgres_server")
    return str(server.url(server.new_database(), schema=f"dump{tag}"))


def _base(meta: Meta) -> BaseMeta:
    """Every engine is a ``BaseMeta``: its trash helpers go beyond the ``Meta`` interface."""
    assert isinstance(meta, BaseMeta)
    return meta


def dump_bytes(meta: Meta) -> bytes:
    buf = io.BytesIO()
    dump_meta(meta, buf)
    return buf.getvalue()


def load_bytes(meta: Meta, data: bytes) -> None:
    load_meta(meta, io.BytesIO(data))


# --- a populated volume ------------------------------------------------------------------------

# the volume's import sources, as ``loftfs.sources`` stores them (credentials sealed)
SOURCES = {
    "version": 1, "next_id": 5,
    "sources": {
        "photos": {"id": 3, "url": "s3://photo-archive/2024/", "endpoint": "", "region": "eu-1",
                   "added_ns": 17, "credentials": {"algorithm": "AES-256-GCM", "sealed": "AAEC"}},
        "logs": {"id": 4, "url": "file:///srv/logs", "endpoint": "", "region": "",
                 "added_ns": 18, "credentials": {}},
    },
}  # fmt: skip


def put_ext(meta: Meta, sid: int, rec: ExtObject) -> None:
    """Store an external object record as the importer does (there is no ``Meta`` call that
    writes one)."""
    _base(meta)._transaction(lambda tx: tx.put_ext(sid, rec), True)


def put_setting(meta: Meta, name: str, value: str) -> None:
    _base(meta)._transaction(lambda tx: tx.put_setting(name, value), True)


def get_setting(meta: Meta, name: str) -> str | None:
    def fn(tx: Txn) -> str | None:
        return tx.get_setting(name)

    return _base(meta)._read(fn)


def lazy_settings(meta: Meta) -> dict[str, str]:
    """Every lazy-import binding setting (``lazy:<inode>``) as stored."""

    def fn(tx: Txn) -> dict[str, str]:
        return tx.settings_with_prefix("lazy:")

    return _base(meta)._read(fn)


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Source:
    """A SQLite volume with real blocks in a directory bucket, and what it should hold."""

    meta: Meta
    settings: VolumeSettings
    store: FileObjectStore
    contents: dict[int, bytes] = field(default_factory=dict)  # inode -> file content
    left_out: int = 0  # bytes of usage held by the file unlinked while open (not dumped)
    shared: tuple[int, int] = (0, 0)  # two files sharing slices (copy_file_range)
    exts: dict[int, ExtObject] = field(default_factory=dict)  # external object records
    lazy: dict[int, tuple[int, str]] = field(default_factory=dict)  # bound directories


def _data_path(meta: Meta, store: FileObjectStore, settings: VolumeSettings) -> DataPath:
    opts = MountOptions(
        buffer_size=16 << 20, upload_threads=2, fetch_threads=2, gc_interval_s=0, cache_size=0
    )
    opts.compact_threshold = 0
    return DataPath(meta, store, settings, opts)


def _write(dp: DataPath, inode: int, offset: int, data: bytes) -> None:
    w = dp.writer(inode)
    w.write(offset, data)
    dp.flush(inode)


def populate(meta: Meta, store: FileObjectStore, settings: VolumeSettings) -> Source:
    """Every kind of record a dump holds: multi-chunk, multi-slice, sparse and punched files,
    shared slices, hard links, symlinks, devices, xattrs, a deep tree, a large directory,
    unicode and non-UTF-8 names, the trash; plus what it must leave out (an unlinked open
    file, slices waiting for gc)."""
    src = Source(meta, settings, store)
    dp = _data_path(meta, store, settings)
    try:
        meta.setxattr(C, ROOT_INODE, b"user.root", b"top")
        docs = meta.mkdir(C, ROOT_INODE, "dökümente".encode(), 0o750).inode
        # a multi-block file patched in place and appended to: three slices in one chunk
        uni = meta.create(C, docs, "ünïcødé-文件.txt".encode(), 0o644, os.O_RDWR).inode
        body = bytearray(_data(1, 200_000))
        _write(dp, uni, 0, bytes(body))
        patch = _data(2, 1000)
        _write(dp, uni, 70_000, patch)
        body[70_000:71_000] = patch
        _write(dp, uni, len(body), b"tail")
        body += b"tail"
        src.contents[uni] = bytes(body)
        meta.setxattr(C, uni, b"user.\xfe\xff", b"\x00\x01\x02binary\xff")
        meta.setxattr(C, uni, b"user.text", "wert ✓".encode())
        # hard links: three names, one inode
        meta.link(C, uni, ROOT_INODE, b"hardlink")
        # a file whose name is not UTF-8
        bad = meta.create(C, docs, b"bad\xff\xfename", 0o600, os.O_RDWR).inode
        _write(dp, bad, 0, b"bad name content")
        src.contents[bad] = b"bad name content"
        # sparse: chunks 0 and 2, grown past its data, a hole punched into chunk 0
        big = meta.create(C, ROOT_INODE, b"sparse", 0o644, os.O_RDWR).inode
        head, far = _data(3, 150_000), _data(4, 3000)
        _write(dp, big, 0, head)
        _write(dp, big, 2 * CHUNK_SIZE + 5, far)
        size = 3 * CHUNK_SIZE + 77
        meta.truncate(C, big, size)
        meta.fallocate(C, big, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10_000, 20_000)
        content = bytearray(size)
        content[: len(head)] = head
        content[10_000:30_000] = bytes(20_000)
        content[2 * CHUNK_SIZE + 5 : 2 * CHUNK_SIZE + 5 + len(far)] = far
        src.contents[big] = bytes(content)
        # slices shared by two files
        copy = meta.create(C, ROOT_INODE, b"copy", 0o644, os.O_RDWR).inode
        assert meta.copy_file_range(C, uni, 0, copy, 0, len(body)) == len(body)
        src.contents[copy] = bytes(body)
        src.shared = (uni, copy)
        # attributes out of the ordinary
        odd = meta.create(C, ROOT_INODE, b"setuid", 0o4755, os.O_RDWR).inode
        meta.setattr(C, odd, uid=1000, gid=2000, atime_ns=-5, mtime_ns=123_456_789)
        src.contents[odd] = b""
        # symlinks, special nodes, an empty directory
        meta.symlink(C, ROOT_INODE, b"sym", "dökümente/ünïcødé-文件.txt".encode())
        meta.symlink(C, docs, b"sym-bin", b"\xff\xfe/target")
        meta.mknod(C, ROOT_INODE, b"fifo", FileType.FIFO, 0o644)
        meta.mknod(C, ROOT_INODE, b"chr", FileType.CHR, 0o600, rdev=(4 << 8) | 1)
        meta.mknod(C, ROOT_INODE, b"blk", FileType.BLK, 0o600, rdev=(8 << 8) | 16)
        meta.mknod(C, ROOT_INODE, b"sock", FileType.SOCK, 0o755)
        meta.mkdir(C, ROOT_INODE, b"empty", 0o700)
        # a deep tree with a hard link at the bottom
        d = meta.mkdir(C, ROOT_INODE, b"deep", 0o755).inode
        for level in range(40):
            d = meta.mkdir(C, d, f"level-{level:02d}".encode(), 0o755).inode
        meta.link(C, uni, d, b"hardlink-deep")
        leaf = meta.create(C, d, b"leaf", 0o644, os.O_RDWR).inode
        _write(dp, leaf, 0, b"leaf data")
        src.contents[leaf] = b"leaf data"
        # a directory larger than one batch of the dump
        many = meta.mkdir(C, ROOT_INODE, b"many", 0o755).inode
        for i in range(300):
            meta.mknod(C, many, f"f{i:04d}".encode(), FileType.FILE, 0o644)
        # imported objects read in place: external slices (one shared with a copy, one in a
        # trashed file) and the import sources
        put_setting(meta, SETTING_SOURCES, json.dumps(SOURCES, sort_keys=True))
        ext = meta.create(C, ROOT_INODE, b"external", 0o644, os.O_RDWR).inode
        imported = [
            ExtObject(3, "2024/ünï cødé/big file.bin", '"9b2cf535f2-2"', CHUNK_SIZE, 500),
            ExtObject(4, "line\nbreak and  spaces", "", 0, 70),
        ]
        for rec in imported:
            src.exts[meta.new_slice_id()] = rec
        ext_ids = list(src.exts)
        put_ext(meta, ext_ids[0], imported[0])
        # lazy import: a directory bound to a source prefix; another one listed (unbound
        # again), which bound its subdirectory in turn
        bound = meta.mkdir(C, ROOT_INODE, b"lazy", 0o750).inode
        meta.bind_lazy(bound, 3, "2024/lazy/ünï cødé/")
        listed = meta.mkdir(C, ROOT_INODE, b"listed", 0o755).inode
        meta.bind_lazy(listed, 4, "listed/")
        meta.import_batch(
            listed,
            [],
            source=4,
            owner=ImportOwner(0o644, 0o700, 1000, 2000),
            dir_cache={},
            lazy_dirs=[(b"sub", "listed/sub/")],
            finish_lazy=True,
        )
        sub = meta.lookup(C, listed, b"sub").inode
        src.lazy = {bound: (3, "2024/lazy/ünï cødé/"), sub: (4, "listed/sub/")}
        meta.write_slice(ext, 1, Slice(0, ext_ids[0], 500, 100, 300, kind=KIND_EXTERNAL), -1)
        ext_copy = meta.create(C, ROOT_INODE, b"external-copy", 0o644, os.O_RDWR).inode
        assert meta.copy_file_range(C, ext, CHUNK_SIZE + 50, ext_copy, 0, 200) == 200
        # the trash: two files with data
        for i in range(2):
            t = meta.create(C, docs, f"trashed-{i}".encode(), 0o644, os.O_RDWR).inode
            _write(dp, t, 0, _data(10 + i, 5000))
            if i == 1:
                put_ext(meta, ext_ids[1], imported[1])
                part = Slice(10, ext_ids[1], 70, 5, 60, kind=KIND_EXTERNAL)
                meta.write_slice(t, 1, part, -1)
            meta.release(t)
            meta.unlink(C, docs, f"trashed-{i}".encode())
        # left out: a file unlinked while open, slices dropped by truncate
        gone = meta.create(C, ROOT_INODE, b"open-unlinked", 0o644, os.O_RDWR).inode
        _write(dp, gone, 0, b"nobody sees this")
        meta.unlink(C, ROOT_INODE, b"open-unlinked")
        src.left_out = BLOCK_SPACE
        cut = meta.create(C, ROOT_INODE, b"truncated", 0o644, os.O_RDWR).inode
        _write(dp, cut, 0, _data(5, 9000))
        meta.truncate(C, cut, 0)
        src.contents[cut] = b""
        for inode in (uni, bad, big, copy, odd, leaf, ext, ext_copy, cut):
            meta.release(inode)
    finally:
        dp.close()
    assert _base(meta).trash_count() == 2
    assert meta.deleted_slices(), "the truncate left a slice waiting for gc"
    return src


@pytest.fixture
def source(tmp_path: Path, opened: Callable[[str], Meta]) -> Source:
    meta = opened(f"sqlite3://{tmp_path}/source.db")
    bucket = tmp_path / "bucket"
    meta.init_volume(
        VolumeSettings(name="dumped", bucket=str(bucket), block_size=BLOCK, trash_days=3)
    )
    store = FileObjectStore(str(bucket))
    store.create()
    return populate(meta, store, meta.load_settings())


# --- what a volume looks like through the Meta interface ----------------------------------------


def snapshot(meta: Meta) -> list[tuple[object, ...]]:
    """Every entry (path, attributes, symlink target, xattrs) seen through ``Meta``, in order."""
    out: list[tuple[object, ...]] = []
    root = meta.getattr(ROOT_INODE)
    xattrs = [(n, meta.getxattr(C, ROOT_INODE, n)) for n in sorted(meta.listxattr(C, ROOT_INODE))]
    out.append((b"/", root, None, xattrs))
    stack: list[tuple[bytes, int]] = [(b"", ROOT_INODE)]
    while stack:
        path, inode = stack.pop()
        for e in meta.readdir(C, inode):
            p = path + b"/" + e.name
            names = sorted(meta.listxattr(C, e.attr.inode))
            target = meta.readlink(e.attr.inode) if e.attr.type == FileType.SYMLINK else None
            out.append((p, e.attr, target, [(n, meta.getxattr(C, e.attr.inode, n)) for n in names]))
            if e.attr.type == FileType.DIR:
                stack.append((p, e.attr.inode))
    return out


def check_same_volume(src: Source, target: Meta) -> None:
    assert snapshot(target) == snapshot(src.meta)
    used, inodes = src.meta.usage()
    assert target.usage() == (used - src.left_out, inodes - 1)
    assert _base(target).trash_count() == _base(src.meta).trash_count()
    assert target.load_settings() == src.meta.load_settings()
    assert get_setting(target, SETTING_SOURCES) == get_setting(src.meta, SETTING_SOURCES)
    assert json.loads(get_setting(target, SETTING_SOURCES) or "null") == SOURCES
    assert target.get_ext(list(src.exts)) == src.meta.get_ext(list(src.exts)) == src.exts
    assert [target.count_ext(s) for s in (3, 4)] == [1, 1]
    assert lazy_settings(target) == lazy_settings(src.meta)
    assert {i: target.lazy_binding(i) for i in src.lazy} == src.lazy
    for inode in src.lazy:
        assert target.getattr(inode).rdev == LAZY_MARK
    listed = target.lookup(C, ROOT_INODE, b"listed").inode
    assert target.getattr(listed).rdev == 0 and target.lazy_binding(listed) is None
    assert target.deleted_slices() == [], "no slice may be unreferenced after a load"
    dp = _data_path(target, src.store, target.load_settings())
    try:
        for inode, content in src.contents.items():
            size = target.getattr(inode).size
            assert size == len(content)
            assert dp.read(inode, 0, size + 10, size) == content, f"inode {inode}"
    finally:
        dp.close()


def check_reference_counts(src: Source, target: Meta) -> None:
    """The loaded reference counts drop to zero exactly when the last reference goes."""
    uni, _ = src.shared
    target.unlink(C, ROOT_INODE, b"copy")
    _base(target).cleanup_trash(now=2**62)  # purge the trash, the copy with it
    assert target.deleted_slices() != []  # the trashed files' slices
    dropped = {s for s, _ in target.deleted_slices(10_000)}
    target.forget_deleted_slices(sorted(dropped))
    shared_ids = {s.id for s in target.read_chunk(uni, 0) if s.id}
    assert shared_ids, "the copy's slices still live in the original"
    assert not shared_ids & dropped
    for path in (b"hardlink",):
        target.unlink(C, ROOT_INODE, path)
    deep = target.lookup(C, ROOT_INODE, b"deep").inode
    for level in range(40):
        deep = target.lookup(C, deep, f"level-{level:02d}".encode()).inode
    target.unlink(C, deep, b"hardlink-deep")
    assert target.deleted_slices(10_000) == []  # one link left
    docs = target.lookup(C, ROOT_INODE, "dökümente".encode()).inode
    target.unlink(C, docs, "ünïcødé-文件.txt".encode())
    _base(target).cleanup_trash(now=2**62)
    assert {s for s, _ in target.deleted_slices(10_000)} == shared_ids
    # the trashed file's external slice went with the trash; the other one is shared too
    shared_ext, trashed_ext = src.exts
    assert trashed_ext in dropped and target.get_ext([trashed_ext]) == {}
    target.unlink(C, ROOT_INODE, b"external")
    _base(target).cleanup_trash(now=2**62)
    assert shared_ext not in {s for s, _ in target.deleted_slices(10_000)}
    target.unlink(C, ROOT_INODE, b"external-copy")
    _base(target).cleanup_trash(now=2**62)
    assert (shared_ext, 500) in target.deleted_slices(10_000)
    target.forget_deleted_slices([shared_ext])
    assert target.get_ext(list(src.exts)) == {}
    assert [target.count_ext(s) for s in (3, 4)] == [0, 0]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "redis", "postgres"])
def test_round_trip_into_engine(
    engine: str,
    source: Source,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    opened: Callable[[str], Meta],
) -> None:
    """sqlite -> ENGINE: the second dump equals the first byte for byte, the volume looks the
    same through Meta, its files read the same data through the data path, and its slice
    reference counts were rebuilt right."""
    first = dump_bytes(source.meta)
    target = opened(_engine_url(engine, request, tmp_path))
    load_bytes(target, first)
    assert dump_bytes(target) == first
    assert dump_bytes(source.meta) == first  # deterministic
    check_same_volume(source, target)
    check_reference_counts(source, target)


def test_round_trip_through_every_engine(
    source: Source,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    opened: Callable[[str], Meta],
) -> None:
    """sqlite -> redis -> postgres -> sqlite gives the same document at every step."""
    first = dump_bytes(source.meta)
    doc = first
    last: Meta | None = None
    for engine in ("redis", "postgres", "sqlite"):
        last = opened(_engine_url(engine, request, tmp_path))
        load_bytes(last, doc)
        doc = dump_bytes(last)
        assert doc == first, f"the dump changed after a load into {engine}"
    assert last is not None
    check_same_volume(source, last)


def test_document_content(source: Source) -> None:
    """Valid JSON, one record per line; hard links written once; names that are not UTF-8 in
    base64; the trash and its times; nothing of sessions, open files or dead slices."""
    data = dump_bytes(source.meta)
    doc = json.loads(data)
    assert doc["format"] == FORMAT_NAME and doc["version"] == FORMAT_VERSION == 2
    assert doc["volume"]["name"] == "dumped" and doc["volume"]["trash_days"] == 3
    assert doc["root"]["xattrs"] == [["user.root", "top"]]
    lines = data.split(b"\n")
    assert len(lines) == len(doc["tree"]) + len(doc["trash"]) + 14  # 13 lines around, "" at the end
    uni = source.shared[0]
    defining = [r for r in doc["tree"] if r.get("inode") == uni and "attr" in r]
    links = [r for r in doc["tree"] if r.get("inode") == uni and "attr" not in r]
    assert len(defining) == 1 and defining[0]["attr"]["nlink"] == 3
    assert len(links) == 2 and all(r["type"] == "file" for r in links)
    assert {"b64": "YmFk//5uYW1l"} in [r.get("name") for r in doc["tree"]]  # b"bad\xff\xfename"
    xattrs = dict((json.dumps(n), v) for n, v in defining[0]["xattrs"])
    assert xattrs[json.dumps({"b64": "dXNlci7+/w=="})] == {"b64": "AAECYmluYXJ5/w=="}
    assert xattrs[json.dumps("user.text")] == "wert ✓"
    names = [r.get("name") for r in doc["tree"]]
    assert "open-unlinked" not in names
    ext = next(r["inode"] for r in doc["tree"] if r.get("name") == "external")
    ext_chunks = [r for r in doc["tree"] if r.get("chunk") == ext]
    assert [(r["index"], [s[2:] for s in r["slices"]]) for r in ext_chunks] == [
        (1, [[500, 100, 300, 1]])
    ]
    # each external object record once, right before the first chunk that uses it
    records = doc["tree"] + doc["trash"]
    exts = [r for r in records if "ext" in r]
    assert exts == [
        {"ext": sid, "source": rec.source, "key": rec.key, "etag": rec.etag,
         "offset": rec.offset, "length": rec.length}
        for sid, rec in source.exts.items()
    ]  # fmt: skip
    for rec in exts:
        after = records[records.index(rec) + 1]
        assert rec["ext"] in [s[1] for s in after["slices"] if s[5] == KIND_EXTERNAL]
    shared_ext, trashed_ext = source.exts
    assert exts[1] in doc["trash"] and exts[1]["ext"] == trashed_ext
    ext_copy = next(r["inode"] for r in doc["tree"] if r.get("name") == "external-copy")
    copy_chunk = next(r for r in records if r.get("chunk") == ext_copy)
    assert copy_chunk["slices"] == [[0, shared_ext, 500, 150, 200, KIND_EXTERNAL]]
    assert doc["summary"]["exts"] == 2
    assert doc["sources"] == SOURCES
    # lazy-import bindings: on the records of the directories still bound, and only there
    bound = {r["inode"]: r for r in doc["tree"] if "lazy" in r}
    assert {i: (r["lazy"]["source"], r["lazy"]["prefix"]) for i, r in bound.items()} == (
        source.lazy
    )
    assert all(r["type"] == "dir" and r["attr"]["rdev"] == LAZY_MARK for r in bound.values())
    listed = next(r for r in doc["tree"] if r.get("name") == "listed")
    assert listed["attr"]["rdev"] == 0 and "lazy" not in listed
    assert "lazy" not in doc["root"]
    trash = [r for r in doc["trash"] if "trash" in r]
    assert len(trash) == 2 == doc["summary"]["trash"]
    times = [r["deleted_ns"] for r in trash]
    assert times == sorted(times) and len(set(times)) == 2
    assert all(r["deleted_ns"] == r["attr"]["ctime_ns"] for r in trash)  # unlinked when closed
    dead = {s for s, _ in source.meta.deleted_slices()}
    live = {s[1] for r in doc["tree"] + doc["trash"] if "chunk" in r for s in r["slices"]}
    assert dead and not dead & live
    assert "sessions" not in doc and "locks" not in doc
    counters = doc["counters"]
    assert counters["used_inodes"] == doc["summary"]["inodes"]
    used, inodes = source.meta.usage()
    assert (counters["used_space"], counters["used_inodes"]) == (used - 4096, inodes - 1)
    assert counters["next_inode"] > max(r.get("inode", 0) for r in doc["tree"])
    summary = doc["summary"]
    assert summary["entries"] == sum(1 for r in doc["tree"] if "parent" in r)
    assert summary["chunks"] == sum(1 for r in doc["tree"] + doc["trash"] if "chunk" in r)


def test_load_rebuilds_usage_and_id_counters(
    source: Source, opened: Callable[[str], Meta], tmp_path: Path
) -> None:
    """Counters a dump gets wrong are not trusted: usage is recomputed, id counters are raised
    past every id in the dump (new inodes and slices never collide with loaded ones)."""
    doc = dump_bytes(source.meta)
    lines = doc.split(b"\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(b'"counters":'))
    lines[i] = (
        b'"counters":'
        + json.dumps(
            {
                "next_inode": 2,
                "next_slice": 1,
                "next_session": 0,
                "used_space": 7,
                "used_inodes": 1,
            },
            separators=(",", ":"),
        ).encode()
        + b","
    )
    target = opened(f"sqlite3://{tmp_path}/t.db")
    load_bytes(target, b"\n".join(lines))
    assert target.usage() == tuple(
        json.loads(doc)["counters"][k] for k in ("used_space", "used_inodes")
    )
    records = json.loads(doc)
    max_inode = max(r.get("inode", 0) for r in records["tree"])
    new = target.mknod(C, ROOT_INODE, b"new", FileType.FILE, 0o644)
    assert new.inode > max_inode
    max_slice = max(s[1] for r in records["tree"] if "chunk" in r for s in r["slices"])
    assert target.new_slice_id() > max_slice


def test_gzip_dump_loads(source: Source, opened: Callable[[str], Meta], tmp_path: Path) -> None:
    import gzip

    first = dump_bytes(source.meta)
    target = opened(f"sqlite3://{tmp_path}/gz.db")
    load_meta(target, io.BytesIO(gzip.compress(first)))
    assert dump_bytes(target) == first


# --- refusals and malformed dumps --------------------------------------------------------------


def test_load_refuses_a_formatted_target(
    source: Source, opened: Callable[[str], Meta], tmp_path: Path
) -> None:
    target = opened(f"sqlite3://{tmp_path}/busy.db")
    target.init_volume(VolumeSettings(name="other"))
    target.mkdir(C, ROOT_INODE, b"keep", 0o755)
    before = dump_bytes(target)
    with pytest.raises(VolumeExists, match="already holds volume 'other'"):
        load_bytes(target, dump_bytes(source.meta))
    assert dump_bytes(target) == before


def _small_dump(tmp_path: Path, opened: Callable[[str], Meta]) -> bytes:
    meta = opened(f"sqlite3://{tmp_path}/small.db")
    meta.init_volume(VolumeSettings(name="small", trash_days=1))
    d = meta.mkdir(C, ROOT_INODE, b"d", 0o755).inode
    f = meta.mknod(C, d, b"f", FileType.FILE, 0o644).inode
    meta.write_slice(f, 0, Slice(0, meta.new_slice_id(), 10, 0, 10), -1)
    meta.write_slice(f, 1, Slice(0, meta.new_slice_id(), 10, 0, 10), -1)
    meta.link(C, f, ROOT_INODE, b"link")
    meta.symlink(C, d, b"s", b"f")
    t = meta.mknod(C, d, b"t", FileType.FILE, 0o644).inode
    meta.write_slice(t, 0, Slice(0, meta.new_slice_id(), 10, 0, 10), -1)
    meta.unlink(C, d, b"t")
    return dump_bytes(meta)


def _expect_malformed(target: Meta, data: bytes, line: int | None, text: str = "") -> None:
    with pytest.raises(DumpFormatError) as info:
        load_bytes(target, data)
    if line is not None:
        assert info.value.line == line, str(info.value)
    assert text in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(NotFormatted):
        target.load_settings()  # nothing of the failed load is left


def test_every_truncation_is_refused(
    tmp_path: Path, opened: Callable[[str], Meta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cutting the dump anywhere (between lines or inside one) fails with the line number and
    leaves the target unformatted, ready for another load."""
    monkeypatch.setattr(dump, "RECORDS_PER_TXN", 2)  # records before the cut are committed
    data = _small_dump(tmp_path, opened)
    target = opened(f"sqlite3://{tmp_path}/cut.db")
    lines = data.split(b"\n")[:-1]
    for n in range(len(lines)):
        prefix = b"".join(line + b"\n" for line in lines[:n])
        _expect_malformed(target, prefix, n + 1, "truncated")
        half = prefix + lines[n][: len(lines[n]) // 2]
        _expect_malformed(target, half, n + 1, "truncated")
    load_bytes(target, data)
    assert dump_bytes(target) == data


# (case, edit of the lines, line of the error (negative: from the end; None: any), error text)
_CASES: list[tuple[str, Callable[[list[bytes]], list[bytes]], int | None, str]] = [
    ("not json", lambda ls: [b"hello", *ls[1:]], 1, "not a loftfs dump"),
    ("other format", lambda ls: [*ls[:1], b'"format":"tar",', *ls[2:]], 2, "not a loftfs dump"),
    ("newer version", lambda ls: [*ls[:2], b'"version":3,', *ls[3:]], 3, "version 3"),
    ("bad json", lambda ls: [*ls[:7], ls[7][:40] + b",", *ls[8:]], 8, "invalid JSON"),
    ("lost line", lambda ls: ls[:7] + ls[8:], None, ""),
    ("missing comma", lambda ls: [*ls[:7], ls[7].rstrip(b","), *ls[8:]], 9, "',' missing"),
    ("bad sources", lambda ls: [*ls[:4], b'"sources":{"1":},', *ls[5:]], 5, "invalid JSON"),
    ("data after the end", lambda ls: [*ls, b"{}"], -1, "after the end"),
    ("summary off", lambda ls: _edit_member(ls, b'"summary":', "inodes", 99), -2, "summary"),
    ("unknown counter", lambda ls: _edit_member(ls, b'"counters":', "bogus", 1), -3, "bogus"),
]


def _edit_member(lines: list[bytes], prefix: bytes, key: str, value: int) -> list[bytes]:
    i = next(n for n, line in enumerate(lines) if line.startswith(prefix))
    line = lines[i]
    comma = line.endswith(b",")
    obj = json.loads(line[len(prefix) : len(line) - comma])
    obj[key] = value
    lines = list(lines)
    lines[i] = prefix + json.dumps(obj, separators=(",", ":")).encode() + (b"," if comma else b"")
    return lines


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_malformed_dump_is_refused(
    case: tuple[str, Callable[[list[bytes]], list[bytes]], int | None, str],
    tmp_path: Path,
    opened: Callable[[str], Meta],
) -> None:
    _, edit, line, text = case
    data = _small_dump(tmp_path, opened)
    lines = edit(data.split(b"\n")[:-1])
    if line is not None and line < 0:
        line += len(lines) + 1  # counted from the end
    _expect_malformed(opened(f"sqlite3://{tmp_path}/bad.db"), b"\n".join(lines) + b"\n", line, text)


def _record_cases() -> list[tuple[str, dict[str, object], str, int]]:
    """(case, record, error text, where: 1 = after the entry of directory "d" (inode 2),
    2 = after the entry defining file "link" (inode 3), 3 = after that file's chunk 0)."""
    attr = {"mode": 420, "uid": 0, "gid": 0, "nlink": 1, "size": 0, "rdev": 0,
            "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "parent": 0}  # fmt: skip
    entry = {"parent": 1, "name": "x", "inode": 50, "type": "file", "attr": attr}
    chunk = {"chunk": 3, "index": 0, "slices": [[0, 1, 10, 0, 10, 0]]}
    return [
        ("unknown field", {**entry, "colour": 1}, "unknown field 'colour'", 1),
        ("bad type", {**entry, "type": "door"}, "'type' must be one of", 1),
        ("slash in name", {**entry, "name": "a/b"}, "invalid name", 1),
        ("dot name", {**entry, "name": ".."}, "invalid name", 1),
        ("bad base64", {**entry, "name": {"b64": "!!"}}, "invalid base64", 1),
        ("mode too big", {**entry, "attr": {**attr, "mode": 0o170000}}, "'mode' must be", 1),
        ("missing attr field", {**entry, "attr": {"mode": 1}}, "'uid' must be", 1),
        ("undefined parent", {**entry, "parent": 999}, "not defined before it", 1),
        (
            "link to nothing",
            {"parent": 1, "name": "x", "inode": 77, "type": "file"},
            "hard link",
            1,
        ),
        (
            "link to a directory",
            {"parent": 1, "name": "x", "inode": 2, "type": "dir"},
            "hard link",
            1,
        ),
        ("chunk of a directory", {**chunk, "chunk": 2}, "must follow", 1),
        ("slice past chunk", {**chunk, "slices": [[CHUNK_SIZE, 1, 1, 0, 1, 0]]}, "outside", 2),
        ("slice past stored", {**chunk, "slices": [[0, 1, 10, 5, 10, 0]]}, "past its stored", 2),
        ("chunk out of order", chunk, "out of order", 3),
        ("symlink target on a file", {**entry, "target": "x"}, "only symlinks", 1),
    ]


@pytest.mark.parametrize("case", _record_cases(), ids=[c[0] for c in _record_cases()])
def test_invalid_record_is_refused(
    case: tuple[str, dict[str, object], str, int],
    tmp_path: Path,
    opened: Callable[[str], Meta],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad record names its line; what was loaded before it is removed again."""
    monkeypatch.setattr(dump, "RECORDS_PER_TXN", 1)  # records before it are committed
    _, record, text, where = case
    lines = _small_dump(tmp_path, opened).split(b"\n")
    at = lines.index(b'"tree":[') + 1 + where
    lines.insert(at, json.dumps(record, separators=(",", ":")).encode() + b",")
    _expect_malformed(opened(f"sqlite3://{tmp_path}/bad.db"), b"\n".join(lines), at + 1, text)


def _small_ext_dump(tmp_path: Path, opened: Callable[[str], Meta]) -> bytes:
    """A file with an external slice, then another entry: lines ``"tree":[``, the file's
    entry, its external object record, its chunk, the other entry, ``],``."""
    meta = opened(f"sqlite3://{tmp_path}/small-ext.db")
    meta.init_volume(VolumeSettings(name="small-ext"))
    f = meta.mknod(C, ROOT_INODE, b"imported", FileType.FILE, 0o644).inode
    sid = meta.new_slice_id()
    put_ext(meta, sid, ExtObject(1, "dir/object", '"e1"', 0, 10))
    meta.write_slice(f, 0, Slice(0, sid, 10, 0, 10, KIND_EXTERNAL), -1)
    meta.mknod(C, ROOT_INODE, b"later", FileType.FILE, 0o644)
    return dump_bytes(meta)


def _ext_line(lines: list[bytes]) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(b'{"ext":'))


def _edit_ext(lines: list[bytes], **changes: object) -> list[bytes]:
    """The external object record with fields changed (``None``: removed)."""
    i = _ext_line(lines)
    rec = json.loads(lines[i].rstrip(b","))
    for key, value in changes.items():
        if value is None:
            del rec[key]
        else:
            rec[key] = value
    return [*lines[:i], json.dumps(rec, separators=(",", ":")).encode() + b",", *lines[i + 1 :]]


def _move(lines: list[bytes], src: int, dst: int) -> list[bytes]:
    lines = list(lines)
    lines.insert(dst, lines.pop(src))
    return lines


def _unused_last(lines: list[bytes]) -> list[bytes]:
    """Another external object record as the last element of the tree."""
    i = _ext_line(lines)
    end = lines.index(b"],", i)
    rec = json.loads(lines[i].rstrip(b","))
    rec["ext"] += 100
    extra = json.dumps(rec, separators=(",", ":")).encode()
    return [*lines[: end - 1], lines[end - 1] + b",", extra, *lines[end:]]


def _v1(lines: list[bytes]) -> list[bytes]:
    """A version 2 document written as version 1 (no sources member, no exts count)."""
    out = [b'"version":1,' if line.startswith(b'"version":') else line for line in lines]
    out = [line for line in out if not line.startswith(b'"sources":')]
    i = next(n for n, line in enumerate(out) if line.startswith(b'"summary":'))
    summary = json.loads(out[i][len(b'"summary":') :])
    del summary["exts"]
    out[i] = b'"summary":' + json.dumps(summary, separators=(",", ":")).encode()
    return out


# (case, edit of the lines, line of the error counted from the external record's line, text)
_EXT_CASES: list[tuple[str, Callable[[list[bytes]], list[bytes]], int, str]] = [
    ("negative offset", lambda ls: _edit_ext(ls, offset=-1), 0, "'offset' must be"),
    ("length past a chunk", lambda ls: _edit_ext(ls, length=CHUNK_SIZE + 1), 0, "'length'"),
    ("offset not a number", lambda ls: _edit_ext(ls, offset="0"), 0, "'offset' must be"),
    ("source too big", lambda ls: _edit_ext(ls, source=1 << 31), 0, "'source' must be"),
    ("empty key", lambda ls: _edit_ext(ls, key=""), 0, "'key' must hold 1 to 1024"),
    ("key too long", lambda ls: _edit_ext(ls, key="é" * 513), 0, "'key' must hold"),
    ("key not a string", lambda ls: _edit_ext(ls, key=["k"]), 0, "'key' must be a string"),
    ("key not utf-8", lambda ls: _edit_ext(ls, key="\ud800"), 0, "'key' is not valid UTF-8"),
    ("etag not a string", lambda ls: _edit_ext(ls, etag=None), 0, "missing 'etag'"),
    ("unknown field", lambda ls: _edit_ext(ls, colour="red"), 0, "unknown field 'colour'"),
    ("bad id", lambda ls: _edit_ext(ls, ext=0), 0, "'ext' must be"),
    ("length not the slice's size", lambda ls: _edit_ext(ls, length=11), 1, "has size 10"),
    ("record missing", lambda ls: ls[: _ext_line(ls)] + ls[_ext_line(ls) + 1 :], 0, "no object"),
    ("record after its chunk", lambda ls: _move(ls, _ext_line(ls), _ext_line(ls) + 1), 0, "no object"),
    ("record before its file", lambda ls: _move(ls, _ext_line(ls), _ext_line(ls) - 1), -1, "right before"),
    ("record unused", lambda ls: _move(ls, _ext_line(ls) + 1, _ext_line(ls) + 3), 1, "right before"),
    ("record last", lambda ls: _unused_last(ls), 4, "right before"),
    ("record twice", lambda ls: [*ls[: _ext_line(ls) + 1], *ls[_ext_line(ls) :]], 1, "defined twice"),
    ("in a version 1 dump", _v1, -1, "need format version 2"),
]  # fmt: skip


@pytest.mark.parametrize("case", _EXT_CASES, ids=[c[0] for c in _EXT_CASES])
def test_invalid_external_record_is_refused(
    case: tuple[str, Callable[[list[bytes]], list[bytes]], int, str],
    tmp_path: Path,
    opened: Callable[[str], Meta],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """External object records are checked like every record, and so is their place: right
    before the chunk that uses them first, used by it, each defined once."""
    monkeypatch.setattr(dump, "RECORDS_PER_TXN", 1)  # records before it are committed
    _, edit, offset, text = case
    lines = _small_ext_dump(tmp_path, opened).split(b"\n")[:-1]
    at = _ext_line(lines)
    edited = edit(lines)
    target = opened(f"sqlite3://{tmp_path}/bad.db")
    _expect_malformed(target, b"\n".join(edited) + b"\n", at + 1 + offset, text)


def test_external_records_load_after_a_failed_try(
    tmp_path: Path, opened: Callable[[str], Meta]
) -> None:
    """A refused load leaves no external object record behind: the same target then takes
    the dump."""
    data = _small_ext_dump(tmp_path, opened)
    lines = data.split(b"\n")
    bad = b"\n".join(_edit_ext(lines, length=11))
    target = opened(f"sqlite3://{tmp_path}/again.db")
    with pytest.raises(DumpFormatError):
        load_bytes(target, bad)
    load_bytes(target, data)
    assert dump_bytes(target) == data
    sid = json.loads(lines[_ext_line(lines)].rstrip(b","))["ext"]
    assert target.get_ext([sid]) == {sid: ExtObject(1, "dir/object", '"e1"', 0, 10)}


def test_version_1_dump_loads(tmp_path: Path, opened: Callable[[str], Meta]) -> None:
    """A dump of format version 1 (no sources, no external objects) loads as it did."""
    data = _small_dump(tmp_path, opened)
    old = b"\n".join(_v1(data.split(b"\n")[:-1])) + b"\n"
    assert b'"version":1,' in old and b'"sources"' not in old
    target = opened(f"sqlite3://{tmp_path}/v1.db")
    load_bytes(target, old)
    assert dump_bytes(target) == data
    assert get_setting(target, SETTING_SOURCES) is None


# --- lazy-import bindings ----------------------------------------------------------------------


def _lazy_volume(tmp_path: Path, opened: Callable[[str], Meta]) -> Meta:
    """Root bound to a source prefix, a bound directory "b", a plain directory "plain", a file
    "f" and a trashed file: lines ``"root":...``, ``"tree":[``, the entries of "b", "f" and
    "plain", ``],``, ``"trash":[``, the trash record, ..."""
    meta = opened(f"sqlite3://{tmp_path}/small-lazy-{uuid.uuid4().hex[:8]}.db")
    meta.init_volume(VolumeSettings(name="small-lazy", trash_days=1))
    meta.bind_lazy(ROOT_INODE, 1, "")
    b = meta.mkdir(C, ROOT_INODE, b"b", 0o755).inode
    meta.bind_lazy(b, 2, "b/")
    meta.mkdir(C, ROOT_INODE, b"plain", 0o755)
    meta.mknod(C, ROOT_INODE, b"f", FileType.FILE, 0o644)
    t = meta.mknod(C, ROOT_INODE, b"t", FileType.FILE, 0o644).inode
    meta.write_slice(t, 0, Slice(0, meta.new_slice_id(), 10, 0, 10), -1)
    meta.unlink(C, ROOT_INODE, b"t")
    return meta


def test_lazy_bindings_round_trip(tmp_path: Path, opened: Callable[[str], Meta]) -> None:
    """The root and a directory bound by a lazy import keep their mark and binding; bindings
    nothing uses (of a directory without the mark, of an inode that is gone) are left out, and
    a mark whose binding is gone is written as none."""
    meta = _lazy_volume(tmp_path, opened)
    plain = meta.lookup(C, ROOT_INODE, b"plain").inode
    put_setting(meta, lazy_setting(plain), json.dumps({"source": 5, "prefix": "unused/"}))
    put_setting(meta, lazy_setting(999_999), json.dumps({"source": 5, "prefix": "gone/"}))
    lost = meta.mkdir(C, ROOT_INODE, b"lost", 0o755).inode
    meta.bind_lazy(lost, 6, "lost/")
    _base(meta)._transaction(lambda tx: tx.del_setting(lazy_setting(lost)), True)
    assert meta.getattr(lost).rdev == LAZY_MARK and meta.lazy_binding(lost) is None

    data = dump_bytes(meta)
    doc = json.loads(data)
    b = meta.lookup(C, ROOT_INODE, b"b").inode
    assert doc["root"]["lazy"] == {"source": 1, "prefix": ""}
    assert doc["root"]["attr"]["rdev"] == LAZY_MARK
    records = {r["name"]: r for r in doc["tree"]}
    assert records["b"]["lazy"] == {"source": 2, "prefix": "b/"}
    assert records["b"]["attr"]["rdev"] == LAZY_MARK
    for name in ("plain", "lost", "f"):
        assert "lazy" not in records[name] and records[name]["attr"]["rdev"] == 0, name
    assert b'"unused/"' not in data and b'"gone/"' not in data

    target = opened(f"sqlite3://{tmp_path}/lazy-target.db")
    load_bytes(target, data)
    assert dump_bytes(target) == data
    stored = lazy_settings(target)
    assert stored == {
        lazy_setting(ROOT_INODE): json.dumps({"source": 1, "prefix": ""}),
        lazy_setting(b): json.dumps({"source": 2, "prefix": "b/"}),
    }
    assert stored.items() <= lazy_settings(meta).items()  # stored as the source stores them
    assert target.lazy_binding(ROOT_INODE) == (1, "")
    assert target.lazy_binding(b) == (2, "b/")
    assert target.getattr(lost).rdev == 0 and target.lazy_binding(lost) is None
    assert target.getattr(plain).rdev == 0


def test_directory_listed_during_the_dump(
    tmp_path: Path, opened: Callable[[str], Meta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bound directory listed (mark and binding cleared) after the dump read its parent's
    listing is written as it is by then: unbound, with its new attributes, and loads."""
    meta = _lazy_volume(tmp_path, opened)
    b = meta.lookup(C, ROOT_INODE, b"b").inode
    listing = dump._Dumper._list_dir

    def list_then_populate(self: dump._Dumper, inode: int) -> list[tuple[bytes, Attr]]:
        entries = listing(self, inode)
        if inode == ROOT_INODE:
            meta.import_batch(
                b,
                [],
                source=2,
                owner=ImportOwner(),
                dir_cache={},
                lazy_dirs=[(b"sub", "b/sub/")],
                finish_lazy=True,
            )
        return entries

    monkeypatch.setattr(dump._Dumper, "_list_dir", list_then_populate)
    data = dump_bytes(meta)
    monkeypatch.undo()
    doc = json.loads(data)
    records = {r["name"]: r for r in doc["tree"]}
    now = meta.getattr(b)
    assert now.rdev == 0 and now.nlink == 3
    assert "lazy" not in records["b"]
    assert (records["b"]["attr"]["rdev"], records["b"]["attr"]["nlink"]) == (0, 3)
    assert records["sub"]["lazy"] == {"source": 2, "prefix": "b/sub/"}
    target = opened(f"sqlite3://{tmp_path}/listed-target.db")
    load_bytes(target, data)
    assert target.getattr(b) == now  # the attributes as they were after the listing
    assert target.lazy_binding(b) is None
    assert target.lazy_binding(records["sub"]["inode"]) == (2, "b/sub/")


@pytest.mark.parametrize(
    "value", ["{not json", '{"source": 2}', '{"source": "2", "prefix": "b/"}', '[2, "b/"]']
)
def test_damaged_lazy_binding_fails_the_dump(
    value: str, tmp_path: Path, opened: Callable[[str], Meta]
) -> None:
    """A binding the dump cannot read is damaged metadata: the dump says which, instead of
    writing a directory that would load unbound or not at all."""
    meta = _lazy_volume(tmp_path, opened)
    b = meta.lookup(C, ROOT_INODE, b"b").inode
    put_setting(meta, lazy_setting(b), value)
    with pytest.raises(LoftError, match=f"directory {b} has an invalid lazy-import binding"):
        dump_bytes(meta)


def _record_line(lines: list[bytes], name: str) -> int:
    """The line of the record of entry ``name`` ("/": the root, "trash": the trash record)."""
    if name == "/":
        return next(i for i, line in enumerate(lines) if line.startswith(b'"root":'))
    if name == "trash":
        return next(i for i, line in enumerate(lines) if line.startswith(b'{"trash":'))
    tag = b'"name":' + json.dumps(name).encode() + b","
    return next(i for i, line in enumerate(lines) if tag in line)


def _edit_lazy(
    lines: list[bytes], name: str, edit: Callable[[dict[str, Any]], None]
) -> list[bytes]:
    """The lines with record ``name`` changed by ``edit``."""
    i = _record_line(lines, name)
    line = lines[i]
    head = b'"root":' if name == "/" else b""
    comma = line.endswith(b",")
    rec = json.loads(line[len(head) : len(line) - comma])
    edit(rec)
    new = head + json.dumps(rec, separators=(",", ":")).encode() + (b"," if comma else b"")
    return [*lines[:i], new, *lines[i + 1 :]]


def _set(**changes: object) -> Callable[[dict[str, Any]], None]:
    """An edit: ``lazy_<field>`` sets a field of the binding, ``rdev`` the attribute, other
    names the record's fields (``None``: removed)."""

    def edit(rec: dict[str, Any]) -> None:
        for key, value in changes.items():
            where, field_ = rec, key
            if key.startswith("lazy_"):
                where, field_ = rec["lazy"], key[5:]
            elif key == "rdev":
                where = rec["attr"]
            if value is None:
                del where[field_]
            else:
                where[field_] = value

    return edit


_BINDING = {"source": 7, "prefix": "p/"}

# (case, record ("/": the root), edit, error text)
_LAZY_CASES: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("source not a number", "b", _set(lazy_source="2"), "'lazy': 'source' must be an integer"),
    ("negative source", "b", _set(lazy_source=-1), "'source' must be an integer from 0"),
    ("source too big", "b", _set(lazy_source=1 << 31), "'source' must be an integer"),
    ("prefix not a string", "b", _set(lazy_prefix=["b/"]), "'prefix' must be a string"),
    ("prefix too long", "b", _set(lazy_prefix="é" * 513), "'prefix' must hold 0 to 1024"),
    ("prefix not utf-8", "b", _set(lazy_prefix="\ud800"), "'prefix' is not valid UTF-8"),
    ("prefix missing", "b", _set(lazy_prefix=None), "missing 'prefix'"),
    ("unknown binding field", "b", _set(lazy_colour=1), "unknown field 'colour'"),
    ("binding not an object", "b", _set(lazy="b/"), "'lazy' must be an object"),
    ("binding without the mark", "b", _set(rdev=0), "must have rdev 1, not 0"),
    ("binding with another rdev", "b", _set(rdev=2), "must have rdev 1, not 2"),
    ("mark without binding", "b", _set(lazy=None), "needs its 'lazy' binding"),
    ("root mark without binding", "/", _set(lazy=None), "root: a directory with rdev 1"),
    ("root binding without mark", "/", _set(rdev=0), "root: a directory with a 'lazy'"),
    ("binding of a plain directory", "plain", _set(lazy=_BINDING), "must have rdev 1"),
    ("binding of a file", "f", _set(lazy=_BINDING), "only directories have a 'lazy'"),
    ("binding of a marked file", "f", _set(lazy=_BINDING, rdev=1), "only directories"),
    ("binding in the trash", "trash", _set(lazy=_BINDING), "unknown field 'lazy'"),
]  # fmt: skip


@pytest.mark.parametrize("case", _LAZY_CASES, ids=[c[0] for c in _LAZY_CASES])
def test_invalid_lazy_binding_is_refused(
    case: tuple[str, str, Callable[[dict[str, Any]], None], str],
    tmp_path: Path,
    opened: Callable[[str], Meta],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A binding is checked like every field, and must go with the mark: a directory has
    ``rdev`` 1 exactly when it carries a binding; nothing else carries one."""
    monkeypatch.setattr(dump, "RECORDS_PER_TXN", 1)  # records before it are committed
    _, name, edit, text = case
    lines = dump_bytes(_lazy_volume(tmp_path, opened)).split(b"\n")[:-1]
    at = _record_line(lines, name)
    edited = _edit_lazy(lines, name, edit)
    target = opened(f"sqlite3://{tmp_path}/bad.db")
    _expect_malformed(target, b"\n".join(edited) + b"\n", at + 1, text)


def test_lazy_binding_in_a_version_1_dump_is_refused(
    tmp_path: Path, opened: Callable[[str], Meta]
) -> None:
    """Version 1 knows no bindings: neither a binding nor the mark it goes with loads."""
    lines = dump_bytes(_lazy_volume(tmp_path, opened)).split(b"\n")[:-1]
    old = _v1(lines)
    root = _record_line(old, "/")
    target = opened(f"sqlite3://{tmp_path}/v1-lazy.db")
    _expect_malformed(target, b"\n".join(old) + b"\n", root + 1, "need format version 2, not 1")
    unbound = _edit_lazy(old, "/", _set(lazy=None))
    _expect_malformed(target, b"\n".join(unbound) + b"\n", root + 1, "needs its 'lazy' binding")


def test_failed_load_leaves_no_binding(
    tmp_path: Path, opened: Callable[[str], Meta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bindings written before a refused record go with the rest: the same target then takes
    a dump without them."""
    monkeypatch.setattr(dump, "RECORDS_PER_TXN", 1)  # the bindings before it are committed
    meta = _lazy_volume(tmp_path, opened)
    lines = dump_bytes(meta).split(b"\n")[:-1]
    bad = _edit_lazy(lines, "plain", _set(lazy=_BINDING))
    target = opened(f"sqlite3://{tmp_path}/again.db")
    with pytest.raises(DumpFormatError):
        load_bytes(target, b"\n".join(bad) + b"\n")
    unbound = meta.lookup(C, ROOT_INODE, b"b").inode
    meta.import_batch(unbound, [], source=2, owner=ImportOwner(), dir_cache={}, finish_lazy=True)
    data = dump_bytes(meta)
    load_bytes(target, data)
    assert dump_bytes(target) == data
    assert lazy_settings(target) == {
        lazy_setting(ROOT_INODE): json.dumps({"source": 1, "prefix": ""})
    }
    assert target.lazy_binding(unbound) is None


def test_interrupted_load_is_marked_and_can_be_discarded(
    source: Source, opened: Callable[[str], Meta], tmp_path: Path
) -> None:
    """Metadata of a load that died is marked (here written by hand as load_meta writes it
    first; tests/cli kills a real load); a new load refuses it unless told to discard it."""
    from loftfs.meta.dump import check_target

    doc = dump_bytes(source.meta)
    url = f"sqlite3://{tmp_path}/half.db"
    target = opened(url)
    interim = source.meta.load_settings()
    interim.extra = {LOAD_MARKER: {"started_ns": 1}}
    target.init_volume(interim)  # what load_meta writes first
    with pytest.raises(VolumeExists, match="interrupted load"):
        load_bytes(target, doc)
    with pytest.raises(VolumeExists, match="interrupted load"):
        check_target(target)
    load_meta(target, io.BytesIO(doc), discard_interrupted=True)
    assert dump_bytes(target) == doc
    with pytest.raises(VolumeExists, match="already holds"):  # a complete volume is kept
        load_meta(target, io.BytesIO(doc), discard_interrupted=True)


def test_dump_of_unformatted_engine(tmp_path: Path, opened: Callable[[str], Meta]) -> None:
    with pytest.raises(NotFormatted):
        dump_bytes(opened(f"sqlite3://{tmp_path}/none.db"))


# --- memory -------------------------------------------------------------------------------------


def synthetic_dump(dirs: int, per_dir: int, external: bool = False) -> Iterator[bytes]:
    """The lines of a dump of ``dirs`` directories of ``per_dir`` one-chunk files, generated
    on the fly: format version 1, or with ``external`` version 2 with every file imported
    (an external slice and its object record)."""
    attr = {"mode": 420, "uid": 0, "gid": 0, "nlink": 1, "size": 4096, "rdev": 0,
            "atime_ns": 1, "mtime_ns": 2, "ctime_ns": 3, "parent": 0}  # fmt: skip
    dattr = {**attr, "mode": 493, "nlink": 2, "parent": 1}
    root = {"inode": 1, "type": "dir", "attr": {**dattr, "nlink": 2 + dirs}}
    volume = VolumeSettings(name="synthetic", uuid="00000000-0000-0000-0000-000000000001")
    j = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    yield b'{\n"format":"loftfs-dump",\n"version":%d,\n' % (2 if external else 1)
    yield f'"volume":{json.dumps(json.loads(volume.to_json()), sort_keys=True, separators=(",", ":"))},\n'.encode()
    if external:
        yield b'"sources":{"1":{"bucket":"imported"}},\n'
    yield f'"root":{j(root)},\n"tree":['.encode()
    inode, sid, first, chunks = 2, 1, True, 0
    records: list[str] = []
    for d in range(dirs):
        records.append(
            j({"parent": 1, "name": f"dir{d:04d}", "inode": inode, "type": "dir", "attr": dattr})
        )
        inode += 1
    for d in range(dirs):
        for i in range(per_dir):
            rec = {
                "parent": 2 + d,
                "name": f"file-{i:06d}.bin",
                "inode": inode,
                "type": "file",
                "attr": attr,
            }
            if i % 10 == 0:
                rec["xattrs"] = [["user.tag", f"v{i}"]]
            records.append(j(rec))
            if external:
                key = f"dir {d:04d}/file-{i:06d}.bin"
                ext = {"ext": sid, "source": 1, "key": key, "etag": f'"{sid:032x}"',
                       "offset": 0, "length": 4096}  # fmt: skip
                records.append(j(ext))
            slices = [[0, sid, 4096, 0, 4096, int(external)]]
            records.append(j({"chunk": inode, "index": 0, "slices": slices}))
            inode, sid, chunks = inode + 1, sid + 1, chunks + 1
            if len(records) > 1000:
                yield (("\n" if first else ",\n") + ",\n".join(records)).encode()
                first, records = False, []
    if records:
        yield (("\n" if first else ",\n") + ",\n".join(records)).encode()
    counters = {"next_inode": inode, "next_slice": sid, "next_session": 1,
                "used_space": 4096 * inode, "used_inodes": inode - 1}  # fmt: skip
    summary = {"inodes": inode - 1, "entries": inode - 2, "chunks": chunks, "slices": chunks,
               "bytes": 4096 * chunks, "trash": 0}  # fmt: skip
    if external:
        summary["exts"] = chunks
    yield f'\n],\n"trash":[\n],\n"counters":{j(counters)},\n"summary":{j(summary)}\n}}\n'.encode()


class _Chunks(io.RawIOBase):
    """A readable stream over a generator of byte strings (nothing is held but one piece)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.rest:
            self.rest = next(self.pieces, b"")
            if not self.rest:
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.size += len(data)
        return len(data)


_MEMORY_PROBE = """
import io, sys
sys.path.insert(0, sys.argv[4])
from test_dump_load import _Chunks, _Sink, synthetic_dump
from loftfs.meta import open_meta
from loftfs.meta.dump import dump_meta, load_meta

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

meta = open_meta(sys.argv[1])
files, phase, external = int(sys.argv[2]), sys.argv[3], sys.argv[5] == "external"
if phase == "dump":
    meta.load_settings()  # connected before the measurement starts
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
base = status("VmRSS")
if phase == "load":
    load_meta(meta, io.BufferedReader(_Chunks(synthetic_dump(50, files // 50, external))))
else:
    sink = _Sink()
    stats = dump_meta(meta, sink)
    assert stats.inodes == files + 51 and sink.size > files * 200, (stats, sink.size)
    assert stats.exts == (files if external else 0), stats
print(status("VmHWM") - base)
meta.close()
"""


def _peak_growth(url: str, files: int, phase: str, kind: str) -> int:
    """Peak resident-size growth (bytes) of a fresh process loading or dumping ``files``
    (``kind``: ``native`` or ``external`` files, see ``synthetic_dump``)."""
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, url, str(files), phase, here, kind],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("kind", ["native", "external"])
def test_memory_stays_bounded(kind: str, tmp_path: Path) -> None:
    """Loading and dumping 50,000 files (a 12 MB document, 19 MB when every file is
    imported) grows a process's peak resident size by a few MiB at most (measured: ~1.5 MiB
    for the load, ~0.5 MiB for the dump; ~4 MiB each when every file is imported, whatever
    their number: the ids of the external object records written or loaded move to a
    temporary SQLite file past 20,000): nothing of the volume is held but one directory
    listing and one batch. Holding the files instead would take tens of MiB."""
    url = f"sqlite3://{tmp_path}/large.db"
    load = _peak_growth(url, 50_000, "load", kind)
    dump = _peak_growth(url, 50_000, "dump", kind)
    assert load < 8 << 20, f"load grew the peak RSS by {load / 2**20:.1f} MiB"
    assert dump < 8 << 20, f"dump grew the peak RSS by {dump / 2**20:.1f} MiB"


def test_inode_set_spills_to_disk() -> None:
    s = InodeSet(memory_limit=100)
    try:
        values = random.Random(7).sample(range(1, 1 << 62), 1000)
        for v in values[:500]:
            assert s.add(v)
        assert s.spilled
        for v in values[:500]:
            assert not s.add(v)
            assert v in s
        for v in values[500:]:
            assert v not in s
            assert s.add(v)
        assert all(v in s for v in values)
    finally:
        s.close()
