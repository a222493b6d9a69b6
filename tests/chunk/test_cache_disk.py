"""The local disk block cache (chunk/cache_disk.py) on real directories: round trips, checksums,
eviction, free space, restarts and crashes, write-back staging, failing and full disks (tmpfs
mounts), several directories and concurrent use."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loftfs.chunk import cache_disk
from loftfs.chunk.cache_disk import (
    FORMAT_VERSION,
    HEAD_SIZE,
    SAMPLE,
    DiskCache,
    encode_head,
    file_size,
    key_hash,
    read_file_key,
    rel_path,
)
from loftfs.chunk.layout import block_key
from loftfs.errors import ConfigError

VOL = "5f0c2d4e-0000-4000-8000-cachetest0001"
SEG = 1024  # small checksum segments: multi-segment blocks stay small


def key(i: int, length: int) -> str:
    """Keys of one width for small ``i``, so blocks of one length have one file size."""
    return block_key(VOL, 100_000 + i, 0, length)


def payload(i: int, length: int) -> bytes:
    """Deterministic content of block ``i``: any read can be checked."""
    seed = hashlib.sha256(f"{i}:{length}".encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


def fsize(i: int, length: int) -> int:
    return file_size(len(key(i, length)), length, SEG)


def raw_path(root: Path, k: str) -> Path:
    return root / VOL / "raw" / rel_path(key_hash(k))


def staging_path(root: Path, k: str) -> Path:
    return root / VOL / "staging" / rel_path(key_hash(k))


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in files_under(root / VOL))


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def scanned(cache: DiskCache) -> DiskCache:
    wait_until(lambda: cache.stats()["scanning"] == 0)
    return cache


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., DiskCache]]:
    """``make(dirs=None, capacity=..., start=True, **opts)``: a started, scanned cache on
    ``tmp_path/cache`` (or ``dirs``), closed at teardown."""
    made: list[DiskCache] = []

    def factory(
        dirs: list[Path] | None = None,
        capacity: int = 64 << 20,
        start: bool = True,
        **opts: object,
    ) -> DiskCache:
        opts.setdefault("segment_size", SEG)
        cache = DiskCache(
            [str(d) for d in (dirs or [tmp_path / "cache"])],
            capacity,
            volume_uuid=VOL,
            **opts,  # type: ignore[arg-type]
        )
        made.append(cache)
        if start:
            cache.start()
            scanned(cache)
        return cache

    yield factory
    for cache in made:
        cache.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("2m")``: a fresh tmpfs of that size, unmounted at teardown (ask for it before
    ``make`` so that the caches on it are closed first)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 100, SEG - 1, SEG, SEG + 1, 3 * SEG + 5, 64 << 10])
def test_round_trip_whole_block(
    make: Callable[..., DiskCache], tmp_path: Path, length: int
) -> None:
    cache = make()
    k, data = key(1, length), payload(1, length)
    assert cache.put_sync(k, data)
    assert cache.get(k, length) == data
    assert cache.contains(k)
    path = raw_path(tmp_path / "cache", k)
    assert path.stat().st_size == fsize(1, length) == cache.stats()["used_bytes"]
    assert read_file_key(str(path)) == k
    assert cache.get(key(2, length), length) is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["blocks"]) == (1, 1, 1)


def test_ranges_across_segment_boundaries(make: Callable[..., DiskCache]) -> None:
    cache = make()
    length = 3 * SEG + 5  # three full segments and a short last one
    k, data = key(7, length), payload(7, length)
    assert cache.put_sync(k, data)
    offsets = [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG - 1, 3 * SEG, length - 1, length]
    for off in offsets:
        for n in [0, 1, 2, SEG - 1, SEG, SEG + 1, 2 * SEG + 3, length]:
            assert cache.get_range(k, length, off, n) == data[off : off + n], (off, n)
    assert cache.get_range(k, length, length + 10, 5) == b""
    with pytest.raises(ValueError):
        cache.get_range(k, length, -1, 5)
    assert cache.get_range(key(8, length), length, 0, 10) is None


def test_async_put_is_written_in_the_background(make: Callable[..., DiskCache]) -> None:
    cache = make()
    blocks = {key(i, 3000): payload(i, 3000) for i in range(20)}
    for k, data in blocks.items():
        cache.put(k, data)
    wait_until(lambda: cache.stats()["blocks"] == 20)
    assert cache.stats()["pending_put_bytes"] == 0
    for k, data in blocks.items():
        assert cache.get(k, 3000) == data


def test_async_put_is_bounded_and_drained_at_close(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    cache = make(start=False, max_pending_bytes=10_000)  # no writer yet: everything waits
    for i in range(5):
        cache.put(key(i, 4000), payload(i, 4000))
    s = cache.stats()
    assert s["pending_put_bytes"] == 8000  # two fit, three dropped
    assert s["dropped_puts"] == 3
    cache.start()
    cache.close()  # writes what is queued
    assert cache.stats()["pending_put_bytes"] == 0
    again = scanned(make())
    assert again.stats()["blocks"] == 2
    assert again.get(key(0, 4000), 4000) == payload(0, 4000)
    assert again.get(key(1, 4000), 4000) == payload(1, 4000)


def test_discard(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    cache = make()
    k = key(3, 5000)
    assert cache.put_sync(k, payload(3, 5000))
    cache.discard(k)
    assert not raw_path(tmp_path / "cache", k).exists()
    assert not cache.contains(k)
    assert cache.get(k, 5000) is None
    assert cache.stats()["used_bytes"] == 0
    cache.discard(k)  # twice, or never cached: nothing happens


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DiskCache([], 1 << 20, volume_uuid=VOL)
    with pytest.raises(ConfigError):
        DiskCache([str(tmp_path)], 1 << 20, volume_uuid="../x")
    with pytest.raises(ConfigError):
        DiskCache([str(tmp_path)], 1 << 20, volume_uuid=VOL, free_ratio=1.0)
    with pytest.raises(ConfigError):
        DiskCache([str(tmp_path)], 1 << 20, volume_uuid=VOL, segment_size=100)


# --- corruption -----------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


LENGTH = 3 * SEG + 5


def _data_offset() -> int:
    return fsize(1, LENGTH) - LENGTH


@pytest.mark.parametrize(
    "damage",
    ["data byte", "last data byte", "magic", "length field", "key byte", "segment crc",
     "truncated", "trailing byte", "empty", "another key"],
)  # fmt: skip
def test_corrupt_file_is_a_miss_and_removed(
    make: Callable[..., DiskCache],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    cache = make()
    k, data = key(1, LENGTH), payload(1, LENGTH)
    assert cache.put_sync(k, data)
    path = raw_path(tmp_path / "cache", k)
    size = path.stat().st_size
    if damage == "data byte":
        _flip(path, _data_offset() + SEG + 17)
    elif damage == "last data byte":
        _flip(path, size - 1)
    elif damage == "magic":
        _flip(path, 0)
    elif damage == "length field":
        _flip(path, 12)
    elif damage == "key byte":
        _flip(path, HEAD_SIZE + 3)
    elif damage == "segment crc":
        _flip(path, _data_offset() - 2)
    elif damage == "truncated":
        os.truncate(path, size - 1)
    elif damage == "trailing byte":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif damage == "empty":
        os.truncate(path, 0)
    else:  # the file of another block of the same length under this block's name
        other = key(2, LENGTH)
        assert cache.put_sync(other, payload(2, LENGTH))
        shutil.copy(raw_path(tmp_path / "cache", other), path)
    with caplog.at_level(logging.WARNING, logger="loftfs.chunk.cache_disk"):
        assert cache.get(k, LENGTH) is None
    assert not path.exists()
    assert str(path) in caplog.text
    s = cache.stats()
    assert s["corrupt"] == 1 and s["hits"] == 0
    assert s["used_bytes"] == disk_bytes(tmp_path / "cache")
    assert cache.get(k, LENGTH) is None
    assert cache.stats()["corrupt"] == 1  # gone: now a plain miss
    assert cache.put_sync(k, data)  # and it can be cached again
    assert cache.get(k, LENGTH) == data


def test_range_verifies_only_the_segments_it_reads(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    cache = make()
    k, data = key(1, LENGTH), payload(1, LENGTH)
    assert cache.put_sync(k, data)
    path = raw_path(tmp_path / "cache", k)
    _flip(path, _data_offset() + 2 * SEG + 5)  # in the third segment
    assert cache.get_range(k, LENGTH, 0, 2 * SEG) == data[: 2 * SEG]
    assert cache.get_range(k, LENGTH, 3 * SEG, 5) == data[3 * SEG :]
    assert path.exists()
    assert cache.get_range(k, LENGTH, 2 * SEG - 1, 2) is None  # touches the third
    assert not path.exists()
    assert cache.stats()["corrupt"] == 1


@pytest.mark.parametrize(("written", "reading"), [(64 << 10, 16 << 10), (4 << 10, 64 << 10)])
def test_files_of_another_segment_size_are_read_and_checked(
    make: Callable[..., DiskCache], tmp_path: Path, written: int, reading: int
) -> None:
    """A cache filled with another checksum segment size (an earlier default) is reused as it
    is: whole and ranged reads work and each is checked against the file's own segments."""
    length = 5 * max(written, reading) + 7
    k, data = key(1, length), payload(1, length)
    first = make(segment_size=written)
    assert first.put_sync(k, data)
    first.close()
    cache = make(segment_size=reading)
    assert cache.get(k, length) == data
    assert cache.get_range(k, length, written - 3, 9) == data[written - 3 : written + 6]
    assert cache.get_range(k, length, length - 5, 5) == data[-5:]
    path = raw_path(tmp_path / "cache", k)
    _flip(path, file_size(len(k), length, written) - length + 3 * written + 1)
    assert cache.get_range(k, length, 0, written) == data[:written]  # another segment
    assert cache.get_range(k, length, 3 * written, 4) is None  # the damaged one
    assert not path.exists()
    assert cache.stats()["corrupt"] == 1


