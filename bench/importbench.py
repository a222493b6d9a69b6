"""Import without copying: how fast an existing tree or bucket becomes usable, and how its data
reads.

What it measures (each step on a fresh volume, SQLite metadata, local-directory store):

1. **local**: ``loft import`` of a local tree of ``--files`` small files (default 1,000,000,
   1,000 per directory): objects/s and the import process's peak RSS.
2. **s3**: a SeaweedFS bucket of ``--objects`` small objects (default 200,000, 1,000 per
   prefix): the same partitioned parallel listing an import does, writing nothing
   (``loftfs.importer.bare_listing``), then ``loft import`` of the bucket; objects/s of both
   and their ratio (target: the import at least half the listing's rate), peak RSS.
3. **lazy**: the bucket bound with ``loft import --lazy`` and mounted: time of the first ``ls``
   of the root, then ``find`` over one prefix of 10,000 objects (``--subtree``) and the
   directory listings the mount sent to the source (target: only that subtree's).
4. **reads**: a sample of imported files read through the mount, sha256 against the source;
   read again after dropping the page cache: the GETs sent to the source must not grow.

JuiceFS has no import that leaves the data in place (its ``sync`` copies every object), so
there is no JuiceFS column: the yardstick of step 2 is the bare listing, as the issue sets it.

Run as root: ``.venv/bin/python bench/importbench.py [--files 1000000] [--objects 200000]``.
The local tree and the bucket are made first (not timed) under ``--workdir``; everything this
starts (SeaweedFS, mounts) is stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
LOFT = str(VENV_BIN / "loft")
sys.path.append(str(REPO / "tests"))  # tests/servers.py: SeaweedFS
from servers import S3_READER, SeaweedServer  # noqa: E402

PER_DIR = 1000


class BenchError(Exception):
    pass


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [LOFT, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise BenchError(f"loft {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def timed_import(*args: str) -> tuple[dict[str, Any], float, int]:
    """``loft import ... --json`` in a child: (summary, wall seconds, its peak RSS in bytes).

    The peak is the child's ``VmHWM``, read until it exits: ``ru_maxrss`` from ``wait4`` would
    count the memory of this process, which the child is a copy of until it executes."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([LOFT, "import", *args, "--json"], stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise BenchError(f"loft import: exit {proc.returncode}: {err.read()[-2000:]}")
        return json.loads(out.read()), wall, peak


