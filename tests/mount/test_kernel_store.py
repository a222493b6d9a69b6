"""A light open hands its snapshot to the kernel's page cache (``VFS.kernel_store``), so the
reads of a small file after its open never reach the mount; through real mounts: they do not,
what they return is right, and changes made here or by another mount show at the next open."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loftmount import Mount, Mounter, Volume, loft, lowlevel_only

from loftfs.vfs.vfs import LIGHT_FILE_MAX, RELEASE_LINGER_S

LONG = ("--attr-timeout", "60", "--entry-timeout", "60", "--dir-entry-timeout", "60")
SIZES = [1, 4095, 4096, 4097, 65_537, 131_072, LIGHT_FILE_MAX - 1, LIGHT_FILE_MAX]


def drop_kernel_caches() -> None:
    """Page cache, dentries and inodes, once the mount let go of what was just closed (a
    file closed less than RELEASE_LINGER_S ago is still open to it: its open is not light)."""
    time.sleep(RELEASE_LINGER_S + 0.5)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fuse_counts(m: Mount) -> dict[str, int]:
    out = json.loads(loft("stats", str(m.path), "--json").stdout)["fuse"]
    return {op: int(v["count"]) for op, v in out.items()}


def content(tag: int, size: int) -> bytes:
    unit = b"%05d-" % tag
    return (unit * (size // len(unit) + 1))[:size]


@lowlevel_only("fill the kernel's page cache at open")
def test_small_files_are_read_without_a_read_request(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume)
    d = m.path / "d"
    d.mkdir()
    for i, size in enumerate(SIZES):
        (d / f"f{i}").write_bytes(content(i, size))
    (d / "big").write_bytes(content(99, LIGHT_FILE_MAX + 1))
    drop_kernel_caches()
    before = fuse_counts(m)
    for i, size in enumerate(SIZES):
        with open(d / f"f{i}", "rb") as f:
            assert f.read() == content(i, size)
            assert f.read() == b""
            f.seek(size // 2)
            assert f.read(100) == content(i, size)[size // 2 : size // 2 + 100]
    after = fuse_counts(m)
    assert after.get("open", 0) - before.get("open", 0) == len(SIZES)
    assert after.get("read", 0) == before.get("read", 0)
    # Above the light size the reads are the mount's to answer.
    assert (d / "big").read_bytes() == content(99, LIGHT_FILE_MAX + 1)
    assert fuse_counts(m).get("read", 0) > after.get("read", 0)


def test_changes_here_and_elsewhere_show_at_the_next_open(mounter: Mounter, volume: Volume) -> None:
    """The kernel keeps what a light open stored only while the file stays as stored: a
    rewrite of the same size, a shrink and a growth by another mount, and a truncate, a
    write and a rename over the file in this mount each show at the next open. With long
    timeouts the kernel learns of another mount's change only from the open itself (with
    short ones a new lookup would tell it first)."""
    a = mounter.mount(volume, *LONG)
    b = mounter.mount(volume)
    name = "f"
    (a.path / name).write_bytes(content(1, 30_000))
    time.sleep(1.2)  # b's memory of the (missing) name expires
    assert (b.path / name).read_bytes() == content(1, 30_000)

    def rewrite_in_b(data: bytes) -> None:
        with open(b.path / name, "r+b") as f:
            f.truncate(0)
            f.write(data)
        # past a's attribute timeout (its next open must find the change anyway) and its
        # release of the last open (so that the next open is light and stores again)
        time.sleep(RELEASE_LINGER_S + 0.5)

    time.sleep(RELEASE_LINGER_S + 0.5)
    assert (a.path / name).read_bytes() == content(1, 30_000)
    for tag, size in ((2, 30_000), (3, 12_345), (5, 100_000)):
        rewrite_in_b(content(tag, size))
        assert (a.path / name).read_bytes() == content(tag, size), (tag, size)
        assert os.stat(a.path / name).st_size == size

    time.sleep(RELEASE_LINGER_S + 0.5)
    os.truncate(a.path / name, 10)
    assert (a.path / name).read_bytes() == content(5, 10)
    with open(a.path / name, "r+b") as f:
        f.seek(5)
        f.write(b"abcdefgh")
    assert (a.path / name).read_bytes() == content(5, 5) + b"abcdefgh"
    (a.path / "new").write_bytes(content(6, 7_000))
    os.rename(a.path / "new", a.path / name)
    assert (a.path / name).read_bytes() == content(6, 7_000)
    time.sleep(1.2)
    assert (b.path / name).read_bytes() == content(6, 7_000)


def test_a_reader_holding_the_file_open_sees_a_truncate(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume)
    p = m.path / "f"
    p.write_bytes(content(7, 50_000))
    drop_kernel_caches()
    with open(p, "rb", buffering=0) as f:
        assert f.read(1000) == content(7, 1000)
        os.truncate(p, 2000)
        f.seek(0)
        assert f.read() == content(7, 2000)
        with open(p, "r+b") as w:
            w.seek(3000)
            w.write(b"z")
        f.seek(0)
        assert f.read() == content(7, 2000) + b"\0" * 1000 + b"z"
