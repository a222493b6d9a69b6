"""``loft source`` and ``loft import`` against real sources: local trees and SeaweedFS buckets.

Imports are checked through the metadata engine itself (paths, sizes, mtimes, external
records); reading the imported data through a mount is in tests/mount/test_import_mount.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from loftcli import LOFT, Volume, check_clean_error, loft, ok

from loftfs.importer import key_path
from loftfs.meta import open_meta
from loftfs.meta.interface import Meta
from loftfs.meta.types import KIND_EXTERNAL, ROOT_CTX, ROOT_INODE, FileType
from servers import S3_READER, SeaweedServer


def tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def walk(meta: Meta, inode: int, prefix: str = "") -> dict[str, tuple[str, int]]:
    """path -> (type, size) of everything under ``inode``."""
    out: dict[str, tuple[str, int]] = {}
    for e in meta.readdir(ROOT_CTX, inode):
        path = prefix + e.name.decode()
        out[path] = (e.attr.type.name, e.attr.size)
        if e.attr.type == FileType.DIR:
            out.update(walk(meta, e.attr.inode, path + "/"))
    return out


def resolve(meta: Meta, path: str) -> int:
    inode = ROOT_INODE
    for part in path.strip("/").split("/"):
        inode = meta.lookup(ROOT_CTX, inode, part.encode()).inode
    return inode


def imported(volume: Volume, dest: str) -> dict[str, tuple[str, int]]:
    meta = open_meta(volume.meta_url)
    try:
        return walk(meta, resolve(meta, dest))
    finally:
        meta.close()


def summary(*args: str, code: int = 0) -> dict[str, Any]:
    run = loft("import", *args, "--json")
    assert run.code == code, f"exit {run.code}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    return json.loads(run.stdout)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    tree(
        root,
        {
            "a/1.txt": b"one",
            "a/2.txt": b"two!",
            "a/b/c/deep.bin": os.urandom(70_000),
            "top.txt": b"top",
            "skip/me.tmp": b"tmp",
        },
    )
    return root


def test_source_add_ls_rm_and_bad_input(volume: Volume, src: Path) -> None:
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    listed = json.loads(ok(loft("source", "ls", volume.meta_url, "--json")).stdout)
    assert [(s["name"], s["id"], s["url"], s["credentials"]) for s in listed] == [
        ("local", 1, f"file://{src}", "none")
    ]
    # the same name again, a bad URL, a bad name, a missing directory: one clean line each
    assert "already" in check_clean_error(
        loft("source", "add", volume.meta_url, "local", f"file://{src}")
    )
    assert "invalid source URL" in check_clean_error(
        loft("source", "add", volume.meta_url, "x", "ftp://host/b")
    )
    assert "invalid source name" in check_clean_error(
        loft("source", "add", volume.meta_url, "Bad Name", f"file://{src}")
    )
    check_clean_error(loft("import", volume.meta_url, "nosuch", "/d"))
    # in use: rm refuses without --force
    ok(loft("import", volume.meta_url, "local", "/data"))
    assert "still read from" in check_clean_error(loft("source", "rm", volume.meta_url, "local"))
    ok(loft("source", "rm", volume.meta_url, "local", "--force"))
    assert json.loads(ok(loft("source", "ls", volume.meta_url, "--json")).stdout) == []
    # the source tree is untouched by all of it
    assert (src / "a/1.txt").read_bytes() == b"one"


def test_import_tree_metadata_only(volume: Volume, src: Path) -> None:
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    out = summary(volume.meta_url, "local", "/datasets/x", "--exclude", "*.tmp")
    assert (out["created"], out["skipped"], out["conflicts"]) == (4, 1, 0)
    assert imported(volume, "/datasets/x") == {
        "a": ("DIR", 4096),
        "a/1.txt": ("FILE", 3),
        "a/2.txt": ("FILE", 4),
        "a/b": ("DIR", 4096),
        "a/b/c": ("DIR", 4096),
        "a/b/c/deep.bin": ("FILE", 70_000),
        "top.txt": ("FILE", 3),
    }
    # metadata only: no object of the volume was written but the marker
    data_files = [p for p in volume.bucket.rglob("*") if p.is_file()]
    assert len(data_files) == 1, data_files
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before
    meta = open_meta(volume.meta_url)
    try:
        inode = resolve(meta, "/datasets/x/a/b/c/deep.bin")
        attr = meta.getattr(inode)
        assert attr.mtime_ns == (src / "a/b/c/deep.bin").stat().st_mtime_ns
        assert attr.mode == 0o644
        (s,) = meta.read_chunk(inode, 0)
        assert s.kind == KIND_EXTERNAL and s.len == 70_000
        rec = meta.get_ext([s.id])[s.id]
        assert (rec.key, rec.offset, rec.length) == ("a/b/c/deep.bin", 0, 70_000)
    finally:
        meta.close()
    # a subprefix, with include patterns, mode and owner
    out = summary(
        volume.meta_url, "local/a", "/only-a", "--include", "*.txt", "--mode", "0600",
        "--uid", "1000", "--gid", "1000",
    )  # fmt: skip
    assert out["created"] == 2
    meta = open_meta(volume.meta_url)
    try:
        attr = meta.getattr(resolve(meta, "/only-a/2.txt"))
        assert (attr.mode, attr.uid, attr.gid) == (0o600, 1000, 1000)
    finally:
        meta.close()


def test_rerun_imports_new_and_changed_reports_vanished(volume: Volume, src: Path) -> None:
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    summary(volume.meta_url, "local", "/d")
    again = summary(volume.meta_url, "local", "/d")
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 5)
    (src / "a/2.txt").write_bytes(b"two, longer now")
    os.utime(src / "a/2.txt", ns=(1, 2_000_000_000))
    (src / "new.txt").write_bytes(b"new")
    (src / "top.txt").unlink()
    out = summary(volume.meta_url, "local", "/d")
    assert (out["created"], out["updated"], out["unchanged"]) == (1, 1, 3)
    assert (out["vanished"], out["deleted"], out["vanished_paths"]) == (1, 0, ["/d/top.txt"])
    tree_now = imported(volume, "/d")
    assert tree_now["a/2.txt"] == ("FILE", 15) and "top.txt" in tree_now
    out = summary(volume.meta_url, "local", "/d", "--delete")
    assert (out["vanished"], out["deleted"]) == (1, 1)
    assert "top.txt" not in imported(volume, "/d")


def test_conflicts_are_reported_not_overwritten(volume: Volume, src: Path, tmp_path: Path) -> None:
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    other = tmp_path / "other"
    tree(other, {"a/1.txt": b"other one", "top.txt/inner": b"x"})
    ok(loft("source", "add", volume.meta_url, "other", f"file://{other}"))
    summary(volume.meta_url, "local", "/d")
    # the other source's a/1.txt meets a file of the first: a conflict, left alone (exit 2);
    # its top.txt/inner meets a file where a directory would go
    out = summary(volume.meta_url, "other", "/d", code=2)
    assert out["conflicts"] == 2 and sorted(out["conflict_paths"]) == ["a/1.txt", "top.txt/inner"]
    assert imported(volume, "/d")["a/1.txt"] == ("FILE", 3)
    out = summary(volume.meta_url, "other", "/d", "--overwrite")
    assert out["updated"] == 1 and out["conflicts"] == 1  # a file never replaces... nor a dir
    assert imported(volume, "/d")["a/1.txt"] == ("FILE", 9)


def test_keys_map_to_paths_or_are_skipped() -> None:
    assert key_path("a/b/c.txt") == ((b"a", b"b"), b"c.txt")
    assert key_path("caf\u00e9") == ((), "caf\u00e9".encode())
    for bad in ("a//b", "./a", "a/../b", "a/.", "x/" + "n" * 256, "a\0b"):
        assert key_path(bad) is None, bad
    assert key_path("ok/" + "n" * 255) is not None


def _import_process(volume: Volume, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LOFT, "import", volume.meta_url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_killed_import_resumes_to_the_same_result(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "many"
    files = {f"d{i % 7}/sub{i % 3}/f{i:05d}.txt": f"{i}".encode() for i in range(5000)}
    tree(src, files)
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    proc = _import_process(volume, "local", "/a", "--threads", "2", "--batch", "10")
    # kill it once some batches are committed (files appear) but long before the end
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        meta = open_meta(volume.meta_url)
        try:
            seen = meta.usage()[1]
        finally:
            meta.close()
        if seen > 200:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen > 200, "the import ended before it could be killed"
    partial = imported(volume, "/a")
    assert len([p for p, (t, _) in partial.items() if t == "FILE"]) < 5000
    out = summary(volume.meta_url, "local", "/a")
    assert out["resumed"] is True
    reference = summary(volume.meta_url, "local", "/b")
    assert reference["created"] == 5000
    assert imported(volume, "/a") == imported(volume, "/b")
    assert len([p for p, (t, _) in imported(volume, "/a").items() if t == "FILE"]) == 5000


# --- S3 sources -------------------------------------------------------------------------------


def test_s3_source_with_read_only_sealed_credentials(
    volume: Volume, seaweed_server: SeaweedServer
) -> None:
    bucket = seaweed_server.new_bucket()
    c = seaweed_server.client()
    c.create_bucket(Bucket=bucket)
    for key in ("photos/2024/a.jpg", "photos/2024/b.jpg", "photos/2025/c.jpg",
                "photos/empty-dir/", "other/z"):  # fmt: skip
        c.put_object(Bucket=bucket, Key=key, Body=key.encode())
    url = f"{seaweed_server.endpoint}/{bucket}/photos"
    env = {"LOFT_SOURCE_SECRET_KEY": S3_READER[1]}
    run = ok(
        loft(
            "source", "add", volume.meta_url, "photos", url, "--access-key", S3_READER[0],
            env=env,
        )
    )  # fmt: skip
    listed = ok(loft("source", "ls", volume.meta_url, "--json")).stdout
    assert S3_READER[1] not in run.stdout + run.stderr + listed
    assert json.loads(listed)[0]["credentials"] == "stored (sealed)"
    # sealed in the metadata; the key is an object of the volume's bucket
    meta = open_meta(volume.meta_url)
    try:
        assert S3_READER[1] not in (meta.get_setting("sources") or "")
    finally:
        meta.close()
    out = summary(volume.meta_url, "photos", "/p")
    assert (out["created"], out["skipped"]) == (3, 0)
    assert imported(volume, "/p") == {
        "2024": ("DIR", 4096),
        "2024/a.jpg": ("FILE", 17),
        "2024/b.jpg": ("FILE", 17),
        "2025": ("DIR", 4096),
        "2025/c.jpg": ("FILE", 17),
    }
    # wrong credentials: one clean line at add time
    bad = loft(
        "source", "add", volume.meta_url, "bad", url, "--access-key", S3_READER[0],
        "--secret-key", "wrong",
    )  # fmt: skip
    assert "cannot be listed" in check_clean_error(bad)
    # a missing bucket too
    assert "cannot be listed" in check_clean_error(
        loft("source", "add", volume.meta_url, "gone", f"{seaweed_server.endpoint}/no-such-bkt")
    )


def test_missing_tree_and_quota_are_clean_errors(volume: Volume, src: Path, tmp_path: Path) -> None:
    assert "is not a directory" in check_clean_error(
        loft("source", "add", volume.meta_url, "gone", f"file://{tmp_path}/nope")
    )
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    ok(loft("config", volume.meta_url, "--inodes", "4"))
    line = check_clean_error(loft("import", volume.meta_url, "local", "/d", "--batch", "1"))
    assert "quota is reached" in line and "resume" in line
    ok(loft("config", volume.meta_url, "--inodes", "0"))
    out = summary(volume.meta_url, "local", "/d", "--batch", "1")
    assert out["resumed"] is True
    assert len([p for p, (t, _) in imported(volume, "/d").items() if t == "FILE"]) == 5


def test_credentials_of_an_encrypted_volume_need_its_secret(
    meta_url: str, bucket: Path, tmp_path: Path, seaweed_server: SeaweedServer
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("a long and secret passphrase\n")
    ok(
        loft(
            "format", meta_url, "encvol", "--bucket", str(bucket),
            "--encrypt-passphrase-file", str(pw),
        )
    )  # fmt: skip
    src_bucket = seaweed_server.new_bucket()
    seaweed_server.client().create_bucket(Bucket=src_bucket)
    url = f"{seaweed_server.endpoint}/{src_bucket}"
    add = ("source", "add", meta_url, "enc", url, "--access-key", S3_READER[0])
    env = {"LOFT_SOURCE_SECRET_KEY": S3_READER[1]}
    # sealing needs the volume's key object, which only the volume's secret unlocks
    assert "passphrase" in check_clean_error(loft(*add, env=env))
    ok(loft(*add, "--encrypt-passphrase-file", str(pw), env=env))
    keys = [p for p in bucket.rglob("*") if p.name == ".loftfs-sources-key"]
    assert len(keys) == 1 and len(keys[0].read_bytes()) > 32  # stored encrypted
    assert S3_READER[1].encode() not in keys[0].read_bytes()
    assert "passphrase" in check_clean_error(loft("import", meta_url, "enc", "/d"))
    out = json.loads(
        ok(
            loft("import", meta_url, "enc", "/d", "--json", "--encrypt-passphrase-file", str(pw))
        ).stdout
    )
    assert out["created"] == 0 and out["objects"] == 0


def test_a_flat_tree_is_listed_in_key_ranges(volume: Volume, tmp_path: Path) -> None:
    """A tree with no subdirectories still gives every worker a share: key ranges, covering
    every key exactly once (keys outside the range alphabet included)."""
    from loftfs.importer import list_partition, partitions
    from loftfs.object import create_storage

    src = tmp_path / "flat"
    names = [f"{i:05x}.bin" for i in range(600)] + ["Zed", "~tilde", "\u00e9t\u00e9", "-dash"]
    tree(src, {n: n.encode() for n in names})
    store = create_storage("file", str(src))
    parts = partitions(store, "", 16)
    assert len(parts) == 16 and all(not p.flat for p in parts)
    listed = [i.key for p in parts for i in list_partition(store, p, "")]
    assert sorted(listed) == sorted(names)
    ok(loft("source", "add", volume.meta_url, "flat", f"file://{src}"))
    out = summary(volume.meta_url, "flat", "/f", "--threads", "4")
    assert out["created"] == len(names)


def test_a_completed_import_leaves_no_checkpoints(volume: Volume, src: Path) -> None:
    ok(loft("source", "add", volume.meta_url, "local", f"file://{src}"))
    summary(volume.meta_url, "local", "/d", "--batch", "1")
    summary(volume.meta_url, "local", "/d", "--batch", "1")
    meta = open_meta(volume.meta_url)
    try:
        left = meta._transaction(lambda tx: tx.settings_with_prefix("import:"), False)  # type: ignore[attr-defined]
    finally:
        meta.close()
    assert len(left) == 1  # the job record (complete), no partition checkpoint
    assert json.loads(next(iter(left.values())))["state"] == "complete"