def _hwm(pid: int) -> int:
    """Peak resident size of a running process since it executed its program (bytes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def new_volume(root: Path, name: str) -> str:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    url = f"sqlite3://{root / 'meta.db'}"
    run("format", url, name, "--bucket", str(root / "bucket"))
    return url


# --- the local tree ---------------------------------------------------------------------------


def make_tree(root: Path, files: int) -> None:
    marker = root.with_name(root.name + ".complete")
    if marker.exists() and marker.read_text() == str(files):
        return
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    print(f"making a tree of {files:,} files in {root} ...", flush=True)
    body = b"x" * 100
    for i in range(files):
        if i % PER_DIR == 0:
            d = root / f"dir{i // PER_DIR:05d}"
            d.mkdir(parents=True)
        fd = os.open(d / f"img{i:08d}.jpg", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, body)
        os.close(fd)
    marker.write_text(str(files))


def bench_local(work: Path, files: int) -> dict[str, Any]:
    src = work / "tree"
    make_tree(src, files)
    url = new_volume(work / "vol-local", "imp-local")
    run("source", "add", url, "tree", f"file://{src}")
    summary, wall, rss = timed_import(url, "tree", "/data")
    if summary["created"] != files:
        raise BenchError(f"local import created {summary['created']} of {files}")
    return {
        "objects": files,
        "seconds": wall,
        "objects_per_s": files / wall,
        "peak_rss_mb": rss / 1e6,
    }


# --- the bucket -------------------------------------------------------------------------------


def fill_bucket(server: SeaweedServer, bucket: str, objects: int) -> dict[str, bytes]:
    """``objects`` small objects under ``p<n>/`` prefixes; returns a sample of their bodies."""
    c = server.client()
    c.create_bucket(Bucket=bucket)
    sample: dict[str, bytes] = {}
    rng = random.Random(1)
    picked = set(rng.sample(range(objects), min(200, objects)))

    def put(i: int) -> None:
        key = f"p{i // PER_DIR:04d}/obj{i:08d}.bin"
        body = os.urandom(64 + i % 4000)
        c.put_object(Bucket=bucket, Key=key, Body=body)
        if i in picked:
            sample[key] = body

    print(f"uploading {objects:,} objects to SeaweedFS ...", flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(objects), chunksize=64))
    print(f"  {objects / (time.perf_counter() - start):,.0f} PUT/s", flush=True)
    return sample


def bench_s3(
    work: Path, server: SeaweedServer, bucket: str, objects: int, threads: int
) -> dict[str, Any]:
    from loftfs.importer import bare_listing
    from loftfs.object import create_storage

    store = create_storage(
        "s3",
        f"{server.endpoint}/{bucket}",
        access_key=S3_READER[0],
        secret_key=S3_READER[1],
    )
    try:
        listed, list_s = bare_listing(store, "", threads)
    finally:
        store.close()
    if listed != objects:
        raise BenchError(f"the bare listing found {listed} of {objects} objects")
    url = new_volume(work / "vol-s3", "imp-s3")
    env = {"LOFT_SOURCE_SECRET_KEY": S3_READER[1]}
    run(
        "source", "add", url, "bkt", f"{server.endpoint}/{bucket}", "--access-key", S3_READER[0],
        env=env,
    )  # fmt: skip
    summary, wall, rss = timed_import(url, "bkt", "/data", "--threads", str(threads))
    if summary["created"] != objects:
        raise BenchError(f"s3 import created {summary['created']} of {objects}")
    return {
        "objects": objects,
        "listing_s": list_s,
        "listing_per_s": listed / list_s,
        "import_s": wall,
        "import_per_s": objects / wall,
        "ratio": (objects / wall) / (listed / list_s),
        "peak_rss_mb": rss / 1e6,
        "url": url,
    }


# --- through a mount --------------------------------------------------------------------------


@contextmanager
def mounted(url: str, mnt: Path, cache: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", "-d", url, str(mnt), "--cache-dir", str(cache))
    try:
        yield mnt
    finally:
        subprocess.run([LOFT, "umount", str(mnt)], capture_output=True)


def figures(mnt: Path) -> dict[str, Any]:
    return dict(json.loads(run("stats", str(mnt), "--json").stdout)["sources"])


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def bench_lazy(work: Path, server: SeaweedServer, bucket: str, subtree_objects: int) -> dict:
    url = new_volume(work / "vol-lazy", "imp-lazy")
    run(
        "source", "add", url, "bkt", f"{server.endpoint}/{bucket}",
        "--access-key", S3_READER[0], env={"LOFT_SOURCE_SECRET_KEY": S3_READER[1]},
    )  # fmt: skip
    run("import", url, "bkt", "/data", "--lazy")
    with mounted(url, work / "mnt-lazy", work / "cache-lazy") as mnt:
        start = time.perf_counter()
        top = os.listdir(mnt / "data")
        first_ls = time.perf_counter() - start
        before = figures(mnt)["lazy"]["lazy_listings_total"]
        prefixes = sorted(top)[: max(1, subtree_objects // PER_DIR)]
        start = time.perf_counter()
        found = 0
        for p in prefixes:
            for _, _, names in os.walk(mnt / "data" / p):
                found += len(names)
        find_s = time.perf_counter() - start
        listings = figures(mnt)["lazy"]["lazy_listings_total"] - before
    return {
        "root_entries": len(top),
        "first_ls_s": first_ls,
        "subtree_dirs": len(prefixes),
        "subtree_objects": found,
        "find_s": find_s,
        "listings_for_subtree": listings,
    }


def bench_reads(work: Path, url: str, sample: dict[str, bytes]) -> dict[str, Any]:
    with mounted(url, work / "mnt-read", work / "cache-read") as mnt:
        drop_page_cache()
        start = time.perf_counter()
        bad = [k for k, body in sample.items() if _sha(mnt / "data" / k) != _sha_bytes(body)]
        first_s = time.perf_counter() - start
        gets = figures(mnt)["source"]["requests_total"]
        drop_page_cache()
        start = time.perf_counter()
        bad += [k for k, body in sample.items() if _sha(mnt / "data" / k) != _sha_bytes(body)]
        second_s = time.perf_counter() - start
        gets_after = figures(mnt)["source"]["requests_total"]
    if bad:
        raise BenchError(f"{len(bad)} imported files read back wrong, e.g. {bad[0]}")
    return {
        "files": len(sample),
        "first_read_s": first_s,
        "source_gets": gets,
        "second_read_s": second_s,
        "source_gets_second_read": gets_after - gets,
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000, help="local tree size")
    parser.add_argument("--objects", type=int, default=200_000, help="bucket size")
    parser.add_argument("--subtree", type=int, default=10_000, help="objects the lazy find walks")
    parser.add_argument("--threads", type=int, default=8, help="listing threads (s3)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: local,s3")
    parser.add_argument("--workdir", default="/var/tmp/loftbench-import", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (mounting and dropping the page cache need it)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    results: dict[str, Any] = {"date": started.isoformat(timespec="seconds")}
    if "local" not in skip:
        r = bench_local(work, args.files)
        results["local"] = r
        print(
            f"local tree -> SQLite: {r['objects']:,} objects in {r['seconds']:.1f} s = "
            f"{r['objects_per_s']:,.0f} objects/s, peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    if "s3" not in skip:
        shutil.rmtree(work / "seaweedfs", ignore_errors=True)
        server = SeaweedServer(work / "seaweedfs")
        server.start()
        try:
            bucket = "imp-bench"
            sample = fill_bucket(server, bucket, args.objects)
            r = bench_s3(work, server, bucket, args.objects, args.threads)
            results["s3"] = {k: v for k, v in r.items() if k != "url"}
            print(
                f"SeaweedFS -> SQLite: bare listing {r['listing_per_s']:,.0f} objects/s, "
                f"import {r['import_per_s']:,.0f} objects/s (ratio {r['ratio']:.2f}), "
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            lz = bench_lazy(work, server, bucket, args.subtree)
            results["lazy"] = lz
            print(
                f"lazy: first ls of the root ({lz['root_entries']:,} entries) "
                f"{lz['first_ls_s'] * 1000:.0f} ms; find over {lz['subtree_objects']:,} objects "
                f"in {lz['subtree_dirs']} prefixes {lz['find_s']:.2f} s with "
                f"{lz['listings_for_subtree']} source listings",
                flush=True,
            )
            rd = bench_reads(work, r["url"], sample)
            results["reads"] = rd
            print(
                f"reads: {rd['files']} files, sha256 equal; first read {rd['first_read_s']:.2f} s "
                f"({rd['source_gets']} source GETs), second read {rd['second_read_s']:.2f} s "
                f"({rd['source_gets_second_read']} source GETs)",
                flush=True,
            )
        finally:
            server.close()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
