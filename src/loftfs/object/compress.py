"""Compression as a wrapper around any store.

Every stored object starts with a 13-byte header: a magic, the algorithm id and the original
length; lz4 and zstd frames also carry a checksum of the content. Objects are self-describing:
changing a volume's algorithm later still reads what was written before, and a damaged body is
detected (``ObjectCorrupted``) instead of being returned as data. Sizes reported by ``head`` and ``list`` are those of the stored objects.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import lz4.frame
import zstandard

from loftfs.errors import ConfigError, ObjectCorrupted
from loftfs.object.interface import ObjectStore, ObjectStoreWrapper

MAGIC = b"\x89LFZ"
_HEADER = struct.Struct(">4sBQ")  # magic, algorithm id, original length
HEADER_SIZE = _HEADER.size

ALGORITHMS = {"none": 0, "lz4": 1, "zstd": 2}
_NAMES = {v: k for k, v in ALGORITHMS.items()}
ZSTD_LEVEL = 3


class CompressedStore(ObjectStoreWrapper):
    """Compresses on ``put`` with ``algo``; decompresses whatever algorithm a stored object names.
    A ranged ``get`` fetches the whole object and slices it: compressed bytes cannot be
    addressed by offset."""

    def __init__(self, inner: ObjectStore, algo: str) -> None:
        super().__init__(inner)
        if algo not in ALGORITHMS:
            raise ConfigError(
                f"unknown compression {algo!r} (supported: {', '.join(sorted(ALGORITHMS))})"
            )
        self.algo = algo
        self._algo_id = ALGORITHMS[algo]
        # zstandard (de)compressor objects are not safe to share between threads
        self._local = threading.local()

    def describe(self) -> str:
        return f"{self.inner.describe()} (compress={self.algo})"

    def _zstd_c(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        return c

    def _zstd_d(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, data: bytes) -> bytes:
        header = _HEADER.pack(MAGIC, self._algo_id, len(data))
        if self._algo_id == 1:
            body = lz4.frame.compress(data, content_checksum=True)
        elif self._algo_id == 2:
            body = self._zstd_c().compress(data)
        else:
            body = bytes(data)
        return header + body

    def decode(self, key: str, stored: bytes) -> bytes:
        def corrupted(why: str) -> ObjectCorrupted:
            return ObjectCorrupted(f"object {key!r} in {self.inner.describe()} is corrupted: {why}")

        if len(stored) < HEADER_SIZE:
            raise corrupted(f"{len(stored)} bytes, shorter than the compression header")
        magic, algo_id, length = _HEADER.unpack_from(stored)
        if magic != MAGIC:
            raise corrupted("no compression header")
        body = memoryview(stored)[HEADER_SIZE:]
        decoders: dict[int, Callable[[memoryview], bytes]] = {
            0: bytes,
            1: lz4.frame.decompress,
            2: lambda b: self._zstd_d().decompress(b, max_output_size=length),
        }
        decoder = decoders.get(algo_id)
        if decoder is None:
            raise corrupted(f"unknown compression id {algo_id}")
        try:
            data = decoder(body)
        except Exception as e:  # the libraries raise their own error types
            raise corrupted(f"{_NAMES[algo_id]} decoding failed ({e})") from e
        if len(data) != length:
            raise corrupted(f"decoded {len(data)} bytes, header says {length}")
        return data

    # what is stored is not what is read: the version check goes through head() and get()
    get_checked = ObjectStore.get_checked

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        data = self.decode(key, self.inner.get(key))
        if offset == 0 and limit < 0:
            return data
        return data[offset:] if limit < 0 else data[offset : offset + limit]

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, self.encode(data))
