"""fallocate (including PUNCH_HOLE and ZERO_RANGE), copy_file_range by reference and
lseek(SEEK_DATA/SEEK_HOLE): the low-level binding forwards them to the file system, where the
pyfuse3 binding leaves them to the kernel's fallbacks (test_posix_basic checks those results)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from loftmount import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MIB,
    Mount,
    fallocate,
    lowlevel_only,
)

pytestmark = lowlevel_only("forward fallocate, copy_file_range and lseek to the file system")


def test_fallocate_grows_the_file(workdir: Path) -> None:
    f = workdir / "pre"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        fallocate(fd, 0, 0, 3 * MIB)
        assert os.fstat(fd).st_size == 3 * MIB
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 5 * MIB)
        assert os.fstat(fd).st_size == 3 * MIB
        os.posix_fallocate(fd, 0, 4 * MIB)
        assert os.fstat(fd).st_size == 4 * MIB
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert data[:3] == b"abc"
    assert data[3:] == bytes(4 * MIB - 3)


def test_punch_hole_and_zero_range_read_zeros(workdir: Path) -> None:
    f = workdir / "holes"
    content = bytes(range(256)) * (3 * MIB // 256)
    f.write_bytes(content)
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, MIB)
        assert os.fstat(fd).st_size == len(content)
        # The page cache of the punched range was dropped: this read goes to the file system.
        assert (
            os.pread(fd, MIB + 8192, 0)
            == content[:4096] + bytes(MIB) + content[4096 + MIB : 8192 + MIB]
        )
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 2 * MIB, 2 * MIB)  # past EOF: the file grows
        assert os.fstat(fd).st_size == 4 * MIB
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert data[:4096] == content[:4096]
    assert data[4096 : 4096 + MIB] == bytes(MIB)
    assert data[4096 + MIB : 2 * MIB] == content[4096 + MIB : 2 * MIB]
    assert data[2 * MIB :] == bytes(2 * MIB)


def test_fallocate_unsupported_mode(workdir: Path) -> None:
    fd = os.open(workdir / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)  # PUNCH_HOLE needs KEEP_SIZE
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)


def test_copy_file_range_writes_no_new_blocks(workdir: Path, shared_mount: Mount) -> None:
    src, dst = workdir / "src", workdir / "dst"
    content = os.urandom(3 * MIB + 123)
    src.write_bytes(content)
    dst.write_bytes(b"D" * 1000)
    blocks_before = set(shared_mount.volume.block_files())
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_RDWR)
    try:
        assert os.copy_file_range(fi, fo, 2 * MIB, 0, 500) == 2 * MIB
        done = 0
        while done < len(content) - MIB:  # the rest, from an offset, possibly in pieces
            n = os.copy_file_range(fi, fo, len(content), MIB + done, 500 + 2 * MIB + done)
            assert n > 0
            done += n
        assert os.copy_file_range(fi, fo, 100, len(content), 0) == 0  # at EOF
    finally:
        os.close(fi)
        os.close(fo)
    assert dst.read_bytes() == b"D" * 500 + content[: 2 * MIB] + content[MIB:]
    # No block was written for the copy: the destination references the source's slices.
    assert not set(shared_mount.volume.block_files()) - blocks_before


def test_seek_data_and_hole(workdir: Path) -> None:
    f = workdir / "seek"
    f.write_bytes(b"x" * 10000)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100
        assert os.lseek(fd, 100, os.SEEK_HOLE) == 10000
        with pytest.raises(OSError) as e:
            os.lseek(fd, 10000, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_END) == 10000
    finally:
        os.close(fd)
