"""Provisioning against real servers: volumes made end to end on SQLite + files, Redis + S3
(SeaweedFS) and PostgreSQL + S3, used through their own restricted credentials, kept apart from
each other, and removed completely by ``destroy_volume``, or by a create that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import botocore.exceptions
import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from loftfs.chunk.datapath import DataPath
from loftfs.cli.common import meta_session
from loftfs.errors import ConfigError, LoftError
from loftfs.meta.postgres import parse_url as parse_pg_url
from loftfs.meta.redis import parse_url as parse_redis_url
from loftfs.meta.types import ROOT_CTX, ROOT_INODE
from loftfs.object import create_storage, open_volume_storage
from loftfs.plane.config import PlaneConfig, load_config
from loftfs.plane.provision import (
    Provisioner,
    VolumeSecrets,
    VolumeSpec,
    new_volume_id,
    scram_verifier,
)
from loftfs.vfs.options import MountOptions
from servers import S3_READER, PostgresServer, RedisServer, SeaweedServer

C = ROOT_CTX
BLOCK = 64 << 10
DATA_SIZE = 5 * BLOCK - 1000  # five block objects
OPTS = MountOptions(
    buffer_size=8 << 20,
    upload_threads=2,
    fetch_threads=2,
    readahead_blocks=0,
    gc_interval_s=0,
    cache_size=0,
    compact_threshold=0,
)


# --- helpers ---------------------------------------------------------------------------------


def make_config(
    tmp_path: Path,
    *,
    kind: str = "file",
    policy: str = "bucket",
    seaweed: SeaweedServer | None = None,
    reader: bool = False,
    redis_url: str = "",
    postgres_url: str = "",
    shared_bucket: str = "",
) -> PlaneConfig:
    overrides: dict[str, object] = {
        "state_dir": str(tmp_path / "plane"),
        "kind": kind,
        "policy": policy,
        "redis_url": redis_url or None,
        "postgres_url": postgres_url or None,
        "shared_bucket": shared_bucket or None,
    }
    if kind == "s3":
        assert seaweed is not None
        key, secret = S3_READER if reader else (seaweed.access_key, seaweed.secret_key)
        overrides |= {"endpoint": seaweed.endpoint, "access_key": key, "secret_key": secret}
    return load_config(None, overrides, environ={})


def spec(engine: str, name: str = "data") -> VolumeSpec:
    return VolumeSpec(new_volume_id(), name, engine, block_size=BLOCK)


def exercise(secrets: VolumeSecrets) -> bytes:
    """Use the volume as a mount does, through its own credentials: a session, directories,
    an xattr, a rename, and a file written and read back through the encrypted store."""
    data = os.urandom(DATA_SIZE)
    with meta_session(secrets.meta_url) as meta:
        settings = meta.load_settings()
        assert settings.encryption["secret"] == "key"
        assert "secret_key" not in settings.storage_options  # credentials stay in the plane
        meta.new_session({"host": "test"}, heartbeat_s=60)
        folder = meta.mkdir(C, ROOT_INODE, b"dir", 0o755).inode
        inode = meta.create(C, folder, b"file", 0o644, os.O_RDWR).inode
        meta.setxattr(C, inode, b"user.k", b"v")
        assert meta.getxattr(C, inode, b"user.k") == b"v"
        with pytest.MonkeyPatch.context() as env:
            # what a mount of the control plane does: the keys come with the mount config
            for name, var in (("access_key", "LOFT_ACCESS_KEY"), ("secret_key", "LOFT_SECRET_KEY")):
                if name in secrets.storage_options:
                    env.setenv(var, secrets.storage_options[name])
            store = open_volume_storage(settings, secrets.volume_secret())
            dp = DataPath(meta, store, settings, OPTS)
            try:
                dp.writer(inode).write(0, data)
                dp.flush(inode)
                size = meta.lookup(C, folder, b"file").size
                assert size == len(data)
                assert dp.read(inode, 0, len(data), size) == data
            finally:
                dp.close()
                store.close()
        meta.rename(C, folder, b"file", ROOT_INODE, b"moved")
        assert {e.name for e in meta.readdir(C, ROOT_INODE)} == {b"dir", b"moved"}
        meta.open(C, inode, os.O_RDONLY)
        meta.release(inode)
        assert meta.statfs(C).used_inodes == 3
    return data


def raw_objects(secrets: VolumeSecrets, uuid: str) -> dict[str, bytes]:
    """The volume's block objects as stored (no decryption)."""
    store = create_storage(secrets.storage, secrets.bucket, **secrets.storage_options)
    try:
        return {
            e.key: store.get(e.key) for e in store.list(prefix=f"{uuid}/chunks/") if not e.is_prefix
        }
    finally:
        store.close()


