"""File data: slice lists, reference counts, truncate/holes, copies, compaction, quotas, trash."""

from __future__ import annotations

import errno
import os

import pytest
from meta_helpers import ROOT, RW, fs_error, mkfile

from loftfs.chunk.layout import overlay
from loftfs.meta import Meta
from loftfs.meta.base import BaseMeta
from loftfs.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    NOW,
    ROOT_CTX,
    Ctx,
    FileType,
    Slice,
    VolumeSettings,
)

C = ROOT_CTX
MiB = 1 << 20


def engine(meta: Meta) -> BaseMeta:
    """The shared implementation, for what it offers beyond ``Meta`` (trash maintenance)."""
    assert isinstance(meta, BaseMeta)
    return meta


def write(meta: Meta, inode: int, offset: int, length: int) -> int:
    """Commit one new slice covering ``[offset, offset + length)`` (within one chunk)."""
    index, pos = divmod(offset, CHUNK_SIZE)
    sid = meta.new_slice_id()
    meta.write_slice(inode, index, Slice(pos, sid, length, 0, length), NOW)
    return sid


def visible(
    meta: Meta, inode: int, index: int, end: int = CHUNK_SIZE
) -> list[tuple[int, int, int]]:
    """(pos, len, slice id) of the chunk's visible segments up to ``end``, merged by id."""
    out: list[tuple[int, int, int]] = []
    for seg in overlay(meta.read_chunk(inode, index), 0, end):
        if out and out[-1][2] == seg.id == 0:
            out[-1] = (out[-1][0], out[-1][1] + seg.len, 0)
        else:
            out.append((seg.pos, seg.len, seg.id))
    return out


def refs(meta: Meta) -> set[int]:
    return {sid for sid, _ in meta.deleted_slices(100_000)}


