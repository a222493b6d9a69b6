"""One fixture over every store configuration: each conformance test runs against all of them.
A new backend (s3) is one more entry in ``STORE_KINDS`` and a branch in ``_open``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loftfs.meta.types import VolumeSettings
from loftfs.object import create_storage, open_storage_url, open_volume_storage
from loftfs.object.encrypt import VolumeSecret, new_record
from loftfs.object.interface import ObjectStore
from loftfs.object.prefix import PrefixStore
from servers import SeaweedServer

STORE_KINDS = [
    "file",
    "file+lz4",
    "file+zstd",
    "file+prefix",
    "file+encrypt",
    "file+zstd+encrypt",
    "s3",
    "s3+prefix",
]


class StoreFactory:
    """Makes fresh, empty stores of one configuration."""

    def __init__(self, kind: str, base: Path, seaweed: SeaweedServer | None = None) -> None:
        self.kind = kind
        self.base = base
        self.seaweed = seaweed  # the S3 server of the s3 kinds (see _open)
        self._bucket = ""
        # head/list report the bytes put (compression and encryption report stored sizes)
        self.exact_sizes = not ("lz4" in kind or "zstd" in kind or "encrypt" in kind)
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
        if self.kind in ("file+encrypt", "file+zstd+encrypt"):
            # the whole stack of an encrypted volume, as a mount builds it (a key file's
            # secret: no passphrase derivation per store)
            secret = VolumeSecret("key", os.urandom(32), "test")
            settings = VolumeSettings(
                "conformance", bucket=str(root), compress="zstd" if "zstd" in self.kind else "none"
            )
            settings.encryption, _ = new_record(secret, settings.uuid)
            return open_volume_storage(settings, secret)
        if self.kind in ("s3", "s3+prefix") and self.seaweed is not None:
            # s3: a fresh bucket per store; s3+prefix: one bucket per test, a fresh key prefix
            # per store (isolated as well as by buckets, and a bucket costs the server 0.2 s)
            if self.kind == "s3" or not self._bucket:
                self._bucket = self.seaweed.new_bucket()
            url = self.seaweed.bucket_url(self._bucket)
            if self.kind == "s3+prefix":
                url += f"/tenant-{self._n}"
            return open_storage_url(
                url, access_key=self.seaweed.access_key, secret_key=self.seaweed.secret_key
            )
        raise AssertionError(self.kind)

    def close(self) -> None:
        for store in self._made:
            store.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(params=STORE_KINDS)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    kind: str = request.param
    seaweed = request.getfixturevalue("seaweed_server") if kind.startswith("s3") else None
    factory = StoreFactory(kind, tmp_path / "stores", seaweed)
    yield factory
    factory.close()


@pytest.fixture
def store(new_store: StoreFactory) -> ObjectStore:
    return new_store()