def check_created(prov: Provisioner, secrets: VolumeSecrets, uuid: str) -> None:
    """Format, data, encryption at rest, quotas and usage of a fresh volume."""
    data = exercise(secrets)
    objects = raw_objects(secrets, uuid)
    assert len(objects) == 5
    for stored in objects.values():
        assert stored[0] == 1  # the encrypted object format
        assert not any(data[i : i + 32] in stored for i in range(0, len(data), BLOCK))
    prov.set_quota(secrets, 10 << 30, 1000)
    with meta_session(secrets.meta_url) as meta:
        settings = meta.load_settings()
        assert (settings.capacity, settings.inodes, settings.uuid) == (10 << 30, 1000, uuid)
    usage = prov.usage(secrets)
    assert usage.inodes == 3
    assert usage.bytes >= DATA_SIZE
    assert usage.objects == 5
    with pytest.raises(ConfigError, match="capacity must be"):
        prov.set_quota(secrets, -1, 0)


def opens(url: str) -> bool:
    try:
        with meta_session(url) as meta:
            meta.load_settings()
    except LoftError:
        return False
    return True


def redis_admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, protocol=2)


def redis_client(meta_url: str) -> redis.Redis:
    c = parse_redis_url(meta_url)
    return redis.Redis(
        host=c.host,
        port=c.port,
        db=c.db,
        username=c.username,
        password=c.password,
        protocol=2,
        retry=Retry(NoBackoff(), 0),
    )


def s3_keys(seaweed: SeaweedServer, bucket: str, prefix: str = "") -> list[str]:
    page = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in page.get("Contents", [])]


def bucket_exists(seaweed: SeaweedServer, bucket: str) -> bool:
    try:
        seaweed.client().head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        return False
    return True


@pytest.fixture(scope="module")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url(postgres_server.new_database())


def pg_rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(parse_pg_url(url).conninfo, autocommit=True) as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description else []


# --- SQLite + file ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["bucket", "prefix"])
def test_sqlite_file_volumes(tmp_path: Path, policy: str) -> None:
    config = make_config(tmp_path, policy=policy)
    prov = Provisioner(config)
    prov.check()
    assert prov.engines() == ["sqlite"]
    a, uuid_a = prov.create_volume(spec("sqlite", "alpha"))
    b, uuid_b = prov.create_volume(spec("sqlite", "beta"))
    vid_a = a.admin["volume_id"]
    db_a = Path(config.server.volumes_dir) / f"{vid_a}.db"
    assert a.meta_url == f"sqlite3://{db_a}"
    root = Path(config.storage.root)
    if policy == "bucket":
        assert a.bucket == str(root / f"loft-{vid_a}")
    else:
        assert a.bucket == str(root / "loft-volumes" / vid_a)
    assert a.storage == "file" and a.storage_options == {}
    assert len(bytes.fromhex(a.data_key)) == 32 and a.data_key != b.data_key
    assert a.admin["uuid"] == uuid_a
    check_created(prov, a, uuid_a)
    exercise(b)
    # each volume's objects lie in its own directory only
    assert not any(Path(b.bucket).rglob(f"{uuid_a}*"))
    assert not any(Path(a.bucket).rglob(f"{uuid_b}*"))

    prov.destroy_volume(a)
    assert not db_a.exists() and not Path(a.bucket).exists()
    assert opens(b.meta_url) and prov.usage(b).objects == 5
    prov.destroy_volume(a)  # again: nothing left to do, no error
    prov.destroy_volume(b)
    assert sorted(os.listdir(config.server.volumes_dir)) == []


# --- Redis + S3, one bucket per volume -------------------------------------------------------


