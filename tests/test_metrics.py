"""Metrics of a mount: FUSE request timing (both bindings' hooks), object-store requests
through ``MeteredStore`` over a real directory store, data-path sources, the Prometheus text
and its HTTP endpoint, and ``--metrics`` address parsing."""

from __future__ import annotations

import errno
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Generator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from loftfs.errors import ConfigError, FSError, ObjectNotFound, ObjectTransientError
from loftfs.metrics import FUSE_BUCKETS, Metrics, is_failure, parse_listen_address
from loftfs.object.faults import FaultInjectingStore
from loftfs.object.file import FileObjectStore
from loftfs.object.metered import MeteredStore
from loftfs.object.retry import RetryStore
from loftfs.vfs.options import MountOptions


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the Prometheus text, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(metrics: Metrics) -> dict[str, str]:
    """Family name -> type, as a scraper sees them."""
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}


# --- FUSE requests -------------------------------------------------------------------------------


def test_fuse_ops_count_errors_latency_and_buckets() -> None:
    m = Metrics()
    m.observe_op("read", 0.0003)
    m.observe_op("read", 0.002)
    m.observe_op("read", 20.0, failed=True)  # beyond the last bound: +Inf only
    m.observe_op("lookup", FUSE_BUCKETS[0])  # exactly on a bound: counted in it (le)
    s = samples(m)
    read = (("op", "read"),)
    assert s[("loftfs_fuse_ops_total", read)] == 3
    assert s[("loftfs_fuse_errors_total", read)] == 1
    assert s[("loftfs_fuse_op_seconds_count", read)] == 3
    assert s[("loftfs_fuse_op_seconds_sum", read)] == pytest.approx(20.0023)
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "0.00025"), ("op", "read")))] == 0
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "0.0005"), ("op", "read")))] == 1
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "0.0025"), ("op", "read")))] == 2
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "10.0"), ("op", "read")))] == 2
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "+Inf"), ("op", "read")))] == 3
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "5e-05"), ("op", "lookup")))] == 1
    # request types never seen make no series
    assert ("loftfs_fuse_ops_total", (("op", "write"),)) not in s
    snap = m.snapshot()["fuse"]
    assert snap["read"] == {"count": 3, "errors": 1, "seconds": pytest.approx(20.0023)}
    assert set(snap) == {"read", "lookup"}
    assert families(m)["loftfs_fuse_op_seconds"] == "histogram"


def test_op_observer_and_unknown_ops_share_the_figures() -> None:
    m = Metrics()
    observe = m.op_observer("read")
    observe(0.001, False)
    m.observe_op("read", 0.001)
    m.observe_op("ioctl", 0.5, True)  # not in the table: created on first use
    snap = m.snapshot()["fuse"]
    assert snap["read"]["count"] == 2
    assert snap["ioctl"] == {"count": 1, "errors": 1, "seconds": 0.5}


def test_concurrent_recording_loses_nothing() -> None:
    m = Metrics()
    n, threads = 20_000, 8

    def work(i: int) -> None:
        observe = m.op_observer("write")
        for k in range(n):
            observe(1e-4, k % 10 == 0)
            m.observe_op(f"op{i % 2}", 1e-4)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    snap = m.snapshot()["fuse"]
    assert snap["write"]["count"] == n * threads
    assert snap["write"]["errors"] == n * threads // 10
    assert snap["op0"]["count"] + snap["op1"]["count"] == n * threads
    s = samples(m)
    assert s[("loftfs_fuse_op_seconds_bucket", (("le", "+Inf"), ("op", "write")))] == n * threads


def test_each_mount_has_its_own_registry() -> None:
    a, b = Metrics({"volume": "a"}), Metrics({"volume": "b"})
    a.observe_op("read", 0.001)
    assert ("loftfs_fuse_ops_total", (("op", "read"),)) not in samples(b)
    assert samples(a)[("loftfs_mount_info", (("volume", "a"),))] == 1
    assert b.snapshot()["info"] == {"volume": "b"}
    with pytest.raises(ValueError, match="bad info label"):
        Metrics({"Bad-Label": "x"})


def test_only_failures_count_as_errors() -> None:
    assert not is_failure(FSError(errno.ENOENT))
    assert not is_failure(FSError(errno.ENOSPC))
    assert is_failure(FSError(errno.EIO))
    assert is_failure(ObjectTransientError("timeout"))
    assert is_failure(RuntimeError("bug"))


