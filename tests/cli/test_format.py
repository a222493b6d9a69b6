"""``loft format``: a volume is created only from valid input and a working, unclaimed bucket;
every refusal is one error line and leaves metadata and bucket as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loftcli import Volume, bucket_files, check_clean_error, loft, loft_process, ok

from loftfs.object import VOLUME_MARKER


def test_format_creates_volume_and_marker(meta_url: str, bucket: Path) -> None:
    run = ok(
        loft(
            "format", meta_url, "train-data", "--storage", "file", "--bucket", str(bucket),
            "--block-size", "1M", "--compress", "zstd", "--capacity", "10G", "--inodes", "1000",
            "--trash-days", "2",
        )
    )  # fmt: skip
    settings = Volume(meta_url, bucket, "train-data").status()["settings"]
    assert settings["name"] == "train-data"
    assert settings["block_size"] == 1 << 20
    assert settings["compress"] == "zstd"
    assert settings["capacity"] == 10 << 30
    assert settings["inodes"] == 1000
    assert settings["trash_days"] == 2
    assert settings["bucket"] == str(bucket)
    for shown in ("train-data", settings["uuid"], "1.0 MiB", "zstd", "10.0 GiB"):
        assert shown in run.stdout
    # the marker is the only object: the storage probe was cleaned up
    assert bucket_files(bucket) == {f"{settings['uuid']}/{VOLUME_MARKER}"}
    marker = json.loads((bucket / settings["uuid"] / VOLUME_MARKER).read_text())
    assert marker["name"] == "train-data"
    assert marker["uuid"] == settings["uuid"]


def test_format_defaults(volume: Volume) -> None:
    settings = volume.status()["settings"]
    assert settings["block_size"] == 4 << 20
    assert settings["compress"] == "none"
    assert (settings["capacity"], settings["inodes"], settings["trash_days"]) == (0, 0, 0)


def test_format_twice_is_refused_and_changes_nothing(volume: Volume) -> None:
    before = volume.status()["settings"]
    files = bucket_files(volume.bucket)
    line = check_clean_error(
        loft("format", volume.meta_url, "other", "--bucket", str(volume.bucket) + "-2")
    )
    assert "already exists" in line
    assert before["uuid"] in line
    assert volume.status()["settings"] == before
    assert bucket_files(volume.bucket) == files
    assert not Path(str(volume.bucket) + "-2").exists()


def test_format_if_missing_is_idempotent(meta_url: str, bucket: Path) -> None:
    args = ("format", "--if-missing", meta_url, "demo", "--bucket", str(bucket))
    ok(loft(*args))
    uuid = Volume(meta_url, bucket, "demo").uuid
    run = ok(loft(*args))
    assert "nothing changed" in run.stdout
    assert Volume(meta_url, bucket, "demo").uuid == uuid
    # a different volume at that URL is still an error
    line = check_clean_error(
        loft("format", "--if-missing", meta_url, "other", "--bucket", str(bucket))
    )
    assert "different volume" in line


def test_bucket_of_another_volume_is_refused(volume: Volume, tmp_path: Path) -> None:
    other_meta = f"sqlite3://{tmp_path / 'other.db'}"
    files = bucket_files(volume.bucket)
    line = check_clean_error(loft("format", other_meta, "vol2", "--bucket", str(volume.bucket)))
    assert "already holds volume 'vol1'" in line
    assert volume.uuid in line
    assert bucket_files(volume.bucket) == files
    assert "no volume" in check_clean_error(loft("status", other_meta))


def test_relative_bucket_is_stored_absolute(
    meta_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ok(loft("format", meta_url, "rel", "--bucket", "data"))
    assert Volume(meta_url, tmp_path / "data", "rel").status()["settings"]["bucket"] == str(
        tmp_path / "data"
    )


@pytest.mark.parametrize("name", ["ab", "Upper", "-abc", "abc-", "a_b", "a" * 64, "dots.no"])
def test_bad_names(name: str, meta_url: str, bucket: Path, tmp_path: Path) -> None:
    line = check_clean_error(loft("format", "--bucket", str(bucket), "--", meta_url, name))
    assert "invalid volume name" in line
    assert not bucket.exists()
    assert not (tmp_path / "meta.db").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--block-size", "3M", "invalid block size"),
        ("--block-size", "32K", "invalid block size"),
        ("--block-size", "128M", "invalid block size"),
        ("--block-size", "lots", "invalid size"),
        ("--capacity", "ten", "invalid size"),
        ("--inodes", "-1", "--inodes must be 0 or more"),
        ("--trash-days", "-3", "--trash-days must be 0 or more"),
    ],
)
def test_bad_sizes(flag: str, value: str, message: str, meta_url: str, bucket: Path) -> None:
    line = check_clean_error(loft("format", meta_url, "vol", "--bucket", str(bucket), flag, value))
    assert message in line
    assert not bucket.exists()


def test_usage_errors_exit_2(meta_url: str) -> None:
    line = check_clean_error(loft("format", meta_url), code=2)
    assert "NAME" in line
    line = check_clean_error(loft("format", meta_url, "vol"), code=2)
    assert "--bucket" in line
    line = check_clean_error(
        loft("format", meta_url, "vol", "--bucket", "/tmp/x", "--compress", "gzip"), code=2
    )
    assert "--compress" in line


@pytest.mark.parametrize(
    "url",
    [
        "foo",
        "mysql://x",
        "sqlite3://",
        "sqlite3:///",
        "sqlite3://missing-relative-dir/meta.db",
        "sqlite3:///nonexistent-dir/sub/meta.db",
    ],
)
def test_bad_meta_urls(
    url: str, bucket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    check_clean_error(loft("format", url, "vol", "--bucket", str(bucket)))
    assert not bucket.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_garbage_database_file(tmp_path: Path, bucket: Path) -> None:
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a database\n" * 100)
    check_clean_error(loft("format", f"sqlite3://{db}", "vol", "--bucket", str(bucket)))
    check_clean_error(loft("status", f"sqlite3://{db}"))


def test_bucket_below_a_regular_file_is_refused(meta_url: str, tmp_path: Path) -> None:
    """Permissions do not stop root; a path whose parent is a file fails for everyone."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    line = check_clean_error(loft("format", meta_url, "vol", "--bucket", str(blocker / "data")))
    assert "not usable" in line
    assert "no volume" in check_clean_error(loft("status", meta_url))
    assert blocker.read_text() == "a file, not a directory"


def test_bucket_that_is_a_file_is_refused(meta_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    line = check_clean_error(loft("format", meta_url, "vol", "--bucket", str(blocker)))
    assert "not a directory" in line
    assert "no volume" in check_clean_error(loft("status", meta_url))


def test_unknown_storage(meta_url: str, bucket: Path) -> None:
    line = check_clean_error(loft("format", meta_url, "vol", "--storage", "ftp", "--bucket", "x"))
    assert "unsupported storage" in line


def test_real_program_errors_are_one_line(tmp_path: Path) -> None:
    """The installed entry point, in a subprocess without stdin: same one-line errors."""
    run = loft_process("format", "foo", "vol", "--bucket", str(tmp_path / "b"))
    check_clean_error(run)
    run = loft_process("status")
    check_clean_error(run, code=2)
