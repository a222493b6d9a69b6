"""Warming a small file's blocks at its lookup (``VFS._engine_lookup``, ``DataPath.preload``)
through real mounts: reading many small files preloads them (with a remote engine: the
``redis+s3`` and ``postgres+s3`` stacks; never with SQLite), a stat-only pass stops doing it
soon, and a change made between a lookup and the open always shows.

The files are spread over directories of six: the lookups of a directory that keep missing
make the mount read it whole (``loftfs.vfs.sweep``, tested in test_meta_cache.py), and
lookups answered from that listing preload nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loftmount import Mount, Mounter, Volume, loft

from loftfs.vfs.predict import WINDOW

FILES = 60
SIZE = 19_998  # a multiple of 6: see content()


def drop_kernel_caches() -> None:
    """Page cache, dentries and inodes; then outwait the mount's own memory of names (the
    default one-second timeouts), so each name is looked up from the engine again."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(1.3)


def preloaded(m: Mount) -> int:
    out = json.loads(loft("stats", str(m.path), "--json").stdout)["sources"]["preload"]
    return int(out["blocks_total"])


def content(i: int) -> bytes:
    return (b"%06d" % i) * (SIZE // 6)


def small(d: Path, i: int) -> Path:
    return d / f"k{i // 6}" / f"f{i}"


def write_all(d: Path, n: int) -> None:
    for i in range(n):
        small(d, i).parent.mkdir(parents=True, exist_ok=True)
        small(d, i).write_bytes(content(i))


def read_all(d: Path, n: int) -> None:
    for i in range(n):
        assert small(d, i).read_bytes() == content(i)


def test_reading_small_files_preloads_them_and_stats_stop_it(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    m = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache"))
    d, s = m.path / "d", m.path / "s"
    write_all(d, FILES)
    write_all(s, FILES)
    drop_kernel_caches()
    before = preloaded(m)
    read_all(d, FILES)
    after_read = preloaded(m)
    if volume.stack.meta_kind == "sqlite":  # no round trip to hide the disk read behind
        assert after_read == before == 0
        return
    assert after_read - before >= FILES - 2  # each file's block (all from the disk cache)

    drop_kernel_caches()
    for i in range(FILES):  # stat only: the guesses fail, preloading stops
        assert os.stat(small(s, i)).st_size == SIZE
    after_stat = preloaded(m)
    assert after_stat - after_read <= WINDOW + 12 < FILES

    drop_kernel_caches()
    read_all(s, FILES)  # reading again: back on within a dozen files
    assert preloaded(m) - after_stat >= FILES - 14


def test_a_change_between_lookup_and_open_shows(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    """The slice list read at the lookup only warms blocks: another mount's rewrite between
    the lookup and the open shows, as close-to-open requires."""
    a = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache-a"))
    b = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache-b"))
    for i in range(8):  # a reading pass: opens follow lookups
        (b.path / f"f{i}").write_bytes(content(i))
    drop_kernel_caches()
    for i in range(8):
        assert (a.path / f"f{i}").read_bytes() == content(i)
    for round_ in range(3):
        old = content(100 + round_)
        (b.path / "f0").write_bytes(old)
        assert (a.path / "f0").read_bytes() == old  # now in a's disk cache
        drop_kernel_caches()
        before = preloaded(a)
        assert os.stat(a.path / "f0").st_size == SIZE  # the lookup preloads the old block
        assert preloaded(a) == before + (volume.stack.meta_kind != "sqlite")
        new = b"new content %d" % round_
        (b.path / "f0").write_bytes(new)
        assert (a.path / "f0").read_bytes() == new
