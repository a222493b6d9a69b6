"""What only the PostgreSQL engine has: schemas as volumes, URL handling, connection failures
(wrong password, a killed or hung server) and concurrency across threads and processes.

The conformance suite (``-k postgres``) checks the namespace semantics; these tests use the
session's server (``postgres_server``) with a database of their own, or a server of their own
(``postgres_factory``) when they kill or pause it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from meta_helpers import ROOT, names

from loftfs.errors import ConfigError, FSError, MetaUnavailable, NotFormatted, VolumeExists
from loftfs.meta import Meta, open_meta
from loftfs.meta.postgres import PostgresMeta, parse_url
from loftfs.meta.types import ROOT_CTX, FileType, VolumeSettings
from servers import PostgresServer

C = ROOT_CTX
PW = PostgresServer.password


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()


def formatted(open_: Callable[[str], Meta], url: str, name: str = "vol") -> Meta:
    meta = open_(url)
    meta.init_volume(VolumeSettings(name=name))
    return meta


def tables_in(server: PostgresServer, db: str, schema: str) -> list[str]:
    out = server.psql(
        f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1", db=db
    )
    return out.split()


def schema_exists(server: PostgresServer, db: str, schema: str) -> bool:
    return server.psql(f"SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'", db=db) != ""


# --- schemas as volumes -----------------------------------------------------------------------


def test_volumes_in_two_schemas_are_isolated(
    postgres_server: PostgresServer, database: str, opened: Callable[[str], Meta]
) -> None:
    a = formatted(opened, postgres_server.url(database, schema="vol_a"), "vola")
    b = formatted(opened, postgres_server.url(database, schema="vol_b"), "volb")
    public = formatted(opened, postgres_server.url(database), "volp")
    a.mknod(C, ROOT, b"only-in-a", FileType.FILE, 0o644)
    b.mkdir(C, ROOT, b"only-in-b", 0o755)
    assert names(a, ROOT) == [b"only-in-a"]
    assert names(b, ROOT) == [b"only-in-b"]
    assert names(public, ROOT) == []
    assert a.load_settings().name == "vola" and b.load_settings().name == "volb"
    # inode numbers are allocated per volume: both start from the same counter
    assert a.lookup(C, ROOT, b"only-in-a").inode == b.lookup(C, ROOT, b"only-in-b").inode

    # something of another application in a's schema: destroy must leave it alone
    postgres_server.psql("CREATE TABLE vol_a.not_ours (x int)", db=database)
    a.destroy_volume()
    assert tables_in(postgres_server, database, "vol_a") == ["not_ours"]
    with pytest.raises(NotFormatted):
        a.load_settings()
    # b and the public volume are untouched and keep working
    assert names(b, ROOT) == [b"only-in-b"]
    b.mknod(C, ROOT, b"after", FileType.FILE, 0o644)
    assert names(b, ROOT) == [b"after", b"only-in-b"]
    assert names(public, ROOT) == []

    b.destroy_volume()
    assert not schema_exists(postgres_server, database, "vol_b")  # empty: dropped with it
    public.destroy_volume()
    assert schema_exists(postgres_server, database, "public")  # never dropped
    assert tables_in(postgres_server, database, "public") == []
    assert tables_in(postgres_server, database, "vol_a") == ["not_ours"]


def test_unformatted_schema_and_reformat(
    postgres_server: PostgresServer, database: str, opened: Callable[[str], Meta]
) -> None:
    url = postgres_server.url(database, schema="fresh")
    meta = opened(url)
    with pytest.raises(NotFormatted, match="schema fresh"):
        meta.load_settings()
    assert not schema_exists(postgres_server, database, "fresh")  # reading creates nothing
    meta.init_volume(VolumeSettings(name="one"))
    with pytest.raises(VolumeExists) as info:
        meta.init_volume(VolumeSettings(name="two"))
    assert PW not in str(info.value) and "****" in str(info.value)
    meta.destroy_volume()
    meta.init_volume(VolumeSettings(name="three"))  # the same engine object formats again
    assert meta.load_settings().name == "three"
    assert names(meta, ROOT) == []


def test_tenant_role_confined_to_its_schema(
    postgres_server: PostgresServer, database: str, opened: Callable[[str], Meta]
) -> None:
    """A role without CREATE on the database formats into the schema made for it, and cannot
    open another tenant's volume."""
    tag = database[-8:]
    for name in ("t1", "t2"):
        role = f"{name}_{tag}"
        postgres_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{name}'", db=database)
        postgres_server.psql(f"CREATE SCHEMA {role} AUTHORIZATION {role}", db=database)
    base = f"127.0.0.1:{postgres_server.port}/{database}"
    t1 = formatted(opened, f"postgres://t1_{tag}:pw-t1@{base}?schema=t1_{tag}", "one")
    t1.mknod(C, ROOT, b"mine", FileType.FILE, 0o644)
    assert tables_in(postgres_server, database, f"t1_{tag}")[:2] == ["loft_chunk", "loft_counter"]
    formatted(opened, f"postgres://t2_{tag}:pw-t2@{base}?schema=t2_{tag}", "two")
    intruder = opened(f"postgres://t1_{tag}:pw-t1@{base}?schema=t2_{tag}")
    for attempt in (intruder.load_settings, lambda: intruder.init_volume(VolumeSettings(name="x"))):
        with pytest.raises(MetaUnavailable, match=f"permission denied for schema t2_{tag}"):
            attempt()
    t1.destroy_volume()
    assert not schema_exists(postgres_server, database, f"t1_{tag}")  # its owner may drop it


