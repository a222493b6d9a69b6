"""Encrypted volumes from the command line: ``format`` with a passphrase or key file, ``status``
and ``info`` that show the algorithm and never key material, ``mount`` that refuses a missing or
wrong secret with one line before mounting anything, ``config`` that changes the secret, and
``gc``/``destroy`` that work without it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loftcli import Volume, bucket_files, check_clean_error, loft, loft_process, mount_processes, ok

from loftfs.errors import ConfigError
from loftfs.meta import open_meta
from loftfs.meta.types import VolumeSettings
from loftfs.object import VOLUME_MARKER, open_volume_storage
from loftfs.object.encrypt import ENV_PASSPHRASE, OVERHEAD, VolumeSecret

PASSPHRASE = "a long and secret passphrase"


@pytest.fixture
def pw_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def enc_volume(meta_url: str, bucket: Path, pw_file: Path) -> Volume:
    ok(
        loft(
            "format", meta_url, "secret-vol", "--bucket", str(bucket), "--block-size", "1M",
            "--encrypt-passphrase-file", str(pw_file),
        )
    )  # fmt: skip
    return Volume(meta_url, bucket, "secret-vol")


def _settings(meta_url: str) -> VolumeSettings:
    meta = open_meta(meta_url)
    try:
        return meta.load_settings()
    finally:
        meta.close()


def _secret_free(text: str, settings: VolumeSettings) -> None:
    record = settings.encryption
    assert record["wrapped_key"] not in text
    assert record["kdf"].get("salt", "no salt") not in text
    assert PASSPHRASE not in text


def test_format_with_a_passphrase_file(meta_url: str, bucket: Path, pw_file: Path) -> None:
    run = ok(
        loft(
            "format", meta_url, "secret-vol", "--bucket", str(bucket),
            "--encrypt-passphrase-file", str(pw_file),
        )
    )  # fmt: skip
    assert "aes-256-gcm (passphrase, scrypt)" in run.stdout
    settings = _settings(meta_url)
    record = settings.encryption
    assert record["algorithm"] == "aes-256-gcm" and record["secret"] == "passphrase"
    assert record["kdf"]["name"] == "scrypt" and record["kdf"]["n"] >= 1 << 17
    _secret_free(run.stdout + run.stderr, settings)
    # status and config show the algorithm, never the record's salt or wrapped key
    status = ok(loft("status", meta_url))
    assert "aes-256-gcm (passphrase, scrypt)" in status.stdout
    as_json = ok(loft("status", meta_url, "--json"))
    assert json.loads(as_json.stdout)["settings"]["encryption"] == {
        "algorithm": "aes-256-gcm", "format": 1, "secret": "passphrase", "kdf": "scrypt",
    }  # fmt: skip
    shown = ok(loft("config", meta_url))
    assert "aes-256-gcm" in shown.stdout
    for text in (status.stdout, as_json.stdout, shown.stdout):
        _secret_free(text, settings)
    # the bucket marker is not encrypted (it holds no data) and says nothing about the key
    marker = (bucket / settings.uuid / VOLUME_MARKER).read_text()
    _secret_free(marker, settings)


def test_format_with_the_environment_and_a_key_file(tmp_path: Path) -> None:
    meta1 = f"sqlite3://{tmp_path / 'env.db'}"
    ok(loft("format", meta1, "env-vol", "--bucket", str(tmp_path / "b1"), env={ENV_PASSPHRASE: PASSPHRASE}))  # fmt: skip
    assert _settings(meta1).encryption["secret"] == "passphrase"
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex() + "\n")
    meta2 = f"sqlite3://{tmp_path / 'key.db'}"
    run = ok(
        loft("format", meta2, "key-vol", "--bucket", str(tmp_path / "b2"), "--encrypt-key-file", str(key))
    )  # fmt: skip
    assert "aes-256-gcm (key file)" in run.stdout
    assert _settings(meta2).encryption["kdf"] == {"name": "none"}
    # no secret: a plain volume, and status says so
    meta3 = f"sqlite3://{tmp_path / 'plain.db'}"
    ok(loft("format", meta3, "plain-vol", "--bucket", str(tmp_path / "b3")))
    assert _settings(meta3).encryption == {}
    assert json.loads(ok(loft("status", meta3, "--json")).stdout)["settings"]["encryption"] == {}


@pytest.mark.parametrize(
    ("content", "extra", "env", "message"),
    [
        ("short\n", (), {}, "too short"),
        ("\n", (), {}, "is empty"),
        (PASSPHRASE, ("--encrypt-key-file", "PW"), {}, "not both"),
        (None, (), {ENV_PASSPHRASE: ""}, "LOFT_ENCRYPT_PASSPHRASE is set but empty"),
    ],
)
def test_format_refusals_change_nothing(
    meta_url: str,
    bucket: Path,
    tmp_path: Path,
    content: str | None,
    extra: tuple[str, ...],
    env: dict[str, str],
    message: str,
) -> None:
    pw = tmp_path / "pw"
    args = ["format", meta_url, "vol", "--bucket", str(bucket)]
    if content is not None:
        pw.write_text(content)
        args += ["--encrypt-passphrase-file", str(pw)]
    args += [str(pw) if a == "PW" else a for a in extra]
    line = check_clean_error(loft(*args, env=env))
    assert message in line
    assert not bucket.exists()
    assert "no volume" in check_clean_error(loft("status", meta_url))


def test_format_if_missing_checks_the_secret(
    enc_volume: Volume, pw_file: Path, tmp_path: Path
) -> None:
    base = ("format", "--if-missing", enc_volume.meta_url, "secret-vol", "--bucket")
    args = (*base, str(enc_volume.bucket), "--block-size", "1M")
    assert "nothing changed" in ok(loft(*args, "--encrypt-passphrase-file", str(pw_file))).stdout
    line = check_clean_error(loft(*args))
    assert "encrypted, but no passphrase or key was given" in line
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase at all")
    line = check_clean_error(loft(*args, "--encrypt-passphrase-file", str(wrong)))
    assert "wrong passphrase for volume 'secret-vol'" in line


def test_change_the_secret(enc_volume: Volume, pw_file: Path, tmp_path: Path) -> None:
    """``config --new-key-file`` rewraps the data key: what was written before still reads
    with the new secret, the old one no longer unlocks the volume."""
    old = VolumeSecret("passphrase", PASSPHRASE.encode(), "test")
    settings = _settings(enc_volume.meta_url)
    store = open_volume_storage(settings, old)
    store.put(f"{settings.uuid}/chunks/0/0/1_0_5", b"hello")

    key = os.urandom(32)
    key_file = tmp_path / "new.key"
    key_file.write_bytes(key)
    meta = enc_volume.meta_url
    line = check_clean_error(loft("config", meta, "--new-key-file", str(key_file)))
    assert "needs the current one" in line
    wrong = tmp_path / "wrong"
    wrong.write_text("certainly not it, no")
    line = check_clean_error(
        loft("config", meta, "--new-key-file", str(key_file), "--encrypt-passphrase-file", str(wrong))
    )  # fmt: skip
    assert "wrong passphrase" in line
    assert _settings(meta).encryption == settings.encryption  # unchanged by the refusals

    run = ok(
        loft("config", meta, "--new-key-file", str(key_file), "--encrypt-passphrase-file", str(pw_file))
    )  # fmt: skip
    assert "encryption" in run.stdout and "key file" in run.stdout
    after = _settings(meta)
    assert after.encryption["secret"] == "key"
    new_store = open_volume_storage(after, VolumeSecret("key", key, "test"))
    assert new_store.get(f"{settings.uuid}/chunks/0/0/1_0_5") == b"hello"
    with pytest.raises(ConfigError, match="encrypted with a key file"):
        open_volume_storage(after, old)
    # and back to a passphrase (the current secret is now the key file)
    ok(
        loft("config", meta, "--new-passphrase-file", str(pw_file), "--encrypt-key-file", str(key_file))
    )  # fmt: skip
    assert (
        open_volume_storage(_settings(meta), old).get(f"{settings.uuid}/chunks/0/0/1_0_5")
        == b"hello"
    )


def test_change_the_secret_of_a_plain_volume_is_refused(volume: Volume, pw_file: Path) -> None:
    line = check_clean_error(loft("config", volume.meta_url, "--new-passphrase-file", str(pw_file)))
    assert "is not encrypted" in line


def test_gc_and_destroy_need_no_secret(enc_volume: Volume, pw_file: Path) -> None:
    settings = _settings(enc_volume.meta_url)
    store = open_volume_storage(settings, VolumeSecret("passphrase", PASSPHRASE.encode(), "t"))
    store.put(f"{settings.uuid}/chunks/0/0/9_0_3", b"abc")
    assert (enc_volume.bucket / settings.uuid / "chunks/0/0/9_0_3").stat().st_size == 3 + OVERHEAD
    ok(loft("gc", enc_volume.meta_url))
    run = ok(loft("destroy", enc_volume.meta_url, settings.uuid, "--yes"))
    assert "1 object deleted" in run.stdout
    assert bucket_files(enc_volume.bucket) == set()


# --- mounts -----------------------------------------------------------------------------------


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "FUSE is not available"
    return None


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    pids = mount_processes(path)
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)
    for pid in pids:
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.mount
@pytest.mark.skipif(_fuse_unavailable() is not None, reason=_fuse_unavailable() or "")
def test_mount_needs_the_right_secret(
    enc_volume: Volume, mountpoint: Path, pw_file: Path, tmp_path: Path
) -> None:
    meta, mnt, log = enc_volume.meta_url, str(mountpoint), str(tmp_path / "mount.log")
    wrong = tmp_path / "wrong"
    wrong.write_text("a wrong passphrase\n")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    for args, env, message in [
        (("--encrypt-passphrase-file", str(wrong)), {}, "wrong passphrase for volume 'secret-vol'"),
        ((), {ENV_PASSPHRASE: "also wrong, sadly"}, "wrong passphrase for volume 'secret-vol'"),
        ((), {}, "is encrypted with a passphrase: give it with --encrypt-passphrase-file"),
        (("--encrypt-key-file", str(key)), {}, "a key was given"),
    ]:
        for background in ((), ("-d", "--log", log)):
            run = loft_process("mount", *background, meta, mnt, *args, env=env)
            assert message in check_clean_error(run), (args, background)
            assert not os.path.ismount(mountpoint)
            assert not mount_processes(mountpoint)

    # the right passphrase, from the environment: the volume mounts and stores ciphertext
    run = loft_process("mount", "-d", "--log", log, meta, mnt, env={ENV_PASSPHRASE: PASSPHRASE})
    assert run.code == 0, run.stderr + Path(log).read_text()
    pids = mount_processes(mountpoint)
    assert pids
    for pid in pids:  # the secret came through a pipe: not in argv, not in the environment
        for what in ("cmdline", "environ"):
            assert PASSPHRASE.encode() not in Path(f"/proc/{pid}/{what}").read_bytes()
    data = b"model weights, very secret " * 100_000
    (mountpoint / "w.bin").write_bytes(data)
    info = json.loads(ok(loft_process("info", str(mountpoint / "w.bin"), "--json")).stdout)
    assert info["encryption"] == "aes-256-gcm (passphrase, scrypt)"
    ok(loft_process("umount", mnt))
    blocks = [p for p in enc_volume.bucket.rglob("*") if p.is_file() and "/chunks/" in str(p)]
    assert blocks
    assert sum(p.stat().st_size for p in blocks) == len(data) + len(blocks) * OVERHEAD
    assert not any(b"model weights" in p.read_bytes() for p in blocks)

    # again from the passphrase file, in the foreground process's background child
    ok(loft_process("mount", "-d", "--log", log, meta, mnt, "--encrypt-passphrase-file", str(pw_file)))  # fmt: skip
    assert (mountpoint / "w.bin").read_bytes() == data
    ok(loft_process("umount", mnt))


def test_help_shows_the_encryption_options() -> None:
    for command, options in [
        ("format", ("--encrypt-passphrase-file", "--encrypt-key-file", "LOFT_ENCRYPT_PASSPHRASE")),
        ("mount", ("--encrypt-passphrase-file", "--encrypt-key-file")),
        ("config", ("--new-passphrase-file", "--new-key-file", "--encrypt-passphrase-file")),
    ]:
        run = ok(loft(command, "--help", env={"COLUMNS": "200"}))
        text = " ".join(run.stdout.split())
        for option in options:
            assert option in text, (command, option)
        assert "--secret-fd" not in text  # internal: how a background mount gets its secret
