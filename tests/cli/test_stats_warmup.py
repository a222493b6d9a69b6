"""``loft stats`` and ``loft warmup`` against real control servers run in this process, with
handlers that do real work on real files (the mount's own handlers are tested through real
mounts). The commands run in a typer group built like ``loft``'s, so errors end the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from loftcli import Run, check_clean_error
from rich.console import Console
from typer.testing import CliRunner

from loftfs.cli.common import LoftGroup
from loftfs.cli.stats import fuse_table, object_table, render_stats, source_table, stats_cmd
from loftfs.cli.warmup import (
    WarmFile,
    WarmupJob,
    batches,
    plan_warmup,
    read_path_list,
    run_warmup,
    walk_files,
    warmup_cmd,
)
from loftfs.control import ControlServer, int_list
from loftfs.metrics import Metrics

app = typer.Typer(cls=LoftGroup, add_completion=False, pretty_exceptions_enable=False)
app.command("stats")(stats_cmd)
app.command("warmup")(warmup_cmd)


def cli(*args: str) -> Run:
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args} raised {result.exception!r}")
    return Run(result.exit_code, result.stdout, result.stderr)


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=160, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: a socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="loftcli", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- stats -------------------------------------------------------------------------------------


def snapshot(
    t: float, reads: int, read_s: float, gets: int, got: int, hits: int, misses: int
) -> dict[str, Any]:
    """What ``Metrics.snapshot`` returns, ``t`` seconds after the mount started."""
    return {
        "time": t,
        "uptime_s": t,
        "info": {"volume": "vol1"},
        "fuse": {"read": {"count": reads, "errors": 0, "seconds": read_s}},
        "object": {
            "requests": {"get": {"count": gets, "errors": 0, "seconds": gets * 0.01}},
            "bytes": {"get": got, "put": 0},
        },
        "sources": {
            "mem_cache": {"hits": hits, "misses": misses, "used_bytes": 3 << 20},
            "buffer": {"used_bytes": 1 << 20, "total_bytes": 4 << 20},
        },
    }


def test_rates_between_two_samples() -> None:
    prev = snapshot(10.0, 1000, 1.0, 50, 50 << 20, 100, 100)
    cur = snapshot(12.0, 1200, 2.0, 70, 90 << 20, 130, 110)  # 2 s later
    fuse = text_of(fuse_table(prev, cur))
    assert "read" in fuse and "100" in fuse  # 200 reads in 2 s
    assert "5.0 ms" in fuse  # 1.0 s for 200 reads
    obj = text_of(object_table(prev, cur))
    assert "GET" in obj and "10.0" in obj and "20.0" in obj  # 10 req/s, 20 MiB/s
    cache = text_of(source_table("mem_cache", prev, cur))
    assert "75.0%" in cache  # 30 hits, 10 misses in the window
    assert "3.0 MiB" in cache
    buffer = text_of(source_table("buffer", prev, cur))
    assert "1.0 MiB of 4.0 MiB" in buffer
    first = text_of(render_stats(None, prev, "/mnt/v"))  # averages since the mount started
    assert "since the mount started" in first and "vol1" in first
    assert "100" in text_of(fuse_table(None, prev))  # 1000 reads in 10 s


@pytest.fixture
def stats_server(sock_dir: Path) -> Iterator[tuple[Path, Metrics]]:
    metrics = Metrics({"volume": "vol1"})
    hits = [0]
    metrics.register_source("mem_cache", lambda: {"hits": hits[0], "misses": 1})
    with ControlServer(sock_dir / "m.sock", {"stats": lambda args: metrics.snapshot()}) as srv:
        yield srv.path, metrics


def test_stats_json(stats_server: tuple[Path, Metrics]) -> None:
    path, metrics = stats_server
    metrics.observe_op("read", 0.002)
    metrics.observe_request("get", 0.01, nbytes=4096)
    run = cli("stats", str(path), "--json")
    assert run.code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["fuse"]["read"]["count"] == 1
    assert data["object"]["bytes"]["get"] == 4096
    assert data["info"] == {"volume": "vol1"}


def test_stats_refreshes_count_times(stats_server: tuple[Path, Metrics]) -> None:
    path, metrics = stats_server
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            metrics.observe_op("write", 0.0005)
            time.sleep(0.001)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        start = time.monotonic()
        run = cli("stats", str(path), "--count", "3", "--interval", "0.1")
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        worker.join()
    assert run.code == 0, run.stderr
    assert run.stdout.count("FUSE requests") == 3
    assert run.stdout.count("since the mount started") == 1
    assert run.stdout.count("rates over the last") == 2
    assert "write" in run.stdout and "Mem cache" in run.stdout
    assert 0.2 <= elapsed < 5


def test_stats_errors(sock_dir: Path) -> None:
    line = check_clean_error(cli("stats", str(sock_dir)))
    assert "is not in a loftfs mount" in line
    line = check_clean_error(cli("stats", str(sock_dir / "nothing")))
    assert "no such file or directory" in line
    line = check_clean_error(cli("stats", str(sock_dir), "--interval", "0"))
    assert "--interval must be more than 0" in line
    line = check_clean_error(cli("stats", str(sock_dir), "--count", "0"))
    assert "--count must be 1 or more" in line
    srv = ControlServer(sock_dir / "gone.sock", {})
    srv.start()
    os.link(srv.path, sock_dir / "kept.sock")  # the file outlives the server
    srv.stop()
    line = check_clean_error(cli("stats", str(sock_dir / "kept.sock")))
    assert "no live loftfs mount process answers" in line
    with ControlServer(sock_dir / "old.sock", {}) as old:  # a mount without "stats"
        line = check_clean_error(cli("stats", str(old.path), "--json"))
        assert "unknown command 'stats'" in line


# --- warmup: finding files ---------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.bin": os.urandom(1000),
        "d/b.bin": os.urandom(3000),
        "d/e/c.bin": b"",
        "d/e/f/g.bin": os.urandom(10),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "link").symlink_to(root / "d")  # not followed inside a walk
    os.mkfifo(root / "d" / "fifo")  # not a regular file: skipped
    return files


def test_walk_files_lists_regular_files_with_inodes(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    problems: list[str] = []
    found = list(walk_files(str(tmp_path), problems))
    assert problems == []
    assert sorted(os.path.relpath(f.path, tmp_path) for f in found) == sorted(files)
    for f in found:
        st = os.stat(f.path)
        assert (f.inode, f.size) == (st.st_ino, st.st_size)
    single = list(walk_files(str(tmp_path / "a.bin"), problems))
    assert [f.size for f in single] == [1000]
    list(walk_files(str(tmp_path / "missing"), problems))
    list(walk_files(str(tmp_path / "d" / "fifo"), problems))
    assert problems == [
        f"{tmp_path / 'missing'}: No such file or directory",
        f"{tmp_path / 'd' / 'fifo'}: not a regular file or directory",
    ]


def test_batches_split_by_count_and_size() -> None:
    small = [WarmFile(f"f{i}", i, 10) for i in range(150)]
    assert [len(b) for b in batches(small)] == [64, 64, 22]
    big = [WarmFile(f"g{i}", i, 100 << 20) for i in range(5)]
    assert [len(b) for b in batches(big)] == [2, 2, 1]  # at most 256 MiB per batch
    huge = [WarmFile("h", 1, 1 << 40)]
    assert [len(b) for b in batches(huge)] == [1]


def test_plan_and_path_lists(sock_dir: Path) -> None:
    jobs, problems = plan_warmup([str(sock_dir), str(sock_dir / "missing")])
    assert jobs == []
    assert problems == [
        f"{sock_dir} is not in a loftfs mount",
        f"{sock_dir / 'missing'}: no such file or directory",
    ]
    listing = sock_dir / "list.txt"
    listing.write_text("/a b/c\n\n/d\n")
    assert read_path_list(str(listing)) == ["/a b/c", "/d"]


# --- warmup: asking the mounts -----------------------------------------------------------------


class CacheServer:
    """What a mount does for ``warmup``, on real files: the first request for a file reads
    it (fetched), later ones find it cached. Inodes in ``broken`` fail."""

    def __init__(self, files: list[WarmFile], broken: frozenset[int] = frozenset()) -> None:
        self.by_inode = {f.inode: f.path for f in files}
        self.broken = broken
        self.cached: set[int] = set()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.batch_sizes: list[int] = []

    def warmup(self, args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        inodes = int_list(args, "inodes")
        with self.lock:
            self.batch_sizes.append(len(inodes))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            for ino in inodes:
                time.sleep(0.002)
                path = self.by_inode.get(ino)
                if path is None or ino in self.broken:
                    yield {"inode": ino, "fetched_bytes": 0, "cached_bytes": 0, "error": "EIO"}
                    continue
                with self.lock:
                    cached = ino in self.cached
                    self.cached.add(ino)
                size = os.path.getsize(path)
                if cached:
                    yield {"inode": ino, "fetched_bytes": 0, "cached_bytes": size, "error": None}
                else:
                    fetched = len(Path(path).read_bytes())
                    yield {"inode": ino, "fetched_bytes": fetched, "cached_bytes": 0, "error": None}
            yield {"done": True}
        finally:
            with self.lock:
                self.in_flight -= 1


def dataset(root: Path, n: int) -> list[WarmFile]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:03d}").write_bytes(os.urandom(100 + i))
    problems: list[str] = []
    files = list(walk_files(str(root), problems))
    assert not problems and len(files) == n
    return files


def test_run_warmup_over_two_mounts_in_parallel(sock_dir: Path) -> None:
    files_a = dataset(sock_dir / "a", 150)
    files_b = dataset(sock_dir / "b", 20)
    broken = files_a[7].inode
    mount_a, mount_b = CacheServer(files_a, frozenset({broken})), CacheServer(files_b)
    with (
        ControlServer(sock_dir / "a.sock", {"warmup": mount_a.warmup}) as a,
        ControlServer(sock_dir / "b.sock", {"warmup": mount_b.warmup}) as b,
    ):
        jobs = [
            WarmupJob(a.path, "mount a", files_a),
            WarmupJob(b.path, "mount b", files_b),
        ]
        seen: list[WarmFile] = []
        summary = run_warmup(jobs, 4, lambda f, fetched, cached, error: seen.append(f))
        total = sum(f.size for f in files_a + files_b)
        assert summary.files == len(seen) == 170
        assert sorted(f.path for f in seen) == sorted(f.path for f in files_a + files_b)
        assert summary.bytes == total
        assert summary.fetched_bytes == total - files_a[7].size
        assert summary.cached_bytes == 0
        assert summary.errors == [(files_a[7].path, "EIO")]
        assert sorted(mount_a.batch_sizes) == [22, 64, 64]
        assert mount_a.peak + mount_b.peak >= 2  # batches ran at the same time
        again = run_warmup(jobs, 2)
        assert again.fetched_bytes == 0
        assert again.cached_bytes == total - files_a[7].size


def test_run_warmup_reports_mounts_that_fail(sock_dir: Path) -> None:
    files = dataset(sock_dir / "a", 70)
    good = dataset(sock_dir / "b", 5)
    mount = CacheServer(good)

    def crash(args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        ino = int_list(args, "inodes")[0]
        yield {"inode": ino, "fetched_bytes": 1, "cached_bytes": 0, "error": None}
        raise RuntimeError("fetch pool stopped")

    with (
        ControlServer(sock_dir / "c.sock", {"warmup": crash}) as crashing,
        ControlServer(sock_dir / "g.sock", {"warmup": mount.warmup}) as healthy,
    ):
        jobs = [
            WarmupJob(crashing.path, "mount c", files),
            WarmupJob(sock_dir / "none.sock", "mount n", files[:3]),
            WarmupJob(healthy.path, "mount g", good),
        ]
        summary = run_warmup(jobs, 3)
    assert summary.files == 78
    reasons = {why for _, why in summary.errors}
    assert len(summary.errors) == 70 - 2 + 3  # the first file of each crashing batch is done
    assert any("RuntimeError: fetch pool stopped" in why for why in reasons)
    assert any("no live loftfs mount process answers at mount n" in why for why in reasons)
    assert summary.fetched_bytes == 2 + sum(f.size for f in good)


def test_warmup_command_errors(sock_dir: Path) -> None:
    line = check_clean_error(cli("warmup", str(sock_dir)))
    assert line == f"loft: error: {sock_dir} is not in a loftfs mount"
    line = check_clean_error(cli("warmup"))
    assert "no path given" in line
    line = check_clean_error(cli("warmup", "--threads", "0", str(sock_dir)))
    assert "--threads must be 1 or more" in line
    line = check_clean_error(cli("warmup", "--from-file", str(sock_dir / "none.txt")))
    assert "cannot read the path list" in line
    listing = sock_dir / "list.txt"
    listing.write_text(f"{sock_dir}\n{sock_dir / 'missing'}\n")
    run = cli("warmup", "--from-file", str(listing))
    assert run.code == 1 and "Traceback" not in run.stderr
    lines = run.error_lines
    assert lines[:2] == [
        f"loft: warning: {sock_dir} is not in a loftfs mount",
        f"loft: warning: {sock_dir / 'missing'}: no such file or directory",
    ]
    assert lines[2:] == ["loft: error: none of the 2 paths could be warmed up"]
