"""``loft objbench``: behaviour checks and measurements of a real object store, in a random
prefix that is gone afterwards; a store that misbehaves fails the command."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from loftcli import bucket_files, check_clean_error, loft, ok

from loftfs.cli.objbench import LIST_KEYS, _Bar, run_checks
from loftfs.errors import ObjectStoreError
from loftfs.object import storage_names
from loftfs.object.file import FileObjectStore
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper

SMALL_RUN = ("--count", "20", "--big-count", "3", "--small-size", "3K", "--big-size", "300K")
CHECK_NAMES = {
    "put + get",
    "ranged get",
    "head",
    "missing key: not found",
    "overwrite",
    "put (many keys)",
    "list: prefix, order, pages",
    "list: delimiter",
    "list: start-after",
    "list: limit, empty prefix",
    "delete, delete of a missing key",
    "batch delete",
}


def _report(run_stdout: str) -> dict:
    return json.loads(run_stdout)


def _check_report(report: dict) -> None:
    assert {c["name"] for c in report["checks"]} == CHECK_NAMES
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    steps = {s["name"].split(" (")[0]: s for s in report["bench"]}
    assert set(steps) == {
        "PUT small", "GET small", "HEAD small", "PUT big", "GET big", "LIST 20 keys", "DELETE"
    }  # fmt: skip
    for step in report["bench"]:
        assert step["errors"] == 0, step
        assert step["ops"] > 0 and step["ops_per_s"] > 0
        assert 0 < step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"], step
    assert steps["PUT big"]["size"] == 300 << 10 and steps["PUT big"]["ops"] == 3
    assert steps["GET small"]["bytes_per_s"] > 0
    assert steps["DELETE"]["ops"] == 23
    assert report["left_over"] == 0


def test_objbench_on_a_directory(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "someone-else").write_bytes(b"keep me")
    run = ok(loft("objbench", f"file://{bucket}", *SMALL_RUN, "--threads", "3", "--json"))
    report = _report(run.stdout)
    _check_report(report)
    assert report["prefix"].startswith("loft-objbench-")
    # it cleaned up after itself and touched nothing else
    assert bucket_files(bucket) == {"someone-else"}
    assert not any(p.is_dir() for p in bucket.iterdir())


def test_objbench_tables(tmp_path: Path) -> None:
    bucket = tmp_path / "b"
    bucket.mkdir()
    run = ok(loft("objbench", f"file://{bucket}", *SMALL_RUN))
    for shown in ("Behaviour", "Performance", "ranged get", "PUT big", "p99 ms", "MiB/s"):
        assert shown in run.stdout
    assert "FAILED" not in run.stdout
    run = ok(loft("objbench", f"file://{bucket}", "--checks-only"))
    assert "batch delete" in run.stdout and "Performance" not in run.stdout
    assert bucket_files(bucket) == set()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ftp://host/bucket",), "unsupported storage URL scheme"),
        (("/no/scheme",), "has no scheme"),
        (("file:///tmp", "--threads", "0"), "--threads must be at least 1"),
        (("file:///tmp", "--count", "0"), "--count must be at least 1"),
        (("file:///tmp", "--big-size", "lots"), "invalid size"),
    ],
)
def test_objbench_bad_input(args: tuple[str, ...], message: str) -> None:
    assert message in check_clean_error(loft("objbench", *args))


def test_objbench_unwritable_store(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere; a path through a regular file is unwritable for everyone
        (tmp_path / "file").write_bytes(b"x")
        url = f"file://{tmp_path / 'file' / 'bucket'}"
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        url = f"file://{locked}"
    line = check_clean_error(loft("objbench", url, "--checks-only"))
    assert "cannot write to" in line and "loft-objbench-" in line


# --- misbehaving stores: each breaks one thing loftfs relies on -----------------------------


class NoStartAfter(ObjectStoreWrapper):
    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, "", delimiter, limit)


class OnePage(ObjectStoreWrapper):
    """Lists only the first 1,000 keys (a client that forgets to follow pages)."""

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        for n, info in enumerate(self.inner.list(prefix, start_after, delimiter, limit)):
            if n >= 1000:
                return
            yield info


class IgnoresRanges(ObjectStoreWrapper):
    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        return self.inner.get(key)


class MissingDeleteFails(ObjectStoreWrapper):
    def delete(self, key: str) -> None:
        self.inner.head(key)  # raises ObjectNotFound for a missing key
        self.inner.delete(key)


class BatchDeleteDropsSome(ObjectStoreWrapper):
    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(list(keys)[:1000])


class WrongErrorForMissing(ObjectStoreWrapper):
    def head(self, key: str) -> ObjectInfo:
        try:
            return self.inner.head(key)
        except ObjectStoreError as e:
            raise ObjectStoreError(f"HTTP 403: {e}") from e


@pytest.mark.parametrize(
    ("wrapper", "failing"),
    [
        (NoStartAfter, {"list: start-after"}),
        (OnePage, {"list: prefix, order, pages"}),
        (IgnoresRanges, {"ranged get"}),
        (MissingDeleteFails, {"delete, delete of a missing key"}),
        (BatchDeleteDropsSome, {"batch delete"}),
        (WrongErrorForMissing, {"missing key: not found"}),
    ],
)
def test_checks_catch_misbehaviour(
    tmp_path: Path, wrapper: type[ObjectStoreWrapper], failing: set[str]
) -> None:
    store: ObjectStore = wrapper(FileObjectStore(str(tmp_path / "b")))
    results = run_checks(store, "pfx/", _Bar(False), threads=4)
    assert {c.name for c in results} == CHECK_NAMES
    assert {c.name for c in results if not c.ok} == failing
    assert all(c.detail for c in results if not c.ok)


def test_failed_check_fails_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit status and the one error line, for a store whose listings ignore start-after
    (the backend is the real directory store, wrapped to misbehave)."""
    import loftfs.object

    bucket = tmp_path / "b"
    monkeypatch.setattr(
        loftfs.object,
        "open_storage_url",
        lambda url, **kw: NoStartAfter(FileObjectStore(str(bucket))),
    )
    run = loft("objbench", "file:///ignored", "--checks-only")
    line = check_clean_error(run)
    assert "1 of 12 behaviour checks failed: list: start-after" in line
    assert "FAILED" in run.stdout
    assert bucket_files(bucket) == set()  # cleaned up all the same
    assert LIST_KEYS > 1000  # pagination needs more keys than one S3 page


