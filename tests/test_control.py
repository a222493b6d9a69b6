"""The control channel: a real ``ControlServer`` on a real Unix socket, with simple handlers,
and clients speaking to it the way ``loft stats`` and ``loft warmup`` do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loftfs.control import (
    MAX_REQUEST_BYTES,
    BadRequest,
    ControlClient,
    ControlError,
    ControlServer,
    control_request,
    control_socket_path,
    int_list,
)
from loftfs.errors import ConfigError, LoftError
from loftfs.metrics import Metrics


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: a socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="loftctl", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """Handlers with observable effects."""

    def __init__(self) -> None:
        self.closed_streams = 0
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()

    def count(self, args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            for i in range(int(args.get("n", 3))):
                yield {"i": i}
            yield {"done": True}
        finally:
            with self.lock:
                self.closed_streams += 1

    def slow(self, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(float(args.get("s", 0.2)))
        with self.lock:
            self.in_flight -= 1
        return {"slept": True}


def handlers(rec: Recorder, metrics: Metrics) -> dict[str, Any]:
    def crash(args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("handler bug")

    def refuse(args: dict[str, Any]) -> dict[str, Any]:
        raise LoftError("volume is read-only")

    def inodes(args: dict[str, Any]) -> dict[str, Any]:
        return {"sum": sum(int_list(args, "inodes"))}

    def not_json(args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {"ok": 1}
        yield {"bad": {1, 2}}

    return {
        "stats": lambda args: metrics.snapshot(),
        "count": rec.count,
        "slow": rec.slow,
        "crash": crash,
        "refuse": refuse,
        "inodes": inodes,
        "not_json": not_json,
    }


@pytest.fixture
def server(sock_dir: Path) -> Iterator[tuple[ControlServer, Recorder, Metrics]]:
    rec, metrics = Recorder(), Metrics()
    srv = ControlServer(sock_dir / "m.sock", handlers(rec, metrics))
    srv.start()
    yield srv, rec, metrics
    srv.stop()


def raw_exchange(path: Path, payload: bytes, lines: int) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        f = s.makefile("rb")
        return [json.loads(f.readline()) for _ in range(lines)]


def test_socket_path_sits_next_to_the_mount_record(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path
) -> None:
    from loftfs.fuse import mount

    monkeypatch.setattr(mount, "RECORD_DIR", sock_dir / "mounts")
    record = mount._record_path("/mnt/data")
    sock = control_socket_path("/mnt/data")
    assert sock.parent == record.parent == sock_dir / "mounts"
    assert sock.name == record.stem + ".sock"
    assert control_socket_path("/mnt/other") != sock


def test_requests_single_and_streamed(server: tuple[ControlServer, Recorder, Metrics]) -> None:
    srv, rec, metrics = server
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    metrics.observe_op("read", 0.001)
    with ControlClient(srv.path) as client:
        snap = client.call("stats")
        assert snap["fuse"]["read"]["count"] == 1
        assert list(client.request("count", n=2)) == [{"i": 0}, {"i": 1}, {"done": True}]
        assert client.call("inodes", inodes=[1, 2, 3]) == {"sum": 6}
        ping = client.call("ping")
        assert ping["pid"] == os.getpid() and "stats" in ping["commands"]
    assert rec.closed_streams == 1


def test_bad_requests_are_answered_and_the_connection_goes_on(
    server: tuple[ControlServer, Recorder, Metrics],
) -> None:
    srv, _, _ = server
    answers = raw_exchange(
        srv.path,
        b"this is not json\n"
        b"[1, 2]\n"
        b'{"cmd": "count", "args": [1]}\n'
        b'{"cmd": "nope"}\n'
        b"\xff\xfe\n"
        b'{"cmd": "count", "args": {"n": 1}}\n',
        8,
    )
    assert answers[0] == {"error": "bad request: not a JSON line"}
    assert "expected" in answers[1]["error"]
    assert "must be an object" in answers[2]["error"]
    assert answers[3]["error"].startswith("unknown command 'nope' (known: ")
    assert answers[4] == {"error": "bad request: not a JSON line"}
    assert answers[5:] == [{"data": {"i": 0}}, {"data": {"done": True}}, {"end": True}]


def test_failing_handlers_answer_an_error_and_the_server_lives_on(
    server: tuple[ControlServer, Recorder, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    srv, _, _ = server
    with ControlClient(srv.path) as client:
        with pytest.raises(ControlError, match="crash failed: RuntimeError: handler bug"):
            client.call("crash")
        with pytest.raises(ControlError, match="volume is read-only"):
            client.call("refuse")
        with pytest.raises(ControlError, match="'inodes' must hold non-negative integers"):
            client.call("inodes", inodes=[1, -2])
        with pytest.raises(ControlError, match="'inodes' must be a list"):
            client.call("inodes")
        # a stream that turns bad half-way: what was sent arrives, then the error
        got = []
        with pytest.raises(ControlError, match="not JSON"):
            for msg in client.request("not_json"):
                got.append(msg)
        assert got == [{"ok": 1}]
        assert client.call("count", n=0) == {"done": True}  # same connection still in step
    assert any("control command crash failed" in r.message for r in caplog.records)


def test_oversized_request_is_refused(server: tuple[ControlServer, Recorder, Metrics]) -> None:
    srv, _, _ = server
    inodes = [123456] * (MAX_REQUEST_BYTES // 5)
    with ControlClient(srv.path) as client:
        with pytest.raises(ControlError, match="larger than"):
            client.call("inodes", inodes=inodes)  # refused before it is sent
        assert client.call("inodes", inodes=list(range(10_000)))["sum"] == 49_995_000
    # the server refuses it too, from a client that does not check
    answers = raw_exchange(srv.path, b"x" * (MAX_REQUEST_BYTES + 1), 1)
    assert answers == [{"error": f"request larger than {MAX_REQUEST_BYTES} bytes"}]
    with ControlClient(srv.path) as client:
        assert client.call("count", n=0) == {"done": True}


def test_abandoned_stream_is_closed_on_the_server(
    server: tuple[ControlServer, Recorder, Metrics],
) -> None:
    srv, rec, _ = server
    client = ControlClient(srv.path)
    stream = client.request("count", n=100_000)
    assert next(stream) == {"i": 0}
    stream.close()  # the connection is out of step now: the client drops it
    with pytest.raises(ControlError, match="closed"):
        client.call("count", n=1)
    deadline = time.monotonic() + 10
    while rec.closed_streams == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.closed_streams == 1
    with ControlClient(srv.path) as again:
        assert again.call("count", n=1) == {"done": True}


def test_clients_are_served_in_parallel(server: tuple[ControlServer, Recorder, Metrics]) -> None:
    srv, rec, _ = server
    n = 6
    results: list[dict[str, Any]] = []

    def one() -> None:
        with ControlClient(srv.path) as client:
            results.append(client.call("slow", s=0.3))

    start = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [{"slept": True}] * n
    assert rec.peak == n
    assert time.monotonic() - start < 0.3 * n / 2


def test_connection_limit(sock_dir: Path) -> None:
    rec = Recorder()
    with ControlServer(sock_dir / "c.sock", {"slow": rec.slow}, max_connections=1) as srv:
        first = ControlClient(srv.path)
        deadline = time.monotonic() + 5
        while srv.connections() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with ControlClient(srv.path) as second, pytest.raises(ControlError, match="too many"):
            second.call("slow", s=0)
        first.close()
        while srv.connections() > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with ControlClient(srv.path) as third:
            assert third.call("slow", s=0) == {"slept": True}


def test_client_timeout(server: tuple[ControlServer, Recorder, Metrics]) -> None:
    srv, _, _ = server
    with (
        ControlClient(srv.path, timeout=0.1) as client,
        pytest.raises(ControlError, match=r"did not answer 'slow' within 0\.1s"),
    ):
        client.call("slow", s=1.0)


def test_stop_disconnects_clients_and_removes_the_socket(sock_dir: Path) -> None:
    rec = Recorder()
    srv = ControlServer(sock_dir / "s.sock", {"count": rec.count})
    srv.start()
    client = ControlClient(srv.path)
    assert client.call("count", n=0) == {"done": True}
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2
    assert not srv.path.exists()
    with pytest.raises(ControlError):
        client.call("count", n=0)
    client.close()
    with pytest.raises(ConfigError, match="no live loftfs mount process answers"):
        ControlClient(srv.path)
    srv.stop()  # idempotent


def test_start_replaces_a_stale_socket_but_not_a_live_one(sock_dir: Path) -> None:
    path = sock_dir / "x.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed mount leaves
    with ControlServer(path, {}) as srv:
        with ControlClient(path) as client:
            assert client.call("ping")["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="another process serves"):
            ControlServer(path, {}).start()
        assert srv.path.exists()
    (sock_dir / "plain").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(sock_dir / "plain", {}).start()
    with pytest.raises(ConfigError, match="longer than"):
        ControlServer(sock_dir / ("n" * 120), {}).start()


def test_a_new_server_keeps_its_socket_when_an_old_one_stops(sock_dir: Path) -> None:
    """A remount on the same mountpoint may bind the path before the old server stops."""
    path = sock_dir / "r.sock"
    old = ControlServer(path, {})
    old.start()
    os.unlink(path)  # as if gone; a new server binds the same path
    with ControlServer(path, {}):
        old.stop()
        assert path.exists()
        with ControlClient(path) as client:
            assert client.call("ping")


def test_paths_outside_a_mount(sock_dir: Path) -> None:
    with pytest.raises(ConfigError, match="is not in a loftfs mount"):
        ControlClient.for_mount(str(sock_dir))
    with pytest.raises(ConfigError, match="is not in a loftfs mount"):
        list(control_request(str(sock_dir), "stats"))
    with pytest.raises(ConfigError, match="no live loftfs mount process answers"):
        ControlClient(sock_dir / "missing.sock")


def test_int_list_limits() -> None:
    assert int_list({"k": [0, 5]}, "k") == [0, 5]
    with pytest.raises(BadRequest, match="at most 2"):
        int_list({"k": [1, 2, 3]}, "k", max_items=2)
    with pytest.raises(BadRequest):
        int_list({"k": [True]}, "k")
    with pytest.raises(BadRequest):
        int_list({"k": [1.5]}, "k")
