"""Every workload, loftfs against JuiceFS, in one command; one table per backend.

Both file systems run on the same machine, the same backends and the same disk cache size, in
the same run.

Backends (``--backend``): ``sqlite-file`` (a SQLite file + a local directory as the object store,
each file system its own) and ``redis-s3`` (one ``redis-server`` and one SeaweedFS S3 gateway on
loopback, started here: a Redis database and a bucket each). Workloads (``--only``):

- ``seq``: write one ``--size-mib`` file with 1 MiB writes, ``fsync`` at the end; read it cold
  (mount down, disk cache directory deleted, page cache dropped, mounted again), then warm (the
  disk cache filled by the cold read, page cache dropped);
- ``random``: 4 KiB reads at random aligned offsets of that file, warm, one at a time, with
  ``O_DIRECT`` (or ``posix_fadvise`` when the mount refuses it) so that each one reaches the
  file system; the mount daemon's write count proves it (every read's reply passes through it);
- ``jfsbench``: ``juicefs bench -p 1`` on each mount, its table parsed;
- ``smallfiles``: ``--files`` files of 4 KiB in one directory: create, ``ls -l``, read, delete.

Every step runs on one file system at a time, the order alternating from step to step (and from
backend to backend), so that load elsewhere on the machine hits both alike. Each step starts
after a ``sync``: data the other file system left dirty in the page cache (a store that does
not fsync its objects leaves a whole 1 GiB write there) is written out before, not during,
the next step's measurement, and once the machine is quiet (``wait_quiet``: the object store
and the previous mount delete the last step's objects and blocks for a while after it). After
each session the file system finishes, unmounted, the work it deferred (``settle``: ``loft gc``
deletes the blocks of the files the session deleted; JuiceFS defers none), timed in the notes.
``jfsbench`` and ``smallfiles``, short and the noisiest, run ``--rounds`` times (default 3),
alternating too: the table shows each metric's median and the notes the ratio of each round.
The peak RSS (``VmHWM``) of each mount daemon is read just before each unmount (the table:
the highest of the rounds).

Run as root: ``.venv/bin/python bench/suite.py [--backend all] [--quick] [--markdown]``.
Mounts, servers and ``--workdir`` are removed at the end, on errors and on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from metaops import redact, versions
from seqio import (
    MIB,
    VENV_BIN,
    BenchError,
    FileSystem,
    JuiceFS,
    LoftFS,
    drop_page_cache,
    force_unmount,
    mounted,
    peak_rss_mib,
    read_file,
    run,
    write_file,
)

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))  # tests/servers.py: Redis and SeaweedFS on loopback
from servers import RedisServer, SeaweedServer, ServerError, server_unavailable  # noqa: E402

FS_NAMES = ("loftfs", "juicefs")
SHOWN = {"loftfs": "loftfs", "juicefs": "JuiceFS"}
BACKENDS = ("sqlite-file", "redis-s3")
WORKLOADS = ("seq", "random", "jfsbench", "smallfiles")
BLOCK_SIZE = 4 << 20  # both volumes: 4 MiB blocks (JuiceFS's default)
IO_SIZE = 4096  # random reads
SMALL_FILE = 4096  # smallfiles
BIG_NAME = "big.bin"
HIGHER, LOWER = "higher", "lower"
QUIET_SHARE = 0.15  # of all CPUs busy: below it the machine counts as quiet (wait_quiet)
QUIET_LIMIT_S = 60.0
RSS = "peak RSS of the mount (VmHWM)"
# (full, --quick): file MiB, small files, random reads, juicefs bench small files, rounds
FULL = {"size_mib": 1024, "files": 10_000, "reads": 5_000, "jfs_small": 1000, "rounds": 3}
QUICK = {"size_mib": 64, "files": 500, "reads": 500, "jfs_small": 20, "rounds": 1}
JFS_BENCH_ROWS = {  # juicefs bench's ITEM column -> our metric
    "Write big file": "big file write MiB/s",
    "Read big file": "big file read MiB/s",
    "Write small file": "small file write files/s",
    "Read small file": "small file read files/s",
    "Stat file": "stat files/s",
}


@dataclass(frozen=True)
class Plan:
    """What one run measures, the same on every backend and both file systems."""

    size: int  # bytes of the big file
    files: int
    reads: int
    cache_mib: int
    jfs_small: int
    rounds: int  # of the juicefs bench and small-file sessions (medians shown)
    workloads: frozenset[str]
    loft_cache: bool  # loftfs takes --cache-dir/--cache-size (else: it runs without one)
    base: bytes  # the big file's content: this MiB, each MiB stamped with its index
    seed: int  # of the random read offsets, the same for both file systems

    @property
    def size_mib(self) -> int:
        return self.size // MIB


@dataclass
class Placement:
    """Where one file system keeps its metadata and blocks on a backend."""

    meta_url: str | None = None  # None: a SQLite file under the file system's root
    bucket_url: str | None = None  # None: a local directory under the file system's root
    access_key: str = ""
    secret_key: str = ""

    def describe(self) -> str:
        meta = redact(self.meta_url) if self.meta_url else "SQLite file"
        return f"{meta} + {self.bucket_url or 'local directory'}"


def set_option(cmd: list[str], flag: str, value: str) -> list[str]:
    """``cmd`` with the value of ``flag`` set to ``value`` (appended when ``cmd`` lacks it)."""
    out = list(cmd)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


@dataclass
class _Configured(FileSystem):
    """A file system on a ``Placement``, with a disk block cache of ``cache_mib`` under its root."""

    placement: Placement = field(default_factory=Placement)
    cache_mib: int = 0
    cache_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cache_dir = self.root / "cache"

    @property
    def meta_url(self) -> str:
        return self.placement.meta_url or super().meta_url

    def format_cmd(self) -> list[str]:
        # mixed in before LoftFS/JuiceFS: super() is their concrete format_cmd
        cmd = super().format_cmd()  # type: ignore[safe-super]
        p = self.placement
        if p.bucket_url:
            cmd = set_option(cmd, "--storage", "s3")
            cmd = set_option(cmd, "--bucket", p.bucket_url)
            cmd += ["--access-key", p.access_key, "--secret-key", p.secret_key]
        return cmd

    def clear_disk_cache(self) -> None:
        """Delete the disk cache (only while unmounted: the daemon's index would lie)."""
        if os.path.ismount(self.mnt):
            raise BenchError(f"{self.name}: clearing the disk cache of a mounted file system")
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True)

    def cached_mib(self) -> float:
        """Bytes in the disk cache directory, in MiB."""
        total = 0
        for top, _, files in os.walk(self.cache_dir):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(top, name)).st_size
        return total / MIB

    def mount(self) -> int:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return super().mount()

    def settle(self) -> float:
        """After a session, unmounted: finish the work it left for later; the seconds it took.
        JuiceFS leaves none behind (with its trash off, the objects of deleted files are gone
        before its unmount returns: 3,000 files tried)."""
        return 0.0