def test_remembered_header_still_checks_the_data(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    """Ranged reads reuse the header they verified before; damage to the data after that is
    still caught (segment checksums), and a dropped file takes its header along."""
    cache = make()
    k, data = key(2, LENGTH), payload(2, LENGTH)
    assert cache.put_sync(k, data)
    assert cache.get_range(k, LENGTH, 10, 100) == data[10:110]  # header remembered
    path = raw_path(tmp_path / "cache", k)
    _flip(path, 0)  # the header on disk no longer verifies: the remembered one is used
    assert cache.get_range(k, LENGTH, SEG + 1, 7) == data[SEG + 1 : SEG + 8]
    _flip(path, _data_offset() + SEG + 3)
    assert cache.get_range(k, LENGTH, SEG, 4) is None
    assert not path.exists()
    assert cache.put_sync(k, data)
    assert cache.get_range(k, LENGTH, SEG, 4) == data[SEG : SEG + 4]


def test_unreadable_file_is_a_miss(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    cache = make()
    k = key(1, 100)
    assert cache.put_sync(k, payload(1, 100))
    path = raw_path(tmp_path / "cache", k)
    path.unlink()
    path.mkdir()  # open works, read fails with EISDIR
    assert cache.get(k, 100) is None
    assert cache.get_range(k, 100, 0, 10) is None
    s = cache.stats()
    assert s["errors"] == 2 and s["hits"] == 0 and s["misses"] == 2


# --- eviction and space -----------------------------------------------------------------------


def test_eviction_keeps_the_recently_used(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    length = 2000
    cache = make(capacity=10 * fsize(0, length))
    for i in range(10):
        assert cache.put_sync(key(i, length), payload(i, length))
    for i in range(5):  # 0..4 become the most recently used
        assert cache.get(key(i, length), length) is not None
    for i in range(10, 15):
        assert cache.put_sync(key(i, length), payload(i, length))
    cached = {i for i in range(15) if cache.contains(key(i, length))}
    assert cached == set(range(5)) | set(range(10, 15))  # few blocks: exact LRU
    for i in range(5, 10):
        assert not raw_path(tmp_path / "cache", key(i, length)).exists()
    s = cache.stats()
    assert s["evictions"] == 5
    assert s["used_bytes"] == disk_bytes(tmp_path / "cache") <= s["capacity"]


def test_sampled_eviction_keeps_a_hot_set(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    length = 200
    slots = 6 * SAMPLE
    cache = make(capacity=slots * fsize(0, length))
    hot = range(SAMPLE)
    for i in range(1, 4 * slots):
        assert cache.put_sync(key(i + 1000, length), payload(i, length))
        if i % 4 == 0:
            for h in hot:  # kept warm; or cached again if it was evicted
                if cache.get(key(h, length), length) is None:
                    cache.put_sync(key(h, length), payload(h, length))
    assert sum(cache.contains(key(h, length)) for h in hot) >= len(hot) - 2
    s = cache.stats()
    assert s["used_bytes"] == disk_bytes(tmp_path / "cache") <= s["capacity"]
    assert s["blocks"] >= slots - 1


def test_oversized_block_is_not_cached(make: Callable[..., DiskCache]) -> None:
    cache = make(capacity=10_000)
    assert cache.put_sync(key(1, 5000), payload(1, 5000))
    assert not cache.put_sync(key(2, 20_000), payload(2, 20_000))
    assert cache.contains(key(1, 5000))  # nothing evicted for a block that cannot fit
    assert cache.stats()["evictions"] == 0


def test_free_ratio_is_kept(tmpfs: Callable[[str], Path], make: Callable[..., DiskCache]) -> None:
    mnt = tmpfs("4m")
    length = 64 << 10
    cache = make(dirs=[mnt], capacity=1 << 30, free_ratio=0.5)
    for i in range(48):  # 3 MiB of blocks into a 4 MiB file system that must stay half free
        assert cache.put_sync(key(i, length), payload(i, length))
        st = os.statvfs(mnt)
        assert st.f_bavail * st.f_frsize >= st.f_blocks * st.f_frsize // 2
    s = cache.stats()
    assert s["evictions"] > 0 and s["errors"] == 0
    assert cache.get(key(47, length), length) == payload(47, length)
    assert s["used_bytes"] == disk_bytes(mnt) <= 2 << 20


def test_space_taken_by_others_is_given_back(
    tmpfs: Callable[[str], Path], make: Callable[..., DiskCache]
) -> None:
    mnt = tmpfs("4m")
    length = 64 << 10
    cache = make(dirs=[mnt], capacity=1 << 30, free_ratio=0.25)
    for i in range(20):  # 1.3 MiB
        assert cache.put_sync(key(i, length), payload(i, length))
    (mnt / "other").write_bytes(b"\0" * (2 << 20))  # another program fills the disk
    wait_until(lambda: cache.stats()["evictions"] > 0, timeout=5)  # background check
    wait_until(lambda: os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize >= 1 << 20, timeout=5)
    assert cache.stats()["used_bytes"] == disk_bytes(mnt)


# --- restart and crash ------------------------------------------------------------------------


def test_restart_reuses_the_cache(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = make()
    for i in range(30):
        assert first.put_sync(key(i, 3000), payload(i, 3000))
    assert first.stage(key(100, 500), payload(100, 500))
    first.close()
    # What a crash mid-write leaves: temporary files of a writer that is gone.
    torn = raw_path(root, key(200, 3000))
    torn.parent.mkdir(parents=True, exist_ok=True)
    temp = torn.parent / f".{torn.name}.0badf00d-7.tmp"
    temp.write_bytes(b"half a block")
    staged_temp = staging_path(root, key(201, 500))
    staged_temp.parent.mkdir(parents=True, exist_ok=True)
    staged_temp = staged_temp.parent / f".{staged_temp.name}.0badf00d-8.tmp"
    staged_temp.write_bytes(b"half")

    second = make()
    assert not temp.exists() and not staged_temp.exists()
    s = second.stats()
    assert s["blocks"] == 30 and s["staged_blocks"] == 1
    assert s["used_bytes"] == disk_bytes(root)
    assert second.staged_keys() == [key(100, 500)]
    for i in range(30):
        assert second.get(key(i, 3000), 3000) == payload(i, 3000)
    assert second.read_staged(key(100, 500)) == payload(100, 500)


def test_blocks_are_found_before_the_scan_reaches_them(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    first = make()
    for i in range(10):
        assert first.put_sync(key(i, 700), payload(i, 700))
    first.close()
    second = make(start=False)  # no scan yet: files are opened directly
    assert second.stats()["scanning"] == 1
    assert second.contains(key(3, 700))
    assert second.get(key(3, 700), 700) == payload(3, 700)
    assert second.get_range(key(4, 700), 700, 10, 20) == payload(4, 700)[10:30]
    assert second.get(key(99, 700), 700) is None
    second.start()
    scanned(second)
    s = second.stats()
    assert s["blocks"] == 10 and s["used_bytes"] == disk_bytes(tmp_path / "cache")


def test_smaller_capacity_after_restart_evicts(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    first = make()
    for i in range(20):
        assert first.put_sync(key(i, 1000), payload(i, 1000))
    first.close()
    second = make(capacity=5 * fsize(0, 1000))
    wait_until(lambda: second.stats()["used_bytes"] <= 5 * fsize(0, 1000))
    assert second.stats()["blocks"] == 5
    assert disk_bytes(tmp_path / "cache") == second.stats()["used_bytes"]


CRASHER = """
import sys, time
sys.path.insert(0, {tests!r})
from loftfs.chunk.cache_disk import DiskCache
from test_cache_disk import key, payload, VOL, SEG
cache = DiskCache([{root!r}], 1 << 30, volume_uuid=VOL, segment_size=SEG)
cache.start()
i = 0
while True:
    cache.put(key(i, 200_000), payload(i, 200_000))
    cache.put_sync(key(i + 1, 150_000), payload(i + 1, 150_000))
    if i % 3 == 0:
        cache.stage(key(i + 2, 50_000), payload(i + 2, 50_000))
    if i == 30:
        print("ready", flush=True)
    i += 3
"""


def test_kill_9_mid_write_loses_nothing_but_the_unfinished(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    script = CRASHER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = make()
    assert not [p for p in files_under(root) if p.name.endswith(".tmp")]
    blocks = files_under(root / VOL / "raw")
    assert len(blocks) > 20
    s = cache.stats()
    assert s["blocks"] == len(blocks)
    for path in blocks:  # every file that survived holds its block intact
        k = read_file_key(str(path))
        i, _, length = (int(x) for x in k.rsplit("/", 1)[1].split("_"))
        assert cache.get(k, length) == payload(i - 100_000, length)
    staged = cache.staged_keys()
    assert staged
    for k in staged:
        i, _, length = (int(x) for x in k.rsplit("/", 1)[1].split("_"))
        assert cache.read_staged(k) == payload(i - 100_000, length)
    assert cache.stats()["corrupt"] == 0


# --- write-back staging -----------------------------------------------------------------------


def test_stage_read_unstage(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = make()
    k, data = key(1, LENGTH), payload(1, LENGTH)
    assert cache.stage(k, data)
    assert staging_path(root, k).exists() and not raw_path(root, k).exists()
    assert cache.read_staged(k) == data
    assert cache.get(k, LENGTH) == data
    assert cache.get_range(k, LENGTH, SEG - 2, 4) == data[SEG - 2 : SEG + 2]
    assert cache.contains(k)
    assert cache.staged_keys() == [k]
    s = cache.stats()
    assert (s["staged_blocks"], s["staged_bytes"], s["blocks"]) == (1, fsize(1, LENGTH), 0)
    ino = staging_path(root, k).stat().st_ino
    cache.unstage(k)
    assert not staging_path(root, k).exists()
    assert raw_path(root, k).stat().st_ino == ino  # moved, not copied
    assert cache.read_staged(k) is None
    assert cache.get(k, LENGTH) == data
    assert cache.staged_keys() == []
    s = cache.stats()
    assert (s["staged_blocks"], s["blocks"], s["used_bytes"]) == (0, 1, fsize(1, LENGTH))


def test_drop_staged(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    cache = make()
    k = key(1, 900)
    assert cache.stage(k, payload(1, 900))
    cache.drop_staged(k)
    assert not staging_path(tmp_path / "cache", k).exists()
    assert cache.staged_keys() == [] and cache.get(k, 900) is None
    assert cache.stats()["used_bytes"] == 0


def test_staged_blocks_are_never_evicted(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    length = 1000
    cache = make(capacity=10 * fsize(0, length))
    for i in range(4):
        assert cache.stage(key(i, length), payload(i, length))
    for i in range(100, 130):
        assert cache.put_sync(key(i, length), payload(i, length))
    s = cache.stats()
    assert s["staged_blocks"] == 4 and s["blocks"] == 6
    assert s["used_bytes"] == disk_bytes(tmp_path / "cache") <= s["capacity"]
    for i in range(4):
        assert cache.read_staged(key(i, length)) == payload(i, length)
    # Staging takes room from cached blocks, but never goes over the capacity.
    staged = 4
    while cache.stage(key(staged, length), payload(staged, length)):
        staged += 1
    assert staged == 10
    assert cache.stats()["blocks"] == 0
    assert not cache.put_sync(key(200, length), payload(200, length))
    # Once uploaded, they are cached blocks like the others.
    for i in range(10):
        cache.unstage(key(i, length))
    assert cache.put_sync(key(300, length), payload(300, length))
    s = cache.stats()
    assert (s["blocks"], s["staged_blocks"], s["evictions"]) == (10, 0, 31)


def test_staged_block_corruption_is_reported(
    make: Callable[..., DiskCache], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make()
    k = key(1, LENGTH)
    assert cache.stage(k, payload(1, LENGTH))
    _flip(staging_path(tmp_path / "cache", k), _data_offset() + 3)
    with caplog.at_level(logging.ERROR, logger="loftfs.chunk.cache_disk"):
        assert cache.read_staged(k) is None
    assert "staged" in caplog.text
    assert cache.staged_keys() == [] and cache.stats()["corrupt"] == 1


# --- failing and full disks -------------------------------------------------------------------


def test_read_only_dir_causes_no_errors_and_is_retried(
    tmpfs: Callable[[str], Path], make: Callable[..., DiskCache]
) -> None:
    mnt = tmpfs("4m")
    cache = make(dirs=[mnt], retry_after_s=0.3)
    assert cache.put_sync(key(1, 3000), payload(1, 3000))
    remount(mnt, "ro")
    for i in range(2, 6):
        assert not cache.put_sync(key(i, 3000), payload(i, 3000))
    cache.put(key(9, 3000), payload(9, 3000))
    assert not cache.stage(key(10, 3000), payload(10, 3000))
    cache.discard(key(11, 3000))
    s = cache.stats()
    assert s["errors"] == 3  # then the directory is skipped
    assert s["skipped_puts"] >= 2 and s["disabled_dirs"] == 1
    assert cache.get(key(1, 3000), 3000) == payload(1, 3000)  # reads still work
    remount(mnt, "rw")
    time.sleep(0.35)
    assert cache.put_sync(key(12, 3000), payload(12, 3000))
    assert cache.stage(key(13, 3000), payload(13, 3000))
    assert cache.stats()["disabled_dirs"] == 0
    assert cache.stats()["used_bytes"] == disk_bytes(mnt)


def test_full_disk_causes_no_errors(
    tmpfs: Callable[[str], Path], make: Callable[..., DiskCache]
) -> None:
    mnt = tmpfs("1m")
    length = 64 << 10
    cache = make(dirs=[mnt], free_ratio=0.0)
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill it behind the cache's back
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert not cache.put_sync(key(1, length), payload(1, length))  # ENOSPC: counted
    assert not cache.stage(key(2, length), payload(2, length))
    cache.put(key(3, length), payload(3, length))
    assert cache.stats()["errors"] >= 1
    assert not [p for p in files_under(mnt) if p != filler]  # no temporary files left
    filler.unlink()
    wait_until(lambda: cache.put_sync(key(4, length), payload(4, length)), timeout=5)
    assert cache.get(key(4, length), length) == payload(4, length)


# --- several directories, threads -------------------------------------------------------------


def test_blocks_spread_over_directories(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    length = 1000
    per_dir = 8 * fsize(0, length)
    cache = make(dirs=dirs, capacity=3 * per_dir)
    for i in range(60):
        assert cache.put_sync(key(i, length), payload(i, length))
    for d in dirs:
        assert 0 < disk_bytes(d) <= per_dir
    assert cache.stats()["used_bytes"] == sum(disk_bytes(d) for d in dirs)
    found = [i for i in range(60) if cache.get(key(i, length), length) == payload(i, length)]
    assert len(found) == cache.stats()["blocks"] >= 15
    cache.close()
    again = make(dirs=dirs, capacity=3 * per_dir)  # same directories, same places
    assert again.stats()["blocks"] == len(found)
    assert all(again.get(key(i, length), length) == payload(i, length) for i in found)


def test_changed_directories_keep_staged_blocks(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    first = make(dirs=[one])
    staged = [key(i, 2000) for i in range(12)]
    for i, k in enumerate(staged):
        assert first.stage(k, payload(i, 2000))
    for i in range(100, 112):
        assert first.put_sync(key(i, 2000), payload(i, 2000))
    first.close()
    second = make(dirs=[one, two])  # a second directory: half the hashes now belong there
    assert sorted(second.staged_keys()) == sorted(staged)
    for i, k in enumerate(staged):
        assert second.read_staged(k) == payload(i, 2000)
    assert files_under(two / VOL / "staging")  # moved where they are looked for now
    for i in range(100, 112):  # cached blocks of the other directory are gone, the rest stay
        assert second.get(key(i, 2000), 2000) in (None, payload(i, 2000))
    assert second.stats()["used_bytes"] == disk_bytes(one) + disk_bytes(two)
    assert second.stats()["blocks"] == len(files_under(one / VOL / "raw"))


def test_concurrent_use_from_threads(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    lengths = [1, 700, SEG, 3 * SEG + 5, 9000]
    cache = make(capacity=10 * fsize(0, 9000), max_pending_bytes=200_000)
    wrong: list[str] = []
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                i = rng.randrange(80)
                length = lengths[i % len(lengths)]
                k, data = key(i, length), payload(i, length)
                op = rng.random()
                if op < 0.3:
                    cache.put(k, data)
                elif op < 0.45:
                    cache.put_sync(k, data)
                elif op < 0.5:
                    cache.discard(k)
                elif op < 0.75:
                    got = cache.get(k, length)
                    if got is not None and got != data:
                        wrong.append(k)
                else:
                    off = rng.randrange(length)
                    n = rng.randrange(length - off + 1)
                    got = cache.get_range(k, length, off, n)
                    if got is not None and got != data[off : off + n]:
                        wrong.append(k)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert not failures and not wrong
    s = cache.stats()
    assert s["hits"] > 0 and s["evictions"] > 0
    assert s["corrupt"] == 0 and s["errors"] == 0
    assert s["used_bytes"] == disk_bytes(tmp_path / "cache") <= s["capacity"]
    assert s["blocks"] == len(files_under(tmp_path / "cache" / VOL / "raw"))


# --- file format versions ------------------------------------------------------------------


def _write_cache_file(path: Path, k: str, data: bytes, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_head(k.encode(), data, SEG, version) + data)


def test_files_of_format_version_1_are_still_read(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    """Version 1 (crc32 segment checksums) is what earlier releases wrote: cached and staged
    blocks written by them are read after an upgrade, checksums verified."""
    root = tmp_path / "cache"
    k1, d1 = key(1, LENGTH), payload(1, LENGTH)
    k2, d2 = key(2, LENGTH), payload(2, LENGTH)
    k3, d3 = key(3, LENGTH), payload(3, LENGTH)
    _write_cache_file(raw_path(root, k1), k1, d1, 1)
    _write_cache_file(staging_path(root, k2), k2, d2, 1)
    _write_cache_file(raw_path(root, k3), k3, d3, 1)
    bad = bytearray(raw_path(root, k3).read_bytes())
    bad[-2] ^= 0x40  # one flipped bit in the last segment of version-1 data
    raw_path(root, k3).write_bytes(bytes(bad))
    assert encode_head(k1.encode(), d1, SEG, 1) != encode_head(k1.encode(), d1, SEG)
    cache = make()
    assert cache.get(k1, LENGTH) == d1
    assert cache.get_range(k1, LENGTH, SEG - 2, 4) == d1[SEG - 2 : SEG + 2]
    assert cache.staged_keys() == [k2]
    assert cache.read_staged(k2) == d2
    assert cache.get_range(k3, LENGTH, 0, 8) == d3[:8]  # first segment intact
    assert cache.get(k3, LENGTH) is None  # the damaged one is a miss, and the file goes
    assert not raw_path(root, k3).exists()
    # new files are written in the current version and read back
    k4, d4 = key(4, LENGTH), payload(4, LENGTH)
    cache.put_sync(k4, d4)
    assert raw_path(root, k4).read_bytes()[4:6] == FORMAT_VERSION.to_bytes(2, "little")
    assert cache.get(k4, LENGTH) == d4


def test_unknown_format_version_is_a_miss(make: Callable[..., DiskCache], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    k, data = key(1, LENGTH), payload(1, LENGTH)
    _write_cache_file(raw_path(root, k), k, data, FORMAT_VERSION)
    raw = bytearray(raw_path(root, k).read_bytes())
    raw[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    raw_path(root, k).write_bytes(bytes(raw))
    cache = make()
    assert cache.get(k, LENGTH) is None
    assert not raw_path(root, k).exists()


# --- kept descriptors -----------------------------------------------------------------------


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_reads_keep_block_files_open_within_a_bound(
    make: Callable[..., DiskCache], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached block file is opened once for any number of reads (``FD_CACHE``); at most
    FD_CACHE are kept, the least recently read closed first; eviction, discard and close
    close theirs (an evicted file's space is freed)."""
    monkeypatch.setattr(cache_disk, "FD_CACHE", 2)
    cache = make()
    keys = [key(i, 5000) for i in range(4)]
    for i, k in enumerate(keys):
        assert cache.put_sync(k, payload(i, 5000))
    before = _open_fds()
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, *args: object, **kw: object) -> int:
        opened.append(path)
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_disk.os, "open", counting_open)
    for _ in range(3):
        assert cache.get(keys[0], 5000) == payload(0, 5000)
        assert cache.get_range(keys[1], 5000, 100, 10) == payload(1, 5000)[100:110]
    assert len(opened) == 2  # one open per file
    assert len(_open_fds() - before) == 2
    assert cache.get(keys[2], 5000) == payload(2, 5000)  # keys[0] read least recently: closed
    assert len(_open_fds() - before) == 2
    assert cache.get(keys[1], 5000) and len(opened) == 3
    assert cache.get(keys[0], 5000) and len(opened) == 4
    cache.discard(keys[0])
    assert len(_open_fds() - before) == 1
    assert not raw_path(tmp_path / "cache", keys[0]).exists()
    assert cache.get(keys[0], 5000) is None
    cache.close()
    assert _open_fds() - before == set()


def test_a_kept_descriptor_outlives_eviction_only_while_a_read_uses_it(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    """A block evicted (or found corrupt) while a read holds its descriptor: the read goes on
    with it, and it is closed when that read gives it back, never under it."""
    cache = make()
    k = key(7, 5000)
    assert cache.put_sync(k, payload(7, 5000))
    assert cache.get(k, 5000)  # kept now
    area = cache._areas[0]
    h = cache_disk.key_hash(k)
    kept = cache._open_kept(area, h, str(raw_path(tmp_path / "cache", k)))
    cache.discard(k)
    link = f"/proc/self/fd/{kept.fd}"
    target = os.readlink(link)  # still open: the read in progress uses it
    assert target.endswith("(deleted)")
    assert kept.dropped and h not in cache._fds
    cache._release_kept(kept)
    try:  # closed (the number may already serve another file)
        assert os.readlink(link) != target
    except FileNotFoundError:
        pass


def test_whole_block_is_one_read_of_the_file(
    make: Callable[..., DiskCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-block read takes header and data in one read (one wait for a cold disk)."""
    cache = make()
    length = 5 * SEG + 3
    k, data = key(1, length), payload(1, length)
    assert cache.put_sync(k, data)
    reads: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        reads.append(n)
        return pread(fd, n, off)

    monkeypatch.setattr(cache_disk.os, "pread", counting)
    assert cache.get(k, length) == data
    assert reads == [fsize(1, length) + 1]  # one byte more: trailing bytes are corruption


def test_prewarm(make: Callable[..., DiskCache], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make()
    k, data = key(1, 9000), payload(1, 9000)
    assert cache.put_sync(k, data)
    advised: list[tuple[int, int, int, int]] = []
    fadvise = os.posix_fadvise

    def recording(fd: int, off: int, n: int, advice: int) -> None:
        advised.append((fd, off, n, advice))
        fadvise(fd, off, n, advice)

    monkeypatch.setattr(cache_disk.os, "posix_fadvise", recording)
    assert cache.prewarm(k, 9000)
    assert [a[1:] for a in advised] == [(0, 0, os.POSIX_FADV_WILLNEED)]
    assert cache.get(k, 9000) == data  # through the descriptor prewarm opened and kept
    assert not cache.prewarm(key(2, 9000), 9000)  # not cached
    assert not cache.prewarm(k, 0)
    assert len(advised) == 1
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 0  # no read counted


def test_a_block_waiting_to_be_written_is_read_from_memory(
    make: Callable[..., DiskCache], tmp_path: Path
) -> None:
    cache = make(start=False)  # no writer: puts wait
    k, data = key(4, 7000), payload(4, 7000)
    cache.put(k, data)
    assert cache.stats()["pending_put_bytes"] == 7000
    assert not raw_path(tmp_path / "cache", k).exists()
    assert cache.prewarm(k, 7000)
    assert cache.get(k, 7000) == data
    assert cache.get_range(k, 7000, 100, 50) == data[100:150]
    assert cache.get(k, 6999) is None  # another length: another block
    cache.start()
    wait_until(lambda: cache.stats()["blocks"] == 1)
    assert cache.get(k, 7000) == data