def test_redis_s3_volumes_are_isolated_and_destroyed(
    tmp_path: Path, redis_server: RedisServer, seaweed_server: SeaweedServer
) -> None:
    admin_url = redis_server.url(0) + "?read_timeout=20&prefix=ignored"
    config = make_config(tmp_path, kind="s3", seaweed=seaweed_server, redis_url=admin_url)
    prov = Provisioner(config)
    prov.check()
    a, uuid_a = prov.create_volume(spec("redis", "alpha"))
    b, _ = prov.create_volume(spec("redis", "beta"))
    vid_a, vid_b = a.admin["volume_id"], b.admin["volume_id"]
    assert a.bucket == f"s3://loft-{vid_a}"
    assert a.storage_options["endpoint"] == seaweed_server.endpoint
    parsed = parse_redis_url(a.meta_url)
    assert (parsed.username, parsed.db, parsed.prefix) == (f"loft-{vid_a}", 0, vid_a)
    assert parsed.read_timeout == 20  # the administrator's options are kept
    assert parsed.password and parsed.password not in admin_url
    assert a.admin["redis_user"] == f"loft-{vid_a}"
    assert bucket_exists(seaweed_server, f"loft-{vid_a}")
    check_created(prov, a, uuid_a)

    user_a = redis_client(a.meta_url)
    try:
        assert user_a.hgetall(f"{vid_a}:setting")
        denied: list[tuple[str, ...]] = [
            ("HGETALL", f"{vid_b}:setting"),
            ("SET", f"{vid_b}:x", "1"),
            ("DEL", f"{vid_b}:setting"),
            ("SCAN", "0"),
            ("KEYS", "*"),
            ("RANDOMKEY",),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("SELECT", "1"),
            ("CONFIG", "GET", "maxmemory"),
            ("ACL", "SETUSER", f"loft-{vid_a}", "~*"),
            ("SUBSCRIBE", "news"),
        ]
        for command in denied:
            with pytest.raises(redis.exceptions.NoPermissionError):
                user_a.execute_command(*command)
    finally:
        user_a.close()

    user_a = redis_client(a.meta_url)
    assert user_a.ping()
    prov.destroy_volume(a)
    with pytest.raises(redis.exceptions.RedisError):  # cut off, and may not come back
        user_a.ping()
    user_a.close()
    admin = redis_admin(redis_server)
    try:
        assert not list(admin.scan_iter(match=f"{vid_a}:*"))
        assert list(admin.scan_iter(match=f"{vid_b}:*"))
        assert admin.execute_command("ACL", "GETUSER", f"loft-{vid_a}") is None
    finally:
        admin.close()
    assert not bucket_exists(seaweed_server, f"loft-{vid_a}")
    assert not opens(a.meta_url)  # its credentials are gone too
    assert opens(b.meta_url)
    prov.destroy_volume(a)
    prov.destroy_volume(b)
    assert not bucket_exists(seaweed_server, f"loft-{vid_b}")


def test_redis_volume_in_another_database(tmp_path: Path, redis_server: RedisServer) -> None:
    """An administrator URL naming database 5: the volume's user may SELECT it, and its keys
    land there."""
    prov = Provisioner(make_config(tmp_path, redis_url=redis_server.url(5)))
    secrets, _ = prov.create_volume(spec("redis"))
    vid = secrets.admin["volume_id"]
    assert parse_redis_url(secrets.meta_url).db == 5
    exercise(secrets)
    in_db5 = redis.Redis(host="127.0.0.1", port=redis_server.port, db=5, protocol=2)
    try:
        assert in_db5.exists(f"{vid}:setting")
        prov.destroy_volume(secrets)
        assert not list(in_db5.scan_iter(match=f"{vid}:*"))
    finally:
        in_db5.close()


# --- PostgreSQL + S3, prefixes of one shared bucket ------------------------------------------