@dataclass
class SuiteLoftFS(_Configured, LoftFS):
    with_cache: bool = True

    def mount_cmd(self) -> list[str]:
        cmd = super().mount_cmd()
        if self.with_cache:
            cmd += ["--cache-dir", str(self.cache_dir), "--cache-size", f"{self.cache_mib}M"]
        return cmd

    def settle(self) -> float:
        """A mount deletes the blocks of deleted files lazily, in the background (and not in
        the last seconds before its unmount): ``loft gc`` deletes what the session left, so
        that it does not land in the next session's measurements."""
        start = time.perf_counter()
        run([str(VENV_BIN / "loft"), "gc", self.meta_url], f"{self.name} gc", timeout=600)
        return time.perf_counter() - start


@dataclass
class SuiteJuiceFS(_Configured, JuiceFS):
    def mount_cmd(self) -> list[str]:
        cmd = set_option(super().mount_cmd(), "--cache-size", str(self.cache_mib))
        cmd = set_option(cmd, "--cache-dir", str(self.cache_dir))
        return set_option(cmd, "--backup-meta", "0")  # no hourly metadata dump in the run


def loft_has_disk_cache() -> bool:
    """Whether this build's ``loft mount`` takes ``--cache-dir`` and ``--cache-size``."""
    proc = subprocess.run(
        [str(VENV_BIN / "loft"), "mount", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},  # no truncated option names
    )
    text = proc.stdout + proc.stderr
    return "--cache-dir" in text and "--cache-size" in text


