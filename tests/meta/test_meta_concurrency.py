"""Concurrent clients and threads on one volume: nothing lost, counts exact."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from meta_helpers import ROOT, RW, Backend, names

from loftfs.errors import FSError
from loftfs.meta import Meta
from loftfs.meta.types import NOW, ROOT_CTX, FileType, Slice

C = ROOT_CTX


def run_threads(workers: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_parallel_create_rename_in_one_directory(backend: Backend, meta: Meta) -> None:
    clients = [meta, backend.open()]
    d = meta.mkdir(C, ROOT, b"d", 0o777)
    per_worker = 25

    def worker(client: Meta, w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(per_worker):
                name = b"w%d-%d" % (w, i)
                client.mknod(C, d.inode, name, FileType.FILE, 0o644)
                client.mkdir(C, d.inode, name + b".dir", 0o755)
                client.rename(C, d.inode, name, d.inode, name + b".renamed")
                if i % 5 == 0:
                    client.rmdir(C, d.inode, name + b".dir")

        return run

    run_threads([worker(clients[w % 2], w) for w in range(6)])
    listing = names(meta, d.inode)
    expected = set()
    for w in range(6):
        for i in range(per_worker):
            expected.add(b"w%d-%d.renamed" % (w, i))
            if i % 5:
                expected.add(b"w%d-%d.dir" % (w, i))
    assert set(listing) == expected
    dirs = sum(1 for n in expected if n.endswith(b".dir"))
    assert meta.getattr(d.inode).nlink == 2 + dirs
    inodes = {e.attr.inode for e in meta.readdir(C, d.inode)}
    assert len(inodes) == len(expected)
    clients[1].close()  # a client with batched counters flushes them when it closes
    assert meta.usage()[1] == 2 + len(expected)
    meta.close()
    fresh = backend.open()
    assert fresh.usage() == ((2 + dirs) * 4096, 2 + len(expected))


def test_racing_renames_of_one_name(backend: Backend, meta: Meta) -> None:
    """Many threads race to rename files onto one target: exactly one file survives."""
    clients = [meta, backend.open()]
    for i in range(20):
        meta.mknod(C, ROOT, b"src%d" % i, FileType.FILE, 0o644)

    def worker(client: Meta, start: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(start, 20, 4):
                client.rename(C, ROOT, b"src%d" % i, ROOT, b"target")

        return run

    run_threads([worker(clients[k % 2], k) for k in range(4)])
    assert names(meta, ROOT) == [b"target"]
    clients[1].close()
    assert meta.usage()[1] == 2


def test_parallel_writes_and_truncates(backend: Backend, meta: Meta) -> None:
    clients = [meta, backend.open()]
    f = meta.create(C, ROOT, b"f", 0o644, RW)
    written: list[int] = []
    lock = threading.Lock()

    def worker(client: Meta, w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(20):
                sid = client.new_slice_id()
                client.write_slice(f.inode, w, Slice(i * 10, sid, 10, 0, 10), NOW)
                with lock:
                    written.append(sid)

        return run

    run_threads([worker(clients[w % 2], w) for w in range(4)])
    assert len(set(written)) == 80
    for w in range(4):
        assert len(meta.read_chunk(f.inode, w)) == 20
    meta.unlink(C, ROOT, b"f")
    meta.release(f.inode)
    assert sorted(s for s, _ in meta.deleted_slices(1000)) == sorted(written)


def test_concurrent_mkdir_same_name(backend: Backend, meta: Meta) -> None:
    clients = [meta, backend.open()]
    results: list[str] = []
    lock = threading.Lock()

    def worker(client: Meta) -> Callable[[], None]:
        def run() -> None:
            try:
                client.mkdir(C, ROOT, b"x", 0o755)
                outcome = "ok"
            except FSError as e:
                assert e.errno == errno.EEXIST
                outcome = "exists"
            with lock:
                results.append(outcome)

        return run

    run_threads([worker(clients[k % 2]) for k in range(6)])
    assert sorted(results) == ["exists"] * 5 + ["ok"]
    assert meta.getattr(ROOT).nlink == 3


def test_two_processes_on_one_database(backend: Backend, meta: Meta) -> None:
    """Two mounts of one volume are two processes on one SQLite file."""
    import subprocess
    import sys
    import textwrap

    d = meta.mkdir(C, ROOT, b"d", 0o777)
    code = textwrap.dedent(
        f"""
        import sys
        from loftfs.meta import open_meta
        from loftfs.meta.types import ROOT_CTX, FileType
        m = open_meta({backend.url!r})
        tag = sys.argv[1].encode()
        for i in range(150):
            m.mknod(ROOT_CTX, {d.inode}, tag + b"%d" % i, FileType.FILE, 0o644)
            m.mkdir(ROOT_CTX, {d.inode}, tag + b"dir%d" % i, 0o755)
            m.rename(ROOT_CTX, {d.inode}, tag + b"%d" % i, {d.inode}, tag + b"f%d" % i)
        m.close()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in ("p", "q")]
    for i in range(150):
        meta.mkdir(C, d.inode, b"m%d" % i, 0o755)
    assert [p.wait(120) for p in procs] == [0, 0]
    listing = names(meta, d.inode)
    assert len(listing) == 150 * 5
    assert meta.getattr(d.inode).nlink == 2 + 150 * 3
    assert meta.usage()[1] == 2 + 150 * 5
