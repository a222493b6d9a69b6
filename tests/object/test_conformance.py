"""The ObjectStore contract, run against every store configuration (see conftest.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loftfs.errors import ObjectChanged, ObjectNotFound
from loftfs.object.interface import ObjectInfo, ObjectStore

from .conftest import StoreFactory

FIXTURE_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=40
)


def entries(infos: object) -> list[tuple[str, bool]]:
    return [(i.key, i.is_prefix) for i in infos]  # type: ignore[attr-defined]


# --- basic operations ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 7])
def test_put_get_roundtrip(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    store.put("dir/obj", data)
    assert store.get("dir/obj") == data


def test_compressible_data_roundtrip(store: ObjectStore) -> None:
    data = b"loftfs " * 100_000
    store.put("text", data)
    assert store.get("text") == data


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("nope")
    with pytest.raises(ObjectNotFound):
        store.get("no/such/dir/key", 10, 5)
    with pytest.raises(ObjectNotFound):
        store.head("nope")


def test_a_prefix_is_not_an_object(store: ObjectStore) -> None:
    store.put("a/b", b"x")
    with pytest.raises(ObjectNotFound):
        store.get("a")
    with pytest.raises(ObjectNotFound):
        store.head("a")


def test_head(store: ObjectStore, new_store: StoreFactory) -> None:
    store.put("k", b"12345")
    info = store.head("k")
    assert info.key == "k"
    assert not info.is_prefix
    assert info.mtime_ns > 0
    if new_store.exact_sizes:
        assert info.size == 5


@given(offset=st.integers(0, 300), limit=st.integers(-1, 300))
@FIXTURE_OK
def test_ranged_get(store: ObjectStore, offset: int, limit: int) -> None:
    data = bytes(range(256))
    store.put("range", data)
    expected = data[offset:] if limit < 0 else data[offset : offset + limit]
    assert store.get("range", offset, limit) == expected


def test_get_checked_serves_only_the_version_listed(store: ObjectStore) -> None:
    """What imports rely on: the ETag that ``head`` and ``list`` report pins a version; a get
    checked against it returns that version's bytes, or ``ObjectChanged`` once it was replaced
    (never bytes of the new version), and ``ObjectNotFound`` once it is gone."""
    store.put("v", b"version one")
    etag = store.head("v").etag
    assert etag, "every store reports a version tag"
    assert [i.etag for i in store.list() if i.key == "v"] == [etag]
    assert store.get_checked("v", etag) == b"version one"
    assert store.get_checked("v", etag, 8, 3) == b"one"
    assert store.get_checked("v", etag, 11, 5) == b""
    time.sleep(0.01)  # a new mtime where the tag is derived from it
    store.put("v", b"version two, longer")
    with pytest.raises(ObjectChanged):
        store.get_checked("v", etag, 0, 4)
    with pytest.raises(ObjectChanged):
        store.get_checked("v", etag, 100, 4)
    new = store.head("v").etag
    assert new != etag and store.get_checked("v", new, 8, 3) == b"two"
    store.delete("v")
    with pytest.raises(ObjectNotFound):
        store.get_checked("v", new)


def test_overwrite(store: ObjectStore) -> None:
    store.put("k", b"first version, longer")
    store.put("k", b"second")
    assert store.get("k") == b"second"
    assert entries(store.list()) == [("k", False)]


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("a/b/c", b"1")
    store.delete("a/b/c")
    store.delete("a/b/c")
    store.delete("never/existed")
    with pytest.raises(ObjectNotFound):
        store.get("a/b/c")
    assert list(store.list()) == []
    # the emptied "directories" do not show up as prefixes either
    assert list(store.list(delimiter="/")) == []


def test_delete_many(store: ObjectStore) -> None:
    for i in range(10):
        store.put(f"d/{i}", b"x")
    store.delete_many([f"d/{i}" for i in range(0, 10, 2)] + ["d/missing"])
    assert [i.key for i in store.list()] == [f"d/{i}" for i in range(1, 10, 2)]


def test_create_is_idempotent(store: ObjectStore) -> None:
    store.put("k", b"v")
    store.create()
    store.create()
    assert store.get("k") == b"v"
    assert store.describe()


# --- listing ------------------------------------------------------------------------------

TRICKY = ["a", "a-b", "a.b", "a0", "ab", "b", "é", "a/b", "a/c/d", "a-/x", "b/a/a"]


def model_list(
    keys: set[str], prefix: str, start_after: str, delimiter: str, limit: int
) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    last = None
    for k in sorted(keys):
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix) :]
        if delimiter and delimiter in rest:
            common = prefix + rest[: rest.index(delimiter) + len(delimiter)]
            if common <= start_after or common == last:
                continue
            last = common
            out.append((common, True))
        elif k > start_after:
            out.append((k, False))
    return out[:limit] if limit else out


def conflict_free(keys: set[str]) -> set[str]:
    """Drop keys that are a 'directory' of another key: a file store cannot hold both."""
    return {k for k in keys if not any(o.startswith(k + "/") for o in keys)}


def test_list_key_order(store: ObjectStore) -> None:
    keys = conflict_free(set(TRICKY))
    for k in keys:
        store.put(k, b"")
    assert [i.key for i in store.list()] == sorted(keys)


@pytest.mark.parametrize(
    ("prefix", "delimiter"),
    [("", "/"), ("a", "/"), ("a/", "/"), ("a/c", "/"), ("", "-"), ("a", "."), ("b/", "")],
)
def test_list_prefix_delimiter(store: ObjectStore, prefix: str, delimiter: str) -> None:
    keys = conflict_free(set(TRICKY))
    for k in keys:
        store.put(k, b"")
    got = entries(store.list(prefix, delimiter=delimiter))
    assert got == model_list(keys, prefix, "", delimiter, 0)


_part = st.sampled_from(["a", "b", "a-", "ab", "a.b", "0", "é"])
_key = st.lists(_part, min_size=1, max_size=3).map("/".join)


@given(
    keys=st.sets(_key, min_size=0, max_size=12),
    prefix=st.sampled_from(["", "a", "a/", "a-", "b/a", "ab/", "é"]),
    start_after=st.sampled_from(["", "a", "a/", "a/b", "a-/0", "b", "zz"]),
    delimiter=st.sampled_from(["", "/", "-"]),
    limit=st.integers(0, 5),
)
@FIXTURE_OK
def test_list_matches_model(
    new_store: StoreFactory,
    keys: set[str],
    prefix: str,
    start_after: str,
    delimiter: str,
    limit: int,
) -> None:
    keys = conflict_free(keys)
    store = new_store()
    for k in keys:
        store.put(k, k.encode())
    got = entries(store.list(prefix, start_after, delimiter, limit))
    assert got == model_list(keys, prefix, start_after, delimiter, limit)


def test_list_paging_with_start_after(store: ObjectStore) -> None:
    keys = {f"p/{i:03d}" for i in range(25)} | {f"p/sub{i}/x" for i in range(5)} | {"q"}
    for k in keys:
        store.put(k, b"")
    full = entries(store.list("p/", delimiter="/"))
    paged: list[tuple[str, bool]] = []
    after = ""
    while True:
        page = entries(store.list("p/", after, "/", limit=4))
        if not page:
            break
        paged += page
        after = page[-1][0]
    assert paged == full
    assert len(full) == 30


def test_list_sizes(store: ObjectStore, new_store: StoreFactory) -> None:
    store.put("x/one", b"1")
    store.put("x/three", b"333")
    infos = {i.key: i for i in store.list("x/")}
    assert set(infos) == {"x/one", "x/three"}
    if new_store.exact_sizes:
        assert infos["x/three"].size == 3
    assert all(isinstance(i, ObjectInfo) and i.size > 0 for i in infos.values())


def test_list_is_lazy(store: ObjectStore) -> None:
    for i in range(20):
        store.put(f"lazy/{i:02d}", b"")
    it = iter(store.list("lazy/"))
    assert next(it).key == "lazy/00"
    assert next(it).key == "lazy/01"


# --- concurrency --------------------------------------------------------------------------


def test_overwrite_is_atomic(store: ObjectStore) -> None:
    """Readers racing an overwriting writer see one whole version, never a mix or a part."""
    versions = [bytes([v]) * (200_000 + v * 1000) for v in range(1, 5)]
    store.put("hot", versions[0])
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            data = store.get("hot")
            if data not in versions:
                bad.append(f"{len(data)} bytes starting {data[:1]!r}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < deadline:
        store.put("hot", versions[n % len(versions)])
        n += 1
    stop.set()
    for t in threads:
        t.join()
    assert not bad
    assert n > 1


def test_concurrent_operations(store: ObjectStore) -> None:
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(30):
                key = f"c/{w}/{i}"
                data = f"{w}:{i}".encode() * 50
                store.put(key, data)
                assert store.get(key) == data
                if i % 3 == 0:
                    store.delete(key)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = sorted(f"c/{w}/{i}" for w in range(8) for i in range(30) if i % 3)
    assert [i.key for i in store.list("c/")] == expected


def test_put_and_delete_racing_in_one_directory(store: ObjectStore) -> None:
    """Deleting the last object of a 'directory' while another is put there loses nothing."""
    errors: list[BaseException] = []

    def churn(name: str) -> None:
        try:
            for _ in range(200):
                store.put(f"race/{name}", b"v")
                store.delete(f"race/{name}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(n,)) for n in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.put("race/final", b"ok")
    assert store.get("race/final") == b"ok"