@contextlib.contextmanager
def placements(backend: str, workdir: Path) -> Iterator[dict[str, Placement]]:
    """Start what ``backend`` needs (stopped and deleted after) and yield each file system's
    placement on it."""
    if backend == "sqlite-file":
        yield {name: Placement() for name in FS_NAMES}
        return
    for kind in ("redis", "seaweedfs"):
        why = server_unavailable(kind)
        if why:
            raise BenchError(f"{backend}: {why}")
    with contextlib.ExitStack() as stack:
        redis = RedisServer(workdir / "redis-server")
        stack.callback(redis.close)
        redis.start()
        s3 = SeaweedServer(workdir / "seaweedfs-server")
        stack.callback(s3.close)
        s3.start()
        keys = {"access_key": s3.access_key, "secret_key": s3.secret_key}
        yield {  # a database and a bucket each (loftfs's format and JuiceFS's create them)
            "loftfs": Placement(
                redis.url(1, prefix="loftbench"), s3.bucket_url(s3.new_bucket()), **keys
            ),
            "juicefs": Placement(redis.url(2), s3.bucket_url(s3.new_bucket()), **keys),
        }


@dataclass
class Row:
    """One metric of one workload: a value per round and file system. Shown: the median over
    the rounds (the highest for a peak RSS)."""

    workload: str
    metric: str
    better: str
    samples: dict[str, list[float]] = field(default_factory=dict)

    def value(self, fs: str) -> float | None:
        got = self.samples.get(fs)
        if not got:
            return None
        return max(got) if self.workload == RSS else statistics.median(got)

    def ratio(self) -> float | None:
        loft, jfs = self.value("loftfs"), self.value("juicefs")
        if loft is None or not jfs:
            return None
        return loft / jfs

    def round_ratios(self) -> list[float]:
        """loftfs / JuiceFS of each round both finished (rounds run in pairs)."""
        loft, jfs = self.samples.get("loftfs", []), self.samples.get("juicefs", [])
        return [a / b for a, b in zip(loft, jfs, strict=False) if b]


@dataclass
class Report:
    """The results of one backend."""

    backend: str
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # seconds waited for quiet, per step
    settled: dict[str, list[float]] = field(default_factory=dict)  # fs -> settle() seconds
    failed: dict[str, str] = field(default_factory=dict)  # file system -> why it stopped
    error: str | None = None  # why the backend stopped

    def put(self, workload: str, metric: str, better: str, fs: str, value: float) -> None:
        row = self.rows.setdefault((workload, metric), Row(workload, metric, better))
        row.samples.setdefault(fs, []).append(value)

    def rss(self, fs: str, mount: str, pid: int) -> None:
        self.put(RSS, f"MiB, {mount} mount", LOWER, fs, peak_rss_mib(pid))


def progress(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def busy_share(window: float) -> float:
    """The share of all CPUs' time spent other than idle over the next ``window`` seconds
    (waiting for I/O counts as busy: a disk still writing is not quiet)."""

    def sample() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(ticks), ticks[3]  # user nice system idle iowait irq softirq steal

    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float = QUIET_LIMIT_S) -> float:
    """Wait until the machine is quiet (less than ``QUIET_SHARE`` of its CPU time busy over a
    second), for at most ``limit`` seconds; the seconds waited. An object store deletes the
    objects of the previous step's files, and a mount daemon its blocks, for a while after
    they are gone: a step that started meanwhile would share the machine with that work."""
    start = time.monotonic()
    while time.monotonic() - start < limit and busy_share(1.0) >= QUIET_SHARE:
        pass
    return time.monotonic() - start


