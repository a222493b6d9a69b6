"""Metadata operation latency per engine: loftfs against JuiceFS, same engines, same run.

For each metadata engine (SQLite file, Redis, PostgreSQL; the servers are started here on
loopback) both file systems get a fresh volume with a local directory as the object store, are
mounted side by side with every kernel cache of names and attributes switched off (so each call
reaches the file system), and the same system calls are timed one at a time from this process:

- ``lookup``: ``stat`` of a name in a directory of 1,000 files (a different existing name each
  call, relative to an open directory fd, so only the last component is resolved);
- ``getattr``: ``fstat`` of an open file;
- ``create``: ``open(O_CREAT|O_EXCL)`` + ``close`` of a new empty file;
- ``rename``: ``rename`` of a file to a new name in the same directory;
- ``unlink``: ``unlink`` of a file;
- ``readdir``: ``os.listdir`` of the 1,000-file directory (open, read every entry, close);
- ``slice commit``: ``pwrite`` of 4 KiB at the start of a chunk never written before, then
  ``fsync`` of the open file: one 4 KiB block PUT to the local directory plus one slice commit
  (the slice record and the new file length) in the metadata engine.

Repetitions are split into rounds; each round runs every operation on both file systems, the
order alternating between rounds, so a burst of load elsewhere on the machine hits both. A short
untimed warm-up precedes the rounds. Reports p50 and p99 in microseconds and the ratio of the
p50s (loftfs / JuiceFS, lower is better for loftfs; the target is at most 2).

Run as root: ``.venv/bin/python bench/metaops.py [--engines sqlite,redis,postgres] [--reps 2000]``.
Everything it starts (servers, mounts) and writes under ``--workdir`` is removed at the end,
on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from seqio import VENV_BIN, BenchError, FileSystem, JuiceFS, LoftFS, force_unmount, mounted

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))  # tests/servers.py: the Redis and PostgreSQL servers
from servers import PostgresServer, RedisServer, Server, ServerError  # noqa: E402

ENGINES = ("sqlite", "redis", "postgres")
OPS = ("lookup", "getattr", "create", "rename", "unlink", "readdir", "slice commit")
DIR_ENTRIES = 1000
CHUNK = 64 << 20  # both file systems cut files into 64 MiB chunks
SLICE_BYTES = 4096
TARGET_RATIO = 2.0
WARMUP = 20  # untimed calls of each operation (readdir: 2) before the rounds


class _OnEngine(FileSystem):
    """A file system whose metadata lives at ``engine_url`` (default: the SQLite file under
    ``root``), mounted with the kernel's name and attribute caches off."""

    engine_url: str | None = None

    @property
    def meta_url(self) -> str:
        return self.engine_url or super().meta_url


class LoftOnEngine(_OnEngine, LoftFS):
    def mount_cmd(self) -> list[str]:
        return [
            *super().mount_cmd(),
            "--attr-timeout", "0",
            "--entry-timeout", "0",
            "--dir-entry-timeout", "0",
        ]  # fmt: skip


class JuiceFSOnEngine(_OnEngine, JuiceFS):
    def mount_cmd(self) -> list[str]:
        # open-cache 0 makes every open ask the metadata engine; backup-meta 0 keeps the
        # hourly metadata dump (which loftfs does not have) out of the run
        return [
            *super().mount_cmd(),
            "--attr-cache", "0",
            "--entry-cache", "0",
            "--dir-entry-cache", "0",
            "--negative-entry-cache", "0",
            "--open-cache", "0",
            "--backup-meta", "0",
        ]  # fmt: skip