# --- S3 (SeaweedFS) -------------------------------------------------------------------------


@pytest.mark.skipif("s3" not in storage_names(), reason="the s3 backend is not registered")
def test_objbench_on_seaweedfs(seaweed_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import boto3

    bucket = seaweed_server.new_bucket()
    client = boto3.client(
        "s3",
        endpoint_url=seaweed_server.endpoint,
        aws_access_key_id=seaweed_server.access_key,
        aws_secret_access_key=seaweed_server.secret_key,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    for name, value in seaweed_server.env().items():
        monkeypatch.setenv(name, value)
    run = ok(loft("objbench", seaweed_server.bucket_url(bucket), *SMALL_RUN, "--json"))
    _check_report(_report(run.stdout))
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    # the read-only identity can list but not write: one clear error line
    for name, value in seaweed_server.env(reader=True).items():
        monkeypatch.setenv(name, value)
    line = check_clean_error(loft("objbench", seaweed_server.bucket_url(bucket), "--checks-only"))
    assert "cannot write to" in line


def test_objbench_help() -> None:
    run = ok(loft("objbench", "--help", env={"COLUMNS": "200"}))
    for shown in (
        "STORAGE_URL",
        "--threads",
        "--small-size",
        "--big-size",
        "--count",
        "--endpoint",
    ):
        assert shown in run.stdout
    assert "objbench" in ok(loft("--help")).stdout
