"""``Meta.import_batch`` and lazy bindings on every engine: what an import writes (files with
external slices, directories from key paths), how a re-run compares versions, conflicts,
quotas, checkpoints written with the batch, and directories bound to a source prefix."""

from __future__ import annotations

import errno

from meta_helpers import ROOT, fs_error, mkfile, names

from loftfs.meta import Meta
from loftfs.meta.ops_import import LAZY_MARK, lazy_setting
from loftfs.meta.types import (
    CHUNK_SIZE,
    KIND_EXTERNAL,
    ROOT_CTX,
    FileType,
    ImportItem,
    ImportOwner,
    Slice,
)

C = ROOT_CTX
OWNER = ImportOwner(0o640, 0o750, 1000, 1001)
SOURCE = 3


def item(path: str, size: int, etag: str = "e1", mtime: int = 1_700_000_000 * 10**9) -> ImportItem:
    parts = [p.encode() for p in path.split("/")]
    return ImportItem(tuple(parts[:-1]), parts[-1], size, mtime, "pre/" + path, etag)


def run(meta: Meta, dest: int, items: list[ImportItem], **kw: object) -> object:
    return meta.import_batch(dest, items, source=SOURCE, owner=OWNER, dir_cache={}, **kw)  # type: ignore[arg-type]


def resolve(meta: Meta, path: str) -> int:
    inode = ROOT
    for part in path.split("/"):
        inode = meta.lookup(C, inode, part.encode()).inode
    return inode


def test_batch_creates_files_with_external_slices_and_directories(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"data", 0o755).inode
    big = 2 * CHUNK_SIZE + 5
    result = run(
        meta, dest, [item("a/b/one.jpg", 10), item("a/two.jpg", 0), item("weights.bin", big)]
    )
    assert (result.created, result.updated, result.conflicts) == (3, 0, 0)  # type: ignore[attr-defined]
    assert sorted(result.new_dirs) == [(b"a",), (b"a", b"b")]  # type: ignore[attr-defined]
    assert names(meta, dest) == [b"a", b"weights.bin"]
    a = meta.getattr(resolve(meta, "data/a"))
    assert (a.type, a.mode, a.uid, a.gid, a.nlink, a.parent) == (
        FileType.DIR, 0o750, 1000, 1001, 3, dest,
    )  # fmt: skip
    assert meta.getattr(dest).nlink == 3
    f = meta.getattr(resolve(meta, "data/a/b/one.jpg"))
    assert (f.type, f.mode, f.uid, f.gid, f.size, f.mtime_ns) == (
        FileType.FILE, 0o640, 1000, 1001, 10, 1_700_000_000 * 10**9,
    )  # fmt: skip
    # one external record per 64 MiB chunk, each a piece of the same object
    w = resolve(meta, "data/weights.bin")
    pieces = []
    for index in range(3):
        (s,) = meta.read_chunk(w, index)
        assert (s.pos, s.off, s.kind) == (0, 0, KIND_EXTERNAL)
        rec = meta.get_ext([s.id])[s.id]
        assert (rec.source, rec.key, rec.etag) == (SOURCE, "pre/weights.bin", "e1")
        assert rec.length == s.len == s.size
        pieces.append((rec.offset, rec.length))
    assert pieces == [(0, CHUNK_SIZE), (CHUNK_SIZE, CHUNK_SIZE), (2 * CHUNK_SIZE, 5)]
    # an empty object is an empty file, with no slice
    assert meta.read_chunk(resolve(meta, "data/a/two.jpg"), 0) == []
    assert meta.count_ext(SOURCE) == 4
    # usage counts what was imported
    space, inodes = meta.usage()
    assert inodes >= 6 and space >= big


def test_rerun_compares_versions_and_keeps_local_changes(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"d", 0o755).inode
    run(meta, dest, [item("x", 100), item("y", 100), item("z", 100)])
    ino_x = resolve(meta, "d/x")
    # y changed here: a local write on top of the external slice
    y = resolve(meta, "d/y")
    sid = meta.new_slice_id()
    meta.write_slice(y, 0, Slice(10, sid, 5, 0, 5), 0)
    again = run(meta, dest, [item("x", 100), item("y", 100), item("z", 100)])
    assert (again.created, again.updated, again.unchanged, again.conflicts) == (0, 0, 3, 0)  # type: ignore[attr-defined]
    assert len(meta.read_chunk(y, 0)) == 2  # the local write is kept
    # a new version: refreshed where the file is untouched, a conflict where it was changed
    new = run(meta, dest, [item("x", 200, "e2"), item("y", 300, "e2")])
    assert (new.updated, new.conflicts) == (1, 1)  # type: ignore[attr-defined]
    assert new.conflict_paths == [b"y"]  # type: ignore[attr-defined]
    x = meta.getattr(ino_x)
    assert x.size == 200 and resolve(meta, "d/x") == ino_x  # same inode, new data
    (s,) = meta.read_chunk(ino_x, 0)
    assert meta.get_ext([s.id])[s.id].etag == "e2"
    # the old version's record lost its last reference
    assert any(True for _ in meta.deleted_slices())