def test_postgres_s3_prefix_volumes_are_isolated_and_destroyed(
    tmp_path: Path, postgres_url: str, seaweed_server: SeaweedServer
) -> None:
    shared = seaweed_server.new_bucket()
    config = make_config(
        tmp_path,
        kind="s3",
        policy="prefix",
        seaweed=seaweed_server,
        postgres_url=postgres_url + "?connect_timeout=7&schema=public",
        shared_bucket=shared,
    )
    prov = Provisioner(config)
    prov.check()
    a, uuid_a = prov.create_volume(spec("postgres", "alpha"))
    b, uuid_b = prov.create_volume(spec("postgres", "beta"))
    vid_a, vid_b = a.admin["volume_id"], b.admin["volume_id"]
    role_a, role_b = f"loft_{vid_a}", f"loft_{vid_b}"
    assert a.bucket == f"s3://{shared}/{vid_a}"
    parsed = parse_pg_url(a.meta_url)
    assert parsed.schema == role_a
    assert parsed.connect_timeout == 7  # the administrator's options are kept
    assert a.meta_url.startswith(f"postgres://{role_a}:")
    assert PostgresServer.password not in a.meta_url
    check_created(prov, a, uuid_a)
    exercise(b)
    assert all(k.startswith(f"{vid_a}/{uuid_a}/") for k in s3_keys(seaweed_server, shared, vid_a))
    assert all(k.startswith(f"{vid_b}/{uuid_b}/") for k in s3_keys(seaweed_server, shared, vid_b))

    table = pg_rows(
        postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = %s LIMIT 1", role_b
    )[0][0]
    with psycopg.connect(parse_pg_url(a.meta_url).conninfo, autocommit=True) as conn:
        conn.execute(f"SELECT count(*) FROM {role_a}.{table}")  # its own: fine
        for statement in (
            f"SELECT * FROM {role_b}.{table}",
            f"DROP TABLE {role_b}.{table}",
            "CREATE TABLE public.intruder (i int)",
            "CREATE SCHEMA intruder",
            f"CREATE ROLE {role_a}_x",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)

    session = psycopg.connect(parse_pg_url(a.meta_url).conninfo, autocommit=True)
    prov.destroy_volume(a)  # a session of the role does not keep it alive
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert not pg_rows(postgres_url, "SELECT 1 FROM pg_namespace WHERE nspname = %s", role_a)
    assert not pg_rows(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = %s", role_a)
    assert not s3_keys(seaweed_server, shared, f"{vid_a}/")
    assert len(s3_keys(seaweed_server, shared, f"{vid_b}/")) == 6  # five blocks, the marker
    assert not opens(a.meta_url)
    assert opens(b.meta_url)
    prov.destroy_volume(a)
    prov.destroy_volume(b)
    assert not pg_rows(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = %s", role_b)
    assert bucket_exists(seaweed_server, shared)  # the shared bucket stays


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "redis", "postgres"])
def test_create_failing_at_format_leaves_nothing(
    tmp_path: Path,
    engine: str,
    redis_server: RedisServer,
    postgres_url: str,
    seaweed_server: SeaweedServer,
) -> None:
    """Credentials that may list the shared bucket but not write to it: the storage step
    passes, the namespace and its credentials are made, the format's probe fails; then
    everything made is removed and the error shows no secret."""
    shared = seaweed_server.new_bucket()
    seaweed_server.client().create_bucket(Bucket=shared)
    config = make_config(
        tmp_path,
        kind="s3",
        policy="prefix",
        seaweed=seaweed_server,
        reader=True,
        redis_url=redis_server.url(0),
        postgres_url=postgres_url,
        shared_bucket=shared,
    )
    prov = Provisioner(config)
    request = spec(engine)
    vid = request.volume_id
    with pytest.raises(LoftError) as info:
        prov.create_volume(request)
    message = str(info.value)
    assert message.startswith(f"volume {vid} was not created: storage ")
    assert "permission denied" in message.lower()
    assert S3_READER[1] not in message and PostgresServer.password not in message
    admin = redis_admin(redis_server)
    try:
        assert admin.execute_command("ACL", "GETUSER", f"loft-{vid}") is None
        assert not list(admin.scan_iter(match=f"{vid}:*"))
    finally:
        admin.close()
    assert not pg_rows(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = %s", f"loft_{vid}")
    assert not pg_rows(postgres_url, "SELECT 1 FROM pg_namespace WHERE nspname = %s", f"loft_{vid}")
    volumes = Path(config.server.volumes_dir)
    assert not volumes.exists() or not any(volumes.iterdir())
    assert not s3_keys(seaweed_server, shared)


def test_bad_requests_create_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    prov = Provisioner(config)
    bad = [
        (VolumeSpec("vol1", "data", "sqlite"), "invalid volume id"),
        (VolumeSpec(new_volume_id(), "Bad_Name", "sqlite"), "invalid volume name"),
        (VolumeSpec(new_volume_id(), "data", "redis"), "engine 'redis' is not available"),
        (VolumeSpec(new_volume_id(), "data", "sqlite", block_size=3000), "invalid block size"),
        (VolumeSpec(new_volume_id(), "data", "sqlite", compress="gzip"), "unknown compression"),
        (VolumeSpec(new_volume_id(), "data", "sqlite", capacity=-1), "capacity must be"),
    ]
    for request, expected in bad:
        with pytest.raises(ConfigError, match=expected):
            prov.create_volume(request)
    assert not Path(config.storage.root).exists()
    assert not Path(config.server.volumes_dir).exists()


def test_check_names_what_is_unusable(
    tmp_path: Path,
    redis_server: RedisServer,
    postgres_url: str,
    postgres_server: PostgresServer,
    seaweed_server: SeaweedServer,
) -> None:
    Provisioner(
        make_config(tmp_path, redis_url=redis_server.url(0), postgres_url=postgres_url)
    ).check()
    prov = Provisioner(make_config(tmp_path, redis_url="redis://127.0.0.1:1/0"))
    with pytest.raises(ConfigError, match=r"metadata.redis_url: Redis at 127.0.0.1:1/0"):
        prov.check()
    # administrators without the rights provisioning needs
    admin = redis_admin(redis_server)
    admin.execute_command("ACL", "SETUSER", "lowly", "on", ">lowly-pw", "~*", "+@all", "-@admin")
    try:
        url = f"redis://lowly:lowly-pw@127.0.0.1:{redis_server.port}/0"
        with pytest.raises(ConfigError, match="may not manage ACL users"):
            Provisioner(make_config(tmp_path, redis_url=url)).check()
    finally:
        admin.execute_command("ACL", "DELUSER", "lowly")
        admin.close()
    pg_rows(postgres_url, "CREATE ROLE lowly LOGIN PASSWORD 'lowly-pw'")
    try:
        db = postgres_url.rsplit("/", 1)[1]
        url = f"postgres://lowly:lowly-pw@127.0.0.1:{postgres_server.port}/{db}"
        with pytest.raises(ConfigError, match="may not create roles"):
            Provisioner(make_config(tmp_path, postgres_url=url)).check()
    finally:
        pg_rows(postgres_url, "DROP ROLE lowly")
    wrong = load_config(
        None,
        {
            "state_dir": str(tmp_path / "plane"),
            "kind": "s3",
            "endpoint": seaweed_server.endpoint,
            "access_key": seaweed_server.access_key,
            "secret_key": "not-the-secret",
        },
        environ={},
    )
    with pytest.raises(ConfigError, match=r"storage http://127\.0\.0\.1:\d+ is not usable") as info:
        Provisioner(wrong).check()
    assert "not-the-secret" not in str(info.value)


# --- secrets ---------------------------------------------------------------------------------


def test_volume_secrets_round_trip_and_stay_out_of_reprs() -> None:
    secrets = VolumeSecrets(
        meta_url="redis://loft-v1:pw-123@h:6379/0?prefix=v1",
        storage="s3",
        bucket="s3://b/v1",
        storage_options={"endpoint": "http://h:9000", "secret_key": "sk-456"},
        data_key="ab" * 32,
        admin={"volume_id": "v1", "engine": "redis", "redis_user": "loft-v1"},
    )
    assert VolumeSecrets.from_json(secrets.to_json()) == secrets
    assert secrets.volume_secret().value == bytes.fromhex("ab" * 32)
    shown = repr(secrets)
    assert "pw-123" not in shown and "sk-456" not in shown and "abab" not in shown
    with pytest.raises(ConfigError, match="malformed volume secrets"):
        VolumeSecrets.from_json('{"meta_url": "x"}')
    with pytest.raises(ConfigError, match="malformed volume secrets"):
        VolumeSecrets.from_json("[]")


def test_scram_verifier_shape() -> None:
    verifier = scram_verifier("secret")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert "secret" not in verifier
    assert verifier != scram_verifier("secret")  # a fresh salt each time
