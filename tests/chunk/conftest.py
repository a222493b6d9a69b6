"""A real volume for data-path tests: a SQLite metadata file and a directory object store,
with small blocks so multi-block behaviour shows up in small files."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loftfs.chunk.datapath import DataPath
from loftfs.meta import open_meta
from loftfs.meta.interface import Meta
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, VolumeSettings
from loftfs.object.file import FileObjectStore
from loftfs.object.interface import ObjectStore, ObjectStoreWrapper
from loftfs.vfs.options import MountOptions

BLOCK = 64 << 10


class CountingStore(ObjectStoreWrapper):
    """Counts the calls that reach the real store (to observe caching and single-flight)."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gets: list[str] = []
        self.puts: list[str] = []
        self.deletes: list[int] = []  # keys per delete_many call

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        self.gets.append(key)
        return self.inner.get(key, offset, limit)

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put(key, data)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.deletes.append(len(keys))
        self.inner.delete_many(keys)


@dataclass
class Volume:
    root: Path
    meta: Meta
    settings: VolumeSettings
    files: FileObjectStore  # the bucket as it is on disk
    paths: list[DataPath] = field(default_factory=list)
    _names: itertools.count[int] = field(default_factory=itertools.count)

    def data_path(
        self, store: ObjectStore | None = None, meta: Meta | None = None, **opts: object
    ) -> DataPath:
        defaults: dict[str, object] = {
            "buffer_size": 8 << 20,
            "upload_threads": 4,
            "fetch_threads": 4,
            "gc_interval_s": 0,
            "compact_threshold": 0,
            "cache_size": 0,  # the disk cache has its own tests (test_cache_disk.py)
        }
        defaults.update(opts)
        dp = DataPath(
            meta or self.meta,
            store or self.files,
            self.settings,
            MountOptions(**defaults),  # type: ignore[arg-type]
        )
        self.paths.append(dp)
        return dp

    def new_file(self) -> int:
        name = f"f{next(self._names)}".encode()
        return self.meta.create(ROOT_CTX, ROOT_INODE, name, 0o644, os.O_RDWR).inode

    def size(self, inode: int) -> int:
        return self.meta.getattr(inode).size

    def block_files(self) -> set[str]:
        return {i.key for i in self.files.list(f"{self.settings.uuid}/chunks/")}


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    meta = open_meta(f"sqlite3://{tmp_path}/meta.db")
    settings = VolumeSettings(name="test", bucket=str(tmp_path / "data"), block_size=BLOCK)
    meta.init_volume(settings)
    settings = meta.load_settings()
    files = FileObjectStore(settings.bucket)
    files.create()
    vol = Volume(tmp_path, meta, settings, files)
    yield vol
    for dp in vol.paths:
        try:
            dp.close()
        except Exception:
            pass
    meta.close()


@pytest.fixture
def dp(volume: Volume) -> DataPath:
    return volume.data_path()


def read_all(dp: DataPath, inode: int, size: int) -> bytes:
    return dp.read(inode, 0, size + 100, size)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
