"""Provisioning: everything a tenant's volume needs outside the plane's own database.

``Provisioner.create_volume`` makes, in this order, the volume's storage (a bucket of its own,
or a key prefix of the shared bucket: ``[storage] policy``), its metadata namespace with
credentials that reach nothing else, a fresh encryption key, and then formats the volume
through those restricted credentials (``loft format``'s checks and writes, via
``format_volume``): a volume that formats is a volume its mounts can use. Whatever fails, what
was made so far is removed again, newest first, so a failed create leaves nothing behind.

Isolation, per engine (the volume id ``v`` + 16 hex digits names every piece):

- SQLite: a database file of its own, ``<state_dir>/volumes/<volume id>.db``.
- Redis: keys under ``<volume id>:`` and an ACL user ``loft-<volume id>`` (random password)
  allowed those keys only, without dangerous and administrative commands and without any
  command that names keys it was not given (``SCAN``, ``KEYS``, ``RANDOMKEY``) or that reaches
  server-wide state (functions, script kill/flush, pub/sub channels).
- PostgreSQL: a role ``loft_<volume id>`` (LOGIN, random password, sent to the server as a
  SCRAM verifier only) owning the schema of the same name, with ``CONNECT`` on the database and
  no other privilege. Other volumes' schemas belong to their own roles and are closed to it;
  the ``public`` schema is as the server's defaults leave it (PostgreSQL 15 and later: no
  ``CREATE`` for others).
- Storage: a bucket per volume, or the prefix ``<volume id>/`` of the shared bucket; the data
  is encrypted (AES-256-GCM) under a data key that the volume's 32-byte key wraps.

``destroy_volume`` removes the same pieces (objects, metadata, credentials, bucket), each step
tolerating that it was done before, so it can run again after a failure and after a create that
failed half way. Passwords and keys never appear in an exception message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from secrets import token_hex, token_urlsafe
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from loftfs.cli.common import meta_session
from loftfs.errors import ConfigError, FSError, LoftError, ObjectNotFound
from loftfs.object import create_storage, marker_key
from loftfs.object.encrypt import KEY_SIZE, VolumeSecret
from loftfs.plane.config import PlaneConfig

if TYPE_CHECKING:
    import redis
    from botocore.client import BaseClient

    from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)

VOLUME_ID_RE = re.compile(r"^v[0-9a-f]{16}$")
REDIS_USER_PREFIX = "loft-"
PG_ROLE_PREFIX = "loft_"
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default for SCRAM-SHA-256 verifiers
_DELETE_BATCH = 1000
# Redis: what a volume's user may not run, beyond its key pattern. -@dangerous and -@admin take
# KEYS, FLUSHALL, SWAPDB, CONFIG, DEBUG, MONITOR, CLIENT KILL...; the rest either reveal other
# volumes' key names (SCAN, RANDOMKEY) or change state shared by the whole server.
_REDIS_DENIED = (
    "-@dangerous",
    "-@admin",
    "-scan",
    "-keys",
    "-randomkey",
    "-dbsize",
    "-swapdb",
    "-flushdb",
    "-flushall",
    "-function",
    "-script|flush",
    "-script|kill",
)


def new_volume_id() -> str:
    """A fresh volume id: ``v`` + 16 random hex digits (a bucket suffix, a Redis prefix and a
    PostgreSQL identifier alike)."""
    return "v" + token_hex(8)


@dataclass
class VolumeSpec:
    """What the plane asks for: the volume id it chose, the tenant's name for the volume
    (``loft format``'s name rules) and the format parameters."""

    volume_id: str
    name: str
    engine: str  # sqlite | redis | postgres
    block_size: int = 4 << 20
    compress: str = "none"
    capacity: int = 0  # bytes, 0: unlimited
    inodes: int = 0
    trash_days: int = 0


@dataclass
class VolumeSecrets:
    """Everything a mount of the volume needs, and what ``destroy_volume`` needs besides: the
    plane keeps it sealed by its master key and hands parts out only as a mount config."""

    meta_url: str  # with the volume's own credentials (Redis ACL user, PostgreSQL role)
    storage: str  # file | s3
    bucket: str  # a directory, or s3://bucket[/prefix]
    storage_options: dict[str, str] = field(default_factory=dict)  # endpoint, region, keys
    # 64 hex digits: the volume's key (its key-file secret, which wraps the data key)
    data_key: str = field(default="", repr=False)
    admin: dict[str, str] = field(default_factory=dict)  # volume id, uuid, user/role names

    def __repr__(self) -> str:  # the URL and the options hold passwords
        return f"VolumeSecrets(volume={self.admin.get('volume_id', '?')}, storage={self.storage})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VolumeSecrets:
        """The inverse of ``to_json``; ``ConfigError`` for anything else."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            out = cls(
                meta_url=str(data["meta_url"]),
                storage=str(data["storage"]),
                bucket=str(data["bucket"]),
                storage_options={str(k): str(v) for k, v in data["storage_options"].items()},
                data_key=str(data["data_key"]),
                admin={str(k): str(v) for k, v in data["admin"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"malformed volume secrets ({type(e).__name__})") from None
        return out

    def volume_secret(self) -> VolumeSecret:
        """The key that unlocks the volume's data (``open_volume_storage``'s ``secret``)."""
        try:
            key = bytes.fromhex(self.data_key)
        except ValueError:
            key = b""
        if len(key) != KEY_SIZE:
            raise ConfigError("the volume's data key is not 64 hex digits")
        return VolumeSecret("key", key, "the control plane")


@dataclass
class Usage:
    """What a volume uses: bytes and inodes (its quotas' units) and data objects."""

    bytes: int
    inodes: int
    objects: int


@dataclass
class _Storage:
    """Where one volume's objects go, and what of it belongs to the volume alone."""

    kind: str  # file | s3
    bucket: str  # what the volume's settings name: a directory or s3://bucket[/prefix]
    options: dict[str, str]  # to open the store (with credentials)
    stored: dict[str, str]  # kept in the volume's settings (no credentials)
    own_bucket: str  # s3: a bucket made for this volume alone ("" under the prefix policy)


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677): handing
    the server this instead of the password keeps the password out of its statement logs."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _scrub(text: str, hidden: list[str]) -> str:
    """One line without any of the ``hidden`` values."""
    line = " ".join(str(text).split())
    for value in hidden:
        if value:
            line = line.replace(value, "****")
    return line


