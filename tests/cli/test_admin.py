"""``loft status``, ``config``, ``destroy``, ``gc`` and the data behind ``info``, on real
volumes whose files are written the way a mount writes them (blocks put to the bucket, then the
slice committed to the metadata engine)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from loftcli import Volume, bucket_files, check_clean_error, loft, ok

from loftfs.chunk.layout import block_keys
from loftfs.cli.info import describe_inode
from loftfs.cli.status import session_dict
from loftfs.errors import NotFormatted
from loftfs.meta import Meta, open_meta
from loftfs.meta.types import CHUNK_SIZE, ROOT_CTX, ROOT_INODE, SessionInfo, Slice
from loftfs.object import open_volume_storage


@contextmanager
def opened(volume: Volume) -> Iterator[Meta]:
    meta = open_meta(volume.meta_url)
    try:
        yield meta
    finally:
        meta.close()


def write_file(meta: Meta, name: bytes, parts: list[tuple[int, bytes]]) -> int:
    """Create ``name`` in the root and write each (offset, data) part as one slice, storing
    its blocks first, as the data path does."""
    settings = meta.load_settings()
    store = open_volume_storage(settings)
    attr = meta.create(ROOT_CTX, ROOT_INODE, name, 0o644, os.O_RDWR)
    try:
        for offset, data in parts:
            index, pos = divmod(offset, CHUNK_SIZE)
            slice_id = meta.new_slice_id()
            keys = block_keys(settings.uuid, slice_id, len(data), settings.block_size)
            for i, key in enumerate(keys):
                store.put(key, data[i * settings.block_size : (i + 1) * settings.block_size])
            meta.write_slice(
                attr.inode, index, Slice(pos, slice_id, len(data), 0, len(data)), time.time_ns()
            )
    finally:
        meta.release(attr.inode)
        store.close()
    return attr.inode


# --- status ----------------------------------------------------------------------------------


def test_status_tables(volume: Volume) -> None:
    run = ok(loft("status", volume.meta_url))
    for shown in ("vol1", volume.uuid, "4.0 MiB", "Sessions (0)", "no quota"):
        assert shown in run.stdout
    assert run.stderr == ""


def test_status_json_and_usage(volume: Volume) -> None:
    with opened(volume) as meta:
        write_file(meta, b"f", [(0, b"x" * 5000)])
    data = volume.status()
    assert data["usage"]["inodes"] >= 2  # root + f
    assert data["usage"]["bytes"] >= 5000
    assert data["sessions"] == []
    assert data["meta"] == volume.meta_url


def test_status_lists_live_sessions(volume: Volume) -> None:
    with opened(volume) as meta:
        sid = meta.new_session(
            {"host": "gpu-node-7", "pid": 4242, "mountpoint": "/mnt/loft/vol1"}, heartbeat_s=5
        )
        try:
            run = ok(loft("status", volume.meta_url))
            assert "gpu-node-7" in run.stdout
            assert "live" in run.stdout
            (session,) = volume.status()["sessions"]
            assert session["sid"] == sid
            assert session["pid"] == 4242
            assert session["stale"] is False
        finally:
            meta.close_session()


def test_session_staleness_and_secrets() -> None:
    now = time.time_ns()
    old = SessionInfo(7, now - 3600 * 10**9, {"host": "h", "pid": 1, "access_key": "AKIA"})
    data = session_dict(old, now)
    assert data["stale"] is True
    assert data["heartbeat_age_s"] == pytest.approx(3600)
    assert data["info"]["access_key"] == "****"
    fresh = SessionInfo(8, now - 10**9, {"hostname": "h2"})
    assert session_dict(fresh, now)["stale"] is False
    assert session_dict(fresh, now)["host"] == "h2"


def test_status_of_unformatted_url(meta_url: str) -> None:
    line = check_clean_error(loft("status", meta_url))
    assert "loft format" in line


# --- config ----------------------------------------------------------------------------------


def test_config_changes_quotas(volume: Volume) -> None:
    run = ok(
        loft("config", volume.meta_url, "--capacity", "10G", "--inodes", "500", "--trash-days", "3")
    )
    assert "unlimited" in run.stdout and "10.0 GiB" in run.stdout
    settings = volume.status()["settings"]
    assert (settings["capacity"], settings["inodes"], settings["trash_days"]) == (10 << 30, 500, 3)
    run = ok(loft("config", volume.meta_url, "--capacity", "10G"))
    assert "Nothing changed" in run.stdout
    ok(loft("config", volume.meta_url, "--capacity", "0"))
    assert volume.status()["settings"]["capacity"] == 0


def test_config_without_changes_shows_settings(volume: Volume) -> None:
    run = ok(loft("config", volume.meta_url))
    assert volume.uuid in run.stdout
    data = json.loads(ok(loft("config", volume.meta_url, "--json")).stdout)
    assert data["changed"] == []
    assert data["settings"]["name"] == "vol1"


def test_config_warns_when_quota_below_usage(volume: Volume) -> None:
    with opened(volume) as meta:
        write_file(meta, b"big", [(0, b"y" * 300_000)])
    run = ok(loft("config", volume.meta_url, "--capacity", "64K"))
    assert "warning" in run.stderr
    assert volume.status()["settings"]["capacity"] == 64 << 10


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--block-size", "8M"),
        ("--compress", "lz4"),
        ("--storage", "s3"),
        ("--bucket", "/elsewhere"),
        ("--uuid", "0000"),
        ("--name", "renamed"),
    ],
)
def test_config_refuses_immutable_settings(volume: Volume, flag: str, value: str) -> None:
    before = volume.status()["settings"]
    line = check_clean_error(loft("config", volume.meta_url, flag, value, "--capacity", "1G"))
    assert f"{flag} cannot be changed" in line
    assert volume.status()["settings"] == before


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--capacity", "big", "invalid size"), ("--inodes", "-5", "must be 0 or more")],
)
def test_config_bad_values(volume: Volume, flag: str, value: str, message: str) -> None:
    before = volume.status()["settings"]
    assert message in check_clean_error(loft("config", volume.meta_url, flag, value))
    assert volume.status()["settings"] == before


# --- destroy ---------------------------------------------------------------------------------


def test_destroy_deletes_data_then_metadata(volume: Volume) -> None:
    with opened(volume) as meta:
        write_file(meta, b"a", [(0, os.urandom(9 << 20))])  # three blocks of 4 MiB
    uuid = volume.uuid
    assert len(bucket_files(volume.bucket)) == 4  # 3 blocks + marker
    run = ok(loft("destroy", volume.meta_url, uuid, "--yes"))
    assert "3 objects deleted" in run.stdout
    assert bucket_files(volume.bucket) == set()
    assert "no volume" in check_clean_error(loft("status", volume.meta_url))
    # the same URL and bucket can be formatted again
    ok(loft("format", volume.meta_url, "vol1", "--bucket", str(volume.bucket)))


def test_destroy_needs_the_right_uuid(volume: Volume) -> None:
    files = bucket_files(volume.bucket)
    line = check_clean_error(
        loft("destroy", volume.meta_url, "00000000-0000-0000-0000-000000000000", "--yes")
    )
    assert "does not match" in line
    assert bucket_files(volume.bucket) == files
    ok(loft("status", volume.meta_url))


def test_destroy_asks_first(volume: Volume) -> None:
    uuid = volume.uuid
    files = bucket_files(volume.bucket)
    for answer in ("n\n", "", "maybe\n"):
        run = loft("destroy", volume.meta_url, uuid, input=answer)
        assert run.code == 1
        question, error = run.error_lines
        assert "Destroy volume 'vol1'" in question and question.rstrip().endswith("[y/N]:")
        assert error.startswith("loft: error: aborted")
    assert bucket_files(volume.bucket) == files
    ok(loft("destroy", volume.meta_url, uuid, input="y\n"))
    assert bucket_files(volume.bucket) == set()


def test_destroy_refuses_live_sessions(volume: Volume) -> None:
    uuid = volume.uuid
    with opened(volume) as meta:
        meta.new_session({"host": "n1", "pid": 1, "mountpoint": "/mnt/x"}, heartbeat_s=5)
        try:
            line = check_clean_error(loft("destroy", volume.meta_url, uuid, "--yes"))
            assert "live session" in line and "n1:/mnt/x" in line
            ok(loft("status", volume.meta_url))
            ok(loft("destroy", volume.meta_url, uuid, "--yes", "--force"))
        finally:
            with contextlib.suppress(NotFormatted):  # the volume is gone with the session
                meta.close_session()
    assert "no volume" in check_clean_error(loft("status", volume.meta_url))


# --- gc --------------------------------------------------------------------------------------


def test_gc_deletes_blocks_of_deleted_files(volume: Volume) -> None:
    with opened(volume) as meta:
        write_file(meta, b"keep", [(0, b"k" * 1000)])
        write_file(meta, b"gone", [(0, b"g" * (5 << 20)), (100, b"h" * 10)])
        files_with_both = bucket_files(volume.bucket)
        meta.unlink(ROOT_CTX, ROOT_INODE, b"gone")
    assert len(files_with_both) == 1 + 1 + 3  # marker, keep, gone (2 blocks + 1)
    data = json.loads(ok(loft("gc", volume.meta_url, "--json")).stdout)
    assert data == {"slices": 2, "blocks": 3, "bytes": (5 << 20) + 10}
    remaining = bucket_files(volume.bucket)
    assert len(remaining) == 2
    run = ok(loft("gc", volume.meta_url))
    assert "Deleted 0 blocks" in run.stdout
    assert bucket_files(volume.bucket) == remaining


# --- info ------------------------------------------------------------------------------------


def test_describe_file_slices_and_keys(volume: Volume) -> None:
    with opened(volume) as meta:
        settings = meta.load_settings()
        inode = write_file(
            meta, b"f", [(0, b"a" * (6 << 20)), (1 << 20, b"b" * 100), (CHUNK_SIZE + 5, b"c")]
        )
        info = describe_inode(meta, settings, inode, ROOT_CTX)
    assert info["type"] == "file"
    assert (info["mode"], info["permissions"]) == ("0644", "-rw-r--r--")
    assert info["size"] == CHUNK_SIZE + 6
    assert [c["index"] for c in info["chunks"]] == [0, 1]
    first, second = info["chunks"][0]["slices"]
    assert (first["pos"], first["size"], first["len"]) == (0, 6 << 20, 6 << 20)
    assert (second["pos"], second["len"]) == (1 << 20, 100)
    assert first["blocks"] == block_keys(settings.uuid, first["id"], 6 << 20, 4 << 20)
    assert len(first["blocks"]) == 2
    for chunk in info["chunks"]:
        for s in chunk["slices"]:
            for key in s["blocks"]:
                assert (volume.bucket / key).is_file()


def test_describe_directory_and_symlink(volume: Volume) -> None:
    with opened(volume) as meta:
        settings = meta.load_settings()
        d = meta.mkdir(ROOT_CTX, ROOT_INODE, b"d", 0o755)
        for name in (b"x", b"y", b"z"):
            meta.release(meta.create(ROOT_CTX, d.inode, name, 0o644, os.O_RDWR).inode)
        link = meta.symlink(ROOT_CTX, ROOT_INODE, b"l", b"d/x")
        assert describe_inode(meta, settings, d.inode, ROOT_CTX)["entries"] == 3
        assert describe_inode(meta, settings, link.inode, ROOT_CTX)["target"] == "d/x"


def test_info_outside_a_mount(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    assert "not inside a loftfs mount" in check_clean_error(loft("info", str(tmp_path / "plain")))
    assert "no such file" in check_clean_error(loft("info", str(tmp_path / "missing")))