def test_concurrent_formats_of_one_schema(postgres_server: PostgresServer, database: str) -> None:
    """Formats racing on one schema: exactly one wins, the others see VolumeExists."""
    url = postgres_server.url(database, schema="race")
    metas = [open_meta(url) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(metas))

    def run(m: Meta, i: int) -> None:
        barrier.wait()
        try:
            m.init_volume(VolumeSettings(name=f"race{i}"))
            outcomes.append("ok")
        except VolumeExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=run, args=(m, i)) for i, m in enumerate(metas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(outcomes) == ["exists", "exists", "exists", "ok"]
        assert metas[0].getattr(ROOT).nlink == 2
        assert metas[0].usage() == (4096, 1)
    finally:
        for m in metas:
            m.close()


# --- URLs -------------------------------------------------------------------------------------


def test_url_parameters() -> None:
    cfg = parse_url(
        "postgresql://us%40er:p%40ss%3Aw@db.example:6543/meta?schema=tenant_7&pool_max=3"
        "&sslmode=require&connect_timeout=4&application_name=x&retry_timeout=5"
        "&statement_timeout=2.5&isolation=serializable&pipeline=off"
    )
    assert (cfg.schema, cfg.pool_max, cfg.retry_timeout, cfg.statement_timeout) == (
        "tenant_7",
        3,
        5.0,
        2.5,
    )
    assert (cfg.isolation, cfg.pipeline, cfg.connect_timeout) == ("serializable", "off", 4)
    assert cfg.where == "db.example:6543/meta"
    assert cfg.password == "p@ss:w"
    for part in ("user=us@er", "dbname=meta", "sslmode=require", "application_name=x"):
        assert part in cfg.conninfo
    assert "schema" not in cfg.conninfo and "pool_max" not in cfg.conninfo
    assert not cfg.local

    default = parse_url("postgres://u:p@127.0.0.1/db")
    assert (default.schema, default.pool_max, default.isolation) == ("public", 10, "read_committed")
    assert default.retry_timeout == 30.0 and default.connect_timeout == 10
    assert default.local and default.where == "127.0.0.1:5432/db"
    assert parse_url("postgres://u@localhost,[::1]:5433/db").local
    assert parse_url("postgres:///db?host=/var/run/postgresql").local
    assert not parse_url("postgres://u@localhost,10.0.0.5/db").local


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://u:secretpw@h:5432/", "names no database"),
        ("postgres://u:secretpw@h/db?schema=Upper", "invalid schema"),
        ("postgres://u:secretpw@h/db?schema=pg_toast", "invalid schema"),
        ("postgres://u:secretpw@h/db?schema=1abc", "invalid schema"),
        ("postgres://u:secretpw@h/db?schema=a%3Bdrop", "invalid schema"),
        ("postgres://u:secretpw@h/db?schema=", "invalid schema"),
        ("postgres://u:secretpw@h/db?schema=a&schema=b", "appears twice"),
        ("postgres://u:secretpw@h/db?pool_max=0", "pool_max"),
        ("postgres://u:secretpw@h/db?pool_max=many", "pool_max"),
        ("postgres://u:secretpw@h/db?retry_timeout=-1", "retry_timeout"),
        ("postgres://u:secretpw@h/db?statement_timeout=0", "statement_timeout"),
        ("postgres://u:secretpw@h/db?isolation=chaos", "isolation"),
        ("postgres://u:secretpw@h/db?pipeline=maybe", "pipeline"),
        ("postgres://u:secretpw@h/db?connect_timeout=soon", "connect_timeout"),
        ("postgres://u:secretpw@h/db?no_such_option=1", "no_such_option"),
        ("postgres://u:secretpw@h:notaport/db", "invalid"),
    ],
)
def test_url_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_meta(url)
    text = str(info.value)
    assert "secretpw" not in text and "\n" not in text


