"""DataPath against a real SQLite volume and a real directory store, compared with a
byte-array model of each file."""

from __future__ import annotations

import errno
import logging
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loftfs.chunk.datapath import DataPath
from loftfs.chunk.gc import BlockGC
from loftfs.chunk.layout import block_keys
from loftfs.errors import FSError
from loftfs.meta import open_meta
from loftfs.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    ROOT_CTX,
    ROOT_INODE,
)
from loftfs.object import open_volume_storage
from loftfs.object.compress import CompressedStore
from loftfs.object.faults import FaultInjectingStore

from .conftest import BLOCK, CountingStore, Volume, read_all, wait_until

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
    max_examples=25,
)


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- writes and reads against a model -------------------------------------------------------

_write = st.tuples(
    st.integers(0, 600_000),  # offset
    st.integers(1, 150_000),  # length
    st.booleans(),  # flush after this write
)


@given(writes=st.lists(_write, min_size=1, max_size=12), seed=st.integers(0, 1 << 30))
@FIXTURE_OK
def test_random_writes_match_model(
    volume: Volume, dp: DataPath, writes: list[tuple[int, int, bool]], seed: int
) -> None:
    inode = volume.new_file()
    model = bytearray()
    w = dp.writer(inode)
    for i, (offset, length, flush) in enumerate(writes):
        data = pattern(seed + i, length)
        w.write(offset, data)
        if len(model) < offset + length:
            model.extend(bytes(offset + length - len(model)))
        model[offset : offset + length] = data
        assert dp.dirty_size(inode) <= len(model)
        if flush:
            dp.flush(inode)
            assert dp.dirty_size(inode) == 0
            assert read_all(dp, inode, volume.size(inode)) == bytes(model)
    dp.flush(inode)
    assert not w.dirty
    size = volume.size(inode)
    assert size == len(model)
    assert read_all(dp, inode, size) == bytes(model)
    # ranges, read through a handle's read state
    rng = random.Random(seed)
    state = dp.new_read_state()
    for _ in range(10):
        off = rng.randrange(0, size + 10)
        n = rng.randrange(1, 200_000)
        assert dp.read(inode, off, n, size, state) == bytes(model[off : off + n])
    dp.release_writer(inode)


