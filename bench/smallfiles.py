"""Small files: create+write+close, stat, open+read+close and unlink of N 4 KiB files in one
directory, on loftfs and JuiceFS side by side (SQLite + local directory, same block size).

Run as root: ``.venv/bin/python bench/smallfiles.py [--files 2000] [--runs 3]``. Prints files per
second for each step and the ratio loftfs / JuiceFS (higher is better for loftfs). The read step
runs after a remount and a page-cache drop, so every file is read through the mount.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from seqio import BenchError, FileSystem, JuiceFS, LoftFS, drop_page_cache, mounted

STEPS = ("create", "stat", "read", "unlink")
FILE_SIZE = 4096


def bench_one(fs: FileSystem, files: int) -> dict[str, float]:
    """Files per second of each step on a fresh volume."""
    fs.prepare()
    rates: dict[str, float] = {}
    data = os.urandom(FILE_SIZE)
    try:
        d = fs.mnt / "small"
        with mounted(fs):
            d.mkdir()
            names = [d / f"f{i:06d}" for i in range(files)]
            start = time.perf_counter()
            for p in names:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
            rates["create"] = files / (time.perf_counter() - start)
        drop_page_cache()
        with mounted(fs):
            start = time.perf_counter()
            for p in names:
                os.stat(p)
            rates["stat"] = files / (time.perf_counter() - start)
            start = time.perf_counter()
            for p in names:
                fd = os.open(p, os.O_RDONLY)
                got = os.read(fd, FILE_SIZE + 1)
                os.close(fd)
                if got != data:
                    raise BenchError(f"{fs.name}: {p} read back {len(got)} wrong bytes")
            rates["read"] = files / (time.perf_counter() - start)
            start = time.perf_counter()
            for p in names:
                os.unlink(p)
            rates["unlink"] = files / (time.perf_counter() - start)
        return rates
    finally:
        shutil.rmtree(fs.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="number of files (default 2000)")
    parser.add_argument("--runs", type=int, default=1, help="runs; the median is shown")
    parser.add_argument("--workdir", default="/var/tmp/loftbench-small", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (mounting and dropping the page cache need it)")
    kinds: dict[str, type[FileSystem]] = {"loftfs": LoftFS, "juicefs": JuiceFS}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in kinds}
    workdir: Path = args.workdir.resolve()
    try:
        for i in range(args.runs):
            for name, kind in kinds.items():
                rates = bench_one(kind(name, workdir / name, 4 << 20), args.files)
                runs[name].append(rates)
                shown = ", ".join(f"{s} {rates[s]:.0f}/s" for s in STEPS)
                print(f"run {i + 1} {name}: {shown}", file=sys.stderr)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = {n: {s: statistics.median(r[s] for r in rs) for s in STEPS} for n, rs in runs.items()}
    print(f"smallfiles: {args.files} files of {FILE_SIZE} B, {args.runs} run(s), files/s")
    print(f"{'':12}{'loftfs':>10}{'juicefs':>10}{'loft/jfs':>10}")
    for s in STEPS:
        loft, jfs = median["loftfs"][s], median["juicefs"][s]
        print(f"{s:12}{loft:10.0f}{jfs:10.0f}{loft / jfs:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
