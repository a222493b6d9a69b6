"""``loft dump`` and ``loft load``: files, pipes, gzip, summaries, and the clean one-line
failures (formatted target, truncated dump, interrupted load)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from loftcli import LOFT, Volume, check_clean_error, loft, loft_process, ok

from loftfs.errors import NotFormatted
from loftfs.meta import open_meta
from loftfs.meta.dump import LOAD_MARKER
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, FileType, Slice


def _fill(meta_url: str, files: int = 3) -> None:
    """A directory of ``files`` files with data records, a hard link, a symlink, an xattr."""
    meta = open_meta(meta_url)
    try:
        d = meta.mkdir(ROOT_CTX, ROOT_INODE, "données".encode(), 0o755).inode
        for i in range(files):
            f = meta.mknod(ROOT_CTX, d, f"f{i:05d}".encode(), FileType.FILE, 0o644).inode
            meta.write_slice(f, 0, Slice(0, meta.new_slice_id(), 100, 0, 100), -1)
        meta.link(ROOT_CTX, f, ROOT_INODE, b"link")
        meta.symlink(ROOT_CTX, ROOT_INODE, b"sym", b"donn\xc3\xa9es/f00000")
        meta.setxattr(ROOT_CTX, f, b"user.k", b"\xff")
    finally:
        meta.close()


def _dump(meta_url: str) -> bytes:
    proc = subprocess.run([*LOFT, "dump", meta_url], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dump_to_file_and_load_it(volume: Volume, tmp_path: Path) -> None:
    _fill(volume.meta_url)
    path = tmp_path / "backup.json"
    run = ok(loft("dump", volume.meta_url, str(path)))
    assert run.stdout.startswith(f"Dumped volume vol1 to {path}: 6 inodes, 6 entries, 3 chunks")
    assert run.stderr == ""  # no progress bar without a terminal, no warning
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the settings may hold credentials
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    doc = json.loads(path.read_bytes())
    assert doc["volume"]["uuid"] == volume.uuid
    target = f"sqlite3://{tmp_path / 'restored.db'}"
    run = ok(loft("load", target, str(path)))
    assert run.stdout.startswith(f"Loaded volume vol1 ({volume.uuid}) into {target}: 6 inodes")
    assert _dump(target) == path.read_bytes() == _dump(volume.meta_url)
    status = json.loads(ok(loft("status", target, "--json")).stdout)
    assert status["settings"]["name"] == "vol1"
    assert status["settings"]["bucket"] == str(volume.bucket)


def test_pipe_dump_into_load(volume: Volume, tmp_path: Path) -> None:
    """``loft dump URL | loft load URL2``: the summary of the dump goes to stderr then."""
    _fill(volume.meta_url)
    target = f"sqlite3://{tmp_path / 'piped.db'}"
    dump = subprocess.Popen(
        [*LOFT, "dump", volume.meta_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    load = subprocess.run(
        [*LOFT, "load", target, "-"], stdin=dump.stdout, capture_output=True, text=True, timeout=120
    )
    assert dump.stdout is not None and dump.stderr is not None
    dump.stdout.close()
    dump_err = dump.stderr.read().decode()
    assert dump.wait(60) == 0, dump_err
    assert load.returncode == 0, load.stderr
    assert dump_err.startswith("Dumped volume vol1 to stdout: 6 inodes")
    assert load.stdout.startswith("Loaded volume vol1")
    assert _dump(target) == _dump(volume.meta_url)


def test_gzip_dump_is_deterministic(volume: Volume, tmp_path: Path) -> None:
    _fill(volume.meta_url)
    a, b = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    ok(loft("dump", volume.meta_url, str(a)))
    ok(loft("dump", volume.meta_url, str(b)))
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == _dump(volume.meta_url)
    target = f"sqlite3://{tmp_path / 'gz.db'}"
    ok(loft("load", target, str(a)))
    assert _dump(target) == _dump(volume.meta_url)


def test_dump_warns_about_live_sessions(volume: Volume, tmp_path: Path) -> None:
    meta = open_meta(volume.meta_url)
    try:
        meta.new_session({"mountpoint": "/mnt/x"}, heartbeat_s=60)
        run = ok(loft("dump", volume.meta_url, str(tmp_path / "live.json")))
    finally:
        meta.close()
    assert run.stderr.startswith("loft: warning: volume 'vol1' has 1 live session")


def test_load_refuses_a_formatted_target(volume: Volume, tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    ok(loft("dump", volume.meta_url, str(path)))
    _fill(volume.meta_url)
    before = _dump(volume.meta_url)
    line = check_clean_error(loft("load", volume.meta_url, str(path)))
    assert "already holds volume 'vol1'" in line
    assert _dump(volume.meta_url) == before


def test_truncated_dump_is_refused(volume: Volume, tmp_path: Path) -> None:
    _fill(volume.meta_url)
    data = _dump(volume.meta_url)
    cut = tmp_path / "cut.json"
    cut.write_bytes(data[: len(data) * 2 // 3])
    target = f"sqlite3://{tmp_path / 't.db'}"
    line = check_clean_error(loft_process("load", target, str(cut)))
    assert "malformed dump at line " in line and "truncated" in line
    assert line.endswith("; nothing was loaded")
    check_clean_error(loft("status", target))  # no volume there
    full = tmp_path / "full.json"
    full.write_bytes(data)
    ok(loft("load", target, str(full)))
    assert _dump(target) == data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dump", "{unformatted}"), "no volume at"),
        (("dump", "{meta}", "{tmp}/missing/x.json"), "does not exist"),
        (("dump", "{meta}", "{tmp}"), "is a directory"),
        (("load", "{unformatted}", "{tmp}/nothing.json"), "No such file"),
        (("load", "{unformatted}", "{tmp}/garbage.json"), "not a loftfs dump"),
        (("load", "not-a-url", "{tmp}/garbage.json"), "invalid metadata URL"),
    ],
)
def test_clean_errors(volume: Volume, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "garbage.json").write_text("hello\n")
    values = {
        "meta": volume.meta_url,
        "unformatted": f"sqlite3://{tmp_path / 'none.db'}",
        "tmp": str(tmp_path),
    }
    line = check_clean_error(loft(*(a.format(**values) for a in args)))
    assert message in line


def test_killed_load_is_refused_until_discarded(volume: Volume, tmp_path: Path) -> None:
    """A load killed half way leaves marked metadata: a new load says so and, with
    --discard-interrupted, replaces it. The bucket is untouched throughout."""
    _fill(volume.meta_url, files=3000)  # more records than one load transaction takes
    data = _dump(volume.meta_url)
    bucket_before = sorted(p.name for p in volume.bucket.rglob("*"))
    target = f"sqlite3://{tmp_path / 'killed.db'}"
    proc = subprocess.Popen(
        [*LOFT, "load", target, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) * 3 // 4])  # the rest never comes
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while True:  # wait until the first batches are committed
        meta = open_meta(target)
        try:
            settings = meta.load_settings()
            d = meta.lookup(ROOT_CTX, ROOT_INODE, "données".encode()).inode
            meta.lookup(ROOT_CTX, d, b"f00100")
            break
        except Exception:
            assert time.monotonic() < deadline, "the load never committed a batch"
            time.sleep(0.05)
        finally:
            meta.close()
    assert LOAD_MARKER in settings.extra
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdin.close()
    path = tmp_path / "full.json"
    path.write_bytes(data)
    line = check_clean_error(loft("load", target, str(path)))
    assert "interrupted load of volume 'vol1'" in line and "--discard-interrupted" in line
    run = ok(loft("load", "--discard-interrupted", target, str(path)))
    assert run.stdout.startswith("Loaded volume vol1")
    assert _dump(target) == data
    assert sorted(p.name for p in volume.bucket.rglob("*")) == bucket_before
    meta = open_meta(target)
    try:
        assert LOAD_MARKER not in meta.load_settings().extra
    finally:
        meta.close()


def test_unformatted_after_failed_load_can_be_formatted(tmp_path: Path) -> None:
    """A failed load leaves nothing that blocks ``loft format`` at the same URL."""
    target = f"sqlite3://{tmp_path / 'f.db'}"
    bad = tmp_path / "bad.json"
    bad.write_text('{\n"format":"loftfs-dump",\n"version":1,\n')
    check_clean_error(loft("load", target, str(bad)))
    meta = open_meta(target)
    try:
        with pytest.raises(NotFormatted):
            meta.load_settings()
    finally:
        meta.close()
    ok(loft("format", target, "again", "--storage", "file", "--bucket", str(tmp_path / "b")))


def test_dump_leaves_the_secret_key_out_unless_asked(volume: Volume, tmp_path: Path) -> None:
    meta = open_meta(volume.meta_url)
    try:
        settings = meta.load_settings()
        settings.storage_options = {"access_key": "AKID", "secret_key": "s3cr3t-value"}
        meta.update_settings(settings)
    finally:
        meta.close()
    ok(loft("dump", volume.meta_url, str(tmp_path / "a.json")))
    plain = json.loads((tmp_path / "a.json").read_text())
    assert plain["volume"]["storage_options"] == {"access_key": "AKID"}
    assert "s3cr3t-value" not in (tmp_path / "a.json").read_text()
    ok(loft("dump", volume.meta_url, str(tmp_path / "b.json"), "--keep-secret-key"))
    kept = json.loads((tmp_path / "b.json").read_text())
    assert kept["volume"]["storage_options"]["secret_key"] == "s3cr3t-value"