@given(
    writes=st.lists(
        st.tuples(st.integers(-300_000, 300_000), st.integers(1, 200_000)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 1 << 30),
)
@FIXTURE_OK
def test_writes_across_a_chunk_boundary(
    volume: Volume, dp: DataPath, writes: list[tuple[int, int]], seed: int
) -> None:
    inode = volume.new_file()
    base = CHUNK_SIZE - 400_000
    model = bytearray(1_000_000)
    w = dp.writer(inode)
    end = 0
    for i, (rel, length) in enumerate(writes):
        data = pattern(seed + i, length)
        w.write(CHUNK_SIZE + rel, data)
        model[rel + 400_000 : rel + 400_000 + length] = data
        end = max(end, CHUNK_SIZE + rel + length)
    w.flush()
    size = volume.size(inode)
    assert size == end
    assert dp.read(inode, base, 1_000_000, size) == bytes(model[: size - base])
    assert dp.read(inode, 0, 4096, size) == bytes(4096)  # the hole before
    assert (volume.meta.read_chunk(inode, 1) != []) == (end > CHUNK_SIZE)


def test_sparse_file_and_eof(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(1 << 20, b"tail")
    w.flush()
    size = volume.size(inode)
    assert size == (1 << 20) + 4
    assert dp.read(inode, 0, 1 << 20, size) == bytes(1 << 20)
    assert dp.read(inode, (1 << 20) - 2, 100, size) == b"\0\0tail"
    assert dp.read(inode, size, 10, size) == b""
    assert dp.read(inode, size + 5, 10, size) == b""
    assert dp.read(inode, 0, 0, size) == b""
    # a file grown by truncate reads zeros past its data
    volume.meta.truncate(ROOT_CTX, inode, size + 1000)
    dp.invalidate(inode)
    assert dp.read(inode, size - 4, 2000, size + 1000) == b"tail" + bytes(1000)


def test_newest_write_wins(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(0, b"a" * 300_000)
    w.write(100_000, b"b" * 50_000)  # overlaps uploaded blocks: a new slice on top
    w.write(10, b"c" * 10)
    w.flush()
    expected = bytearray(b"a" * 300_000)
    expected[100_000:150_000] = b"b" * 50_000
    expected[10:20] = b"c" * 10
    assert read_all(dp, inode, 300_000) == bytes(expected)
    w.write(0, b"d" * 5)
    w.flush()
    expected[0:5] = b"d" * 5
    assert read_all(dp, inode, 300_000) == bytes(expected)


def test_sequential_writes_make_one_slice(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    w = dp.writer(inode)
    data = pattern(1, 1_000_000)
    for off in range(0, len(data), 4096):
        w.write(off, data[off : off + 4096])
    w.flush()
    slices = volume.meta.read_chunk(inode, 0)
    assert len(slices) == 1 and slices[0].len == len(data)
    keys = volume.block_files()
    assert len(keys) == -(-len(data) // BLOCK)
    assert read_all(dp, inode, len(data)) == data


def test_patch_in_place(volume: Volume, dp: DataPath) -> None:
    """Rewriting the not-yet-uploaded tail of the current slice changes it in place."""
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(0, b"x" * 1000)
    w.write(500, b"y" * 1000)  # overlaps the buffered tail and extends it
    w.write(100, b"z" * 10)
    w.flush()
    assert len(volume.meta.read_chunk(inode, 0)) == 1
    assert read_all(dp, inode, 1500) == b"x" * 100 + b"z" * 10 + b"x" * 390 + b"y" * 1000


def test_reads_see_committed_data_only(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(0, b"hello")
    assert w.dirty
    assert dp.dirty_size(inode) == 5
    assert volume.size(inode) == 0
    assert dp.read(inode, 0, 5, volume.size(inode)) == b""
    dp.flush(inode)
    assert not w.dirty and dp.dirty_size(inode) == 0
    assert dp.read(inode, 0, 5, volume.size(inode)) == b"hello"
    dp.flush(inode)  # nothing buffered: no-op
    dp.flush(12345)  # no writer at all: no-op


def test_full_chunk_is_committed_early(volume: Volume) -> None:
    """A writer moving past a chunk commits the finished chunk without waiting for flush."""
    dp = volume.data_path(buffer_size=2 << 20)
    inode = volume.new_file()
    w = dp.writer(inode)
    piece = pattern(3, 1 << 20)
    for i in range(CHUNK_SIZE // len(piece) + 1):
        w.write(i * len(piece), piece)
    wait_until(lambda: volume.meta.read_chunk(inode, 0) != [])
    assert volume.meta.read_chunk(inode, 1) == []
    assert dp.dirty_size(inode) == CHUNK_SIZE + len(piece)
    w.flush()
    size = volume.size(inode)
    assert size == CHUNK_SIZE + len(piece)
    assert dp.read(inode, CHUNK_SIZE - 10, 20, size) == piece[-10:] + piece[:10]
    assert dp.budget.peak <= 2 << 20


def test_close_flushes_and_release_writer(volume: Volume) -> None:
    dp = volume.data_path()
    a, b = volume.new_file(), volume.new_file()
    dp.writer(a).write(0, b"kept at close")
    dp.writer(b).write(0, b"kept at release")
    dp.release_writer(b)
    assert volume.size(b) == len(b"kept at release")
    dp.close()
    assert volume.size(a) == len(b"kept at close")
    other = volume.data_path()
    assert read_all(other, a, volume.size(a)) == b"kept at close"


def test_invalidate_shows_other_clients_writes(volume: Volume, dp: DataPath) -> None:
    """Close-to-open: a second client's committed write is seen after ``invalidate``."""
    inode = volume.new_file()
    dp.writer(inode).write(0, b"version 1")
    dp.flush(inode)
    assert dp.read(inode, 0, 100, volume.size(inode)) == b"version 1"
    other_meta = open_meta(volume.meta.url)
    try:
        other = volume.data_path(meta=other_meta)
        other.writer(inode).write(0, b"VERSION 2")
        other.flush(inode)
        other.close()
    finally:
        other_meta.close()
    # the slice list is cached until invalidated
    assert dp.read(inode, 0, 100, volume.size(inode)) == b"version 1"
    dp.invalidate(inode)
    assert dp.read(inode, 0, 100, volume.size(inode)) == b"VERSION 2"


# --- memory budget ------------------------------------------------------------------------


def test_writer_larger_than_budget_completes(volume: Volume) -> None:
    budget = 512 << 10
    slow = FaultInjectingStore(volume.files, delay_s=0.002, ops={"put"})
    dp = volume.data_path(store=slow, buffer_size=budget, upload_threads=2)
    inode = volume.new_file()
    w = dp.writer(inode)
    data = pattern(5, 12 << 20)
    for off in range(0, len(data), 128 << 10):
        w.write(off, data[off : off + (128 << 10)])
        assert dp.budget.used <= budget
    w.flush()
    assert dp.budget.peak <= budget
    assert dp.budget.used == dp.cache.size
    assert read_all(dp, inode, len(data)) == data


def test_one_huge_write(volume: Volume) -> None:
    dp = volume.data_path(buffer_size=1 << 20)
    inode = volume.new_file()
    data = pattern(6, 5 << 20)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    assert dp.budget.peak <= 1 << 20
    assert read_all(dp, inode, len(data)) == data


def test_random_writes_of_many_files_within_budget(volume: Volume) -> None:
    """Partial blocks of idle writers are sealed under pressure: nobody waits forever."""
    budget = 256 << 10
    dp = volume.data_path(buffer_size=budget)
    rng = random.Random(9)
    inodes = [volume.new_file() for _ in range(4)]
    models = {i: bytearray(2 << 20) for i in inodes}
    for n in range(600):
        inode = rng.choice(inodes)
        off = rng.randrange(0, (2 << 20) - 8192)
        data = pattern(n, rng.randrange(1, 8192))
        dp.writer(inode).write(off, data)
        models[inode][off : off + len(data)] = data
    for inode in inodes:
        dp.flush(inode)
    assert dp.budget.peak <= budget
    for inode in inodes:
        size = volume.size(inode)
        assert read_all(dp, inode, size) == bytes(models[inode][:size])


def test_concurrent_writers(volume: Volume, dp: DataPath) -> None:
    inodes = [volume.new_file() for _ in range(4)]
    datas = {i: pattern(i, 700_000) for i in inodes}
    errors: list[BaseException] = []

    def run(inode: int) -> None:
        try:
            w = dp.writer(inode)
            data = datas[inode]
            for off in range(0, len(data), 50_000):
                w.write(off, data[off : off + 50_000])
            w.flush()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in inodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for inode in inodes:
        assert read_all(dp, inode, volume.size(inode)) == datas[inode]


# --- failures -----------------------------------------------------------------------------


def test_upload_failure_surfaces_on_flush(volume: Volume) -> None:
    faulty = FaultInjectingStore(volume.files, error_rate=1.0, ops={"put"})
    dp = volume.data_path(store=faulty)
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(0, pattern(1, 200_000))
    with pytest.raises(FSError) as info:
        w.flush()
    assert info.value.errno == errno.EIO
    assert volume.meta.read_chunk(inode, 0) == []
    assert volume.size(inode) == 0
    assert not w.dirty
    assert volume.block_files() == set()  # nothing half-written is left behind
    assert dp.budget.used == 0
    # the error was reported; the writer works again once the store does
    faulty.error_rate = 0.0
    w.write(0, b"second try")
    w.flush()
    assert read_all(dp, inode, volume.size(inode)) == b"second try"


def test_background_upload_failure_fails_next_write(volume: Volume) -> None:
    faulty = FaultInjectingStore(volume.files, error_rate=1.0, ops={"put"})
    dp = volume.data_path(store=faulty)
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(0, pattern(2, 3 * BLOCK))  # three full blocks go up in the background
    assert w.wait_idle(10)
    with pytest.raises(FSError) as info:
        w.write(3 * BLOCK, b"more")
    assert info.value.errno == errno.EIO
    with pytest.raises(FSError):
        dp.flush(inode)
    assert volume.meta.read_chunk(inode, 0) == []


def test_partial_upload_failure_commits_nothing(volume: Volume) -> None:
    faulty = FaultInjectingStore(volume.files, error_rate=0.3, ops={"put"}, seed=4)
    dp = volume.data_path(store=faulty)
    inode = volume.new_file()
    w = dp.writer(inode)
    with pytest.raises(FSError):  # from a later piece of the write, or from flush
        w.write(0, pattern(3, 20 * BLOCK + 5))
        w.flush()
    if w.dirty:  # the write failed first: flush reports the error and cleans up
        with pytest.raises(FSError):
            w.flush()
    assert not w.dirty
    assert volume.meta.read_chunk(inode, 0) == []
    assert volume.block_files() == set()


def test_quota_error_is_raised_as_is(volume: Volume) -> None:
    """ENOSPC from the engine reaches the caller; what fits in the quota is kept."""
    settings = volume.meta.load_settings()
    settings.capacity = 256 << 10
    volume.meta.update_settings(settings)
    dp = volume.data_path()
    inode = volume.new_file()
    data = pattern(4, 1 << 20)
    w = dp.writer(inode)
    w.write(0, data)
    with pytest.raises(FSError) as info:
        w.flush()
    assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
    size = volume.size(inode)
    assert (200 << 10) <= size <= (256 << 10)
    assert read_all(dp, inode, size) == data[:size]
    # a second file gets nothing at all, and its blocks are not left behind
    before = volume.block_files()
    other = volume.new_file()
    dp.writer(other).write(0, pattern(5, 64 << 10))
    with pytest.raises(FSError):
        dp.flush(other)
    assert volume.size(other) == 0
    assert volume.block_files() == before


def test_missing_block_is_eio(
    volume: Volume, dp: DataPath, caplog: pytest.LogCaptureFixture
) -> None:
    inode = volume.new_file()
    dp.writer(inode).write(0, pattern(5, 3 * BLOCK))
    dp.flush(inode)
    victim = sorted(volume.block_files())[1]
    volume.files.delete(victim)
    fresh = volume.data_path()
    with caplog.at_level(logging.ERROR), pytest.raises(FSError) as info:
        fresh.read(inode, 0, 3 * BLOCK, 3 * BLOCK)
    assert info.value.errno == errno.EIO
    assert victim in caplog.text
    # blocks that are intact still read
    assert fresh.read(inode, 0, BLOCK, 3 * BLOCK) == pattern(5, 3 * BLOCK)[:BLOCK]


def test_corrupted_block_is_eio(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    dp.writer(inode).write(0, pattern(6, 2 * BLOCK))
    dp.flush(inode)
    victim = sorted(volume.block_files())[0]
    volume.files.put(victim, b"short")  # wrong length for its key
    fresh = volume.data_path()
    with pytest.raises(FSError) as info:
        fresh.read(inode, 0, 10, 2 * BLOCK)
    assert info.value.errno == errno.EIO


def test_corrupted_compressed_block_is_eio(volume: Volume) -> None:
    store = CompressedStore(volume.files, "zstd")
    dp = volume.data_path(store=store)
    inode = volume.new_file()
    dp.writer(inode).write(0, b"weights " * 20_000)
    dp.flush(inode)
    victim = sorted(volume.block_files())[0]
    raw = bytearray(volume.files.get(victim))
    raw[-3] ^= 0x55  # same length, damaged content
    volume.files.put(victim, bytes(raw))
    fresh = volume.data_path(store=store)
    with pytest.raises(FSError) as info:
        fresh.read(inode, 0, 100, volume.size(inode))
    assert info.value.errno == errno.EIO


def test_truncated_transfer_is_retried(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    data = pattern(7, 2 * BLOCK)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    flaky = FaultInjectingStore(volume.files, truncate_rate=0.5, seed=3)
    reader = volume.data_path(store=flaky)
    for _ in range(5):
        reader.cache.clear()
        try:
            assert reader.read(inode, 0, len(data), len(data)) == data
        except FSError as e:  # two bad transfers in a row: EIO, never wrong data
            assert e.errno == errno.EIO


# --- caching ------------------------------------------------------------------------------


def test_single_flight_and_cache(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    data = pattern(8, BLOCK)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    counting = CountingStore(FaultInjectingStore(volume.files, delay_s=0.2, ops={"get"}))
    reader = volume.data_path(store=counting)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(reader.read(inode, 0, BLOCK, BLOCK)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 8
    assert len(counting.gets) == 1
    assert reader.read(inode, 100, 10, BLOCK) == data[100:110]
    assert len(counting.gets) == 1


def test_readahead_on_sequential_reads_only(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    data = pattern(9, 16 * BLOCK)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    size = len(data)

    counting = CountingStore(volume.files)
    seq = volume.data_path(store=counting, readahead_blocks=4)
    state = seq.new_read_state()
    out = bytearray()
    for off in range(0, 4 * BLOCK, 16 << 10):
        out += seq.read(inode, off, 16 << 10, size, state)
    assert bytes(out) == data[: 4 * BLOCK]
    wait_until(lambda: len(counting.gets) >= 6)
    assert state.window == 4

    counting2 = CountingStore(volume.files)
    rnd = volume.data_path(store=counting2, readahead_blocks=4)
    state = rnd.new_read_state()
    # jumps of at least five blocks, well beyond the tolerance for reordered reads
    offsets = [b * BLOCK + 1000 for b in (12, 2, 8, 14, 3, 9)]
    for off in offsets:
        assert rnd.read(inode, off, 100, size, state) == data[off : off + 100]
    assert len(counting2.gets) == len(offsets)
    assert state.window == 0


def test_block_cache_respects_budget(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    data = pattern(10, 32 * BLOCK)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    reader = volume.data_path(buffer_size=4 * BLOCK, readahead_blocks=0)
    for off in range(0, len(data), BLOCK):
        assert reader.read(inode, off, BLOCK, len(data)) == data[off : off + BLOCK]
    assert reader.cache.size <= 4 * BLOCK
    assert reader.budget.peak <= 4 * BLOCK


# --- compaction and gc --------------------------------------------------------------------


def fragment(volume: Volume, dp: DataPath, inode: int, n: int) -> bytearray:
    """Write ``n`` overlapping pieces, flushing each: ``n`` slices in chunk 0."""
    model = bytearray()
    w = dp.writer(inode)
    rng = random.Random(inode)
    for i in range(n):
        off = rng.randrange(1000, 300_000)
        data = pattern(i, rng.randrange(1, 40_000))
        w.write(off, data)
        w.flush()
        if len(model) < off + len(data):
            model.extend(bytes(off + len(data) - len(model)))
        model[off : off + len(data)] = data
    return model


def test_compaction_keeps_content(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    model = fragment(volume, dp, inode, 20)
    before = volume.block_files()
    assert len(volume.meta.read_chunk(inode, 0)) == 20
    assert dp.compact_chunk(inode, 0)
    slices = volume.meta.read_chunk(inode, 0)
    assert len(slices) == 1
    assert slices[0].pos >= 1000  # the leading hole stays a hole
    size = volume.size(inode)
    assert read_all(dp, inode, size) == bytes(model)
    assert not dp.compact_chunk(inode, 0)  # nothing left to do
    # the old blocks are collected, the new ones stay
    assert dp.collect_garbage() == 20
    after = volume.block_files()
    assert not (after & before)
    assert read_all(volume.data_path(), inode, size) == bytes(model)


def test_background_compaction(volume: Volume) -> None:
    dp = volume.data_path(compact_threshold=8)
    dp.start()
    inode = volume.new_file()
    model = fragment(volume, dp, inode, 12)
    wait_until(lambda: len(volume.meta.read_chunk(inode, 0)) < 8)
    dp.invalidate(inode)
    assert read_all(dp, inode, volume.size(inode)) == bytes(model)


def test_compaction_loses_to_concurrent_change(volume: Volume, dp: DataPath) -> None:
    """A chunk rewritten meanwhile (truncate) is left alone and the new blocks are dropped."""
    inode = volume.new_file()
    fragment(volume, dp, inode, 5)
    before = volume.block_files()
    old = volume.meta.read_chunk(inode, 0)
    volume.meta.truncate(ROOT_CTX, inode, 0)
    assert not volume.meta.replace_slices(inode, 0, old, [])
    assert not dp.compact_chunk(inode, 0)
    assert volume.block_files() <= before


def test_gc_deletes_unreferenced_blocks_only(volume: Volume, dp: DataPath) -> None:
    keep, drop = volume.new_file(), volume.new_file()
    keep_data = pattern(11, 3 * BLOCK)
    dp.writer(keep).write(0, keep_data)
    dp.writer(drop).write(0, pattern(12, 5 * BLOCK))
    dp.flush(keep)
    dp.flush(drop)
    keep_keys = {k for k in volume.block_files()}
    assert len(keep_keys) == 8
    assert dp.collect_garbage() == 0
    assert volume.block_files() == keep_keys
    volume.meta.release(drop)
    volume.meta.unlink(ROOT_CTX, ROOT_INODE, b"f1")
    assert dp.collect_garbage() == 1
    assert len(volume.block_files()) == 3
    assert volume.meta.deleted_slices() == []
    assert read_all(volume.data_path(), keep, len(keep_data)) == keep_data


def test_background_gc(volume: Volume) -> None:
    dp = volume.data_path(gc_interval_s=0.05)
    dp.start()
    inode = volume.new_file()
    dp.writer(inode).write(0, pattern(13, 2 * BLOCK))
    dp.flush(inode)
    assert len(volume.block_files()) == 2
    volume.meta.truncate(ROOT_CTX, inode, 0)
    wait_until(lambda: not volume.block_files())


def test_gc_keeps_slices_whose_deletion_failed(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    dp.writer(inode).write(0, pattern(14, BLOCK))
    dp.flush(inode)
    volume.meta.truncate(ROOT_CTX, inode, 0)
    failing = volume.data_path(store=FaultInjectingStore(volume.files, error_rate=1.0))
    assert failing.collect_garbage() == 0
    assert len(volume.meta.deleted_slices()) == 1
    assert dp.collect_garbage() == 1
    assert not volume.block_files()


def test_gc_deletes_the_blocks_of_many_slices_in_few_requests(volume: Volume, dp: DataPath) -> None:
    """One ``delete_many`` (one S3 ``DeleteObjects`` request) for the blocks of many slices."""
    inodes = [volume.new_file() for _ in range(40)]
    for k, inode in enumerate(inodes):
        dp.writer(inode).write(0, pattern(k, 3 * BLOCK if k == 0 else 1000))
        dp.flush(inode)
    assert len(volume.block_files()) == 42
    for inode in inodes:
        volume.meta.truncate(ROOT_CTX, inode, 0)
    counting = CountingStore(volume.files)
    assert volume.data_path(store=counting).collect_garbage() == 40
    assert counting.deletes == [42]
    assert not volume.block_files()
    assert volume.meta.deleted_slices() == []


def test_gc_forgets_only_the_slices_whose_blocks_are_gone(volume: Volume, dp: DataPath) -> None:
    """When a grouped deletion fails, slices are retried one by one: those whose deletion
    failed stay queued, and no slice leaves the queue with a block left behind."""
    inodes = [volume.new_file() for _ in range(30)]
    for k, inode in enumerate(inodes):
        dp.writer(inode).write(0, pattern(k, 2 * BLOCK))
        dp.flush(inode)
    for inode in inodes:
        volume.meta.truncate(ROOT_CTX, inode, 0)
    queued = dict(volume.meta.deleted_slices())
    assert len(queued) == 30
    flaky = FaultInjectingStore(volume.files, error_rate=0.2, seed=5, ops={"delete"})
    collected = volume.data_path(store=flaky).collect_garbage()
    left = dict(volume.meta.deleted_slices())
    assert 0 < collected < 30 and len(left) == 30 - collected
    uuid = volume.settings.uuid
    remaining = volume.block_files()
    for slice_id, size in queued.items():
        if slice_id not in left:  # forgotten: every block of it is gone
            assert not remaining & set(block_keys(uuid, slice_id, size, BLOCK))
    assert remaining <= {k for i, n in left.items() for k in block_keys(uuid, i, n, BLOCK)}
    assert dp.collect_garbage() == len(left)
    assert not volume.block_files()


class Traffic:
    """A mount's FUSE request count: ``rate`` requests a second while ``busy``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.busy = True
        self._start = time.monotonic()
        self._count = 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if self.busy:
            self._count += self.rate * (now - self._start)
        self._start = now
        return int(self._count)


def queue_small_files(volume: Volume, dp: DataPath, n: int) -> None:
    """``n`` one-block files written, then truncated: ``n`` slices queued for deletion."""
    inodes = [volume.new_file() for _ in range(n)]
    for k, inode in enumerate(inodes):
        dp.writer(inode).write(0, pattern(k, 1000))
        dp.flush(inode)
    for inode in inodes:
        volume.meta.truncate(ROOT_CTX, inode, 0)


def paced_gc(volume: Volume, store: CountingStore, traffic: Traffic) -> BlockGC:
    gc = BlockGC(volume.meta, store, volume.settings.uuid, BLOCK, 0, activity=traffic)
    gc.probe_s, gc.max_yield_s = 0.02, 0.3
    return gc


def test_background_gc_yields_to_a_busy_mount(
    volume: Volume, dp: DataPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the mount serves many requests a background round waits for a quiet moment, at
    most ``max_yield_s`` per group, then deletes a small group: slower, never stalled."""
    monkeypatch.setattr("loftfs.chunk.gc.GROUP_KEYS", 20)
    monkeypatch.setattr("loftfs.chunk.gc.BUSY_GROUP_KEYS", 4)
    queue_small_files(volume, dp, 12)
    store = CountingStore(volume.files)
    gc = paced_gc(volume, store, Traffic(rate=5000))
    start = time.monotonic()
    assert gc.collect(paced=True).slices == 12
    assert store.deletes == [4, 4, 4]
    assert time.monotonic() - start >= 3 * gc.max_yield_s
    assert gc.busy_groups == 3 and gc.yielded_s >= 3 * gc.max_yield_s
    assert not volume.block_files() and volume.meta.deleted_slices() == []


def test_background_gc_runs_full_groups_on_a_quiet_mount(
    volume: Volume, dp: DataPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("loftfs.chunk.gc.GROUP_KEYS", 20)
    queue_small_files(volume, dp, 12)
    store = CountingStore(volume.files)
    gc = paced_gc(volume, store, Traffic(rate=50))  # below busy_ops_per_s
    assert gc.collect(paced=True).slices == 12
    assert store.deletes == [12] and gc.busy_groups == 0
    assert not volume.block_files()


def test_background_gc_goes_ahead_as_soon_as_the_mount_quiets(volume: Volume, dp: DataPath) -> None:
    queue_small_files(volume, dp, 5)
    store = CountingStore(volume.files)
    traffic = Traffic(rate=5000)
    gc = paced_gc(volume, store, traffic)
    gc.max_yield_s = 30.0
    threading.Timer(0.3, lambda: setattr(traffic, "busy", False)).start()
    start = time.monotonic()
    assert gc.collect(paced=True).slices == 5
    assert 0.25 <= time.monotonic() - start < 10
    assert store.deletes == [5] and gc.busy_groups == 0


def test_loft_gc_and_stop_do_not_wait_for_traffic(volume: Volume, dp: DataPath) -> None:
    """Unmounting (``stop``) while a background round waits ends it at once, its slices left
    queued; ``loft gc`` (unpaced) ignores the traffic."""
    queue_small_files(volume, dp, 3)
    store = CountingStore(volume.files)
    gc = paced_gc(volume, store, Traffic(rate=5000))
    gc.interval_s, gc.max_yield_s = 0.01, 60.0
    gc.start()
    time.sleep(0.3)
    start = time.monotonic()
    gc.stop()
    assert time.monotonic() - start < 5
    assert store.deletes == [] and len(volume.meta.deleted_slices()) == 3
    assert gc.collect().slices == 3 and store.deletes == [3]
    assert not volume.block_files()


def test_compaction_of_punched_chunk(volume: Volume, dp: DataPath) -> None:
    """A chunk whose data was all punched out compacts to an empty slice list."""
    inode = volume.new_file()
    fragment(volume, dp, inode, 3)
    size = volume.size(inode)
    volume.meta.fallocate(ROOT_CTX, inode, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size)
    dp.invalidate(inode)
    assert read_all(dp, inode, size) == bytes(size)
    assert dp.compact_chunk(inode, 0)
    assert volume.meta.read_chunk(inode, 0) == []
    dp.invalidate(inode)
    assert read_all(dp, inode, size) == bytes(size)
    assert volume.size(inode) == size
    dp.collect_garbage()
    assert not volume.block_files()


def test_compaction_fills_inner_holes(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    w = dp.writer(inode)
    w.write(10_000, b"a" * 5000)
    w.flush()
    w.write(200_000, b"b" * 5000)
    w.flush()
    volume.meta.fallocate(ROOT_CTX, inode, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 11_000, 100)
    dp.invalidate(inode)
    expected = bytearray(205_000)
    expected[10_000:15_000] = b"a" * 5000
    expected[11_000:11_100] = bytes(100)
    expected[200_000:] = b"b" * 5000
    assert read_all(dp, inode, 205_000) == bytes(expected)
    assert dp.compact_chunk(inode, 0)
    (only,) = volume.meta.read_chunk(inode, 0)
    assert (only.pos, only.len) == (10_000, 195_000)
    dp.invalidate(inode)
    assert read_all(dp, inode, 205_000) == bytes(expected)


def test_tiny_budget(volume: Volume) -> None:
    """A budget smaller than a block still makes progress, within its bound."""
    dp = volume.data_path(buffer_size=BLOCK // 2)
    inode = volume.new_file()
    data = pattern(15, 5 * BLOCK + 123)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    assert dp.budget.peak <= BLOCK // 2
    assert read_all(dp, inode, len(data)) == data


@pytest.mark.parametrize("compress", ["lz4", "zstd"])
def test_volume_storage_stack(volume: Volume, compress: str) -> None:
    """The stack a mount builds (retries + compression over the bucket) round-trips data."""
    settings = volume.meta.load_settings()
    settings.compress = compress
    dp = volume.data_path(store=open_volume_storage(settings))
    inode = volume.new_file()
    data = b"tensor " * 100_000 + pattern(16, 100_000)
    dp.writer(inode).write(0, data)
    dp.flush(inode)
    stored = sum(i.size for i in volume.files.list())
    assert stored < len(data) // 2
    assert read_all(volume.data_path(store=open_volume_storage(settings)), inode, len(data)) == data


def test_full_cache_gives_way_to_writers(volume: Volume) -> None:
    """Cached blocks are evicted for writes; a full cache does not fragment a sequential write."""
    dp = volume.data_path(buffer_size=16 * BLOCK, readahead_blocks=0)
    src = volume.new_file()
    data = pattern(17, 16 * BLOCK)
    dp.writer(src).write(0, data)
    dp.flush(src)
    assert read_all(dp, src, len(data)) == data
    # The block cache takes at most a quarter of the budget; the rest is for writers.
    assert dp.cache.size == 4 * BLOCK == dp.budget.used
    dst = volume.new_file()
    w = dp.writer(dst)
    for off in range(0, 14 * BLOCK, 4096):
        w.write(off, data[off : off + 4096])
    w.flush()
    assert len(volume.meta.read_chunk(dst, 0)) == 1
    assert dp.budget.peak <= 16 * BLOCK


# --- preloading at lookup ---------------------------------------------------------------------


def test_preload_from_the_disk_cache_fetches_nothing(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    data = pattern(22, 3000)
    counting = CountingStore(volume.files)
    cached = volume.data_path(
        store=counting, cache_size=64 << 20, cache_dirs=[str(volume.root / "cache")]
    )
    cached.start()
    cached.writer(inode).write(0, data)
    cached.flush(inode)  # cached on write
    wait_until(lambda: cached.disk is not None and cached.disk.stats()["blocks"] == 1)
    cached.preload(volume.meta.read_chunk(inode, 0), len(data))
    assert cached.reader.preloaded == 1
    assert cached.read(inode, 0, len(data), len(data)) == data
    assert counting.gets == []


def test_preload_without_the_block_in_the_disk_cache_does_nothing(volume: Volume) -> None:
    """Only the disk cache is read ahead: a block it lacks is fetched by the read itself."""
    inode = volume.new_file()
    data = pattern(21, BLOCK + 5000)  # two blocks
    plain = volume.data_path()
    plain.writer(inode).write(0, data)
    plain.flush(inode)
    counting = CountingStore(volume.files)
    cached = volume.data_path(
        store=counting, cache_size=64 << 20, cache_dirs=[str(volume.root / "cache")]
    )
    cached.start()
    cached.preload(volume.meta.read_chunk(inode, 0), len(data))
    time.sleep(0.2)
    assert counting.gets == [] and cached.reader.preloaded == 0
    assert cached.read(inode, 0, len(data), len(data)) == data
    assert len(counting.gets) == 2


def test_a_stale_preload_never_shows(volume: Volume, dp: DataPath) -> None:
    """The slice list given to ``preload`` is a hint: reads use the file's current one."""
    inode = volume.new_file()
    old, new = pattern(23, 4000), pattern(24, 4000)
    dp.writer(inode).write(0, old)
    dp.flush(inode)
    reader = volume.data_path()
    reader.preload(volume.meta.read_chunk(inode, 0), len(old))
    dp.writer(inode).write(0, new)  # another client rewrites the file
    dp.flush(inode)
    reader.invalidate(inode)  # what an open does
    assert reader.read(inode, 0, 4000, 4000) == new
    assert reader.read_snapshot(volume.meta.read_chunk(inode, 0), 4000) == new


def test_preload_of_a_bad_slice_list_is_ignored(volume: Volume, dp: DataPath) -> None:
    inode = volume.new_file()
    dp.writer(inode).write(0, b"x" * 100)
    dp.flush(inode)
    (s,) = volume.meta.read_chunk(inode, 0)
    bad = type(s)(s.pos, s.id, s.size, s.off, s.size + 10, s.kind)  # beyond its slice
    dp.preload([bad], 110)  # logged, nothing raised
    assert dp.reader.preloaded == 0
