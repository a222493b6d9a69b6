"""FileObjectStore specifics: on-disk layout, temporary files, and OS errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loftfs.errors import ObjectNotFound, ObjectStoreError
from loftfs.object import file as file_module
from loftfs.object.file import SYNC_EACH_LIMIT, TMP_PREFIX, FileObjectStore


def test_keys_are_files(tmp_path: Path) -> None:
    store = FileObjectStore(str(tmp_path))
    store.put("vol/chunks/0/0/1_0_5", b"hello")
    assert (tmp_path / "vol/chunks/0/0/1_0_5").read_bytes() == b"hello"
    assert store.describe() == f"file://{tmp_path}/"


def test_no_temporary_files_left(tmp_path: Path) -> None:
    store = FileObjectStore(str(tmp_path))
    for i in range(5):
        store.put(f"d/k{i}", os.urandom(1000))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [f"k{i}" for i in range(5)]


def test_leftover_temporary_files_are_invisible(tmp_path: Path) -> None:
    """A crash between create and rename leaves a temp file: listings never show it."""
    store = FileObjectStore(str(tmp_path))
    store.put("d/real", b"1")
    (tmp_path / "d" / f"{TMP_PREFIX}abc").write_bytes(b"partial")
    (tmp_path / f"{TMP_PREFIX}def").write_bytes(b"partial")
    assert [i.key for i in store.list()] == ["d/real"]
    assert [i.key for i in store.list(delimiter="/")] == ["d/"]


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "a/../b", "./a", "a\0b", f"{TMP_PREFIX}x"]
)
def test_invalid_keys(tmp_path: Path, key: str) -> None:
    store = FileObjectStore(str(tmp_path))
    with pytest.raises(ObjectStoreError, match="invalid object key"):
        store.put(key, b"x")
    with pytest.raises(ObjectStoreError):
        store.get(key)


def test_empty_directories_are_pruned(tmp_path: Path) -> None:
    store = FileObjectStore(str(tmp_path))
    store.put("a/b/c/d", b"1")
    store.put("a/x", b"2")
    store.delete("a/b/c/d")
    assert sorted(os.listdir(tmp_path / "a")) == ["x"]
    store.delete("a/x")
    assert os.listdir(tmp_path) == []
    assert tmp_path.is_dir()  # the root itself stays


def test_missing_root(tmp_path: Path) -> None:
    store = FileObjectStore(str(tmp_path / "nope"))
    with pytest.raises(ObjectNotFound):
        store.get("k")
    with pytest.raises(ObjectNotFound):
        store.head("k")
    assert list(store.list()) == []
    store.delete("k")
    store.create()
    store.put("k", b"v")
    assert store.get("k") == b"v"


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    store = FileObjectStore(str(tmp_path / "f"))
    with pytest.raises(ObjectStoreError, match="not a directory"):
        store.create()


def test_object_where_a_prefix_is_needed(tmp_path: Path) -> None:
    store = FileObjectStore(str(tmp_path))
    store.put("a", b"file")
    with pytest.raises(ObjectStoreError, match="is an object"):
        store.put("a/b", b"x")
    store.put("d/e", b"x")
    with pytest.raises(ObjectStoreError, match="prefix of other objects"):
        store.put("d", b"x")
    assert store.get("a") == b"file"


# --- OS errors (need root for mounts and for dropping privileges) --------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir()
    opts = ",".join(("size=256k", *options))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@needs_root
def test_no_space_left(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small") as root:
        store = FileObjectStore(str(root))
        store.put("fits", b"x" * 1000)
        with pytest.raises(ObjectStoreError, match="no space left on device"):
            store.put("too/big", b"x" * (1 << 20))
        assert store.get("fits") == b"x" * 1000
        # nothing half-written is left behind
        assert [i.key for i in store.list()] == ["fits"]


@needs_root
def test_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro") as root:
        store = FileObjectStore(str(root))
        with pytest.raises(ObjectStoreError, match="read-only file system"):
            store.put("k", b"x")


@needs_root
def test_permission_denied() -> None:
    """Run as an unprivileged user against a root-owned bucket: typed ObjectAuthError."""
    base = Path(tempfile.mkdtemp(prefix="loft-perm-"))
    try:
        os.chmod(base, 0o755)
        root = base / "bucket"
        store = FileObjectStore(str(root))
        store.put("secret/k", b"x")
        store.put("public/k", b"x")
        os.chmod(root, 0o755)
        os.chmod(root / "secret", 0o700)
        script = f"""
import os, sys
from loftfs.errors import ObjectAuthError
from loftfs.object.file import FileObjectStore
os.setgid(65534); os.setuid(65534)
s = FileObjectStore({str(root)!r})
assert s.get("public/k") == b"x"
for op in (lambda: s.get("secret/k"), lambda: s.put("secret/j", b"y"),
           lambda: s.put("new/k", b"y"), lambda: list(s.list("secret/"))):
    try:
        op()
    except ObjectAuthError as e:
        assert "permission denied" in str(e), e
    else:
        sys.exit("no error")
"""
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr + r.stdout
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("prefix", ["../", "../outside/", "a/../", "./", "a//", "/"])
def test_listing_never_leaves_the_root(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    store = FileObjectStore(str(tmp_path / "bucket"))
    store.put("a/k", b"1")
    assert list(store.list(prefix)) == []
    assert list(store.list(prefix, delimiter="/")) == []


@pytest.mark.parametrize("count", [3, SYNC_EACH_LIMIT + 5])
def test_sync_covers_what_was_put(tmp_path: Path, count: int) -> None:
    """``sync`` fsyncs the objects written since the last call (one by one, or the whole file
    system at once when there are many); deleted ones are skipped; nothing stays pending."""
    store = FileObjectStore(str(tmp_path / "bucket"))
    store.create()
    for i in range(count):
        store.put(f"a/{i % 3}/k{i}", b"x" * i)
    store.delete("a/0/k0")
    assert len(store._pending) == count
    # the directories made for them are synced in their parents too
    assert store._new_dirs == {str(tmp_path / "bucket" / d) for d in ("a", "a/0", "a/1", "a/2")}
    store.sync()
    assert not store._pending and not store._new_dirs
    store.sync()  # nothing to do
    keys = {i.key for i in store.list("a/")}
    assert len(keys) == count - 1 and "a/0/k0" not in keys


def test_pending_objects_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "PENDING_LIMIT", 10)
    store = FileObjectStore(str(tmp_path / "bucket"))
    store.create()
    for i in range(25):
        store.put(f"k{i}", b"data")
        assert len(store._pending) < 10
