"""Wrappers (compression, prefix, retries, fault injection) and the storage factory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loftfs.errors import (
    ConfigError,
    ObjectCorrupted,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransientError,
)
from loftfs.meta.types import VolumeSettings
from loftfs.object import create_storage, open_volume_storage, storage_names
from loftfs.object.compress import HEADER_SIZE, CompressedStore
from loftfs.object.faults import FaultInjectingStore
from loftfs.object.file import FileObjectStore
from loftfs.object.prefix import PrefixStore
from loftfs.object.retry import RetryStore


@pytest.fixture
def raw(tmp_path: Path) -> FileObjectStore:
    store = FileObjectStore(str(tmp_path / "raw"))
    store.create()
    return store


# --- compression --------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_compression_shrinks_stored_objects(raw: FileObjectStore, algo: str) -> None:
    store = CompressedStore(raw, algo)
    data = b"0123456789abcdef" * 65536
    store.put("k", data)
    assert raw.head("k").size < len(data) // 10
    assert store.get("k") == data
    assert store.get("k", 100, 50) == data[100:150]


def test_incompressible_data_and_none(raw: FileObjectStore) -> None:
    data = os.urandom(100_000)
    CompressedStore(raw, "none").put("n", data)
    assert raw.head("n").size == len(data) + HEADER_SIZE
    assert CompressedStore(raw, "zstd").get("n") == data


def test_objects_are_self_describing(raw: FileObjectStore) -> None:
    """An object is read by the algorithm it names, whatever the reader is configured with."""
    data = b"model weights " * 1000
    CompressedStore(raw, "lz4").put("a", data)
    CompressedStore(raw, "zstd").put("b", data)
    for algo in ("none", "lz4", "zstd"):
        reader = CompressedStore(raw, algo)
        assert reader.get("a") == data
        assert reader.get("b") == data


@pytest.mark.parametrize("algo", ["none", "lz4", "zstd"])
def test_corrupted_body_is_detected(raw: FileObjectStore, algo: str) -> None:
    store = CompressedStore(raw, algo)
    data = b"checkpoint " * 5000
    store.put("vol/blk", data)
    stored = bytearray(raw.get("vol/blk"))
    # truncation is detected for every algorithm
    raw.put("vol/blk", bytes(stored[: len(stored) - 7]))
    with pytest.raises(ObjectCorrupted, match="vol/blk"):
        store.get("vol/blk")
    # so is a damaged compressed body
    if algo != "none":
        stored[HEADER_SIZE + 20] ^= 0xFF
        stored[-5] ^= 0xFF
        raw.put("vol/blk", bytes(stored))
        with pytest.raises(ObjectCorrupted, match="vol/blk"):
            store.get("vol/blk")


def test_missing_header(raw: FileObjectStore) -> None:
    raw.put("plain", b"not compressed by loftfs")
    with pytest.raises(ObjectCorrupted, match="plain"):
        CompressedStore(raw, "lz4").get("plain")
    raw.put("tiny", b"ab")
    with pytest.raises(ObjectCorrupted, match="tiny"):
        CompressedStore(raw, "lz4").get("tiny")


def test_unknown_algorithm(raw: FileObjectStore) -> None:
    with pytest.raises(ConfigError, match="gzip"):
        CompressedStore(raw, "gzip")


# --- prefix -------------------------------------------------------------------------------


def test_prefixes_isolate(raw: FileObjectStore) -> None:
    a, b = PrefixStore(raw, "tenant-a/"), PrefixStore(raw, "tenant-b/")
    a.put("k", b"A")
    b.put("k", b"B")
    b.put("dir/x", b"B")
    assert a.get("k") == b"A" and b.get("k") == b"B"
    assert [i.key for i in a.list()] == ["k"]
    assert [(i.key, i.is_prefix) for i in b.list(delimiter="/")] == [("dir/", True), ("k", False)]
    assert [i.key for i in b.list(start_after="dir/x")] == ["k"]
    assert a.head("k").key == "k"
    assert [i.key for i in raw.list()] == ["tenant-a/k", "tenant-b/dir/x", "tenant-b/k"]
    b.delete_many(["k", "dir/x"])
    with pytest.raises(ObjectNotFound):
        b.get("k")
    assert a.get("k") == b"A"
    assert a.describe().endswith("tenant-a/")


@pytest.mark.parametrize("prefix", ["", "/abs"])
def test_bad_prefix(raw: FileObjectStore, prefix: str) -> None:
    with pytest.raises(ConfigError):
        PrefixStore(raw, prefix)


# --- fault injection ----------------------------------------------------------------------


def test_faults_always(raw: FileObjectStore) -> None:
    raw.put("k", b"v")
    store = FaultInjectingStore(raw, error_rate=1.0)
    for op in (lambda: store.get("k"), lambda: store.put("k", b"w"), lambda: store.head("k")):
        with pytest.raises(ObjectTransientError, match="injected"):
            op()
    with pytest.raises(ObjectTransientError):
        store.delete("k")
    assert raw.get("k") == b"v"  # a failed put changed nothing
    assert store.errors_injected == 4


def test_faults_never_and_ops_filter(raw: FileObjectStore) -> None:
    store = FaultInjectingStore(raw, error_rate=1.0, ops={"put"})
    raw.put("k", b"v")
    assert store.get("k") == b"v"
    with pytest.raises(ObjectTransientError):
        store.put("k", b"w")
    store.error_rate = 0.0
    store.put("k", b"w")
    assert store.get("k") == b"w"
    with pytest.raises(ValueError):
        FaultInjectingStore(raw, ops={"fetch"})


def test_faults_truncate(raw: FileObjectStore) -> None:
    raw.put("k", bytes(1000))
    store = FaultInjectingStore(raw, truncate_rate=1.0)
    assert len(store.get("k")) < 1000
    assert store.truncations_injected == 1


def test_faults_are_reproducible(raw: FileObjectStore) -> None:
    raw.put("k", b"v")

    def pattern(seed: int) -> list[bool]:
        store = FaultInjectingStore(raw, error_rate=0.5, seed=seed)
        out = []
        for _ in range(40):
            try:
                store.get("k")
                out.append(True)
            except ObjectTransientError:
                out.append(False)
        return out

    assert pattern(7) == pattern(7)
    assert 5 < sum(pattern(7)) < 35


def test_faults_delay(raw: FileObjectStore) -> None:
    raw.put("k", b"v")
    store = FaultInjectingStore(raw, delay_s=0.05)
    t = time.monotonic()
    store.get("k")
    assert time.monotonic() - t >= 0.05


# --- retries ------------------------------------------------------------------------------


def test_retry_recovers_from_transient_errors(raw: FileObjectStore) -> None:
    faulty = FaultInjectingStore(raw, error_rate=0.5, seed=1)
    store = RetryStore(faulty, attempts=20, backoff_s=0.0)
    for i in range(30):
        store.put(f"k{i}", b"v")
    assert all(store.get(f"k{i}") == b"v" for i in range(30))
    assert len(list(store.list())) == 30
    assert faulty.errors_injected > 0


def test_retry_gives_up(raw: FileObjectStore) -> None:
    faulty = FaultInjectingStore(raw, error_rate=1.0)
    store = RetryStore(faulty, attempts=3, backoff_s=0.0)
    with pytest.raises(ObjectTransientError):
        store.put("k", b"v")
    assert faulty.errors_injected == 3


def test_retry_does_not_retry_answers(raw: FileObjectStore) -> None:
    faulty = FaultInjectingStore(raw)
    store = RetryStore(faulty, attempts=5, backoff_s=0.0)
    with pytest.raises(ObjectNotFound):
        store.get("missing")


def test_retry_resumes_listing(raw: FileObjectStore) -> None:
    for i in range(10):
        raw.put(f"k{i}", b"")

    class FlakyList(FaultInjectingStore):
        calls = 0

        def list(self, prefix="", start_after="", delimiter="", limit=0):  # type: ignore[no-untyped-def]
            FlakyList.calls += 1
            for n, info in enumerate(raw.list(prefix, start_after, delimiter, limit)):
                if n == 3 and FlakyList.calls < 3:
                    raise ObjectTransientError("connection reset")
                yield info

    store = RetryStore(FlakyList(raw), attempts=2, backoff_s=0.0)
    assert [i.key for i in store.list()] == [f"k{i}" for i in range(10)]


# --- factory ------------------------------------------------------------------------------


def test_create_storage(tmp_path: Path) -> None:
    assert storage_names() == ["file", "s3"]
    store = create_storage("file", str(tmp_path / "b"), compress="zstd")
    store.create()
    store.put("x", b"y" * 1000)
    assert store.get("x") == b"y" * 1000
    assert (tmp_path / "b" / "x").stat().st_size < 1000
    same = create_storage("file", f"file://{tmp_path}/b")
    assert CompressedStore(same, "none").get("x") == b"y" * 1000


def test_open_volume_storage(tmp_path: Path) -> None:
    settings = VolumeSettings(name="v", bucket=str(tmp_path / "data"), compress="lz4")
    store = open_volume_storage(settings)
    store.create()
    store.put(f"{settings.uuid}/chunks/0/0/1_0_3", b"abc")
    assert store.get(f"{settings.uuid}/chunks/0/0/1_0_3") == b"abc"
    assert "lz4" in store.describe()


@pytest.mark.parametrize(
    ("storage", "bucket", "compress", "message"),
    [
        ("ftp", "/x", "none", "unsupported storage 'ftp'"),
        ("file", "", "none", "needs a directory"),
        ("file", "relative/dir", "none", "absolute"),
        ("file", "/x", "brotli", "unknown compression"),
    ],
)
def test_create_storage_errors(storage: str, bucket: str, compress: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        create_storage(storage, bucket, compress=compress)
    assert "\n" not in str(info.value)


def test_bucket_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        create_storage("file", str(tmp_path / "f"))
    with pytest.raises(ConfigError):
        create_storage("file", str(tmp_path), endpoint="http://x")


def test_errors_are_typed() -> None:
    assert issubclass(ObjectCorrupted, ObjectStoreError)
    assert issubclass(ObjectTransientError, ObjectStoreError)
