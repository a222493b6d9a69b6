"""Damaged blocks through a real mount: a flipped byte in an encrypted or a compressed block
reaches the reader as EIO and a log line naming the object, never as data; the mount keeps
serving, and nothing of the failure is cached (the repaired object reads again)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from loftmount import MIB, Mounter, Volume


@pytest.mark.parametrize("kind", ["encrypted", "compressed"])
def test_flipped_byte_reads_as_eio(
    mounter: Mounter, new_volume: Callable[..., Volume], tmp_path: Path, kind: str
) -> None:
    args: tuple[str, ...] = ("--cache-size", "0")  # the damaged object itself is read
    if kind == "encrypted":
        passphrase = tmp_path / "passphrase"
        passphrase.write_text("correct horse battery staple\n")
        volume = new_volume(encrypt_passphrase_file=str(passphrase))
        args += ("--encrypt-passphrase-file", str(passphrase))
    else:
        volume = new_volume(compress="zstd")
    m = mounter.mount(volume, *args)
    data = os.urandom(MIB) + b"compressible text " * (MIB // 9)  # 3 blocks of 1 MiB
    (m.path / "f").write_bytes(data)
    m = mounter.remount(m)  # every block is committed to the bucket
    keys = sorted(volume.block_files())
    assert len(keys) == 3, keys
    victim = keys[1]
    original = volume.read_block(victim)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    volume.write_block(victim, bytes(damaged))

    m = mounter.remount(m)  # no cached copy: neither the kernel's nor the mount's
    with pytest.raises(OSError) as e:
        (m.path / "f").read_bytes()
    assert e.value.errno == errno.EIO
    with open(m.path / "f", "rb") as f:
        with pytest.raises(OSError) as e:
            os.pread(f.fileno(), 100, MIB + 5000)
        assert e.value.errno == errno.EIO
        assert os.pread(f.fileno(), 4096, 0) == data[:4096]  # intact blocks still read
    assert m.alive()
    log = m.log_text()
    assert victim in log and "corrupted" in log, m.log_tail()

    # a failure is not remembered: once the object is whole again it reads
    volume.write_block(victim, original)
    assert (m.path / "f").read_bytes() == data
    assert m.alive()
