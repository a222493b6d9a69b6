"""Large files across many blocks and chunks: written, read back in odd sizes, after a remount."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

from loftmount import MIB, Mounter, Volume

SIZE = 160 * MIB  # 160 blocks of the test volume's 1 MiB, three 64 MiB chunks


def write_stream(path: Path, size: int, seed: int, piece: int = MIB) -> str:
    """Write ``size`` pseudo-random bytes in ``piece``-sized writes; return their sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb", buffering=0) as fh:
        left = size
        while left:
            data = rng.randbytes(min(piece, left))
            fh.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def read_digest(path: Path, piece: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while data := fh.read(piece):
            digest.update(data)
    return digest.hexdigest()


def test_large_file_round_trip(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume)
    f = m.path / "big.bin"
    expected = write_stream(f, SIZE, 1)
    assert os.stat(f).st_size == SIZE
    assert read_digest(f, MIB) == expected
    assert read_digest(f, 128 * 1024 + 1) == expected  # unaligned reads cross block edges
    whole = _regenerate(SIZE, 1)
    with open(f, "rb") as fh:  # reads across block and chunk boundaries
        for off in (64 * MIB - 5, 128 * MIB - 1, SIZE - 10, 0, 3 * MIB + 12345):
            fh.seek(off)
            assert fh.read(100_000) == whole[off : off + 100_000]
    del whole
    m = mounter.remount(m)  # cold: nothing cached in the mount process
    assert read_digest(m.path / "big.bin", 4 * MIB + 3) == expected


def _regenerate(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(min(MIB, size - len(out)))
    return bytes(out)


def test_parallel_large_writers_and_readers(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume)
    digests: dict[int, str] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            digests[i] = write_stream(m.path / f"w{i}", 40 * MIB + i * 777, 100 + i, 256 * 1024)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    results: dict[int, str] = {}

    def reader(i: int) -> None:
        try:
            results[i] = read_digest(m.path / f"w{i}", 1 << 17)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == digests


def test_overwrite_middle_of_large_file(mounter: Mounter, volume: Volume) -> None:
    m = mounter.mount(volume)
    f = m.path / "f"
    size = 70 * MIB
    write_stream(f, size, 3)
    patch = os.urandom(5 * MIB)
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, patch, 62 * MIB)  # crosses the 64 MiB chunk boundary
    finally:
        os.close(fd)
    expected = bytearray(_regenerate(size, 3))
    expected[62 * MIB : 67 * MIB] = patch
    digest = hashlib.sha256(expected).hexdigest()
    assert read_digest(f, MIB) == digest
    m = mounter.remount(m)
    assert read_digest(m.path / "f", MIB) == digest
