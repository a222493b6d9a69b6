"""One fixture over every store configuration: each conformance test runs against all of them.
A new backend (s3) is one more entry in ``STORE_KINDS`` and a branch in ``_open``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loftfs.object import create_storage
from loftfs.object.interface import ObjectStore
from loftfs.object.prefix import PrefixStore

STORE_KINDS = ["file", "file+lz4", "file+zstd", "file+prefix"]


class StoreFactory:
    """Makes fresh, empty stores of one configuration."""

    def __init__(self, kind: str, base: Path) -> None:
        self.kind = kind
        self.base = base
        # head/list report the bytes put (compression stores report stored sizes)
        self.exact_sizes = not ("lz4" in kind or "zstd" in kind)
        self._made: list[ObjectStore] = []
        self._n = 0

    def __call__(self) -> ObjectStore:
        self._n += 1
        root = self.base / f"bucket{self._n}"
        store = self._open(root)
        store.create()
        self._made.append(store)
        return store

    def _open(self, root: Path) -> ObjectStore:
        if self.kind == "file":
            return create_storage("file", str(root))
        if self.kind == "file+lz4":
            return create_storage("file", str(root), compress="lz4")
        if self.kind == "file+zstd":
            return create_storage("file", str(root), compress="zstd")
        if self.kind == "file+prefix":
            return PrefixStore(create_storage("file", str(root)), "tenant-a/")
        raise AssertionError(self.kind)

    def close(self) -> None:
        for store in self._made:
            store.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=STORE_KINDS)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    factory = StoreFactory(request.param, tmp_path / "stores")
    yield factory
    factory.close()


@pytest.fixture
def store(new_store: StoreFactory) -> ObjectStore:
    return new_store()