# --- connection failures ----------------------------------------------------------------------


def _quick_failure(url: str, expect: str) -> str:
    start = time.monotonic()
    meta = open_meta(url)
    try:
        with pytest.raises(MetaUnavailable) as info:
            meta.load_settings()
    finally:
        meta.close()
    assert time.monotonic() - start < 5, "a permanent error must not be retried"
    text = str(info.value)
    assert expect in text, text
    assert "\n" not in text
    return text


def test_wrong_password_unknown_host_missing_database(
    postgres_server: PostgresServer, database: str
) -> None:
    good = postgres_server.url(database)
    bad_pw = good.replace(f":{PW}@", ":not-the-password@")
    text = _quick_failure(bad_pw, "password authentication failed")
    assert "not-the-password" not in text and f"127.0.0.1:{postgres_server.port}/{database}" in text
    text = _quick_failure(good.replace(database, "no_such_db"), 'database "no_such_db"')
    assert PW not in text
    text = _quick_failure(
        f"postgres://loft:{PW}@no-such-host.invalid:5432/db", "no-such-host.invalid"
    )
    assert PW not in text


def test_cli_format_with_wrong_password_writes_nothing(
    postgres_server: PostgresServer, database: str, tmp_path: Path
) -> None:
    bucket = tmp_path / "bucket"
    url = postgres_server.url(database, schema="cli").replace(f":{PW}@", ":wrong-pw@")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loftfs.cli.main", "format", url, "vol1", "--bucket", str(bucket)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 20
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loft: error: "), proc.stderr
    assert "password authentication failed" in lines[0] and "wrong-pw" not in lines[0]
    assert not bucket.exists() or not any(bucket.iterdir())
    assert not schema_exists(postgres_server, database, "cli")


def test_killed_server_then_back(
    postgres_factory: Callable[[], PostgresServer], opened: Callable[[str], Meta]
) -> None:
    """A killed server: operations fail with MetaUnavailable after ``retry_timeout``; after a
    restart the same engine object works; an operation waiting meanwhile succeeds."""
    server = postgres_factory()
    db = server.new_database()
    url = server.url(db) + "?retry_timeout=2&connect_timeout=2"
    meta = formatted(opened, url)
    d = meta.mkdir(C, ROOT, b"d", 0o755)
    for i in range(20):  # several pooled connections, all of which the kill breaks
        meta.mknod(C, d.inode, b"before%d" % i, FileType.FILE, 0o644)

    server.kill()
    start = time.monotonic()
    with pytest.raises(MetaUnavailable) as info:
        meta.mknod(C, d.inode, b"during", FileType.FILE, 0o644)
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 10, elapsed
    text = str(info.value)
    assert f"127.0.0.1:{server.port}/{db}" in text and PW not in text and "\n" not in text
    with pytest.raises(MetaUnavailable):
        meta.getattr(d.inode)

    server.start()
    assert len(names(meta, d.inode)) == 20  # committed before the kill: still there
    meta.mknod(C, d.inode, b"after", FileType.FILE, 0o644)
    assert meta.getattr(d.inode).nlink == 2

    # an operation issued while the server is down succeeds once it is back in time
    slow = opened(server.url(db) + "?retry_timeout=30")
    slow.getattr(ROOT)  # pooled connections exist before the kill
    server.kill()
    restart = threading.Timer(1.5, server.start)
    restart.start()
    try:
        start = time.monotonic()
        slow.mknod(C, d.inode, b"waited", FileType.FILE, 0o644)
        assert 1.0 < time.monotonic() - start < 25
    finally:
        restart.join()
    assert b"waited" in names(meta, d.inode)