def test_write_slice(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    ids = {meta.new_slice_id() for _ in range(1500)}
    assert len(ids) == 1500 and 0 not in ids
    s = meta.new_slice_id()
    done = meta.write_slice(f.inode, 0, Slice(0, s, 100, 0, 100), 42)
    a = meta.getattr(f.inode)
    assert done.slices == 1 and done.attr == a  # what the commit wrote is what is stored
    assert a.size == 100 and a.mtime_ns == 42 and a.ctime_ns > 42
    done = meta.write_slice(f.inode, 0, Slice(50, s, 100, 10, 20), NOW)
    assert done.slices == 2 and done.attr == meta.getattr(f.inode)
    assert meta.getattr(f.inode).size == 100
    assert meta.read_chunk(f.inode, 0) == [Slice(0, s, 100, 0, 100), Slice(50, s, 100, 10, 20)]
    assert meta.read_chunk(f.inode, 1) == []
    write(meta, f.inode, 3 * CHUNK_SIZE + 10, 5)
    assert meta.getattr(f.inode).size == 3 * CHUNK_SIZE + 15
    with fs_error(errno.EINVAL):
        meta.write_slice(f.inode, 0, Slice(CHUNK_SIZE - 1, s, 100, 0, 2), NOW)
    with fs_error(errno.EINVAL):
        meta.write_slice(f.inode, 0, Slice(0, s, 100, 90, 20), NOW)
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    with fs_error(errno.EISDIR):
        meta.write_slice(d.inode, 0, Slice(0, s, 100, 0, 1), NOW)
    with fs_error(errno.ENOENT):
        meta.write_slice(999_999, 0, Slice(0, s, 100, 0, 1), NOW)


def test_usage_rounds_to_4k(meta: Meta) -> None:
    base_space, base_inodes = meta.usage()
    f = mkfile(meta, ROOT, b"f")
    assert meta.usage() == (base_space, base_inodes + 1)
    write(meta, f.inode, 0, 1)
    assert meta.usage()[0] == base_space + 4096
    write(meta, f.inode, 4096, 1)
    assert meta.usage()[0] == base_space + 8192
    meta.truncate(C, f.inode, 3 * MiB)
    assert meta.usage()[0] == base_space + 3 * MiB
    meta.mkdir(C, ROOT, b"d", 0o755)
    meta.symlink(C, ROOT, b"l", b"t")
    assert meta.usage() == (base_space + 3 * MiB + 8192, base_inodes + 3)
    meta.unlink(C, ROOT, b"f")
    meta.unlink(C, ROOT, b"l")
    meta.rmdir(C, ROOT, b"d")
    assert meta.usage() == (base_space, base_inodes)


def test_unlink_releases_slices(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    a = write(meta, f.inode, 0, 1000)
    b = write(meta, f.inode, CHUNK_SIZE, 1000)
    meta.write_slice(f.inode, 0, Slice(500, a, 1000, 0, 10), NOW)  # a twice in one chunk
    assert refs(meta) == set()
    meta.unlink(C, ROOT, b"f")
    assert dict(meta.deleted_slices()) == {a: 1000, b: 1000}
    meta.forget_deleted_slices([a])
    assert dict(meta.deleted_slices()) == {b: 1000}
    meta.forget_deleted_slices([b])
    assert meta.deleted_slices() == []


def test_truncate_shrink_and_grow(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    a = write(meta, f.inode, 0, 4 * MiB)
    b = write(meta, f.inode, CHUNK_SIZE, 4 * MiB)
    t = meta.truncate(C, f.inode, 1 * MiB)
    assert t.size == MiB
    assert refs(meta) == {b}  # the second chunk is gone
    assert meta.read_chunk(f.inode, 1) == []
    meta.truncate(C, f.inode, 3 * MiB)
    # what lay past the shrink point now reads as zeros
    assert visible(meta, f.inode, 0, 4 * MiB) == [(0, MiB, a), (MiB, 3 * MiB, 0)]
    assert meta.getattr(f.inode).size == 3 * MiB
    meta.truncate(C, f.inode, 0)
    assert meta.read_chunk(f.inode, 0) == []
    assert refs(meta) == {a, b}
    with fs_error(errno.EINVAL):
        meta.truncate(C, f.inode, -1)
    with fs_error(errno.EISDIR):
        meta.truncate(C, ROOT, 0)
    with fs_error(errno.EFBIG):
        meta.truncate(C, f.inode, 1 << 62)


def test_truncate_at_chunk_boundary(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    write(meta, f.inode, 0, 100)
    c = write(meta, f.inode, CHUNK_SIZE, 100)
    meta.truncate(C, f.inode, CHUNK_SIZE)
    assert refs(meta) == {c}
    assert len(meta.read_chunk(f.inode, 0)) == 1  # no hole needed


def test_fallocate(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    assert meta.fallocate(C, f.inode, 0, 0, 5000).size == 5000
    assert meta.fallocate(C, f.inode, FALLOC_FL_KEEP_SIZE, 0, 9000).size == 5000
    a = write(meta, f.inode, 0, 8192)
    meta.fallocate(C, f.inode, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 1000)
    assert meta.getattr(f.inode).size == 8192
    assert visible(meta, f.inode, 0, 8192) == [(0, 1000, a), (1000, 1000, 0), (2000, 6192, a)]
    z = meta.fallocate(C, f.inode, FALLOC_FL_ZERO_RANGE, 8000, 1000)
    assert z.size == 9000
    assert visible(meta, f.inode, 0, 9000)[-1] == (8000, 1000, 0)
    with fs_error(errno.EOPNOTSUPP):
        meta.fallocate(C, f.inode, FALLOC_FL_PUNCH_HOLE, 0, 10)
    with fs_error(errno.EOPNOTSUPP):
        meta.fallocate(C, f.inode, 0x40, 0, 10)
    with fs_error(errno.EINVAL):
        meta.fallocate(C, f.inode, 0, 0, 0)
    with fs_error(errno.EISDIR):
        meta.fallocate(C, ROOT, 0, 0, 10)
    p = meta.mknod(C, ROOT, b"p", FileType.FIFO, 0o644)
    with fs_error(errno.ENODEV):
        meta.fallocate(C, p.inode, 0, 0, 10)


def test_punch_hole_across_chunks(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    a = write(meta, f.inode, CHUNK_SIZE - 100, 100)
    b = write(meta, f.inode, CHUNK_SIZE, 100)
    meta.fallocate(C, f.inode, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CHUNK_SIZE - 50, 100)
    assert visible(meta, f.inode, 0)[-2:] == [(CHUNK_SIZE - 100, 50, a), (CHUNK_SIZE - 50, 50, 0)]
    assert visible(meta, f.inode, 1, 100) == [(0, 50, 0), (50, 50, b)]


def test_copy_file_range(meta: Meta) -> None:
    src = mkfile(meta, ROOT, b"src")
    dst = mkfile(meta, ROOT, b"dst")
    a = write(meta, src.inode, 0, 1000)
    b = write(meta, src.inode, 2000, 1000)  # a gap 1000..2000 reads zeros
    d0 = write(meta, dst.inode, 0, 5000)
    n = meta.copy_file_range(C, src.inode, 500, dst.inode, 100, 2000)
    assert n == 2000
    assert visible(meta, dst.inode, 0, 5000) == [
        (0, 100, d0),
        (100, 500, a),
        (600, 1000, 0),  # the source's gap overwrites the old content with zeros
        (1600, 500, b),
        (2100, 2900, d0),
    ]
    segs = overlay(meta.read_chunk(dst.inode, 0), 100, 600)
    assert segs[0].off == 500  # copied records are cut to the range
    # short at the source's end; nothing past it
    assert meta.copy_file_range(C, src.inode, 2500, dst.inode, 0, 10_000) == 500
    assert meta.copy_file_range(C, src.inode, 5000, dst.inode, 0, 10) == 0
    # references: deleting the source keeps the slices alive through the copy
    meta.unlink(C, ROOT, b"src")
    assert refs(meta) == set()
    meta.unlink(C, ROOT, b"dst")
    assert refs(meta) == {a, b, d0}
    with fs_error(errno.EINVAL):
        meta.copy_file_range(C, ROOT, -1, ROOT, 0, 1)


def test_copy_file_range_across_chunks_and_growth(meta: Meta) -> None:
    src = mkfile(meta, ROOT, b"src")
    dst = mkfile(meta, ROOT, b"dst")
    a = write(meta, src.inode, 0, 3 * MiB)
    n = meta.copy_file_range(C, src.inode, 0, dst.inode, CHUNK_SIZE - MiB, 3 * MiB)
    assert n == 3 * MiB
    assert meta.getattr(dst.inode).size == CHUNK_SIZE + 2 * MiB
    assert visible(meta, dst.inode, 0)[-1] == (CHUNK_SIZE - MiB, MiB, a)
    assert visible(meta, dst.inode, 1, 2 * MiB) == [(0, 2 * MiB, a)]
    assert overlay(meta.read_chunk(dst.inode, 1), 0, 1)[0].off == MiB
    meta.unlink(C, ROOT, b"src")
    meta.truncate(C, dst.inode, CHUNK_SIZE)
    assert refs(meta) == set()  # chunk 0 still references a
    meta.truncate(C, dst.inode, 0)
    assert refs(meta) == {a}
    same = mkfile(meta, ROOT, b"same")
    write(meta, same.inode, 0, 100)
    with fs_error(errno.EINVAL):
        meta.copy_file_range(C, same.inode, 0, same.inode, 50, 60)
    assert meta.copy_file_range(C, same.inode, 0, same.inode, 100, 100) == 100
    assert meta.getattr(same.inode).size == 200


def test_replace_slices(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    for i in range(3):
        write(meta, f.inode, i * 100, 100)
    old = meta.read_chunk(f.inode, 0)
    later = write(meta, f.inode, 50, 10)  # appended after the compactor read the chunk
    new_id = meta.new_slice_id()
    new = [Slice(0, new_id, 300, 0, 300)]
    assert meta.replace_slices(f.inode, 0, old, new)
    chunk = meta.read_chunk(f.inode, 0)
    assert chunk[0] == new[0] and chunk[1].id == later and len(chunk) == 2
    assert refs(meta) == {s.id for s in old}
    assert not meta.replace_slices(f.inode, 0, old, new)  # stale view: nothing changes
    assert meta.read_chunk(f.inode, 0) == chunk
    meta.unlink(C, ROOT, b"f")
    assert refs(meta) == {s.id for s in old} | {new_id, later}


def test_replace_keeps_shared_slices(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    g = mkfile(meta, ROOT, b"g")
    a = write(meta, f.inode, 0, 100)
    meta.copy_file_range(C, f.inode, 0, g.inode, 0, 100)
    new_id = meta.new_slice_id()
    assert meta.replace_slices(
        f.inode, 0, meta.read_chunk(f.inode, 0), [Slice(0, new_id, 100, 0, 100)]
    )
    assert refs(meta) == set()  # g still uses a
    meta.unlink(C, ROOT, b"g")
    assert refs(meta) == {a}


class TestQuota:
    @pytest.fixture
    def settings(self) -> VolumeSettings:
        return VolumeSettings(name="quota", capacity=64 * MiB, inodes=10)

    def test_statfs(self, meta: Meta) -> None:
        st = meta.statfs(C)
        assert st.total_bytes == 64 * MiB
        assert st.avail_bytes == 64 * MiB - 4096
        assert (st.used_inodes, st.avail_inodes) == (1, 9)
        f = mkfile(meta, ROOT, b"f")
        write(meta, f.inode, 0, 10 * MiB)
        st = meta.statfs(C)
        assert st.avail_bytes == 54 * MiB - 4096 and st.avail_inodes == 8

    def test_space_quota(self, meta: Meta) -> None:
        f = mkfile(meta, ROOT, b"f")
        write(meta, f.inode, 0, 60 * MiB)
        with fs_error(errno.ENOSPC):
            write(meta, f.inode, 60 * MiB, 4 * MiB)
        write(meta, f.inode, 0, 4 * MiB)  # overwriting inside the size costs nothing
        with fs_error(errno.ENOSPC):
            meta.truncate(C, f.inode, 70 * MiB)
        with fs_error(errno.ENOSPC):
            meta.fallocate(C, f.inode, 0, 0, 65 * MiB)
        g = mkfile(meta, ROOT, b"g")
        with fs_error(errno.ENOSPC):
            meta.copy_file_range(C, f.inode, 0, g.inode, 0, 10 * MiB)
        meta.truncate(C, f.inode, 0)
        write(meta, g.inode, 0, 60 * MiB)

    def test_inode_quota(self, meta: Meta) -> None:
        for i in range(9):
            mkfile(meta, ROOT, b"f%d" % i)
        with fs_error(errno.ENOSPC):
            mkfile(meta, ROOT, b"x")
        with fs_error(errno.ENOSPC):
            meta.mkdir(C, ROOT, b"d", 0o755)
        meta.unlink(C, ROOT, b"f0")
        meta.mkdir(C, ROOT, b"d", 0o755)

    def test_quota_change_applies(self, meta: Meta) -> None:
        s = meta.load_settings()
        s.capacity = 0
        s.inodes = 0
        meta.update_settings(s)
        st = meta.statfs(C)
        assert st.total_bytes > 1 << 40 and st.avail_inodes > 1 << 30
        for i in range(12):
            mkfile(meta, ROOT, b"f%d" % i)


class TestTrash:
    @pytest.fixture
    def settings(self) -> VolumeSettings:
        return VolumeSettings(name="trash", trash_days=1)

    def test_deleted_files_wait_in_trash(self, meta: Meta) -> None:
        f = mkfile(meta, ROOT, b"f")
        a = write(meta, f.inode, 0, 100)
        meta.link(C, f.inode, ROOT, b"g")
        meta.unlink(C, ROOT, b"g")
        assert engine(meta).trash_count() == 0
        meta.unlink(C, ROOT, b"f")
        assert meta.readdir(C, ROOT) == []
        assert engine(meta).trash_count() == 1
        assert meta.getattr(f.inode).nlink == 0  # invisible to POSIX: no entry, no link
        assert refs(meta) == set()
        assert engine(meta).cleanup_trash() == 0
        later = meta.getattr(f.inode).ctime_ns + 86_400 * 10**9 + 1
        assert engine(meta).cleanup_trash(now=later) == 1
        assert refs(meta) == {a}
        with fs_error(errno.ENOENT):
            meta.getattr(f.inode)
        assert meta.usage() == (4096, 1)

    def test_open_file_goes_to_trash_on_release(self, meta: Meta) -> None:
        f = meta.create(C, ROOT, b"f", 0o644, RW)
        write(meta, f.inode, 0, 100)
        meta.rename(C, ROOT, b"f", ROOT, b"f")
        mkfile(meta, ROOT, b"x")
        meta.rename(C, ROOT, b"x", ROOT, b"f")  # replaced while open
        assert engine(meta).trash_count() == 0
        meta.release(f.inode)
        assert engine(meta).trash_count() == 1

    def test_trash_off_purges_everything(self, meta: Meta) -> None:
        f = mkfile(meta, ROOT, b"f")
        a = write(meta, f.inode, 0, 100)
        meta.unlink(C, ROOT, b"f")
        meta.mkdir(C, ROOT, b"d", 0o755)
        meta.rmdir(C, ROOT, b"d")  # directories never wait in the trash
        assert engine(meta).trash_count() == 1
        s = meta.load_settings()
        s.trash_days = 0
        meta.update_settings(s)
        assert engine(meta).cleanup_trash() == 1
        assert refs(meta) == {a}


def test_peek_reads_attributes_and_chunk_0_and_records_nothing(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o640)
    write(meta, f.inode, 0, 5000)
    write(meta, f.inode, 100, 10)
    attr, slices = meta.peek(C, f.inode, os.O_RDONLY)
    assert attr.size == 5000 and attr.inode == f.inode
    assert slices == meta.read_chunk(f.inode, 0) and len(slices or []) == 2
    empty = mkfile(meta, ROOT, b"empty")
    assert meta.peek(C, empty.inode, os.O_RDONLY) == (meta.getattr(empty.inode), [])
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    assert meta.peek(C, d.inode, os.O_RDONLY)[1] is None
    with fs_error(errno.ENOENT):
        meta.peek(C, 999_999, os.O_RDONLY)
    with fs_error(errno.EACCES):  # the permission check of open
        meta.peek(Ctx(uid=1000, gid=1000), f.inode, os.O_RDONLY)
    # nothing recorded: an unlink removes the file at once (an open record would keep it)
    meta.unlink(C, ROOT, b"f")
    with fs_error(errno.ENOENT):
        meta.getattr(f.inode)


def test_lookup_peek_is_lookup_with_chunk_0(meta: Meta) -> None:
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    f = mkfile(meta, d.inode, b"f", 0o640)
    write(meta, f.inode, 0, 5000)
    write(meta, f.inode, 100, 10)
    attr, slices = meta.lookup_peek(C, d.inode, b"f")
    assert attr == meta.lookup(C, d.inode, b"f") and attr.size == 5000
    assert slices == meta.read_chunk(f.inode, 0) and len(slices or []) == 2
    mkfile(meta, d.inode, b"empty")
    assert meta.lookup_peek(C, d.inode, b"empty")[1] == []
    meta.mkdir(C, d.inode, b"sub", 0o755)
    meta.symlink(C, d.inode, b"link", b"f")
    for name in (b"sub", b"link", b".", b".."):  # not regular files: no slice list
        attr, slices = meta.lookup_peek(C, d.inode, name)
        assert attr == meta.lookup(C, d.inode, name) and slices is None
    # the errors of lookup: test_meta_namespace.py::test_lookup, and
    meta.setattr(C, d.inode, mode=0o700)
    with fs_error(errno.EACCES):  # search permission on the directory, as lookup
        meta.lookup_peek(Ctx(uid=1000, gid=1000), d.inode, b"f")


def test_open_checks(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    assert meta.open(C, f.inode, os.O_RDONLY) == f
    with fs_error(errno.ENOENT):
        meta.open(C, 999_999, os.O_RDONLY)
    meta.release(f.inode)
    meta.release(f.inode)  # harmless twice
    meta.release(999_999)