def settle_cache(fs: _Configured, timeout: float = 30.0) -> float:
    """Wait until the disk cache stops growing (both file systems fill it in the background
    after a read), for at most ``timeout`` seconds; its size in MiB."""
    deadline = time.monotonic() + timeout
    last, stable_since = fs.cached_mib(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = fs.cached_mib()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            break
    return last


def daemon_written(pid: int) -> int:
    """Bytes the daemon has passed to ``write``-family calls, FUSE replies included."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/io has no wchar line")


def expected_block(base: bytes, offset: int) -> bytes:
    """The ``IO_SIZE`` bytes of the big file at ``offset`` (see ``seqio.chunk``)."""
    index, within = divmod(offset, MIB)
    if within >= 8:
        return base[within : within + IO_SIZE]
    return (index.to_bytes(8, "little") + base[8 : within + IO_SIZE])[within:]


@dataclass
class RandomReads:
    latencies_ns: list[int]
    mode: str
    replied: int  # bytes the daemon wrote meanwhile


def random_reads(path: Path, plan: Plan, pid: int) -> RandomReads:
    """``plan.reads`` single-threaded 4 KiB reads at random aligned offsets, each checked.

    ``O_DIRECT`` bypasses the page cache (and read-ahead); where the mount refuses it, the file
    is opened with ``POSIX_FADV_RANDOM`` (no read-ahead) and each page is dropped after its read.
    Either way the daemon must have written at least one 4 KiB reply per read, or the reads did
    not reach it: that is checked, not assumed.
    """
    rng = random.Random(plan.seed)
    offsets = [rng.randrange(plan.size // IO_SIZE) * IO_SIZE for _ in range(plan.reads)]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        mode = "O_DIRECT"
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        mode = "POSIX_FADV_RANDOM + DONTNEED after each read"
    buf = mmap.mmap(-1, IO_SIZE)  # page-aligned, as O_DIRECT wants
    latencies = []
    clock = time.perf_counter_ns
    try:
        before = daemon_written(pid)
        for offset in offsets:
            t0 = clock()
            got = os.preadv(fd, [buf], offset)
            latencies.append(clock() - t0)
            if mode != "O_DIRECT":
                os.posix_fadvise(fd, offset, IO_SIZE, os.POSIX_FADV_DONTNEED)
            if got != IO_SIZE or buf[:] != expected_block(plan.base, offset):
                raise BenchError(f"{path}: wrong data ({got} bytes) at offset {offset}")
        replied = daemon_written(pid) - before
    finally:
        os.close(fd)
        buf.close()
    if replied < plan.reads * IO_SIZE:
        raise BenchError(
            f"{path}: the daemon wrote {replied} bytes for {plan.reads} reads of {IO_SIZE}:"
            " the page cache served some of them"
        )
    return RandomReads(latencies, mode, replied)


def session_format(fs: _Configured, plan: Plan, report: Report) -> None:
    fs.prepare()


def session_write(fs: _Configured, plan: Plan, report: Report) -> None:
    with mounted(fs) as pid:
        seconds = write_file(fs.mnt / BIG_NAME, plan.size, plan.base)
        report.rss(fs.name, "seq write", pid)
    if "seq" in plan.workloads:
        report.put(
            f"seq write {plan.size_mib} MiB", "MiB/s", HIGHER, fs.name, plan.size_mib / seconds
        )


def session_read(fs: _Configured, plan: Plan, report: Report) -> None:
    fs.clear_disk_cache()
    drop_page_cache()
    with mounted(fs) as pid:
        cold = read_file(fs.mnt / BIG_NAME, plan.size, plan.base)
        cached = settle_cache(fs)
        report.notes.append(
            f"{SHOWN[fs.name]}: {cached:.0f} MiB in the disk cache after the cold read"
        )
        drop_page_cache()
        warm = read_file(fs.mnt / BIG_NAME, plan.size, plan.base)
        got: RandomReads | None = None
        if "random" in plan.workloads:
            drop_page_cache()
            got = random_reads(fs.mnt / BIG_NAME, plan, pid)
        report.rss(fs.name, "read", pid)
    if "seq" in plan.workloads:
        name = f"seq read {plan.size_mib} MiB"
        report.put(f"{name}, cold", "MiB/s", HIGHER, fs.name, plan.size_mib / cold)
        report.put(f"{name}, warm", "MiB/s", HIGHER, fs.name, plan.size_mib / warm)
    if got is not None:
        ms = sorted(ns / 1e6 for ns in got.latencies_ns)
        cuts = statistics.quantiles(ms, n=100, method="inclusive")
        name = f"4 KiB random read, warm ({plan.reads})"
        report.put(name, "p50 ms", LOWER, fs.name, cuts[49])
        report.put(name, "p99 ms", LOWER, fs.name, cuts[98])
        report.put(name, "IOPS", HIGHER, fs.name, len(ms) / (sum(ms) / 1000))
        report.notes.append(
            f"{SHOWN[fs.name]}: random reads with {got.mode}; the daemon wrote"
            f" {got.replied / MIB:.1f} MiB meanwhile (>= {plan.reads} x 4 KiB replies)"
        )


def parse_jfs_bench(text: str) -> dict[str, float]:
    """The value of each row of ``juicefs bench``'s result table, by item name."""
    values = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in JFS_BENCH_ROWS:
            number = re.match(r"[0-9.]+", cells[1])
            if number:
                values[cells[0]] = float(number.group())
    return values


def session_jfs_bench(fs: _Configured, plan: Plan, report: Report) -> None:
    with mounted(fs) as pid:
        cmd = [
            str(VENV_BIN / "juicefs"), "bench", str(fs.mnt),
            "--big-file-size", str(plan.size_mib),
            "--small-file-size", "128K",
            "--small-file-count", str(plan.jfs_small),
            "-p", "1",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if proc.returncode != 0:
            raise BenchError(
                f"juicefs bench failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
        report.rss(fs.name, "juicefs bench", pid)
    values = parse_jfs_bench(proc.stdout)
    missing = sorted(set(JFS_BENCH_ROWS) - set(values))
    if missing:
        raise BenchError(f"juicefs bench printed no {missing}: {proc.stdout[-2000:]}")
    name = f"juicefs bench ({plan.size_mib} MiB, {plan.jfs_small} x 128 KiB)"
    for item, metric in JFS_BENCH_ROWS.items():
        report.put(name, metric, HIGHER, fs.name, values[item])


def session_small_files(fs: _Configured, plan: Plan, report: Report) -> None:
    data = os.urandom(SMALL_FILE)
    rates: dict[str, float] = {}
    with mounted(fs) as pid:
        d = fs.mnt / "small"
        d.mkdir()
        paths = [d / f"f{i:06d}" for i in range(plan.files)]
        start = time.perf_counter()
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        rates["create"] = plan.files / (time.perf_counter() - start)
        drop_page_cache()  # names and attributes too: ls -l asks the file system
        start = time.perf_counter()
        ls = subprocess.run(["ls", "-l", str(d)], capture_output=True, timeout=600, check=False)
        rates["ls -l"] = plan.files / (time.perf_counter() - start)
        lines = ls.stdout.count(b"\n")
        if ls.returncode != 0 or lines != plan.files + 1:  # + the "total" line
            raise BenchError(
                f"ls -l {d}: exit {ls.returncode}, {lines} lines: {ls.stderr[-500:]!r}"
            )
        drop_page_cache()
        start = time.perf_counter()
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                got = os.read(fd, SMALL_FILE + 1)
            finally:
                os.close(fd)
            if got != data:
                raise BenchError(f"{p}: read back {len(got)} wrong bytes")
        rates["read"] = plan.files / (time.perf_counter() - start)
        start = time.perf_counter()
        for p in paths:
            os.unlink(p)
        rates["delete"] = plan.files / (time.perf_counter() - start)
        d.rmdir()
        report.rss(fs.name, "small files", pid)
    for step, rate in rates.items():
        report.put(f"{plan.files} files x 4 KiB", f"{step} files/s", HIGHER, fs.name, rate)


Session = Callable[[_Configured, Plan, Report], None]


def sessions(plan: Plan) -> list[tuple[str, Session]]:
    """Each a mount's lifetime on one file system; the big file's write and read sessions also
    serve ``random`` (which needs the file written and the disk cache filled)."""
    out: list[tuple[str, Session]] = []
    if plan.workloads & {"seq", "random"}:
        out += [("seq write", session_write), ("reads", session_read)]
    for k in range(plan.rounds):
        tag = f" ({k + 1}/{plan.rounds})" if plan.rounds > 1 else ""
        if "jfsbench" in plan.workloads:
            out.append((f"juicefs bench{tag}", session_jfs_bench))
        if "smallfiles" in plan.workloads:
            out.append((f"small files{tag}", session_small_files))
    return out


_stopping = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: unwind once (removing every mount and server on the way out);
    signals during that cleanup are ignored so that it can finish."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise KeyboardInterrupt(f"signal {signum}")


def run_backend(backend: str, index: int, plan: Plan, base: Path) -> Report:
    report = Report(backend)
    fss: list[_Configured] = []
    errors = (BenchError, ServerError, OSError, subprocess.SubprocessError)
    try:
        with placements(backend, base) as where:
            for name in FS_NAMES:
                fs: _Configured
                if name == "loftfs":
                    fs = SuiteLoftFS(name, base / name, BLOCK_SIZE, with_cache=plan.loft_cache)
                else:
                    fs = SuiteJuiceFS(name, base / name, BLOCK_SIZE)
                fs.placement, fs.cache_mib = where[name], plan.cache_mib
                fss.append(fs)
                report.notes.append(f"{SHOWN[name]}: {where[name].describe()}")
            steps = [("format", session_format), *sessions(plan)]
            for k, (title, step) in enumerate(steps):
                for fs in fss if (k + index) % 2 == 0 else fss[::-1]:
                    if fs.name in report.failed:
                        continue
                    os.sync()
                    report.waits.append(wait_quiet())
                    progress(f"{backend}: {title}: {fs.name}")
                    try:
                        step(fs, plan, report)
                    except errors as e:
                        if _stopping:
                            raise KeyboardInterrupt from e
                        report.failed[fs.name] = f"{title}: {type(e).__name__}: {e}"
                        progress(f"{backend}: {fs.name} failed: {report.failed[fs.name]}")
                    finally:
                        force_unmount(fs.mnt)
                    if fs.name not in report.failed:
                        try:
                            report.settled.setdefault(fs.name, []).append(fs.settle())
                        except errors as e:
                            if _stopping:
                                raise KeyboardInterrupt from e
                            report.failed[fs.name] = f"{title}: settle: {e}"
    except errors as e:
        if _stopping:
            raise KeyboardInterrupt from e
        report.error = f"{type(e).__name__}: {e}"
        progress(f"{backend}: error: {report.error}")
    finally:
        for fs in fss:
            force_unmount(fs.mnt)
        shutil.rmtree(base, ignore_errors=True)
    return report


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


HEADER = ("workload", "metric", "loftfs", "JuiceFS", "loftfs/JuiceFS", "better")


def table_cells(report: Report) -> list[tuple[str, ...]]:
    cells: list[tuple[str, ...]] = []
    # in the order of the workloads, the peak RSS of each mount last
    for row in sorted(report.rows.values(), key=lambda r: r.workload == RSS):
        ratio = row.ratio()
        cells.append(
            (
                row.workload,
                row.metric,
                fmt(row.value("loftfs")),
                fmt(row.value("juicefs")),
                "-" if ratio is None else f"{ratio:.2f}",
                row.better,
            )
        )
    return cells


def extra_notes(report: Report) -> list[str]:
    """Per-round ratios of the metrics measured more than once, and the waits for quiet."""
    out = []
    for row in report.rows.values():
        ratios = row.round_ratios()
        if len(ratios) > 1 and row.workload != RSS:
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            out.append(f"{row.workload}, {row.metric}: loftfs/JuiceFS by round {shown}")
    if report.waits:
        hit = sum(w >= QUIET_LIMIT_S for w in report.waits)
        out.append(
            f"before each step the run waited for the machine to go quiet (< {QUIET_SHARE:.0%}"
            f" of its CPU time busy over a second): {sum(report.waits):.0f} s in all, at most"
            f" {max(report.waits):.0f} s; gave up after {QUIET_LIMIT_S:.0f} s {hit} times"
        )
    for name, seconds in report.settled.items():
        if any(s >= 0.05 for s in seconds):
            out.append(
                f"after each session (unmounted, not measured) {SHOWN[name]}'s deferred block"
                f" deletions were finished by `loft gc`: {sum(seconds):.1f} s in all, at most"
                f" {max(seconds):.1f} s"
            )
    return out


def problems(report: Report) -> list[str]:
    out = [f"{SHOWN[name]} stopped at {why}" for name, why in report.failed.items()]
    if report.error:
        out.append(f"error: {report.error}")
    return out


def render_plain(report: Report) -> str:
    rows = [HEADER, *table_cells(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"== {report.backend}"]
    for r in rows:
        left = [f"{c:<{w}}" for c, w in zip(r[:2], widths[:2], strict=True)]
        right = [f"{c:>{w}}" for c, w in zip(r[2:5], widths[2:5], strict=True)]
        lines.append("  ".join([*left, *right, r[5]]).rstrip())
    lines += [f"   {n}" for n in [*report.notes, *extra_notes(report), *problems(report)]]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    lines = [f"### {report.backend}", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("| --- | --- | ---: | ---: | ---: | --- |")
    lines += ["| " + " | ".join(r) + " |" for r in table_cells(report)]
    notes = [*report.notes, *extra_notes(report), *problems(report)]
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def parse_workloads(text: str | None) -> frozenset[str]:
    if not text:
        return frozenset(WORKLOADS)
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(WORKLOADS))
    if unknown or not names:
        raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=[*BACKENDS, "all"], default="all", help="(default: all)"
    )
    parser.add_argument("--size-mib", type=int, help="big file size (default 1024; --quick: 64)")
    parser.add_argument("--files", type=int, help="small files (default 10000; --quick: 500)")
    parser.add_argument("--reads", type=int, help="random 4 KiB reads (default 5000; --quick: 500)")
    parser.add_argument(
        "--cache-size-mib",
        type=int,
        help="disk cache size of both file systems (default: twice --size-mib)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of the juicefs bench and small-file workloads, medians shown (default 3;"
        " --quick: 1)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", help=f"comma-separated workloads: {','.join(WORKLOADS)}")
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    parser.add_argument(
        "--workdir",
        default="/var/tmp/loftbench-suite",
        type=Path,
        help="volumes, caches, servers and mounts go here, deleted at the end",
    )
    args = parser.parse_args(argv)
    try:
        workloads = parse_workloads(args.only)
    except ValueError as e:
        parser.error(f"--only: {e}")
    sizes = QUICK if args.quick else FULL
    size_mib = args.size_mib or sizes["size_mib"]
    cache_mib = args.cache_size_mib or 2 * size_mib
    files = args.files or sizes["files"]
    reads = args.reads or sizes["reads"]
    rounds = args.rounds or sizes["rounds"]
    if min(size_mib, cache_mib, files, reads, rounds) < 1 or reads < 2:
        parser.error("sizes and counts must be positive (at least 2 random reads)")
    if os.geteuid() != 0:
        parser.error("run as root (mounting and dropping the page cache need it)")
    if not drop_page_cache():
        parser.error("cannot write /proc/sys/vm/drop_caches: cold and warm reads need it")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    loft_cache = loft_has_disk_cache()
    plan = Plan(
        size=size_mib * MIB,
        files=files,
        reads=reads,
        cache_mib=cache_mib,
        jfs_small=sizes["jfs_small"],
        rounds=rounds,
        workloads=workloads,
        loft_cache=loft_cache,
        base=os.urandom(MIB),
        seed=int.from_bytes(os.urandom(4), "little"),
    )
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    v = versions()
    load = os.getloadavg()
    head = [
        f"command: {command}",
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"versions: loftfs {v['loftfs']}, JuiceFS {v['juicefs']}, Python {v['python']},"
        f" kernel {v['kernel']}",
        f"machine: {socket.gethostname()}, {os.cpu_count()} CPUs, {platform.machine()},"
        f" load average {load[0]:.2f} at start",
        f"settings: {size_mib} MiB file, {files} small files, {reads} random reads,"
        f" disk cache {cache_mib} MiB each, {BLOCK_SIZE // MIB} MiB blocks, {rounds} rounds of"
        " juicefs bench and small files, workloads"
        f" {','.join(w for w in WORKLOADS if w in workloads)}",
    ]
    if not loft_cache:
        head.append(
            "WARNING: this loft mount has no --cache-dir/--cache-size: loftfs runs without a"
            " disk cache, JuiceFS with one (warm reads are not comparable)"
        )
    elif cache_mib < size_mib:
        head.append(f"WARNING: the disk cache ({cache_mib} MiB) is smaller than the file")
    print("\n".join(head), flush=True)
    if not loft_cache:
        print(head[-1], file=sys.stderr)

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    reports: list[Report] = []
    try:
        for i, backend in enumerate(backends):
            reports.append(run_backend(backend, i, plan, workdir / backend))
    except KeyboardInterrupt:
        print("interrupted; mounts, servers and files removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for report in reports:
        print("\n" + render_plain(report))
    if args.markdown:
        print("\n```\n" + "\n".join(head) + "\n```")
        for report in reports:
            print("\n" + render_markdown(report))
    return 1 if any(r.error or r.failed for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