def test_hung_server_is_cut_off(
    postgres_factory: Callable[[], PostgresServer], opened: Callable[[str], Meta]
) -> None:
    """A server that stops answering (SIGSTOP) cannot enforce statement_timeout: the client
    cuts the connection itself, fails within a bounded time and recovers after SIGCONT."""
    server = postgres_factory()
    db = server.new_database()
    url = server.url(db) + "?statement_timeout=1&retry_timeout=1&connect_timeout=1"
    meta = formatted(opened, url)
    meta.mknod(C, ROOT, b"f", FileType.FILE, 0o644)
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(MetaUnavailable):
            meta.lookup(C, ROOT, b"f")
        assert time.monotonic() - start < 12
    finally:
        server.resume()
    deadline = time.monotonic() + 15
    while True:  # the pool reconnects in the background; the first calls may still fail
        try:
            assert meta.lookup(C, ROOT, b"f").type == FileType.FILE
            break
        except MetaUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)


# --- concurrency ------------------------------------------------------------------------------


WORKER = textwrap.dedent(
    """
    import sys, threading
    from loftfs.meta import open_meta
    from loftfs.meta.types import ROOT_CTX as C, FileType
    url, d, tag, n = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
    m = open_meta(url)
    errors = []
    def run(t):
        try:
            for i in range(n):
                name = tag + b"-%d-%d" % (t, i)
                f = m.mknod(C, d, name, FileType.FILE, 0o644)
                m.link(C, f.inode, d, name + b".hard")
                m.rename(C, d, name, d, name + b".moved")
                m.mkdir(C, d, name + b".dir", 0o755)
                m.rename(C, d, name + b".dir", d, name + b".dir2")
                if i % 3 == 0:
                    m.unlink(C, d, name + b".hard")
                    m.rmdir(C, d, name + b".dir2")
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    m.close()
    if errors:
        sys.exit("; ".join(errors))
    """
)


@pytest.mark.parametrize("isolation", ["read_committed", "serializable"])
def test_threads_and_processes_in_one_directory(
    postgres_server: PostgresServer, database: str, isolation: str
) -> None:
    """2 processes x 4 threads create, hard-link, rename, mkdir and remove in one directory:
    every entry and every link count is exact."""
    url = postgres_server.url(database, schema="conc") + f"&isolation={isolation}"
    meta = open_meta(url)
    try:
        meta.init_volume(VolumeSettings(name="conc"))
        d = meta.mkdir(C, ROOT, b"d", 0o777).inode
        n = 12
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, url, str(d), tag, str(n)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in ("p", "q")
        ]
        results = [(p.wait(240), p.stderr.read() if p.stderr else "") for p in procs]
        assert [code for code, _ in results] == [0, 0], results
        expected: set[bytes] = set()
        dirs = 0
        for tag in (b"p", b"q"):
            for t in range(4):
                for i in range(n):
                    name = tag + b"-%d-%d" % (t, i)
                    expected.add(name + b".moved")
                    if i % 3:
                        expected |= {name + b".hard", name + b".dir2"}
                        dirs += 1
        entries = {e.name: e.attr for e in meta.readdir(C, d)}
        assert set(entries) == expected
        assert meta.getattr(d).nlink == 2 + dirs
        for name, attr in entries.items():
            if name.endswith(b".moved"):
                twin = name[: -len(b".moved")] + b".hard"
                assert attr.nlink == (2 if twin in entries else 1), name
                assert meta.getattr(attr.inode).nlink == attr.nlink
        files = sum(1 for name in expected if name.endswith(b".moved"))
        assert meta.usage() == (4096 * (2 + dirs), 2 + dirs + files)
    finally:
        meta.close()


def test_pipelined_reads_and_plain_writes(
    postgres_server: PostgresServer, database: str, opened: Callable[[str], Meta]
) -> None:
    """Both transports give the same answers (the suite runs with the loopback default:
    pipelined writes, plain reads)."""
    on = formatted(opened, postgres_server.url(database, schema="pipe") + "&pipeline=on")
    off = opened(postgres_server.url(database, schema="pipe") + "&pipeline=off")
    assert isinstance(on, PostgresMeta) and isinstance(off, PostgresMeta)
    assert on.pipeline_reads and on.pipeline_writes
    assert not off.pipeline_reads and not off.pipeline_writes
    d = off.mkdir(C, ROOT, b"d", 0o755)
    for i in range(10):
        (on if i % 2 else off).mknod(C, d.inode, b"f%d" % i, FileType.FILE, 0o644)
    for m in (on, off):
        assert len(m.readdir(C, d.inode)) == 10
        assert m.lookup(C, d.inode, b"f3").nlink == 1
        with pytest.raises(FSError):
            m.lookup(C, d.inode, b"missing")
        assert m.lookup(C, d.inode, b"..").inode == ROOT
    on.rename(C, d.inode, b"f1", ROOT, b"moved")
    assert off.lookup(C, ROOT, b"moved").type == FileType.FILE