def test_conflicts_are_left_alone_unless_overwrite(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"d", 0o755).inode
    mkfile(meta, dest, b"mine")
    meta.mkdir(C, dest, b"adir", 0o755)
    mkfile(meta, dest, b"blocker")
    items = [item("mine", 7), item("adir", 7), item("blocker/inside", 7)]
    r = run(meta, dest, items)
    assert (r.created, r.conflicts) == (0, 3)  # type: ignore[attr-defined]
    assert sorted(r.conflict_paths) == [b"adir", b"blocker/inside", b"mine"]  # type: ignore[attr-defined]
    assert meta.getattr(resolve(meta, "d/mine")).size == 0
    r = run(meta, dest, items, overwrite=True)
    assert (r.updated, r.conflicts) == (1, 2)  # type: ignore[attr-defined]
    assert meta.getattr(resolve(meta, "d/mine")).size == 7
    assert meta.getattr(resolve(meta, "d/adir")).type == FileType.DIR


def test_checkpoint_is_written_with_the_batch_and_not_without(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"d", 0o755).inode
    run(meta, dest, [item("a", 1)], checkpoint=("import:job:1:0", "pre/a"))
    assert meta.get_setting("import:job:1:0") == "pre/a"
    # a failing batch (ENOENT destination) writes neither files nor checkpoint
    gone = meta.mkdir(C, ROOT, b"gone", 0o755).inode
    meta.rmdir(C, ROOT, b"gone")
    with fs_error(errno.ENOENT):
        run(meta, gone, [item("b", 1)], checkpoint=("import:job:1:0", "pre/b"))
    assert meta.get_setting("import:job:1:0") == "pre/a"
    with fs_error(errno.ENOTDIR):
        run(meta, resolve(meta, "d/a"), [item("c", 1)])


def test_quota_refuses_the_whole_batch(meta: Meta) -> None:
    settings = meta.load_settings()
    settings.inodes = 5
    meta.update_settings(settings)
    dest = meta.mkdir(C, ROOT, b"d", 0o755).inode  # root + d: 2 of 5 inodes
    with fs_error(errno.ENOSPC):
        run(meta, dest, [item(f"f{i}", 1) for i in range(4)])
    assert names(meta, dest) == []
    run(meta, dest, [item(f"f{i}", 1) for i in range(3)])
    assert len(names(meta, dest)) == 3


def test_lazy_binding_and_listing(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"lazy", 0o755).inode
    meta.bind_lazy(dest, SOURCE, "bucket/prefix/")
    assert meta.getattr(dest).rdev == LAZY_MARK
    assert meta.lazy_binding(dest) == (SOURCE, "bucket/prefix/")
    # a first batch of a listing: objects and subdirectories bound in turn
    run(meta, dest, [item("obj", 3)], lazy_dirs=[(b"sub", "bucket/prefix/sub/")])
    sub = resolve(meta, "lazy/sub")
    assert meta.getattr(sub).rdev == LAZY_MARK
    assert meta.lazy_binding(sub) == (SOURCE, "bucket/prefix/sub/")
    assert meta.lazy_binding(dest) == (SOURCE, "bucket/prefix/")  # not finished yet
    # the last batch clears the binding; a second client finishing again changes nothing
    run(meta, dest, [item("obj2", 3)], finish_lazy=True)
    assert meta.lazy_binding(dest) is None and meta.getattr(dest).rdev == 0
    again = run(meta, dest, [item("obj", 3)], lazy_dirs=[(b"sub", "x/")], finish_lazy=True)
    assert (again.created, again.unchanged) == (0, 1)  # type: ignore[attr-defined]
    assert meta.lazy_binding(sub) == (SOURCE, "bucket/prefix/sub/")
    assert names(meta, dest) == [b"obj", b"obj2", b"sub"]
    assert meta.get_setting(lazy_setting(dest)) is None
    with fs_error(errno.ENOTDIR):
        meta.bind_lazy(resolve(meta, "lazy/obj"), SOURCE, "p/")


def test_unicode_and_odd_names(meta: Meta) -> None:
    dest = meta.mkdir(C, ROOT, b"u", 0o755).inode
    odd = ["caf\u00e9/\u6587\u4ef6 \u540d.txt", "sp ace/tab\there", "n" * 255]
    run(meta, dest, [item(p, 4) for p in odd])
    for p in odd:
        assert meta.getattr(resolve(meta, "u/" + p)).size == 4
