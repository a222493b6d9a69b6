"""Sequential write / cold sequential read of one large file: loftfs against JuiceFS, same run.

Both file systems get the same backends (a SQLite metadata file and a local directory as the
object store), the same block size, no compression and their default memory buffers. JuiceFS
runs with ``--cache-size 0`` so that neither side reads from a local disk block cache.

For each file system: format, mount, write ``--size`` bytes with 1 MiB ``write`` calls, ``fsync``
and ``close`` (all timed), unmount, drop the page cache, mount again (cold: no page cache, no
in-process buffers), read the file back with 1 MiB reads (timed, every MiB checked), unmount and
delete everything. Peak RSS (``VmHWM``) of each mount process is read just before it unmounts.

Run as root: ``.venv/bin/python bench/seqio.py [--size 1G] [--workdir /var/tmp/loftbench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))  # tests/servers.py: finding a mount's daemon
from servers import fuse_daemon_pids  # noqa: E402

MIB = 1 << 20
VENV_BIN = Path(sys.executable).parent
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1G`` -> 1073741824 (binary units, optional ``i``/``B`` suffix)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1] if s and s[-1] in UNITS else ""
    return int(float(s[: len(s) - len(unit)]) * UNITS[unit])


class BenchError(Exception):
    """A file system could not be formatted, mounted or unmounted; the message says which."""


@dataclass
class Result:
    """The measurements of one run of one file system."""

    fs: str
    write_mbps: float
    read_mbps: float
    write_rss_mib: float
    read_rss_mib: float
    cold: str


@dataclass
class FileSystem(ABC):
    """How to format, mount and unmount one file system under ``root``."""

    name: str
    root: Path
    block_size: int
    meta_db: Path = field(init=False)
    bucket: Path = field(init=False)
    mnt: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.meta_db = self.root / "meta.db"
        self.bucket = self.root / "bucket"
        self.mnt = self.root / "mnt"
        self.log = self.root / "mount.log"

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.meta_db}"

    @abstractmethod
    def format_cmd(self) -> list[str]: ...

    @abstractmethod
    def mount_cmd(self) -> list[str]: ...

    @abstractmethod
    def umount_cmd(self) -> list[str]: ...

    def daemon_pid(self) -> int:
        """The pid of the process serving the FUSE connection of ``mnt``."""
        pids = fuse_daemon_pids(self.mnt)
        if not pids:
            raise BenchError(f"{self.name}: no process serves {self.mnt}")
        return max(pids)

    def prepare(self) -> None:
        if self.root.exists():
            force_unmount(self.mnt)
            shutil.rmtree(self.root)
        self.bucket.mkdir(parents=True)
        self.mnt.mkdir()
        run(self.format_cmd(), f"{self.name} format")

    def mount(self) -> int:
        run(self.mount_cmd(), f"{self.name} mount", timeout=120)
        if not os.path.ismount(self.mnt):
            raise BenchError(f"{self.name}: mount returned but {self.mnt} is not mounted")
        set_read_ahead(self.mnt)
        return self.daemon_pid()

    def umount(self, pid: int) -> None:
        try:
            run(self.umount_cmd(), f"{self.name} umount", timeout=300)
        finally:
            force_unmount(self.mnt)
            wait_gone(pid, 30)


class LoftFS(FileSystem):
    def format_cmd(self) -> list[str]:
        return [
            str(VENV_BIN / "loft"),
            "format",
            self.meta_url,
            "loftbench",
            "--storage",
            "file",
            "--bucket",
            str(self.bucket),
            "--block-size",
            f"{self.block_size // MIB}M",
            "--trash-days",
            "0",
        ]

    def mount_cmd(self) -> list[str]:
        return [
            str(VENV_BIN / "loft"),
            "mount",
            self.meta_url,
            str(self.mnt),
            "-d",
            "--log",
            str(self.log),
            "--cache-size",
            "0",  # like JuiceFS below: no disk cache (bench/suite.py measures with one)
        ]

    def umount_cmd(self) -> list[str]:
        return [str(VENV_BIN / "loft"), "umount", str(self.mnt)]


class JuiceFS(FileSystem):
    def format_cmd(self) -> list[str]:
        return [
            str(VENV_BIN / "juicefs"),
            "format",
            self.meta_url,
            "jfsbench",
            "--storage",
            "file",
            "--bucket",
            f"{self.bucket}/",
            "--block-size",
            str(self.block_size // 1024),
            "--compress",
            "none",
            "--trash-days",
            "0",
        ]

    def mount_cmd(self) -> list[str]:
        return [
            str(VENV_BIN / "juicefs"),
            "mount",
            self.meta_url,
            str(self.mnt),
            "-d",
            "--log",
            str(self.log),
            "--cache-size",
            "0",
            "--no-usage-report",
        ]

    def umount_cmd(self) -> list[str]:
        return [str(VENV_BIN / "juicefs"), "umount", str(self.mnt)]

    def daemon_pid(self) -> int:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.mnt / ".config").read_text())["Pid"])
        return super().daemon_pid()


def run(cmd: list[str], what: str, timeout: float = 60) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def force_unmount(mnt: Path) -> None:
    """Detach ``mnt`` if it is still mounted, and end whatever still serves it."""
    pids = fuse_daemon_pids(mnt)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def set_read_ahead(mnt: Path, kb: int = 1024) -> None:
    """Raise the FUSE device's read-ahead: the kernel default (128 KiB) caps sequential reads."""
    dev = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    with contextlib.suppress(OSError):
        if int(bdi.read_text()) < kb:
            bdi.write_text(str(kb))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def chunk(base: bytes, index: int) -> bytes:
    """The ``index``-th MiB of the test file: a random MiB stamped with its index."""
    return index.to_bytes(8, "little") + base[8:]


