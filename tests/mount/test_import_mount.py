"""Imported files through a real mount: read in place and cached, version-checked, written
copy-on-write, materialized; the source is never written (it is mounted read-only here).

Runs on every stack of this folder (the volume's metadata engine and store vary); the sources
are a local tree and, for S3, a SeaweedFS bucket read with read-only credentials.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loftmount import Mount, Mounter, Volume, loft

from servers import S3_READER, SeaweedServer

MIB = 1 << 20


def drop_page_cache() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``root``."""
    return {
        str(p.relative_to(root)): (sha(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def source_figures(m: Mount) -> dict[str, Any]:
    out = loft("stats", str(m.path), "--json").stdout
    return dict(json.loads(out)["sources"]["source"])


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only on itself: nothing can write there, root included."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def source_tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "source"
    files = {
        "train/shard-0/img-0.bin": os.urandom(3000),
        "train/shard-0/img-1.bin": os.urandom(5),
        "train/shard-1/img-2.bin": os.urandom(64 * 1024 + 7),
        "weights/model.safetensors": os.urandom(9 * MIB + 123),  # several blocks
        "README": b"dataset\n",
        "empty": b"",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    yield root


def imported_mount(
    mounter: Mounter, volume: Volume, src: Path, tmp_path: Path, dest: str = "/data"
) -> Mount:
    loft("source", "add", volume.meta_url, "ds", f"file://{src}")
    loft("import", volume.meta_url, "ds", dest)
    return mounter.mount(volume, "--cache-dir", str(tmp_path / "cache"))


def test_reads_in_place_then_from_the_cache(
    mounter: Mounter, volume: Volume, source_tree: Path, tmp_path: Path
) -> None:
    with read_only(source_tree):
        m = imported_mount(mounter, volume, source_tree, tmp_path)
        data = m.path / "data"
        want = snapshot(source_tree)
        got = {rel: sha(data / rel) for rel in want}
        assert got == {rel: h for rel, (h, _) in want.items()}
        # mtimes come from the objects
        for rel, (_, mtime) in want.items():
            assert (data / rel).stat().st_mtime_ns == mtime
        first = source_figures(m)
        assert first["requests_total"] >= len(want) - 1  # the empty file needs no read
        assert first["bytes_total"] >= sum((source_tree / r).stat().st_size for r in want)
        drop_page_cache()
        again = {rel: sha(data / rel) for rel in want}
        assert again == got
        assert source_figures(m)["requests_total"] == first["requests_total"]  # all cached
        # `loft info` says where an imported file's bytes come from
        info = json.loads(loft("info", str(data / "README"), "--json").stdout)
        (s,) = info["chunks"][0]["slices"]
        assert (s["kind"], s["blocks"], s["source"]["source"], s["source"]["key"]) == (
            1, [], "ds", "README",
        )  # fmt: skip
        # random access into the big file, from the cache
        with open(data / "weights/model.safetensors", "rb") as f:
            f.seek(5 * MIB + 11)
            chunk = f.read(4096)
        with open(source_tree / "weights/model.safetensors", "rb") as f:
            f.seek(5 * MIB + 11)
            assert f.read(4096) == chunk


def test_a_changed_or_deleted_object_reads_as_eio_until_imported_again(
    mounter: Mounter, volume: Volume, source_tree: Path, tmp_path: Path
) -> None:
    m = imported_mount(mounter, volume, source_tree, tmp_path)
    data = m.path / "data"
    (source_tree / "README").write_bytes(b"a new version\n")
    (source_tree / "train/shard-0/img-1.bin").unlink()
    for rel in ("README", "train/shard-0/img-1.bin"):
        with pytest.raises(OSError) as e:
            (data / rel).read_bytes()
        assert e.value.errno == errno.EIO
    log = m.log_text()
    assert "'README' changed after it was imported" in log
    assert "'train/shard-0/img-1.bin' was deleted after it was imported" in log
    out = json.loads(loft("import", volume.meta_url, "ds", "/data", "--json").stdout)
    assert (out["updated"], out["vanished"], out["vanished_paths"]) == (
        1,
        1,
        ["/data/train/shard-0/img-1.bin"],
    )
    deadline = time.monotonic() + 10  # the mount's attribute cache expires
    while (data / "README").stat().st_size != 14 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (data / "README").read_bytes() == b"a new version\n"


def test_writes_are_copy_on_write_and_never_reach_the_source(
    mounter: Mounter, volume: Volume, source_tree: Path, tmp_path: Path
) -> None:
    before = snapshot(source_tree)
    with read_only(source_tree):
        m = imported_mount(mounter, volume, source_tree, tmp_path)
        data = m.path / "data"
        model = {rel: (source_tree / rel).read_bytes() for rel in before}
        # overwrite in the middle of a multi-block file, append, truncate, extend
        big = "weights/model.safetensors"
        with open(data / big, "r+b") as f:
            f.seek(4 * MIB - 3)
            f.write(b"X" * 10)
        b = bytearray(model[big])
        b[4 * MIB - 3 : 4 * MIB + 7] = b"X" * 10
        model[big] = bytes(b)
        with open(data / "README", "ab") as f:
            f.write(b"appended\n")
        model["README"] += b"appended\n"
        os.truncate(data / "train/shard-1/img-2.bin", 100)
        model["train/shard-1/img-2.bin"] = model["train/shard-1/img-2.bin"][:100]
        os.truncate(data / "train/shard-0/img-0.bin", 5000)
        model["train/shard-0/img-0.bin"] += bytes(2000)
        # metadata-only changes
        os.rename(data / "train/shard-0/img-1.bin", data / "renamed.bin")
        model["renamed.bin"] = model.pop("train/shard-0/img-1.bin")
        os.chmod(data / "renamed.bin", 0o600)
        os.link(data / "renamed.bin", data / "hardlink.bin")
        model["hardlink.bin"] = model["renamed.bin"]
        os.unlink(data / "empty")
        del model["empty"]
        drop_page_cache()
        for rel, content in model.items():
            assert (data / rel).read_bytes() == content, rel
        assert (data / "renamed.bin").stat().st_mode & 0o777 == 0o600
        m = mounter.remount(m)
        drop_page_cache()
        for rel, content in model.items():
            assert (m.path / "data" / rel).read_bytes() == content, rel
    assert snapshot(source_tree) == before


def test_materialize_copies_the_data_into_the_volume(
    mounter: Mounter, volume: Volume, source_tree: Path, tmp_path: Path
) -> None:
    m = imported_mount(mounter, volume, source_tree, tmp_path)
    data = m.path / "data"
    want = {rel: h for rel, (h, _) in snapshot(source_tree).items()}
    with open(data / "README", "ab") as f:  # a local change on top: kept
        f.write(b"+")
    run = loft("materialize", str(data))
    assert "copied from sources" in run.stdout
    # everything now lives in the volume: the source can go away
    moved = source_tree.rename(tmp_path / "gone")
    m = mounter.remount(m)  # and no cache may help
    for cache_file in (tmp_path / "cache").rglob("*"):
        if cache_file.is_file():
            cache_file.unlink()
    drop_page_cache()
    for rel, digest in want.items():
        content = (m.path / "data" / rel).read_bytes()
        if rel == "README":
            assert content == (moved / rel).read_bytes() + b"+"
        else:
            assert hashlib.sha256(content).hexdigest() == digest, rel
    # again: nothing left to copy
    again = loft("materialize", str(m.path / "data")).stdout
    assert re.search(r"copied from sources\s+0 B\b", again), again
    loft("gc", volume.meta_url)
    loft("source", "rm", volume.meta_url, "ds")  # no file reads from it any more


# --- an S3 source ---------------------------------------------------------------------------


def test_s3_source_read_with_read_only_credentials(
    mounter: Mounter, volume: Volume, seaweed_server: SeaweedServer, tmp_path: Path
) -> None:
    bucket = seaweed_server.new_bucket()
    c = seaweed_server.client()
    c.create_bucket(Bucket=bucket)
    objects = {f"ds/part-{i}/x{i}.bin": os.urandom(1000 * i + 1) for i in range(20)}
    objects["ds/big.bin"] = os.urandom(6 * MIB + 5)
    objects["ds/later.bin"] = os.urandom(100)  # not read before it changes
    for key, body in objects.items():
        c.put_object(Bucket=bucket, Key=key, Body=body)
    loft(
        "source", "add", volume.meta_url, "s3src", f"{seaweed_server.endpoint}/{bucket}/ds",
        "--access-key", S3_READER[0], "--secret-key", S3_READER[1],
    )  # fmt: skip
    out = json.loads(loft("import", volume.meta_url, "s3src", "/s3", "--json").stdout)
    assert out["created"] == len(objects)
    m = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache"))
    for key, body in objects.items():
        if key == "ds/later.bin":
            continue
        path = m.path / "s3" / key.removeprefix("ds/")
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(body).digest()
    # a write goes to the volume, never to the read-only source
    with open(m.path / "s3/big.bin", "r+b") as f:
        f.write(b"local")
    got = c.get_object(Bucket=bucket, Key="ds/big.bin")["Body"].read()
    assert got == objects["ds/big.bin"]
    # an object overwritten in the bucket reads as EIO, not as a mix of versions (what was
    # cached before it changed still reads: it is the version imported)
    c.put_object(Bucket=bucket, Key="ds/later.bin", Body=b"new")
    c.put_object(Bucket=bucket, Key="ds/part-3/x3.bin", Body=b"new")
    drop_page_cache()
    with pytest.raises(OSError) as e:
        (m.path / "s3/later.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert "'ds/later.bin' changed after it was imported" in m.log_text()
    assert (m.path / "s3/part-3/x3.bin").read_bytes() == objects["ds/part-3/x3.bin"]


# --- lazy import ----------------------------------------------------------------------------


def lazy_figures(m: Mount) -> dict[str, Any]:
    out = loft("stats", str(m.path), "--json").stdout
    return dict(json.loads(out)["sources"]["lazy"])


def test_lazy_import_lists_only_what_is_touched(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    src = tmp_path / "bucket-tree"
    for top in range(6):
        for sub in range(3):
            d = src / f"t{top}" / f"s{sub}"
            d.mkdir(parents=True)
            for i in range(20):
                (d / f"o{i}").write_bytes(f"{top}/{sub}/{i}".encode())
    (src / "root.txt").write_bytes(b"root")
    loft("source", "add", volume.meta_url, "tree", f"file://{src}")
    loft("import", volume.meta_url, "tree", "/lazy", "--lazy")
    m = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache"))
    lazy = m.path / "lazy"
    start = time.monotonic()
    assert sorted(os.listdir(lazy)) == ["root.txt", *(f"t{i}" for i in range(6))]
    assert time.monotonic() - start < 1.0
    assert lazy_figures(m)["lazy_listings_total"] == 1
    # walking one subtree lists its directories only: t2, t2/s0..s2
    found = sorted(
        str(Path(d, f).relative_to(lazy)) for d, _, files in os.walk(lazy / "t2") for f in files
    )
    assert len(found) == 60 and found[0] == "t2/s0/o0"
    assert lazy_figures(m)["lazy_listings_total"] == 5
    assert (lazy / "t2/s1/o7").read_bytes() == b"2/1/7"
    # a direct path lookup lists each level on the way, once
    assert (lazy / "t4/s2/o3").read_bytes() == b"4/2/3"
    assert lazy_figures(m)["lazy_listings_total"] == 7
    # a listed directory is a normal one: a second mount sees it without listing again,
    # and changes made here are kept
    (lazy / "t2/s1/o7").write_bytes(b"changed here")
    os.mkdir(lazy / "t2/new-dir")
    m2 = mounter.mount(volume, "--cache-dir", str(tmp_path / "cache2"))
    assert sorted(os.listdir(m2.path / "lazy/t2")) == ["new-dir", "s0", "s1", "s2"]
    assert (m2.path / "lazy/t2/s1/o7").read_bytes() == b"changed here"
    assert lazy_figures(m2)["lazy_listings_total"] == 0  # all listed by the first mount
    # st_rdev of a directory is never shown, bound or not
    assert os.stat(m2.path / "lazy/t5").st_rdev == 0
    assert sorted(os.listdir(m2.path / "lazy/t5")) == ["s0", "s1", "s2"]
    assert lazy_figures(m2)["lazy_listings_total"] == 1
