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

import pytest

from loftfs.chunk.datapath import DataPath
from loftfs.errors import NotFormatted, VolumeExists
from loftfs.meta import dump, engine_schemes
from loftfs.meta.base import BaseMeta
from loftfs.meta.dump import (
    FORMAT_NAME,
    LOAD_MARKER,
    DumpFormatError,
    InodeSet,
    dump_meta,
    load_meta,
)
from loftfs.meta.interface import Meta
from loftfs.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    ROOT_CTX,
    ROOT_INODE,
    FileType,
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
        # a slice of another kind (reserved for external objects): kept as it is
        ext = meta.create(C, ROOT_INODE, b"external", 0o644, os.O_RDWR).inode
        meta.write_slice(ext, 1, Slice(0, meta.new_slice_id(), 500, 100, 300, kind=1), -1)
        # the trash: two files with data
        for i in range(2):
            t = meta.create(C, docs, f"trashed-{i}".encode(), 0o644, os.O_RDWR).inode
            _write(dp, t, 0, _data(10 + i, 5000))
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
        for inode in (uni, bad, big, copy, odd, leaf, ext, cut):
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
    assert doc["format"] == FORMAT_NAME and doc["version"] == 1
    assert doc["volume"]["name"] == "dumped" and doc["volume"]["trash_days"] == 3
    assert doc["root"]["xattrs"] == [["user.root", "top"]]
    lines = data.split(b"\n")
    assert len(lines) == len(doc["tree"]) + len(doc["trash"]) + 13  # 12 lines around, "" at the end
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
    ("newer version", lambda ls: [*ls[:2], b'"version":2,', *ls[3:]], 3, "version 2"),
    ("bad json", lambda ls: [*ls[:6], ls[6][:40] + b",", *ls[7:]], 7, "invalid JSON"),
    ("lost line", lambda ls: ls[:6] + ls[7:], None, ""),
    ("missing comma", lambda ls: [*ls[:6], ls[6].rstrip(b","), *ls[7:]], 8, "',' missing"),
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


def synthetic_dump(dirs: int, per_dir: int) -> Iterator[bytes]:
    """The lines of a dump of ``dirs`` directories of ``per_dir`` one-chunk files, generated
    on the fly."""
    attr = {"mode": 420, "uid": 0, "gid": 0, "nlink": 1, "size": 4096, "rdev": 0,
            "atime_ns": 1, "mtime_ns": 2, "ctime_ns": 3, "parent": 0}  # fmt: skip
    dattr = {**attr, "mode": 493, "nlink": 2, "parent": 1}
    root = {"inode": 1, "type": "dir", "attr": {**dattr, "nlink": 2 + dirs}}
    volume = VolumeSettings(name="synthetic", uuid="00000000-0000-0000-0000-000000000001")
    j = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    yield b'{\n"format":"loftfs-dump",\n"version":1,\n'
    yield f'"volume":{json.dumps(json.loads(volume.to_json()), sort_keys=True, separators=(",", ":"))},\n'.encode()
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
            records.append(j({"chunk": inode, "index": 0, "slices": [[0, sid, 4096, 0, 4096, 0]]}))
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
files, phase = int(sys.argv[2]), sys.argv[3]
if phase == "dump":
    meta.load_settings()  # connected before the measurement starts
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
base = status("VmRSS")
if phase == "load":
    load_meta(meta, io.BufferedReader(_Chunks(synthetic_dump(50, files // 50))))
else:
    sink = _Sink()
    stats = dump_meta(meta, sink)
    assert stats.inodes == files + 51 and sink.size > files * 200, (stats, sink.size)
print(status("VmHWM") - base)
meta.close()
"""


def _peak_growth(url: str, files: int, phase: str) -> int:
    """Peak resident-size growth (bytes) of a fresh process loading or dumping ``files``."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, url, str(files), phase, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """Loading and dumping 50,000 files (a 12 MB document) grows a process's peak resident
    size by a few MiB at most (measured: ~2 MiB for the load, ~1 MiB for the dump): nothing
    of the volume is held but one directory listing and one batch. Holding the files instead
    would take tens of MiB."""
    url = f"sqlite3://{tmp_path}/large.db"
    load = _peak_growth(url, 50_000, "load")
    dump = _peak_growth(url, 50_000, "dump")
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