class RecordingFuseLib:
    """Stands in for libfuse's reply functions, which need a live request."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, int]] = []

    def fuse_reply_err(self, req: int, err: int) -> None:
        self.replies.append((req, err))


def test_lowlevel_guard_times_each_request() -> None:
    from loftfs.fuse.ll_ops import LowLevelOperations

    m = Metrics()
    lib = RecordingFuseLib()
    ops = LowLevelOperations(lib, None, MountOptions(), metrics=m)  # type: ignore[arg-type]

    def ok(req: int) -> None:
        pass

    def missing(req: int) -> None:
        raise FSError(errno.ENOENT)

    def broken(req: int) -> None:
        raise RuntimeError("bug")

    ops._guard("getattr", ok)(1)
    ops._guard("lookup", missing)(2)
    ops._guard("read", broken)(3)
    assert lib.replies == [(2, errno.ENOENT), (3, errno.EIO)]
    snap = m.snapshot()["fuse"]
    assert snap["getattr"]["count"] == 1 and snap["getattr"]["errors"] == 0
    assert snap["lookup"]["count"] == 1 and snap["lookup"]["errors"] == 0
    assert snap["read"]["count"] == 1 and snap["read"]["errors"] == 1
    assert all(0 <= f["seconds"] < 1 for f in snap.values())
    # without metrics the table is built as before and nothing is recorded anywhere
    plain = LowLevelOperations(lib, None, MountOptions())  # type: ignore[arg-type]
    plain._guard("lookup", missing)(4)
    assert lib.replies[-1] == (4, errno.ENOENT)


def test_pyfuse3_adapter_times_each_vfs_call() -> None:
    import pyfuse3

    from loftfs.fuse.adapter import FuseOperations

    m = Metrics()
    ops = FuseOperations(None, MountOptions(), metrics=m)  # type: ignore[arg-type]

    def getattr(inode: int) -> int:
        return inode

    def lookup(inode: int) -> int:
        raise FSError(errno.ENOENT)

    def read(inode: int) -> int:
        raise RuntimeError("bug")

    async def main() -> None:
        assert await ops._run(getattr, 7) == 7
        for fn, err in ((lookup, errno.ENOENT), (read, errno.EIO)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops._run(fn, 1)
            assert e.value.errno == err

    trio.run(main)
    snap = m.snapshot()["fuse"]
    assert {op: (f["count"], f["errors"]) for op, f in snap.items()} == {
        "getattr": (1, 0),
        "lookup": (1, 0),
        "read": (1, 1),
    }


# --- object store ------------------------------------------------------------------------------


def test_metered_store_counts_requests_bytes_and_failures(tmp_path: Path) -> None:
    m = Metrics()
    store = MeteredStore(FileObjectStore(str(tmp_path / "bucket")), m)
    store.create()
    store.put("a/1", b"x" * 1000)
    store.put("a/2", b"y" * 24)
    assert store.get("a/1", 10, 100) == b"x" * 100
    assert store.head("a/2").size == 24
    with pytest.raises(ObjectNotFound):
        store.head("a/3")  # an answer, not a failure
    with pytest.raises(ObjectNotFound):
        store.get("a/3")  # a block that should be there: a failure
    assert [i.key for i in store.list("a/")] == ["a/1", "a/2"]
    listing = store.list("a/")
    assert isinstance(listing, Generator)
    next(listing)
    listing.close()  # stopped early: not a failure
    store.delete("a/1")
    store.delete_many(["a/2"])
    snap = m.snapshot()["object"]
    counts = {k: (v["count"], v["errors"]) for k, v in snap["requests"].items()}
    assert counts == {
        "put": (2, 0),
        "get": (2, 1),
        "head": (2, 0),
        "list": (2, 0),
        "delete": (1, 0),
        "delete_many": (1, 0),
    }
    assert snap["bytes"] == {"get": 100, "put": 1024}
    s = samples(m)
    assert s[("loftfs_object_bytes_total", (("direction", "put"),))] == 1024
    assert s[("loftfs_object_requests_total", (("method", "get"),))] == 2
    assert s[("loftfs_object_errors_total", (("method", "get"),))] == 1
    assert s[("loftfs_object_request_seconds_count", (("method", "put"),))] == 2


def test_metered_store_below_retries_sees_every_attempt(tmp_path: Path) -> None:
    m = Metrics()
    backend = FileObjectStore(str(tmp_path / "bucket"))
    backend.create()
    faulty = FaultInjectingStore(backend, error_rate=1.0, ops={"put", "list"}, seed=1)
    store = RetryStore(MeteredStore(faulty, m), attempts=3, backoff_s=0.001)
    with pytest.raises(ObjectTransientError):
        store.put("k", b"data")
    with pytest.raises(ObjectTransientError):
        list(store.list())
    requests = m.snapshot()["object"]["requests"]
    assert (requests["put"]["count"], requests["put"]["errors"]) == (3, 3)
    assert (requests["list"]["count"], requests["list"]["errors"]) == (3, 3)
    assert m.snapshot()["object"]["bytes"]["put"] == 0
    faulty.error_rate = 0.0
    store.put("k", b"data")
    assert m.snapshot()["object"]["bytes"]["put"] == 4


# --- sources -----------------------------------------------------------------------------------


def test_sources_become_counters_and_gauges() -> None:
    m = Metrics()
    cache = {"hits": 10, "misses": 5, "evictions": 1, "used_bytes": 4096, "blocks": 3}
    m.register_source("disk_cache", lambda: dict(cache))
    m.register_source(
        "writeback",
        lambda: {"pending_blocks": 2, "pending_bytes": 8192, "uploaded_blocks": 40,
                 "failed_uploads": 0, "retries_total": 3},
    )  # fmt: skip
    kinds = families(m)
    assert kinds["loftfs_disk_cache_hits"] == "counter"
    assert kinds["loftfs_disk_cache_evictions"] == "counter"
    assert kinds["loftfs_disk_cache_used_bytes"] == "gauge"
    assert kinds["loftfs_disk_cache_blocks"] == "gauge"
    assert kinds["loftfs_writeback_uploaded_blocks"] == "counter"
    assert kinds["loftfs_writeback_retries"] == "counter"  # any key ending in _total
    assert kinds["loftfs_writeback_pending_bytes"] == "gauge"
    s = samples(m)
    assert s[("loftfs_disk_cache_hits_total", ())] == 10
    assert s[("loftfs_writeback_retries_total", ())] == 3
    cache["hits"] = 11  # read at each scrape
    assert samples(m)[("loftfs_disk_cache_hits_total", ())] == 11
    assert m.snapshot()["sources"]["disk_cache"]["hits"] == 11


def test_a_broken_source_never_breaks_a_scrape(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    calls = []

    def broken() -> dict[str, int]:
        calls.append(1)
        raise RuntimeError("cache gone")

    m.register_source("buffer", lambda: {"used_bytes": 1, "total_bytes": 2})
    m.register_source("disk_cache", broken)
    m.register_source("mem_cache", lambda: {"hits": "many", "Bad Key": 1, "misses": 2})  # type: ignore[dict-item]
    m.observe_op("read", 0.001)
    for _ in range(3):
        s = samples(m)
        assert s[("loftfs_buffer_used_bytes", ())] == 1
        assert s[("loftfs_fuse_ops_total", (("op", "read"),))] == 1
    assert len(calls) == 3
    assert sum("metrics source disk_cache failed" in r.message for r in caplog.records) == 1
    snap = m.snapshot()["sources"]
    assert "disk_cache" not in snap
    assert snap["mem_cache"] == {"misses": 2}  # values that are not numbers are left out
    m.unregister_source("disk_cache")
    with pytest.raises(ValueError, match="bad source name"):
        m.register_source("Disk-Cache", dict)


def test_snapshot_is_json() -> None:
    import json

    m = Metrics({"volume": "v", "mountpoint": "/mnt/v"})
    m.observe_op("write", 0.01)
    m.observe_request("put", 0.1, nbytes=4096)
    m.register_source("buffer", lambda: {"used_bytes": 1.5, "total_bytes": 10})
    snap = json.loads(json.dumps(m.snapshot(), allow_nan=False))
    assert snap["object"]["bytes"] == {"get": 0, "put": 4096}
    assert snap["sources"]["buffer"] == {"used_bytes": 1.5, "total_bytes": 10}
    assert snap["uptime_s"] >= 0 and snap["time"] > 1e9


# --- HTTP endpoint -----------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_http_on_a_free_port() -> None:
    m = Metrics()
    m.observe_op("read", 0.001)
    port, stop = m.serve_http("127.0.0.1", 0)
    try:
        assert port > 0
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'loftfs_fuse_ops_total{op="read"} 1.0' in body
        assert _get(f"http://127.0.0.1:{port}/")[0] == 404
        with pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            Metrics().serve_http("127.0.0.1", port)  # taken
    finally:
        stop()
    stop()  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_serve_http_unknown_host() -> None:
    with pytest.raises(ConfigError, match=r"cannot serve metrics on no-such-host\.invalid"):
        Metrics().serve_http("no-such-host.invalid", 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9567", ("127.0.0.1", 9567)),
        ("localhost:0", ("localhost", 0)),
        (":9567", ("0.0.0.0", 9567)),
        ("9567", ("127.0.0.1", 9567)),
        ("[::1]:9567", ("::1", 9567)),
        (" 10.0.0.1:80 ", ("10.0.0.1", 80)),
    ],
)
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("host:", "missing port"),
        ("host:http", "not a number"),
        ("host:70000", "out of range"),
        ("host:-1", "not a number"),
        ("::1:9567", "in brackets"),
        ("[::1]", "missing :PORT"),
        ("[::1:9567", "unclosed"),
        ("my host:1", "spaces"),
    ],
)
def test_parse_listen_address_rejects(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as e:
        parse_listen_address(text)
    assert "expected HOST:PORT" in str(e.value)