@dataclass
class Target:
    """One mounted file system and the open files and directories the operations use."""

    fs: FileSystem
    samples: dict[str, list[int]] = field(default_factory=lambda: {op: [] for op in OPS})
    lookup_names: list[str] = field(default_factory=list)
    lookup_fd: int = -1
    churn_fd: int = -1
    attr_fd: int = -1
    slice_fd: int = -1
    next_lookup: int = 0
    next_file: int = 0
    next_chunk: int = 0

    @property
    def name(self) -> str:
        return self.fs.name

    def setup(self, stack: contextlib.ExitStack) -> None:
        """Create the working set (untimed); ``stack`` closes the descriptors before unmount."""
        mnt = self.fs.mnt
        (mnt / "lookup").mkdir()
        (mnt / "churn").mkdir()
        self.lookup_fd = self._open_dir(stack, mnt / "lookup")
        self.churn_fd = self._open_dir(stack, mnt / "churn")
        self.lookup_names = [f"e{i:05d}" for i in range(DIR_ENTRIES)]
        for name in self.lookup_names:
            os.close(
                os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.lookup_fd)
            )
        self.attr_fd = os.open(mnt / "attr.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        stack.callback(os.close, self.attr_fd)
        self.slice_fd = os.open(mnt / "slices.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        stack.callback(os.close, self.slice_fd)

    @staticmethod
    def _open_dir(stack: contextlib.ExitStack, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        stack.callback(os.close, fd)
        return fd

    def run(self, reps: int, readdir_reps: int, keep: bool) -> None:
        """``reps`` calls of each operation (``readdir_reps`` of readdir); ``keep``: record."""
        clock = time.perf_counter_ns

        def record(op: str, times: list[int]) -> None:
            if keep:
                self.samples[op].extend(times)

        times = []
        for _ in range(reps):
            name = self.lookup_names[self.next_lookup % DIR_ENTRIES]
            self.next_lookup += 1
            t0 = clock()
            st = os.stat(name, dir_fd=self.lookup_fd)
            times.append(clock() - t0)
            if st.st_size != 0:
                raise BenchError(f"{self.name}: lookup/{name} has size {st.st_size}, not 0")
        record("lookup", times)

        times = []
        for _ in range(reps):
            t0 = clock()
            os.fstat(self.attr_fd)
            times.append(clock() - t0)
        record("getattr", times)

        first = self.next_file
        self.next_file += reps
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        times = []
        for i in range(first, first + reps):
            t0 = clock()
            os.close(os.open(f"c{i}", flags, 0o644, dir_fd=self.churn_fd))
            times.append(clock() - t0)
        record("create", times)

        times = []
        for i in range(first, first + reps):
            t0 = clock()
            os.rename(f"c{i}", f"r{i}", src_dir_fd=self.churn_fd, dst_dir_fd=self.churn_fd)
            times.append(clock() - t0)
        record("rename", times)

        times = []
        for i in range(first, first + reps):
            t0 = clock()
            os.unlink(f"r{i}", dir_fd=self.churn_fd)
            times.append(clock() - t0)
        record("unlink", times)

        path = self.fs.mnt / "lookup"
        times = []
        for _ in range(readdir_reps):
            t0 = clock()
            entries = os.listdir(path)
            times.append(clock() - t0)
            if len(entries) != DIR_ENTRIES:
                raise BenchError(f"{self.name}: readdir gave {len(entries)} of {DIR_ENTRIES}")
        record("readdir", times)

        data = os.urandom(SLICE_BYTES)
        times = []
        for _ in range(reps):
            offset = self.next_chunk * CHUNK
            self.next_chunk += 1
            t0 = clock()
            if os.pwrite(self.slice_fd, data, offset) != SLICE_BYTES:
                raise BenchError(f"{self.name}: short write at {offset}")
            os.fsync(self.slice_fd)
            times.append(clock() - t0)
        record("slice commit", times)

    def check(self) -> None:
        """What the operations left behind is what they should have."""
        left = os.listdir(self.fs.mnt / "churn")
        if left:
            raise BenchError(f"{self.name}: churn/ should be empty, holds {len(left)} entries")
        size = os.fstat(self.slice_fd).st_size
        want = (self.next_chunk - 1) * CHUNK + SLICE_BYTES
        if size != want:
            raise BenchError(f"{self.name}: slices.bin is {size} bytes, expected {want}")


def summarize(samples: list[int]) -> dict[str, float]:
    """p50/p99/mean in microseconds of nanosecond samples."""
    us = sorted(s / 1000 for s in samples)
    if len(us) < 2:
        value = us[0] if us else math.nan
        return {"n": len(us), "p50_us": value, "p99_us": value, "mean_us": value}
    cuts = statistics.quantiles(us, n=100, method="inclusive")
    return {"n": len(us), "p50_us": cuts[49], "p99_us": cuts[98], "mean_us": statistics.fmean(us)}


@dataclass
class EngineResult:
    engine: str
    urls: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    samples_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # fs -> why it was not run
    failed: dict[str, str] = field(default_factory=dict)  # fs -> why its format/mount failed
    error: str | None = None  # why the measurement stopped


def loft_supports(url: str) -> str | None:
    """Why loftfs cannot use the engine of ``url`` in this build, or None."""
    from loftfs.meta import engine_schemes

    scheme = url.split("://", 1)[0].lower()
    if scheme in engine_schemes():
        return None
    return (
        f"loftfs has no {scheme!r} metadata engine in this build yet "
        f"(it has: {', '.join(engine_schemes())}); JuiceFS only"
    )


@contextlib.contextmanager
def engine_urls(engine: str, workdir: Path) -> Iterator[dict[str, str | None]]:
    """Start the engine's server (if any) and yield the metadata URL of each file system:
    None for SQLite (each file system's own ``meta.db``). Stops and deletes the server after."""
    if engine == "sqlite":
        yield {"loftfs": None, "juicefs": None}
        return
    server: Server
    if engine == "redis":
        server = RedisServer(workdir / "redis-server")
    else:
        server = PostgresServer(workdir / "postgres-server")
    try:
        server.start()
        if isinstance(server, RedisServer):
            # one database number each; loftfs also gets its key prefix
            yield {"loftfs": server.url(1, prefix="loftbench"), "juicefs": server.url(2)}
        else:
            assert isinstance(server, PostgresServer)
            urls: dict[str, str | None] = {}
            # a database each; loftfs's format creates its schema, JuiceFS needs it to exist
            urls["loftfs"] = server.url(server.new_database(), schema="loftbench")
            db = server.new_database()
            server.psql("CREATE SCHEMA jfsbench", db)
            urls["juicefs"] = f"{server.url(db)}?sslmode=disable&search_path=jfsbench"
            yield urls
    finally:
        server.close()


def bench_engine(
    engine: str, workdir: Path, reps: int, rounds: int, readdir_reps: int
) -> EngineResult:
    result = EngineResult(engine)
    kinds: dict[str, type[_OnEngine]] = {"loftfs": LoftOnEngine, "juicefs": JuiceFSOnEngine}
    base = workdir / engine
    fss: list[FileSystem] = []
    try:
        with engine_urls(engine, base) as urls, contextlib.ExitStack() as stack:
            for name, kind in kinds.items():
                new = kind(name, base / name, 4 << 20)
                new.engine_url = urls[name]
                result.urls[name] = redact(new.meta_url)
                why = loft_supports(new.meta_url) if name == "loftfs" else None
                if why:
                    result.skipped[name] = why
                    print(f"{engine}: {why}", file=sys.stderr)
                    continue
                fss.append(new)
            targets = []
            for fs in fss:  # one that fails to format or mount leaves the other to run alone
                try:
                    with contextlib.ExitStack() as own:
                        fs.prepare()
                        own.enter_context(mounted(fs))
                        target = Target(fs)
                        target.setup(own)
                        stack.enter_context(own.pop_all())
                    targets.append(target)
                except (BenchError, OSError, subprocess.SubprocessError) as e:
                    if _interrupted:
                        raise KeyboardInterrupt from e
                    result.failed[fs.name] = f"{type(e).__name__}: {e}"
                    print(f"{engine}: {fs.name}: {result.failed[fs.name]}", file=sys.stderr)
            for target in targets:
                target.run(WARMUP, 2, keep=False)
            per_round = math.ceil(reps / rounds)
            readdir_per_round = math.ceil(readdir_reps / rounds)
            for r in range(rounds):
                for target in targets if r % 2 == 0 else targets[::-1]:
                    target.run(per_round, readdir_per_round, keep=True)
                print(f"{engine}: round {r + 1}/{rounds} done", file=sys.stderr)
            for target in targets:
                target.check()
                result.stats[target.name] = {op: summarize(target.samples[op]) for op in OPS}
                result.samples_us[target.name] = {
                    op: [round(s / 1000, 1) for s in target.samples[op]] for op in OPS
                }
    except (BenchError, ServerError, OSError, subprocess.SubprocessError) as e:
        if _interrupted:  # a cleanup step failed while unwinding an interrupt: still stop
            raise KeyboardInterrupt from e
        result.error = f"{type(e).__name__}: {e}"
        print(f"{engine}: error: {result.error}", file=sys.stderr)
    finally:
        for fs in fss:
            force_unmount(fs.mnt)
        shutil.rmtree(base, ignore_errors=True)
    return result


def fmt_us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def print_engine(result: EngineResult) -> None:
    print(f"\n== {result.engine}")
    for name, url in result.urls.items():
        print(f"   {name}: {url}" + (" (not run)" if name in result.skipped else ""))
    for why in result.skipped.values():
        print(f"   {why}")
    for name, why in result.failed.items():
        print(f"   {name} failed: {why}")
    if result.error:
        print(f"   error: {result.error}")
        return
    loft, jfs = result.stats.get("loftfs", {}), result.stats.get("juicefs", {})
    head = f"{'operation (us)':<16}{'n':>6}{'loftfs p50':>12}{'p99':>9}"
    head += f"{'JuiceFS p50':>13}{'p99':>9}{'p50 ratio':>11}  <=2x"
    print(head)
    for op in OPS:
        lo, jo = loft.get(op, {}), jfs.get(op, {})
        n = int(jo.get("n") or lo.get("n") or 0)
        line = f"{op:<16}{n:>6}{fmt_us(lo.get('p50_us')):>12}{fmt_us(lo.get('p99_us')):>9}"
        line += f"{fmt_us(jo.get('p50_us')):>13}{fmt_us(jo.get('p99_us')):>9}"
        if lo and jo and jo["p50_us"] > 0:
            ratio = lo["p50_us"] / jo["p50_us"]
            line += f"{ratio:>11.2f}  {'yes' if ratio <= TARGET_RATIO else 'NO'}"
        print(line)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``****``."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    return f"{scheme}{sep}{auth.split(':', 1)[0]}:****@{host}"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    jfs = subprocess.run(
        [str(VENV_BIN / "juicefs"), "--version"], capture_output=True, text=True, check=False
    )
    return {
        "loftfs": version("loftfs"),
        "juicefs": jfs.stdout.strip().removeprefix("juicefs version "),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


_interrupted = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: unwind (every mount and server is removed on the way out)."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated metadata engines to run (default {','.join(ENGINES)})",
    )
    parser.add_argument(
        "--reps", type=int, default=2000, help="timed calls of each operation (default 2000)"
    )
    parser.add_argument(
        "--readdir-reps",
        type=int,
        help="timed listings of the 1,000-entry directory (default: reps / 10, at least rounds)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds alternating the file systems (default 5)"
    )
    parser.add_argument("--workdir", default="/var/tmp/loftbench-meta", type=Path)
    parser.add_argument("--json", type=Path, help="also write the raw samples and stats here")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        parser.error(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if args.reps < 1 or args.rounds < 1 or args.rounds > args.reps:
        parser.error("--reps and --rounds must be positive, rounds <= reps")
    readdir_reps = args.readdir_reps or max(args.rounds, args.reps // 10)
    if os.geteuid() != 0:
        parser.error("run as root (mounting needs it)")
    # stop cleanly on Ctrl-C (even when started with SIGINT ignored), SIGTERM and SIGHUP
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    results: list[EngineResult] = []
    try:
        for engine in engines:
            results.append(bench_engine(engine, workdir, args.reps, args.rounds, readdir_reps))
    except KeyboardInterrupt:
        print("interrupted; mounts and servers removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    info: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "reps": args.reps,
        "readdir_reps": readdir_reps,
        "rounds": args.rounds,
        "versions": versions(),
    }
    print(
        f"metaops {info['date']}: {args.reps} calls per operation ({readdir_reps} readdirs)"
        f" in {args.rounds} rounds; load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after, {info['cpus']} CPUs; object store: a local directory"
    )
    for result in results:
        print_engine(result)
    if args.json:
        out = {"info": info, "engines": {r.engine: r.__dict__ for r in results}}
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if any(r.error or r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