def _failure(action: str, e: BaseException, hidden: list[str]) -> LoftError:
    """``e`` as a ``LoftError`` of one line saying what failed, without secrets; loftfs's own
    error types are kept (callers branch on them), others become ``LoftError``."""
    detail = _scrub(str(e) or type(e).__name__, hidden)
    if isinstance(e, LoftError) and not isinstance(e, FSError):
        kind = type(e)
        if kind.__module__ == "loftfs.errors":
            return kind(f"{action}: {detail}")
    return LoftError(f"{action}: {type(e).__name__}: {detail}")


class Provisioner:
    """Creates, sizes, measures and destroys the volumes of a control plane (see the module
    docstring). Stateless apart from the configuration: safe to share between threads."""

    def __init__(self, config: PlaneConfig) -> None:
        self.config = config

    def engines(self) -> list[str]:
        return self.config.engines()

    # --- startup check -----------------------------------------------------------------------

    def check(self) -> None:
        """That the storage and every configured engine answer with the rights provisioning
        needs; ``ConfigError`` naming the first that does not."""
        os.makedirs(self.config.server.volumes_dir, mode=0o700, exist_ok=True)
        self._check_storage()
        if self.config.metadata.redis_url:
            self._check_redis()
        if self.config.metadata.postgres_url:
            self._check_postgres()

    def _check_storage(self) -> None:
        from loftfs.cli.format import check_storage

        cfg = self.config.storage
        if cfg.kind == "s3" and cfg.policy == "bucket":
            try:
                self._s3_client(self._storage_options()).list_buckets()
            except Exception as e:
                raise ConfigError(
                    f"storage {cfg.endpoint or 'AWS S3'} is not usable: "
                    f"{_scrub(str(e), [cfg.secret_key])}"
                ) from None
            return
        if cfg.kind == "file":
            where = (
                cfg.root if cfg.policy == "bucket" else os.path.join(cfg.root, cfg.shared_bucket)
            )
        else:
            where = f"s3://{cfg.shared_bucket}"
        store = create_storage(cfg.kind, where, **self._storage_options())
        try:
            check_storage(store)  # creates the root or the shared bucket when missing
        finally:
            store.close()

    def _check_redis(self) -> None:
        from redis.exceptions import NoPermissionError

        where = self._redis_where()
        try:
            with self._redis_admin() as client:
                client.ping()
                client.execute_command("ACL", "USERS")
        except NoPermissionError:
            raise ConfigError(
                f"metadata.redis_url: the user of Redis at {where} may not manage ACL users "
                "(it needs +@admin)"
            ) from None
        except Exception as e:
            detail = _scrub(str(e), self._admin_secrets())
            raise ConfigError(
                f"metadata.redis_url: Redis at {where} is not usable: {detail}"
            ) from None

    def _check_postgres(self) -> None:
        try:
            with self._pg_admin() as conn:
                row = conn.execute(
                    "SELECT rolsuper OR rolcreaterole FROM pg_catalog.pg_roles "
                    "WHERE rolname = current_user"
                ).fetchone()
        except Exception as e:
            raise ConfigError(
                f"metadata.postgres_url: PostgreSQL at {self._pg_where()} is not usable: "
                f"{_scrub(str(e), self._admin_secrets())}"
            ) from None
        if not row or not row[0]:
            raise ConfigError(
                f"metadata.postgres_url: the user of PostgreSQL at {self._pg_where()} may not "
                "create roles (it needs CREATEROLE, or to be a superuser)"
            )

    # --- create ------------------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> tuple[VolumeSecrets, str]:
        """Provision and format the volume ``spec`` describes; returns its secrets and its
        uuid. On any failure everything made so far is removed and the error (a ``LoftError``
        of one line, without secrets) says what failed."""
        from loftfs.cli.format import format_volume

        self._check_spec(spec)
        vid = spec.volume_id
        undo: list[Callable[[], None]] = []
        hidden = self._admin_secrets()
        try:
            storage = self._storage_for(vid)
            self._make_storage(vid, storage, undo)
            meta_url, admin = self._make_namespace(spec.engine, vid, undo, hidden)
            key = os.urandom(KEY_SIZE)
            hidden.append(key.hex())
            secrets_ = VolumeSecrets(
                meta_url=meta_url,
                storage=storage.kind,
                bucket=storage.bucket,
                storage_options=dict(storage.options),
                data_key=key.hex(),
                admin={"volume_id": vid, "engine": spec.engine, **admin},
            )
            if storage.own_bucket:
                secrets_.admin["own_bucket"] = storage.own_bucket
            settings = format_volume(
                meta_url,
                spec.name,
                storage=storage.kind,
                bucket=storage.bucket,
                storage_options=storage.options,
                stored_options=storage.stored,
                secret=secrets_.volume_secret(),
                block_size=spec.block_size,
                compress=spec.compress,
                capacity=spec.capacity,
                inodes=spec.inodes,
                trash_days=spec.trash_days,
            )
            secrets_.admin["uuid"] = settings.uuid
        except BaseException as e:
            self._undo(vid, undo, hidden)
            if isinstance(e, Exception):
                raise _failure(f"volume {vid} was not created", e, hidden) from None
            raise
        return secrets_, settings.uuid

    def _check_spec(self, spec: VolumeSpec) -> None:
        """Refuse bad input before anything is made (``format_volume`` checks it again)."""
        from loftfs.cli.common import non_negative
        from loftfs.cli.format import validate_block_size, validate_compress, validate_name

        if not VOLUME_ID_RE.match(spec.volume_id):
            raise ConfigError(
                f"invalid volume id {spec.volume_id!r}: expected 'v' and 16 hex digits"
            )
        validate_name(spec.name)
        if spec.engine not in self.engines():
            raise ConfigError(
                f"metadata engine {spec.engine!r} is not available (available: "
                f"{', '.join(self.engines())})"
            )
        validate_block_size(spec.block_size)
        validate_compress(spec.compress)
        non_negative(spec.capacity, "capacity")
        non_negative(spec.inodes, "inodes")
        non_negative(spec.trash_days, "trash_days")

    def _undo(self, vid: str, steps: list[Callable[[], None]], hidden: list[str]) -> None:
        for step in reversed(steps):
            try:
                step()
            except Exception as e:
                log.warning(
                    "removing what was made for volume %s failed: %s", vid, _scrub(str(e), hidden)
                )

    # --- storage -----------------------------------------------------------------------------

    def _storage_options(self) -> dict[str, str]:
        cfg = self.config.storage
        if cfg.kind != "s3":
            return {}
        given = {
            "endpoint": cfg.endpoint,
            "region": cfg.region,
            "access_key": cfg.access_key,
            "secret_key": cfg.secret_key,
        }
        return {k: v for k, v in given.items() if v}

    def _storage_for(self, vid: str) -> _Storage:
        cfg = self.config.storage
        options = self._storage_options()
        stored = {k: v for k, v in options.items() if k in ("endpoint", "region")}
        if cfg.kind == "file":
            if cfg.policy == "bucket":
                path = os.path.join(cfg.root, cfg.bucket_prefix + vid)
            else:
                path = os.path.join(cfg.root, cfg.shared_bucket, vid)
            return _Storage("file", path, options, stored, "")
        if cfg.policy == "bucket":
            name = cfg.bucket_prefix + vid
            return _Storage("s3", f"s3://{name}", options, stored, name)
        return _Storage("s3", f"s3://{cfg.shared_bucket}/{vid}", options, stored, "")

    def _make_storage(self, vid: str, storage: _Storage, undo: list[Callable[[], None]]) -> None:
        """Claim the volume's directory, bucket or prefix: it must be new, since destroying the
        volume deletes everything in it."""
        if storage.kind == "file":
            if os.path.lexists(storage.bucket):
                raise ConfigError(f"storage directory {storage.bucket} exists already")
            os.makedirs(os.path.dirname(storage.bucket), exist_ok=True)
            os.mkdir(storage.bucket)
            undo.append(lambda: shutil.rmtree(storage.bucket, ignore_errors=True))
            return
        store = create_storage("s3", storage.bucket, **storage.options)
        try:
            if storage.own_bucket:
                with contextlib.suppress(ObjectNotFound):
                    if next(iter(store.list(limit=1)), None) is not None:
                        raise ConfigError(f"bucket {storage.own_bucket} exists and is not empty")
                store.create()
                undo.append(lambda: self._drop_storage(storage))
            else:
                store.create()  # the shared bucket, once
                if next(iter(store.list(limit=1)), None) is not None:
                    raise ConfigError(f"prefix {storage.bucket} holds objects already")
                undo.append(lambda: self._drop_storage(storage))
        finally:
            store.close()

    def _drop_storage(self, storage: _Storage) -> None:
        """The volume's objects, then its bucket when it had one of its own."""
        self._delete_objects(storage)
        if storage.own_bucket:
            self._delete_bucket(storage)

    def _delete_objects(self, storage: _Storage) -> int:
        """Delete every object in the volume's own bucket or prefix (only the volume's data is
        there); a bucket that is gone already holds none."""
        if storage.kind == "file":
            if os.path.isdir(storage.bucket):
                shutil.rmtree(storage.bucket)
            return 0
        store = create_storage("s3", storage.bucket, **storage.options)
        deleted = 0
        try:
            batch: list[str] = []
            for entry in store.list():
                if entry.is_prefix:
                    continue
                batch.append(entry.key)
                if len(batch) >= _DELETE_BATCH:
                    store.delete_many(batch)
                    deleted += len(batch)
                    batch = []
            if batch:
                store.delete_many(batch)
                deleted += len(batch)
        except ObjectNotFound:
            pass  # no bucket: no objects
        finally:
            store.close()
        return deleted

    @staticmethod
    def _s3_client(options: dict[str, str]) -> BaseClient:
        """A boto3 client for what the store interface does not do (list and delete buckets),
        with the same endpoint, region and keys as the volume's store."""
        import boto3
        from botocore.config import Config

        endpoint = options.get("endpoint", "")
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=options.get("region") or "us-east-1",
            aws_access_key_id=options.get("access_key") or None,
            aws_secret_access_key=options.get("secret_key") or None,
            config=Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint else {},
            ),
        )

    def _delete_bucket(self, storage: _Storage) -> None:
        import botocore.exceptions as bexc

        client = self._s3_client(storage.options)
        try:
            client.delete_bucket(Bucket=storage.own_bucket)
        except bexc.ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) != "NoSuchBucket":
                raise
        finally:
            client.close()

    # --- metadata namespaces -----------------------------------------------------------------

    def _make_namespace(
        self, engine: str, vid: str, undo: list[Callable[[], None]], hidden: list[str]
    ) -> tuple[str, dict[str, str]]:
        """The metadata URL of the volume (with its own credentials) and the names destroy
        needs."""
        if engine == "sqlite":
            return self._make_sqlite(vid, undo)
        password = token_urlsafe(24)
        hidden.append(password)
        if engine == "redis":
            return self._make_redis(vid, password, undo)
        return self._make_postgres(vid, password, undo)

    def _sqlite_path(self, vid: str) -> str:
        return os.path.join(self.config.server.volumes_dir, f"{vid}.db")

    def _make_sqlite(self, vid: str, undo: list[Callable[[], None]]) -> tuple[str, dict[str, str]]:
        path = self._sqlite_path(vid)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            raise ConfigError(f"metadata file {path} exists already")
        undo.append(lambda: _remove_sqlite(path))
        return f"sqlite3://{quote(path)}", {"sqlite_path": path}

    # Redis

    def _redis_where(self) -> str:
        from loftfs.meta.redis import parse_url

        return parse_url(self.config.metadata.redis_url).server

    @contextlib.contextmanager
    def _redis_admin(self) -> Iterator[redis.Redis]:
        import redis as redis_lib
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        from loftfs.meta.redis import parse_url

        c = parse_url(self.config.metadata.redis_url)
        client = redis_lib.Redis(
            host=c.host,
            port=c.port,
            db=c.db,
            username=c.username,
            password=c.password,
            socket_connect_timeout=c.connect_timeout,
            socket_timeout=c.read_timeout,
            ssl=c.tls,
            protocol=2,
            # a blip is retried, an absent server is reported at once (not after seconds)
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            **c.tls_options,
        )
        try:
            yield client
        finally:
            client.close()

    def _make_redis(
        self, vid: str, password: str, undo: list[Callable[[], None]]
    ) -> tuple[str, dict[str, str]]:
        from loftfs.meta.redis import parse_url

        admin_url = self.config.metadata.redis_url
        c = parse_url(admin_url)
        user = REDIS_USER_PREFIX + vid
        rules = ["reset", "on", f">{password}", f"~{vid}:*", "resetchannels", "+@all"]
        rules += _REDIS_DENIED
        if c.db == 0:
            rules.append("-select")  # a connection to another database must SELECT it
        with self._redis_admin() as client:
            if client.execute_command("ACL", "GETUSER", user) is not None:
                raise ConfigError(f"Redis ACL user {user} exists already")
            undo.append(lambda: self._drop_redis(vid, user))
            client.execute_command("ACL", "SETUSER", user, *rules)
        query = [(k, v) for k, v in parse_qsl(urlsplit(admin_url).query) if k != "prefix"]
        query.append(("prefix", vid))
        host = f"[{c.host}]" if ":" in c.host else c.host
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}:{c.port}"
        scheme = "rediss" if c.tls else "redis"
        url = urlunsplit((scheme, netloc, f"/{c.db}", urlencode(query), ""))
        return url, {"redis_user": user, "redis_prefix": vid}

    def _drop_redis(self, prefix: str, user: str) -> None:
        """Delete the volume's keys (``SCAN MATCH <prefix>:*``, ``UNLINK``), then its user."""
        if not VOLUME_ID_RE.match(prefix) or user != REDIS_USER_PREFIX + prefix:
            raise LoftError(f"refusing to drop Redis prefix {prefix!r} / user {user!r}")
        with self._redis_admin() as client:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}:*", count=_DELETE_BATCH):
                batch.append(key)
                if len(batch) >= _DELETE_BATCH:
                    client.unlink(*batch)
                    batch = []
            if batch:
                client.unlink(*batch)
            client.execute_command("ACL", "DELUSER", user)  # also ends its connections

    # PostgreSQL

    def _pg_where(self) -> str:
        from loftfs.meta.postgres import parse_url

        return parse_url(self.config.metadata.postgres_url).where

    @contextlib.contextmanager
    def _pg_admin(self) -> Iterator[Any]:
        import psycopg

        from loftfs.meta.postgres import parse_url

        conn = psycopg.connect(
            parse_url(self.config.metadata.postgres_url).conninfo, autocommit=True
        )
        try:
            yield conn
        finally:
            conn.close()

    def _make_postgres(
        self, vid: str, password: str, undo: list[Callable[[], None]]
    ) -> tuple[str, dict[str, str]]:
        from psycopg import sql

        role = PG_ROLE_PREFIX + vid
        with self._pg_admin() as conn:
            database = conn.info.dbname
            exists = conn.execute(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)
            ).fetchone()
            if exists:
                raise ConfigError(f"PostgreSQL role {role} exists already")
            undo.append(lambda: self._drop_postgres(role))
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(scram_verifier(password))
                )
            )
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(database), sql.Identifier(role)
                )
            )
            conn.execute(
                sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                    sql.Identifier(role), sql.Identifier(role)
                )
            )
        rest = self.config.metadata.postgres_url.partition("://")[2]
        base, _, query = rest.partition("?")
        authority, _, path = base.partition("/")
        host = authority.rsplit("@", 1)[-1]
        params = [
            (k, v)
            for k, v in parse_qsl(query, keep_blank_values=True)
            if k not in ("schema", "user", "password")
        ]
        params.append(("schema", role))
        userinfo = f"{quote(role, safe='')}:{quote(password, safe='')}"
        url = f"postgres://{userinfo}@{host}/{path}?{urlencode(params)}"
        return url, {"pg_role": role, "pg_schema": role}

    def _drop_postgres(self, role: str) -> None:
        """Drop the volume's schema with everything in it, end the role's sessions, revoke
        what it was granted and drop it."""
        from psycopg import sql

        if not role.startswith(PG_ROLE_PREFIX) or not VOLUME_ID_RE.match(
            role[len(PG_ROLE_PREFIX) :]
        ):
            raise LoftError(f"refusing to drop PostgreSQL role {role!r}")
        with self._pg_admin() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(role)))
            if not conn.execute(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)
            ).fetchone():
                return
            try:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                    "WHERE usename = %s",
                    (role,),
                )
            except Exception as e:  # without the right to: its sessions end on their own
                log.warning("could not end the sessions of role %s: %s", role, _scrub(str(e), []))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    def _admin_secrets(self) -> list[str]:
        """Values no message may show: the administrators' passwords and the S3 secret."""
        hidden = [self.config.storage.secret_key]
        redis_url = self.config.metadata.redis_url
        if redis_url:
            with contextlib.suppress(ConfigError):
                from loftfs.meta.redis import parse_url as parse_redis

                hidden.append(parse_redis(redis_url).password or "")
        if self.config.metadata.postgres_url:
            with contextlib.suppress(ConfigError):
                from loftfs.meta.postgres import parse_url as parse_pg

                hidden.append(parse_pg(self.config.metadata.postgres_url).password)
        return [h for h in hidden if h]

    # --- quotas and usage --------------------------------------------------------------------

    def set_quota(self, secrets: VolumeSecrets, capacity: int, inodes: int) -> None:
        """Set the volume's space (bytes) and inode quotas, 0 for none. Mounts trust their
        copy of the settings for a few seconds (``SETTINGS_TTL_S``), then enforce the new
        quotas."""
        for value, name in ((capacity, "capacity"), (inodes, "inodes")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer of 0 or more, not {value!r}")
        hidden = [secrets.data_key, *_url_secrets(secrets)]
        try:
            with meta_session(secrets.meta_url) as meta:
                settings = meta.load_settings()
                settings.capacity = capacity
                settings.inodes = inodes
                meta.update_settings(settings)
        except Exception as e:
            raise _failure("setting the quota failed", e, hidden) from None

    def usage(self, secrets: VolumeSecrets) -> Usage:
        """Bytes and inodes in use (the metadata's counters, exact and cheap) and the number of
        data objects in the store. Counting objects lists every object of the volume (one
        request per 1000 objects on S3): call it at the usage interval, not per request."""
        hidden = [secrets.data_key, *_url_secrets(secrets)]
        try:
            with meta_session(secrets.meta_url) as meta:
                uuid = meta.load_settings().uuid
                used, inodes = meta.usage()
            store = create_storage(secrets.storage, secrets.bucket, **secrets.storage_options)
            try:
                objects = _count_objects(store, uuid)
            finally:
                store.close()
        except Exception as e:
            raise _failure("measuring the usage failed", e, hidden) from None
        return Usage(bytes=used, inodes=inodes, objects=objects)

    # --- destroy -----------------------------------------------------------------------------

    def leftovers(self, volume_id: str, engine: str) -> VolumeSecrets:
        """What ``destroy_volume`` needs to remove the pieces of a creation that never finished
        (its control plane died half way, before it stored the secrets): every piece is named
        by the volume id, so none of its passwords are needed to find and remove it."""
        storage = self._storage_for(volume_id)
        admin = {"volume_id": volume_id, "engine": engine}
        if storage.own_bucket:
            admin["own_bucket"] = storage.own_bucket
        return VolumeSecrets(
            meta_url="",
            storage=storage.kind,
            bucket=storage.bucket,
            storage_options=dict(storage.options),
            data_key="",
            admin=admin,
        )

    def destroy_volume(self, secrets: VolumeSecrets) -> None:
        """Delete the volume's objects, its metadata, its credentials and its bucket (or
        directory). Each step accepts that it was done before: after a failure, run it again."""
        admin = secrets.admin
        vid = admin.get("volume_id", "")
        if not VOLUME_ID_RE.match(vid):
            raise ConfigError(f"the volume secrets name no valid volume id ({vid!r})")
        engine = admin.get("engine", "")
        if engine in ("redis", "postgres") and engine not in self.engines():
            raise ConfigError(
                f"metadata.{engine}_url is not configured: the {engine} namespace of volume "
                f"{vid} cannot be removed"
            )
        hidden = [secrets.data_key, *_url_secrets(secrets), *self._admin_secrets()]
        storage = _Storage(
            secrets.storage,
            secrets.bucket,
            dict(secrets.storage_options),
            {},
            admin.get("own_bucket", ""),
        )
        if secrets.storage == "file" and not os.path.basename(secrets.bucket).endswith(vid):
            raise LoftError(f"refusing to delete {secrets.bucket}: not the directory of {vid}")
        try:
            self._delete_objects(storage)  # the file store: the whole directory
            if engine == "sqlite":
                path = admin.get("sqlite_path") or self._sqlite_path(vid)
                if os.path.basename(path) != f"{vid}.db":
                    raise LoftError(f"refusing to delete {path}: not the metadata of {vid}")
                _remove_sqlite(path)
            elif engine == "redis":
                self._drop_redis(
                    admin.get("redis_prefix", vid), admin.get("redis_user", REDIS_USER_PREFIX + vid)
                )
            elif engine == "postgres":
                self._drop_postgres(admin.get("pg_role", PG_ROLE_PREFIX + vid))
            else:
                raise ConfigError(f"unknown metadata engine {engine!r} in the volume secrets")
            if storage.own_bucket:
                self._delete_bucket(storage)
        except Exception as e:
            raise _failure(f"destroying volume {vid} failed", e, hidden) from None


def _url_secrets(secrets: VolumeSecrets) -> list[str]:
    out = [secrets.storage_options.get("secret_key", "")]
    try:
        password = urlsplit(secrets.meta_url).password
    except ValueError:
        password = None
    if password:
        out += [password, unquote(password)]
    return [s for s in out if s]


def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _count_objects(store: ObjectStore, uuid: str) -> int:
    """Data objects of the volume: everything under ``<uuid>/`` except its marker."""
    marker = marker_key(uuid)
    try:
        return sum(
            1
            for entry in store.list(prefix=f"{uuid}/")
            if not entry.is_prefix and entry.key != marker
        )
    except ObjectNotFound:  # no bucket (any more): no objects
        return 0
