"""What only the Redis engine has: URLs, isolation of volumes on one server, credentials, TLS,
outages (killed, hung), commits whose reply is lost, round trips per operation, and many
processes in one directory. The shared behaviour runs in the conformance suite (``-k redis``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_py
from meta_helpers import ROOT, fs_error, names

from loftfs.errors import ConfigError, MetaUnavailable, NotFormatted
from loftfs.meta import Meta, open_meta, redis_txn
from loftfs.meta import redis as engine
from loftfs.meta.redis import RedisMeta, parse_url
from loftfs.meta.types import NOW, ROOT_CTX, Ctx, FileType, Slice, VolumeSettings
from servers import RedisServer

C = ROOT_CTX
FAST = "connect_timeout=1&read_timeout=1&retry_timeout=2"


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def opened() -> Iterator[Callable[[str], RedisMeta]]:
    """``open(url)``: an engine closed at the end of the test."""
    made: list[Meta] = []

    def open_(url: str) -> RedisMeta:
        meta = open_meta(url)
        assert isinstance(meta, RedisMeta)
        made.append(meta)
        return meta

    yield open_
    for meta in made:
        meta.close()


def keys_of(server: RedisServer, db: int, prefix: str) -> list[bytes]:
    client = redis_py.Redis(port=server.port, db=db, password=server.password)
    try:
        return list(client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


# --- URLs ---------------------------------------------------------------------------------------


def test_url_defaults_and_options() -> None:
    u = parse_url("redis://example.com")
    assert (u.host, u.port, u.db, u.prefix, u.tls) == ("example.com", 6379, 0, "loft", False)
    assert (u.connect_timeout, u.read_timeout, u.retry_timeout) == (5.0, 15.0, 30.0)
    u = parse_url(
        "rediss://me:p%40ss@[::1]:7000/12?prefix=vol-1.a_b&read_timeout=2.5&retry_timeout=9"
        "&ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert (u.host, u.port, u.db, u.prefix, u.tls) == ("::1", 7000, 12, "vol-1.a_b", True)
    assert (u.username, u.password, u.read_timeout, u.retry_timeout) == ("me", "p@ss", 2.5, 9.0)
    assert u.tls_options == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert u.redacted() == "rediss://me:****@[::1]:7000/12?prefix=vol-1.a_b"
    assert "p@ss" not in u.server and "p%40ss" not in u.redacted()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://", "no host"),
        ("redis://h:99999/0", "invalid"),
        ("redis://h/abc", "database must be a number"),
        ("redis://h/0?prefix=a:b", "invalid key prefix"),
        ("redis://h/0?prefix=", "invalid key prefix"),
        ("redis://h/0?prefix=-x", "invalid key prefix"),
        ("redis://h/0?prefix=" + "x" * 65, "invalid key prefix"),
        ("redis://h/0?prefix=a&prefix=b", "given twice"),
        ("redis://h/0?pool=3", "unknown option"),
        ("redis://h/0?read_timeout=soon", "invalid read_timeout"),
        ("redis://h/0?retry_timeout=0", "invalid retry_timeout"),
        ("redis://h/0?ssl_cert_reqs=none", "need a rediss:// URL"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "invalid ssl_cert_reqs"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "no such file"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "invalid ssl_check_hostname"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_meta(url)


def test_url_of_engine_hides_password(opened: Callable[[str], RedisMeta]) -> None:
    meta = opened("redis://user:hunter2@127.0.0.1:1/3?prefix=p&retry_timeout=1")
    assert "hunter2" not in meta.url
    assert meta.url == "redis://user:****@127.0.0.1:1/3?prefix=p"


# --- isolation ----------------------------------------------------------------------------------


def test_volumes_sharing_a_server_are_isolated(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    base = "iso" + uid()
    urls = {
        "a": redis_server.url(db=2, prefix=base),
        "b": redis_server.url(db=2, prefix=base + "-b"),  # a prefix that extends a's
        "c": redis_server.url(db=3, prefix=base),  # a's prefix in another database
    }
    metas = {name: opened(url) for name, url in urls.items()}
    for name, meta in metas.items():
        meta.init_volume(VolumeSettings(name=f"vol-{name}"))
        meta.mkdir(C, ROOT, name.encode() * 3, 0o755)
    other = redis_py.Redis(port=redis_server.port, db=2)
    other.set(f"{base}x", b"not a volume key")  # shares the start of the prefix, not "prefix:"
    try:
        metas["a"].destroy_volume()
        assert keys_of(redis_server, 2, base) == []
        with pytest.raises(NotFormatted):
            metas["a"].load_settings()
        with pytest.raises(NotFormatted):
            opened(urls["a"]).getattr(ROOT)
        for name in ("b", "c"):
            fresh = opened(urls[name])
            assert fresh.load_settings().name == f"vol-{name}"
            assert names(fresh, ROOT) == [name.encode() * 3]
        assert keys_of(redis_server, 2, base + "-b") != []
        assert keys_of(redis_server, 3, base) != []
        assert other.get(f"{base}x") == b"not a volume key"
    finally:
        other.delete(f"{base}x")
        other.close()
        metas["b"].destroy_volume()
        metas["c"].destroy_volume()


def test_not_formatted(redis_server: RedisServer, opened: Callable[[str], RedisMeta]) -> None:
    url = redis_server.url(db=4, prefix="nf" + uid())
    meta = opened(url)
    with pytest.raises(NotFormatted):
        meta.getattr(ROOT)
    with pytest.raises(NotFormatted):
        meta.load_settings()
    meta.init_volume(VolumeSettings(name="nf"))
    other = opened(url)
    assert other.getattr(ROOT).nlink == 2
    meta.destroy_volume()
    with pytest.raises(NotFormatted):  # a client that saw the volume notices it is gone
        other.getattr(ROOT)


# --- credentials, hosts, databases --------------------------------------------------------------


def test_password(
    redis_factory: Callable[..., RedisServer], opened: Callable[[str], RedisMeta]
) -> None:
    server = redis_factory(password="pw-Zq83x")
    good = server.url(db=0, prefix="auth")
    opened(good).init_volume(VolumeSettings(name="auth"))
    assert opened(good).getattr(ROOT).nlink == 2
    for bad in (good.replace("pw-Zq83x", "pw-wrong-91"), good.replace(":pw-Zq83x@", "")):
        start = time.monotonic()
        with pytest.raises(MetaUnavailable, match="refused the credentials") as info:
            opened(bad).getattr(ROOT)
        assert time.monotonic() - start < 3  # not retried for retry_timeout
        assert "pw-" not in str(info.value)
        assert f"127.0.0.1:{server.port}" in str(info.value)


def test_acl_user_confined_to_its_prefix(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    """A tenant's Redis user may touch only keys of its prefix (and no dangerous command):
    the engine works inside it, and another prefix is refused at once."""
    prefix = "acl" + uid()
    admin = redis_py.Redis(port=redis_server.port)
    admin.execute_command(
        "ACL", "SETUSER", prefix, "on", ">pw-acl", f"~{prefix}:*", "+@all", "-@dangerous"
    )
    try:
        url = f"redis://{prefix}:pw-acl@127.0.0.1:{redis_server.port}/8?prefix={prefix}"
        meta = opened(url)
        meta.init_volume(VolumeSettings(name="acl"))
        f = meta.create(C, ROOT, b"f", 0o644, os.O_RDWR)
        meta.flock(C, f.inode, 1, 1, False)
        meta.release(f.inode)
        meta.unlink(C, ROOT, b"f")
        assert names(meta, ROOT) == []
        with pytest.raises(MetaUnavailable, match="denied a command"):
            opened(url.replace(f"prefix={prefix}", "prefix=other")).getattr(ROOT)
        meta.destroy_volume()
        assert keys_of(redis_server, 8, prefix) == []
    finally:
        admin.execute_command("ACL", "DELUSER", prefix)
        admin.close()


def test_unknown_host_and_database(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match="unknown Redis host"):
        opened("redis://no-such-host.invalid:6379/0").getattr(ROOT)
    with pytest.raises(ConfigError, match="has no database 64"):
        opened(redis_server.url(db=64)).getattr(ROOT)  # the server has 64: 0-63
    assert time.monotonic() - start < 5


# --- TLS ----------------------------------------------------------------------------------------


class TLSRedisServer(RedisServer):
    """``redis-server`` accepting TLS only, with a certificate of a test CA for 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ca = workdir / "ca.pem"
        _make_certs(workdir)

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("--port")
        cmd[at : at + 2] = ["--port", "0", "--tls-port", str(self.port)]
        return [
            *cmd,
            "--tls-cert-file", str(self.workdir / "server.pem"),
            "--tls-key-file", str(self.workdir / "server.key"),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(b"PING\r\n")
            return s.recv(100).startswith(b"+PONG")


def _make_certs(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:  # fmt: skip
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("loftfs test CA", ca_key, None, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("127.0.0.1", key, ca.subject, ca_key, False)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))
    (d / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_tls(tmp_path: Path, redis_server: RedisServer, opened: Callable[[str], RedisMeta]) -> None:
    server = TLSRedisServer(tmp_path / "tls")
    try:
        server.start()
        base = f"rediss://127.0.0.1:{server.port}/0?prefix=tls"
        meta = opened(f"{base}&ssl_ca_certs={server.ca}")
        meta.init_volume(VolumeSettings(name="tls"))
        meta.mkdir(C, ROOT, b"d", 0o755)
        assert names(opened(f"{base}&ssl_cert_reqs=none"), ROOT) == [b"d"]
        start = time.monotonic()
        with pytest.raises(MetaUnavailable, match="TLS"):  # the system CAs do not know it
            opened(base).getattr(ROOT)
        assert time.monotonic() - start < 5
    finally:
        server.close()


# --- outages ------------------------------------------------------------------------------------


def test_killed_server_then_back(
    redis_factory: Callable[..., RedisServer], opened: Callable[[str], RedisMeta]
) -> None:
    server = redis_factory(password="pw-Kk29")
    meta = opened(server.url(db=0, prefix="kill") + "&" + FAST)
    meta.init_volume(VolumeSettings(name="kill"))
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    server.kill()
    for op in (lambda: meta.getattr(d.inode), lambda: meta.mkdir(C, ROOT, b"e", 0o755)):
        start = time.monotonic()
        with pytest.raises(MetaUnavailable) as info:
            op()
        assert 1.5 < time.monotonic() - start < 8  # retried for retry_timeout (2 s), no more
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert "pw-Kk29" not in str(info.value)
    server.start()  # same port, same data (append-only file, fsync always)
    assert meta.lookup(C, ROOT, b"d").inode == d.inode  # the same engine object
    meta.mkdir(C, ROOT, b"e", 0o755)
    assert names(meta, ROOT) == [b"d", b"e"]
    assert meta.getattr(ROOT).nlink == 4


def test_server_restarting_within_retry_time(
    redis_factory: Callable[..., RedisServer], opened: Callable[[str], RedisMeta]
) -> None:
    server = redis_factory()
    meta = opened(server.url(db=0, prefix="blip") + "&retry_timeout=30")
    meta.init_volume(VolumeSettings(name="blip"))
    server.kill()
    restarter = threading.Timer(1.0, server.start)
    restarter.start()
    try:
        meta.mkdir(C, ROOT, b"d", 0o755)  # waits for the server instead of failing
    finally:
        restarter.join()
    assert names(meta, ROOT) == [b"d"]


def test_hung_server(
    redis_factory: Callable[..., RedisServer], opened: Callable[[str], RedisMeta]
) -> None:
    server = redis_factory()
    meta = opened(server.url(db=0, prefix="hang") + "&" + FAST)
    meta.init_volume(VolumeSettings(name="hang"))
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(MetaUnavailable, match="unavailable"):
            meta.mkdir(C, ROOT, b"d", 0o755)
        assert time.monotonic() - start < 8
    finally:
        server.resume()
    meta.mkdir(C, ROOT, b"d", 0o755)
    assert names(meta, ROOT) == [b"d"]


class ReplyCutter:
    """A TCP proxy in front of Redis that breaks one connection around its next commit (an
    ``EXEC``, or the ``EVALSHA`` of a commit on assumed values, see ``redis_assume``):
    ``mode="reply"`` lets the server apply the transaction and drops its reply,
    ``mode="request"`` drops the request so the server never sees it."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = ""
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str) -> None:
        with self._lock:
            self.mode = mode

    def _take(self) -> str:
        with self._lock:
            mode, self.mode = self.mode, ""
            return mode

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            pending = threading.Event()
            threading.Thread(target=self._up, args=(client, server, pending), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, pending), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut_reply: threading.Event) -> None:
        while data := _recv(client):
            if (b"EXEC\r\n" in data or b"EVALSHA" in data) and self.mode:
                mode = self._take()
                self.cuts += 1
                if mode == "request":
                    _close(client, server)
                    return
                cut_reply.set()
            try:
                server.sendall(data)
            except OSError:
                break
        _close(client, server)

    def _down(
        self, server: socket.socket, client: socket.socket, cut_reply: threading.Event
    ) -> None:
        while data := _recv(server):
            if cut_reply.is_set():  # the server answered the EXEC: it was applied
                break
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client, server)

    def close(self) -> None:
        self.listener.close()


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.mark.parametrize("mode", ["reply", "request"])
def test_commit_whose_reply_is_lost(
    mode: str, redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    """Applied or not, the operation succeeds once and the namespace counts it once."""
    proxy = ReplyCutter(redis_server.port)
    try:
        meta = opened(f"redis://127.0.0.1:{proxy.port}/5?prefix=cut{uid()}")
        meta.init_volume(VolumeSettings(name="cut"))
        f = meta.mknod(C, ROOT, b"f", FileType.FILE, 0o644)
        proxy.arm(mode)
        d = meta.mkdir(C, ROOT, b"d", 0o755)  # no EEXIST from a rerun of an applied commit
        proxy.arm(mode)
        meta.rename(C, ROOT, b"f", d.inode, b"g")  # no ENOENT either
        proxy.arm(mode)
        sid = meta.new_slice_id()
        meta.write_slice(f.inode, 0, Slice(0, sid, 100, 0, 100), NOW)
        assert proxy.cuts == 3
        assert names(meta, ROOT) == [b"d"]
        assert names(meta, d.inode) == [b"g"]
        assert meta.getattr(ROOT).nlink == 3
        assert meta.read_chunk(f.inode, 0) == [Slice(0, sid, 100, 0, 100)]
        assert meta.usage() == (3 * 4096, 3)
        meta.destroy_volume()
    finally:
        proxy.close()


# --- round trips --------------------------------------------------------------------------------


def test_round_trips_per_operation(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency is round trips: each operation's count is pinned (reads of a write transaction
    carry their WATCH, a read-only one watches nothing, lookup uses one script, readdir reads
    the entries then every attribute (the directory's too) in two, open sends its record with the
    read of the attributes, create and write_slice read what they check in one round trip)."""
    meta = opened(redis_server.url(db=6, prefix="rt" + uid()))
    meta.init_volume(VolumeSettings(name="rt"))
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    f = meta.create(C, d.inode, b"warm", 0o644, os.O_RDWR)  # session and id batches exist
    meta.lookup(C, d.inode, b"warm")  # the server has the read scripts cached
    meta.readdir(C, d.inode)
    sid = meta.new_slice_id()
    trips = [0]
    call = engine.Link.call

    def counting(self: engine.Link, cmds: list[tuple[object, ...]]) -> list[object]:
        trips[0] += 1
        return call(self, cmds)

    monkeypatch.setattr(engine.Link, "call", counting)

    def count(op: Callable[[], object]) -> int:
        trips[0] = 0
        op()
        return trips[0]

    assert count(lambda: meta.getattr(f.inode)) == 1
    assert count(lambda: meta.lookup(C, d.inode, b"warm")) == 1
    assert count(lambda: meta.open(C, f.inode, os.O_RDONLY)) == 1
    assert count(lambda: meta.reopen(C, f.inode, os.O_RDONLY)) == 1
    assert count(lambda: meta.readdir(C, d.inode)) == 2
    # create in a directory this client wrote, commits of a file it wrote: values assumed,
    # checked by the commit itself (redis_assume)
    assert count(lambda: meta.create(C, d.inode, b"new", 0o644, os.O_RDWR)) == 1
    assert count(lambda: meta.write_slice(f.inode, 0, Slice(0, sid, 10, 0, 10), NOW)) == 1
    assert count(lambda: meta.write_slice(f.inode, 0, Slice(10, sid, 10, 0, 10), NOW)) == 1
    other = opened(redis_server.url(db=6, prefix="rt" + uid()))  # knows nothing yet
    other.init_volume(VolumeSettings(name="rt2"))
    d2 = other.mkdir(C, ROOT, b"d", 0o755)
    g = other.create(C, d2.inode, b"g", 0o644, os.O_RDWR)  # session and id batches exist
    other._known.clear()
    assert count(lambda: other.create(C, d2.inode, b"new", 0o644, os.O_RDWR)) == 2
    assert count(lambda: other.write_slice(g.inode, 0, Slice(0, sid, 10, 0, 10), NOW)) == 2
    other.destroy_volume()
    assert count(lambda: meta.read_chunk(f.inode, 0)) == 1
    assert count(lambda: meta.rename(C, d.inode, b"new", d.inode, b"renamed")) == 5
    assert count(lambda: meta.release(f.inode)) == 3
    # unlink of a file with data: its chunks are read in one round trip, however many
    for index in range(1, 5):
        meta.write_slice(f.inode, index, Slice(0, sid, 10, 0, 10), NOW)
    assert count(lambda: meta.unlink(C, d.inode, b"warm")) == 7
    with fs_error(17):
        meta.mkdir(C, d.inode, b"renamed", 0o755)
    meta.destroy_volume()


def test_big_directories_and_files_in_batches(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing's attributes are read in MGET batches, chunks in batches too. Small limits
    here stand for the real ones."""
    monkeypatch.setattr(redis_txn, "MGET_BATCH", 4)
    monkeypatch.setattr(redis_txn, "CHUNK_BATCH", 3)
    meta = opened(redis_server.url(db=6, prefix="big" + uid()))
    meta.init_volume(VolumeSettings(name="big"))
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    made = {
        b"n%02d" % i: meta.mknod(C, d.inode, b"n%02d" % i, FileType.FILE, 0o644) for i in range(11)
    }
    listing = meta.readdir(C, d.inode)
    assert [e.name for e in listing] == sorted(made)
    assert all(e.attr == made[e.name] for e in listing)
    f = made[b"n00"]
    ids = []
    for index in range(7):
        ids.append(meta.new_slice_id())
        meta.write_slice(f.inode, index, Slice(0, ids[-1], 10, 0, 10), NOW)
    meta.unlink(C, d.inode, b"n00")
    assert sorted(s for s, _ in meta.deleted_slices()) == ids
    meta.destroy_volume()


def test_listing_reads_attributes_as_it_is_read(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta], monkeypatch: pytest.MonkeyPatch
) -> None:
    """readdir reads the entries and a first batch of attribute records; the rest are read a
    batch at a time, one batch ahead of what the listing's reader got to, so they are as of
    then. An entry whose record is gone by its read (a concurrent unlink; here deleted behind the engine's back) keeps its place
    with nlink 0, its inode and type only; the one-shot listing (dump) leaves it out. A record
    of an unknown format fails with a clear error, not a wrong entry."""
    monkeypatch.setattr(redis_txn, "MGET_BATCH", 2)
    prefix = "gone" + uid()
    meta = opened(redis_server.url(db=6, prefix=prefix))
    meta.init_volume(VolumeSettings(name="gone"))
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    names = [b"a", b"b", b"c", b"d", b"e", b"f"]
    made = {n: meta.mknod(C, d.inode, n, FileType.FILE, 0o644) for n in names}
    client = redis_py.Redis(port=redis_server.port, db=6, password=redis_server.password)
    try:
        client.delete(f"{prefix}:i{made[b'b'].inode}")  # in the first batch
        listing = meta.readdir(C, d.inode)  # reads [a, b], starts reading [c, d]
        meta.setattr(C, made[b"e"].inode, mode=0o600)  # [e, f] is read later: seen
        client.delete(f"{prefix}:i{made[b'f'].inode}")  # read later: gone
        assert [e.name for e in listing] == names
        assert listing.rows(0, 99) == [(e.name, e.attr.row()) for e in listing]
        assert listing.rows(1, 3) == [(e.name, e.attr.row()) for e in listing[1:3]]
        gone = [e.attr for e in listing if e.attr.nlink == 0]
        assert [(a.inode, a.type, a.size, a.mode) for a in gone] == [
            (made[b"b"].inode, FileType.FILE, 0, 0),
            (made[b"f"].inode, FileType.FILE, 0, 0),
        ]
        assert listing[4].attr.mode == 0o600 and listing[0].attr == made[b"a"]
        whole = meta._read(lambda tx: tx.list_dir(d.inode))
        assert [e.name for e in whole] == [b"a", b"c", b"d", b"e"]
        client.set(f"{prefix}:i{made[b'c'].inode}", b"\x09" + bytes(63))
        listing = meta.readdir(C, d.inode)
        with pytest.raises(MetaUnavailable, match="unknown format"):
            listing.rows(0, 4)
        with pytest.raises(MetaUnavailable, match="unknown format"):
            listing[2]
    finally:
        client.close()
    meta.destroy_volume()


# --- many processes -----------------------------------------------------------------------------


def test_forked_child_uses_connections_of_its_own(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    meta = opened(redis_server.url(db=7, prefix="fork" + uid()))
    meta.init_volume(VolumeSettings(name="fork"))
    meta.mkdir(C, ROOT, b"before", 0o755)  # the parent's pool holds an open connection
    pid = os.fork()
    if pid == 0:  # the child: same engine object
        code = 1
        try:
            meta.mkdir(C, ROOT, b"child", 0o755)
            code = 0
        finally:
            os._exit(code)
    meta.mkdir(C, ROOT, b"parent", 0o755)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert names(meta, ROOT) == [b"before", b"child", b"parent"]
    meta.destroy_volume()


def test_processes_creating_and_renaming_in_one_directory(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    """Files race to replace ten shared names; directories pile up. Nothing is lost or
    leaked: entry counts, link counts, usage and the inode records all agree."""
    prefix = "mp" + uid()
    url = redis_server.url(db=7, prefix=prefix)
    meta = opened(url)
    meta.init_volume(VolumeSettings(name="mp"))
    d = meta.mkdir(C, ROOT, b"d", 0o777)
    per = 40
    code = textwrap.dedent(
        f"""
        import sys
        from loftfs.meta import open_meta
        from loftfs.meta.types import ROOT_CTX, FileType
        m = open_meta({url!r})
        tag = sys.argv[1].encode()
        for i in range({per}):
            m.mknod(ROOT_CTX, {d.inode}, tag + b"f%d" % i, FileType.FILE, 0o644)
            m.rename(ROOT_CTX, {d.inode}, tag + b"f%d" % i, {d.inode}, b"shared%d" % (i % 10))
            m.mkdir(ROOT_CTX, {d.inode}, tag + b"dir%d" % i, 0o755)
        m.close()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in ("p", "q", "r")]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    listing = names(meta, d.inode)
    assert len(listing) == 3 * per + 10
    assert meta.getattr(d.inode).nlink == 2 + 3 * per
    assert meta.usage() == ((2 + 3 * per) * 4096, 2 + 3 * per + 10)
    inode_keys = [
        k for k in keys_of(redis_server, 7, prefix) if k.startswith(f"{prefix}:i".encode())
    ]
    assert len(inode_keys) == 2 + 3 * per + 10  # the replaced files were deleted, none leaked
    meta.destroy_volume()


def test_refused_open_leaves_no_open_record(
    redis_server: RedisServer, opened: Callable[[str], RedisMeta]
) -> None:
    """The one-round-trip open adds its record before the permission check: a refused open,
    or one of a vanished inode, must take it back (else an unlinked file would be kept)."""
    meta = opened(redis_server.url(db=6, prefix="op" + uid()))
    meta.init_volume(VolumeSettings(name="op"))
    f = meta.create(C, ROOT, b"private", 0o600, os.O_RDWR)
    meta.release(f.inode)
    sid = meta._session_id()

    def holders(inode: int) -> list[int]:
        return meta._run(lambda tx: tx.open_sessions(inode), False)

    other = Ctx(uid=1000, gid=1000)
    with fs_error(13):  # EACCES
        meta.open(other, f.inode, os.O_RDONLY)
    assert sid not in holders(f.inode)
    with fs_error(2):  # ENOENT
        meta.open(C, 999_999, os.O_RDONLY)
    assert holders(999_999) == []
    meta.open(C, f.inode, os.O_RDONLY)
    assert holders(f.inode) == [sid]
    meta.destroy_volume()
