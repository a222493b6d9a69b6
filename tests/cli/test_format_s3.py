"""``loft format`` onto S3 (a real SeaweedFS) with SQLite metadata: the volume's settings keep
what a mount needs (credentials masked wherever they are shown), and every bad input is one
error line, exit 1, with no metadata and no object written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from loftcli import check_clean_error, loft, loft_process, ok

from loftfs.errors import NotFormatted, ObjectAuthError
from loftfs.meta import open_meta
from loftfs.meta.types import VolumeSettings
from loftfs.object import VOLUME_MARKER, open_volume_storage
from servers import S3_READER, SeaweedServer

# the tests give credentials explicitly; none may leak in from the machine running them
_CLEAN_ENV = {
    "LOFT_ACCESS_KEY": "",
    "LOFT_SECRET_KEY": "",
    "LOFT_SESSION_TOKEN": "",
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SESSION_TOKEN": "",
    "AWS_PROFILE": "",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _CLEAN_ENV.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)


def admin_env(server: SeaweedServer) -> dict[str, str]:
    return {"LOFT_ACCESS_KEY": server.access_key, "LOFT_SECRET_KEY": server.secret_key}


def client(server: SeaweedServer) -> Any:
    return server.client()


def objects(server: SeaweedServer, bucket: str) -> list[str]:
    """Every key in the bucket; [] when the bucket does not exist."""
    c = client(server)
    if bucket not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
        return []
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def stored_settings(meta_url: str) -> VolumeSettings:
    meta = open_meta(meta_url)
    try:
        return meta.load_settings()
    finally:
        meta.close()


def assert_not_formatted(meta_url: str) -> None:
    with pytest.raises(NotFormatted):
        stored_settings(meta_url)


def test_format_onto_s3(seaweed_server: SeaweedServer, meta_url: str) -> None:
    bucket = seaweed_server.new_bucket()
    url = f"{seaweed_server.endpoint}/{bucket}/team-a/"
    run = ok(loft("format", meta_url, "vol-s3", "--bucket", url, env=admin_env(seaweed_server)))
    assert seaweed_server.secret_key not in run.stdout + run.stderr

    settings = stored_settings(meta_url)
    assert settings.storage == "s3"  # inferred from the URL
    assert settings.bucket == f"{seaweed_server.endpoint}/{bucket}/team-a"
    assert settings.storage_options == {
        "access_key": seaweed_server.access_key,
        "secret_key": seaweed_server.secret_key,
    }
    # the marker is the only object, under the prefix: the probe was cleaned up
    assert objects(seaweed_server, bucket) == [f"team-a/{settings.uuid}/{VOLUME_MARKER}"]

    status = ok(loft("status", meta_url, "--json"))
    shown = json.loads(status.stdout)["settings"]
    assert shown["storage_options"] == {"access_key": "****", "secret_key": "****"}
    table = ok(loft("status", meta_url)).stdout
    assert seaweed_server.secret_key not in status.stdout + table
    assert seaweed_server.access_key not in status.stdout + table

    # a mount opens the store with the stored keys, and the environment's replace them
    store = open_volume_storage(settings)
    marker = json.loads(store.get(f"{settings.uuid}/{VOLUME_MARKER}"))
    assert marker["name"] == "vol-s3"
    store.close()


def test_credentials_override_at_mount(
    seaweed_server: SeaweedServer, meta_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = seaweed_server.new_bucket()
    ok(
        loft(
            "format", meta_url, "vol-s3", "--storage", "s3",
            "--bucket", seaweed_server.bucket_url(bucket), env=admin_env(seaweed_server),
        )
    )  # fmt: skip
    settings = stored_settings(meta_url)
    key = f"{settings.uuid}/{VOLUME_MARKER}"
    monkeypatch.setenv("LOFT_ACCESS_KEY", S3_READER[0])
    monkeypatch.setenv("LOFT_SECRET_KEY", "not-the-secret")
    with pytest.raises(ObjectAuthError, match="wrong credentials"):
        open_volume_storage(settings).get(key)
    monkeypatch.setenv("LOFT_SECRET_KEY", S3_READER[1])
    reader = open_volume_storage(settings)
    assert reader.get(key)
    with pytest.raises(ObjectAuthError, match="permission denied"):
        reader.put(f"{settings.uuid}/x", b"x")


def test_format_without_storing_credentials(
    seaweed_server: SeaweedServer, meta_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = seaweed_server.new_bucket()
    ok(
        loft(
            "format", meta_url, "vol-s3", "--bucket", seaweed_server.bucket_url(bucket),
            "--access-key", seaweed_server.access_key, "--no-store-credentials",
            env={"LOFT_SECRET_KEY": seaweed_server.secret_key},
        )
    )  # fmt: skip
    settings = stored_settings(meta_url)
    assert settings.storage_options == {}
    key = f"{settings.uuid}/{VOLUME_MARKER}"
    with pytest.raises(ObjectAuthError, match="no credentials found"):
        open_volume_storage(settings).get(key)
    # the usual AWS chain then provides them
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_server.secret_key)
    assert open_volume_storage(settings).get(key)


def test_format_refuses_a_bucket_holding_a_volume(
    seaweed_server: SeaweedServer, meta_url: str, tmp_path: Path
) -> None:
    bucket = seaweed_server.new_bucket()
    url = seaweed_server.bucket_url(bucket)
    env = admin_env(seaweed_server)
    ok(loft("format", meta_url, "first", "--bucket", url, env=env))
    before = objects(seaweed_server, bucket)
    other_meta = f"sqlite3://{tmp_path / 'other.db'}"
    line = check_clean_error(loft("format", other_meta, "second", "--bucket", url, env=env))
    assert "already holds volume 'first'" in line
    assert_not_formatted(other_meta)
    assert objects(seaweed_server, bucket) == before
    # another prefix of the same bucket is another place
    ok(loft("format", other_meta, "second", "--bucket", url + "/second", env=env))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown host", "cannot resolve the host"),
        ("wrong secret", "wrong credentials"),
        ("unknown key", "wrong credentials"),
        ("reader, missing bucket", "may not create it"),
        ("reader, existing bucket", "permission denied"),
        ("s3 flags with file storage", "apply to --storage s3 only"),
        ("half a key pair", "give both --access-key and --secret-key"),
        ("no credentials at all", "no credentials found"),
        ("bad bucket name", "invalid bucket name"),
        ("credentials in the URL", "credentials do not go into the bucket URL"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    seaweed_server: SeaweedServer, meta_url: str, tmp_path: Path, case: str, message: str
) -> None:
    bucket = seaweed_server.new_bucket()
    url = seaweed_server.bucket_url(bucket)
    admin = [seaweed_server.access_key, seaweed_server.secret_key]
    args: list[str]
    if case == "unknown host":
        args = ["--bucket", f"http://no-such-host.invalid:9000/{bucket}"]
        args += ["--access-key", admin[0], "--secret-key", admin[1]]
    elif case == "wrong secret":
        args = ["--bucket", url, "--access-key", admin[0], "--secret-key", "wrong-secret-value"]
    elif case == "unknown key":
        args = ["--bucket", url, "--access-key", "nobody", "--secret-key", admin[1]]
    elif case == "reader, missing bucket":
        args = ["--bucket", url, "--access-key", S3_READER[0], "--secret-key", S3_READER[1]]
    elif case == "reader, existing bucket":
        client(seaweed_server).create_bucket(Bucket=bucket)
        args = ["--bucket", url, "--access-key", S3_READER[0], "--secret-key", S3_READER[1]]
    elif case == "s3 flags with file storage":
        args = ["--bucket", str(tmp_path / "data"), "--region", "eu-west-1"]
    elif case == "half a key pair":
        args = ["--bucket", url, "--access-key", admin[0]]
    elif case == "no credentials at all":
        args = ["--bucket", url]
    elif case == "bad bucket name":
        args = ["--bucket", f"{seaweed_server.endpoint}/Not_A_Bucket"]
    else:
        args = ["--bucket", f"http://{admin[0]}:{admin[1]}@127.0.0.1:{seaweed_server.port}/b1"]
    run = loft("format", meta_url, "vol-s3", *args)
    line = check_clean_error(run)
    assert message in line, line
    for secret in (admin[1], S3_READER[1], "wrong-secret-value"):
        assert secret not in run.stdout + run.stderr
    assert_not_formatted(meta_url)
    assert objects(seaweed_server, bucket) == []
    assert not (tmp_path / "data").exists()


def test_mount_with_wrong_credentials_fails_at_once(
    seaweed_server: SeaweedServer, meta_url: str, tmp_path: Path
) -> None:
    """The mount probes the store before mounting: wrong keys are one line and exit 1, not a
    mounted volume whose every read fails."""
    bucket = seaweed_server.new_bucket()
    ok(
        loft(
            "format", meta_url, "vol-s3", "--bucket", seaweed_server.bucket_url(bucket),
            "--no-store-credentials", env=admin_env(seaweed_server),
        )
    )  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"LOFT_ACCESS_KEY": seaweed_server.access_key, "LOFT_SECRET_KEY": "wrong-secret"}
    run = loft_process("mount", meta_url, str(mnt), "-d", "--log", str(tmp_path / "log"), env=env)
    line = check_clean_error(run)
    assert "wrong-secret" not in run.stderr
    assert "credentials" in line or "denied" in line, line
    assert not os.path.ismount(mnt)