def write_file(path: Path, size: int, base: bytes) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // MIB):
            view = memoryview(chunk(base, i))
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def read_file(path: Path, size: int, base: bytes) -> float:
    buf = bytearray(MIB)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(size // MIB):
            got = 0
            while got < MIB:
                n = os.readv(fd, [memoryview(buf)[got:]])
                if n == 0:
                    raise BenchError(f"{path}: short read at MiB {i}")
                got += n
            if buf != chunk(base, i):
                raise BenchError(f"{path}: wrong data in MiB {i}")
        if os.read(fd, 1):
            raise BenchError(f"{path}: longer than written")
    finally:
        os.close(fd)
    return time.perf_counter() - start


@contextlib.contextmanager
def mounted(fs: FileSystem) -> Iterator[int]:
    pid = fs.mount()
    try:
        yield pid
    finally:
        fs.umount(pid)


def bench_one(fs: FileSystem, size: int, base: bytes) -> Result:
    fs.prepare()
    try:
        target = fs.mnt / "seqio.bin"
        with mounted(fs) as pid:
            write_s = write_file(target, size, base)
            write_rss = peak_rss_mib(pid)
        dropped = drop_page_cache()
        with mounted(fs) as pid:
            read_s = read_file(target, size, base)
            read_rss = peak_rss_mib(pid)
        cold = "remount + drop_caches" if dropped else "remount only (drop_caches refused)"
        return Result(fs.name, size / MIB / write_s, size / MIB / read_s, write_rss, read_rss, cold)
    finally:
        force_unmount(fs.mnt)
        shutil.rmtree(fs.root, ignore_errors=True)


def median_result(name: str, runs: list[Result]) -> Result:
    return Result(
        name,
        statistics.median(r.write_mbps for r in runs),
        statistics.median(r.read_mbps for r in runs),
        max(r.write_rss_mib for r in runs),
        max(r.read_rss_mib for r in runs),
        runs[0].cold,
    )


def print_table(results: dict[str, Result]) -> None:
    header = f"{'':24}" + "".join(f"{name:>12}" for name in results)
    both = "loftfs" in results and "juicefs" in results
    print(header + (f"{'loft/jfs':>10}" if both else ""))
    rows = [
        ("seq write MB/s", "write_mbps", "{:12.0f}", "{:10.2f}"),
        ("cold seq read MB/s", "read_mbps", "{:12.0f}", "{:10.2f}"),
        ("peak RSS write MiB", "write_rss_mib", "{:12.0f}", "{:10.2f}"),
        ("peak RSS read MiB", "read_rss_mib", "{:12.0f}", "{:10.2f}"),
    ]
    for label, attr, cell, ratio in rows:
        line = f"{label:24}" + "".join(cell.format(getattr(r, attr)) for r in results.values())
        if both:
            jfs = getattr(results["juicefs"], attr)
            line += ratio.format(getattr(results["loftfs"], attr) / jfs) if jfs else ""
        print(line)
    print("(MB/s = MiB/s; cold read: " + next(iter(results.values())).cold + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--workdir", default="/var/tmp/loftbench", type=Path)
    parser.add_argument(
        "--block-size", default="4M", help="block size of both volumes (default 4M)"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="runs per file system; the median is shown"
    )
    parser.add_argument("--only", choices=["loftfs", "juicefs"], help="benchmark one file system")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (mounting and dropping the page cache need it)")
    size = parse_size(args.size) // MIB * MIB
    block = parse_size(args.block_size)
    workdir: Path = args.workdir.resolve()
    base = os.urandom(MIB)
    kinds: dict[str, type[FileSystem]] = {"loftfs": LoftFS, "juicefs": JuiceFS}
    names = [args.only] if args.only else ["loftfs", "juicefs"]
    runs: dict[str, list[Result]] = {name: [] for name in names}
    try:
        for i in range(args.runs):
            for name in names:
                fs = kinds[name](name, workdir / name, block)
                result = bench_one(fs, size, base)
                runs[name].append(result)
                print(
                    f"run {i + 1} {name}: write {result.write_mbps:.0f} MB/s,"
                    f" cold read {result.read_mbps:.0f} MB/s",
                    file=sys.stderr,
                )
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for name in names:
            shutil.rmtree(workdir / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.rmdir()
    results = {name: median_result(name, rs) for name, rs in runs.items()}
    print(
        f"seqio: {size // MIB} MiB file, 1 MiB writes/reads, block size {block // MIB} MiB, {args.runs} run(s)"
    )
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({n: asdict(r) for n, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
