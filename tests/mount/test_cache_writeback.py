"""The disk cache and write-back through real mounts: a damaged cache file is never returned, a
full cache disk only costs speed, a write-back mount killed mid-way loses nothing (the next
mount uploads what it staged), and unmount waits for the uploads; the block gc of deleted
files waits while the mount is busy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from loftmount import LOFT, MIB, Mounter, Volume, loft, wait_until


def drop_page_cache() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def volume_uuid(volume: Volume) -> str:
    out = loft("status", volume.meta_url, "--json").stdout
    return str(json.loads(out)["settings"]["uuid"])


def cache_files(cache: Path, uuid: str, area: str) -> list[Path]:
    """The block files of one area (``raw``: cached, ``staging``: waiting for upload)."""
    base = cache / uuid / area
    if not base.exists():
        return []
    return [p for p in base.rglob("*") if p.is_file() and "tmp" not in p.name]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for everyone, root included (uploads into it fail)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_damaged_cache_file_is_dropped_and_refetched(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    args = ("--cache-dir", str(cache))
    m = mounter.mount(volume, *args)
    data = os.urandom(3 * MIB + 12345)
    (m.path / "f").write_bytes(data)
    m = mounter.remount(m)
    drop_page_cache()
    assert (m.path / "f").read_bytes() == data  # fills the cache where writing did not
    m.umount()
    uuid = volume_uuid(volume)
    files = cache_files(cache, uuid, "raw")
    assert len(files) >= 4, files
    for f in files:  # one flipped bit in the data of every cached block
        raw = bytearray(f.read_bytes())
        raw[-7] ^= 0x10
        f.write_bytes(bytes(raw))
    m = mounter.mount(volume, *args)
    drop_page_cache()
    assert (m.path / "f").read_bytes() == data
    log = m.log_text()
    assert "corrupt" in log.lower(), m.log_tail()


def test_full_cache_disk_only_costs_speed(mounter: Mounter, volume: Volume, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "3m") as small:
        m = mounter.mount(volume, "--cache-dir", str(small), "--cache-size", "1G")
        data = os.urandom(24 * MIB)
        (m.path / "big").write_bytes(data)
        for _ in range(2):
            m = mounter.remount(m)
            drop_page_cache()
            assert hashlib.sha256((m.path / "big").read_bytes()).digest() == (
                hashlib.sha256(data).digest()
            )
        st = os.statvfs(small)
        assert st.f_bavail * st.f_frsize >= 0.05 * st.f_blocks * st.f_frsize  # kept free
        m.umount()


def test_writeback_crash_loses_nothing(mounter: Mounter, volume: Volume, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("--cache-dir", str(cache), "--writeback")
    volume.bucket.mkdir(parents=True, exist_ok=True)
    m = mounter.mount(volume, *args)
    uuid = volume_uuid(volume)
    contents = {f"f{i}": os.urandom(i * 300_000 + 1000) for i in range(6)}
    with read_only_bind(volume.bucket):  # the object store refuses every upload
        for name, data in contents.items():
            with open(m.path / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        assert not volume.block_files()
        staged = cache_files(cache, uuid, "staging")
        assert len(staged) >= len(contents), staged
        m.kill(signal.SIGKILL)
        m.detach()
    assert not volume.block_files()
    # The next mount with the same cache finds the staged blocks and uploads them.
    m = mounter.mount(volume, *args)
    assert wait_until(lambda: not cache_files(cache, uuid, "staging"), 30), m.log_tail()
    m.umount()
    assert len(volume.block_files()) >= len(staged)
    # A mount without any cache reads everything from the object store.
    m = mounter.mount(volume, "--cache-size", "0")
    for name, data in contents.items():
        assert (m.path / name).read_bytes() == data, name


def test_writeback_umount_waits_for_uploads(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    m = mounter.mount(volume, "--cache-dir", str(cache), "--writeback")
    data = os.urandom(8 * MIB + 5)
    (m.path / "ckpt").write_bytes(data)
    small = {f"s{i}": os.urandom(100 + i) for i in range(50)}
    for name, content in small.items():
        (m.path / name).write_bytes(content)
    m.umount()
    assert not cache_files(cache, volume_uuid(volume), "staging")
    m = mounter.mount(volume, "--cache-size", "0")
    assert (m.path / "ckpt").read_bytes() == data
    for name, content in small.items():
        assert (m.path / name).read_bytes() == content


def test_writeback_deleted_file_is_never_uploaded(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    volume.bucket.mkdir(parents=True, exist_ok=True)
    m = mounter.mount(volume, "--cache-dir", str(cache), "--writeback", "--gc-interval", "0.2")
    with read_only_bind(volume.bucket):
        (m.path / "tmp").write_bytes(os.urandom(3 * MIB))
        os.unlink(m.path / "tmp")
        uuid = volume_uuid(volume)
        assert wait_until(lambda: not cache_files(cache, uuid, "staging"), 20), m.log_tail()
    m.umount()
    assert not volume.block_files()


def test_block_gc_yields_to_a_busy_mount(mounter: Mounter, volume: Volume) -> None:
    """Deleted files' blocks wait while the mount is busy serving requests, and go as soon as
    it is quiet; ``loft stats`` shows how long the gc waited."""
    m = mounter.mount(volume, "--gc-interval", "0.5")
    for i in range(20):
        (m.path / f"f{i}").write_bytes(os.urandom(5000))
    (m.path / "hot").write_bytes(b"x")
    assert len(volume.block_files()) == 21
    stop = threading.Event()

    def traffic() -> None:  # open and close: three requests each reach the mount
        while not stop.is_set():
            os.close(os.open(m.path / "hot", os.O_RDONLY))

    busy = [threading.Thread(target=traffic) for _ in range(3)]
    for t in busy:
        t.start()
    try:
        for i in range(20):
            os.unlink(m.path / f"f{i}")
        time.sleep(3)  # six gc intervals, within the 5 s a group waits at most
        assert len(volume.block_files()) == 21, m.log_tail()
    finally:
        stop.set()
        for t in busy:
            t.join()
    assert wait_until(lambda: len(volume.block_files()) == 1, 20), m.log_tail()
    gc = json.loads(loft("stats", str(m.path), "--json").stdout)["sources"]["gc"]
    assert gc["yielded_seconds_total"] >= 2 and gc["deleted_slices_total"] == 20, gc


def test_cache_reused_after_remount(mounter: Mounter, volume: Volume, tmp_path: Path) -> None:
    """A remounted volume reads what it cached before without the object store."""
    cache = tmp_path / "cache"
    m = mounter.mount(volume, "--cache-dir", str(cache))
    data = os.urandom(5 * MIB)
    (m.path / "f").write_bytes(data)
    m = mounter.remount(m)  # full blocks are cached on their first read, not on write
    drop_page_cache()
    assert (m.path / "f").read_bytes() == data
    m.umount()
    uuid = volume_uuid(volume)
    assert cache_files(cache, uuid, "raw")
    keys = volume.block_files()
    saved = {k: volume.read_block(k) for k in keys}
    for k in keys:
        volume.delete_block(k)
    try:
        m = mounter.mount(volume, "--cache-dir", str(cache))
        drop_page_cache()
        assert (m.path / "f").read_bytes() == data
        m.umount()
    finally:
        for k, v in saved.items():
            volume.write_block(k, v)


def test_warmup_stats_and_metrics(mounter: Mounter, volume: Volume, tmp_path: Path) -> None:
    """``loft warmup`` fills an empty cache from the object store; the reads after it are cache
    hits, visible in ``loft stats`` and on the Prometheus endpoint."""
    m = mounter.mount(volume, "--cache-size", "0")
    tree = m.path / "data"
    tree.mkdir()
    files = {f"d{i % 3}/f{i}": os.urandom(200_000 * (i % 4) + 10) for i in range(12)}
    for name, content in files.items():
        (tree / name).parent.mkdir(exist_ok=True)
        (tree / name).write_bytes(content)
    m.umount()
    cache = tmp_path / "cache"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = mounter.mount(volume, "--cache-dir", str(cache), "--metrics", f"127.0.0.1:{port}")
    tree = m.path / "data"
    out = loft("warmup", str(tree), "--threads", "2")
    assert "12" in out.stdout, out.stdout  # files warmed
    total = sum(len(c) for c in files.values())
    uuid = volume_uuid(volume)
    cached = sum(
        p.stat().st_size for p in cache_files(cache, uuid, "raw")
    )  # headers add a little to each file
    assert cached >= total, (cached, total)
    again = loft("warmup", str(m.path / "data"))
    assert "already cached" in again.stdout.lower() or "cached" in again.stdout.lower()

    before = json.loads(loft("stats", str(m.path), "--json").stdout)
    drop_page_cache()
    for name, content in files.items():
        assert (tree / name).read_bytes() == content
    after = json.loads(loft("stats", str(m.path), "--json").stdout)
    disk_before = before["sources"]["disk_cache"]
    disk_after = after["sources"]["disk_cache"]
    assert disk_after["hits"] > disk_before["hits"]
    gets_before = before["object"]["requests"].get("get", {}).get("count", 0)
    gets_after = after["object"]["requests"].get("get", {}).get("count", 0)
    assert gets_after == gets_before  # served from the cache, no object-store GET
    assert after["fuse"]["read"]["count"] > 0

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "loftfs_fuse_ops_total" in text
    assert "loftfs_disk_cache_hits_total" in text
    assert "loftfs_object_requests_total" in text


def test_status_and_umount_report_writeback(
    mounter: Mounter, volume: Volume, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    volume.bucket.mkdir(parents=True, exist_ok=True)
    m = mounter.mount(volume, "--cache-dir", str(cache), "--writeback")
    with read_only_bind(volume.bucket):
        (m.path / "f").write_bytes(os.urandom(2 * MIB))
        status = json.loads(loft("status", volume.meta_url, "--json").stdout)
        pending = [s["pending_uploads"] for s in status["sessions"]]
        assert 2 in pending, status["sessions"]
        stats = json.loads(loft("stats", str(m.path), "--json").stdout)
        assert stats["sources"]["writeback"]["pending_blocks"] == 2
        # Unmount while the store refuses uploads: the process gives up after its drain
        # timeout would be too slow for a test, so the store comes back while umount waits.
        umount = subprocess.Popen(
            [*LOFT, "umount", str(m.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(2)
    out, _ = umount.communicate(timeout=60)
    assert umount.returncode == 0, out
    assert "Waiting for 2 blocks" in out, out
    m.expected_dead = True
    assert len(volume.block_files()) == 2
