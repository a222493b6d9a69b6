"""The control plane's configuration: a TOML file (``loft serve --config FILE``), environment
variables for the secrets, and flags, in that order of precedence (a flag wins).

Three sections, every key optional::

    [server]    listen, database, master_key_file, state_dir, tls_cert, tls_key,
                delete_grace, usage_interval, max_body
    [storage]   kind, root, endpoint, region, access_key, secret_key, policy,
                bucket_prefix, shared_bucket
    [metadata]  default, redis_url, postgres_url

Paths left out derive from ``state_dir`` (the database, the master key, the file store's root),
so one directory holds a small installation. The secrets can come from the environment instead
of the file: ``LOFT_PLANE_S3_SECRET_KEY``, ``LOFT_PLANE_REDIS_URL``, ``LOFT_PLANE_POSTGRES_URL``,
``LOFT_PLANE_DATABASE`` (the control plane's own database, postgres:// or postgresql://).
Everything is checked here, before anything starts: an unknown key (a typo would otherwise be
ignored), a malformed address, duration, URL or bucket name, or a default engine that is not
configured is a ``ConfigError`` of one line naming the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from loftfs.errors import ConfigError
from loftfs.utils import parse_size

DEFAULT_STATE_DIR = "/var/lib/loftfs/plane"
DEFAULT_LISTEN = "127.0.0.1:8600"
ENGINES = ("sqlite", "redis", "postgres")
STORAGE_KINDS = ("file", "s3")
POLICIES = ("bucket", "prefix")

ENV_S3_SECRET_KEY = "LOFT_PLANE_S3_SECRET_KEY"
ENV_REDIS_URL = "LOFT_PLANE_REDIS_URL"
ENV_POSTGRES_URL = "LOFT_PLANE_POSTGRES_URL"
ENV_DATABASE_URL = "LOFT_PLANE_DATABASE"
# key -> environment variable that may give it (it overrides the file, a flag overrides both)
ENVIRONMENT = {
    "server.database": ENV_DATABASE_URL,
    "storage.secret_key": ENV_S3_SECRET_KEY,
    "metadata.redis_url": ENV_REDIS_URL,
    "metadata.postgres_url": ENV_POSTGRES_URL,
}

# a volume id: "v" + 16 hex digits; bucket names are <bucket_prefix><volume id>
VOLUME_ID_LENGTH = 17
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_PREFIX_RE = re.compile(r"^(?:[a-z0-9][a-z0-9.-]*)?$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: where the API listens and where the plane keeps its own state."""

    listen: str = DEFAULT_LISTEN  # HOST:PORT ([v6]:PORT)
    database: str = field(default="", repr=False)  # SQLAlchemy URL (may hold a password)
    master_key_file: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    tls_cert: str = ""
    tls_key: str = ""
    delete_grace: float = 7 * 86400.0  # seconds a deleted volume is kept (0: destroyed at once)
    usage_interval: float = 60.0  # seconds between usage refreshes (0: only on request)
    max_body: int = 1 << 20  # bytes; larger request bodies are refused

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def volumes_dir(self) -> str:
        """Where the SQLite metadata files of volumes live: ``<state_dir>/volumes``."""
        return os.path.join(self.state_dir, "volumes")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where volumes' data objects go, one bucket each or a prefix each."""

    kind: str = "file"
    root: str = ""  # file: the directory that holds the buckets
    endpoint: str = ""  # s3: http(s)://host:port; empty: AWS
    region: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    policy: str = "bucket"
    bucket_prefix: str = "loft-"
    shared_bucket: str = "loft-volumes"


@dataclass(frozen=True)
class MetadataConfig:
    """``[metadata]``: the engines new volumes may use, with their administrators' URLs."""

    default: str = "sqlite"
    redis_url: str = field(default="", repr=False)
    postgres_url: str = field(default="", repr=False)

    def engines(self) -> list[str]:
        """``sqlite`` always; ``redis`` and ``postgres`` when their URL is configured."""
        found = ["sqlite"]
        if self.redis_url:
            found.append("redis")
        if self.postgres_url:
            found.append("postgres")
        return found


@dataclass(frozen=True)
class PlaneConfig:
    """The whole, validated configuration of a control plane (see ``load_config``)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)

    def engines(self) -> list[str]:
        return self.metadata.engines()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every setting, for logs and ``--help``-like output: secrets masked, passwords taken
        out of URLs."""
        from loftfs.cli.common import redact_url

        out: dict[str, dict[str, Any]] = {}
        for section in _SECTIONS:
            values = {f.name: getattr(getattr(self, section), f.name) for f in _fields(section)}
            out[section] = values
        out["server"]["database"] = redact_url(self.server.database)
        out["storage"]["secret_key"] = "****" if self.storage.secret_key else ""
        out["metadata"]["redis_url"] = redact_url(self.metadata.redis_url)
        out["metadata"]["postgres_url"] = redact_url(self.metadata.postgres_url)
        out["metadata"]["engines"] = self.engines()
        return out


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "metadata": MetadataConfig,
}


def _fields(section: str) -> list[Any]:
    return list(fields(_SECTIONS[section]))


# every key as "section.key", in file order: what flags and overrides may name
CONFIG_KEYS: tuple[str, ...] = tuple(
    f"{section}.{f.name}" for section in _SECTIONS for f in _fields(section)
)
_BY_NAME = {key.split(".", 1)[1]: key for key in CONFIG_KEYS}  # names are unique across sections


# --- parsers of single values ----------------------------------------------------------------


def parse_duration(text: str | int | float) -> float:
    """Seconds of a duration: ``45s``, ``30m``, ``12h``, ``7d``, or a plain number of seconds
    (``60``, ``0``, ``1.5h`` too). ``ConfigError`` for anything else, a negative one
    included."""
    if isinstance(text, bool):
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 45s, 30m, 12h, 7d or 0")
    if isinstance(text, int | float):
        if text < 0 or text != text or text == float("inf"):
            raise ConfigError(f"invalid duration {text!r}: must be 0 or more")
        return float(text)
    m = _DURATION_RE.match(text)
    if not m:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 45s, 30m, 12h, 7d or 0")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8600`` for IPv6) as (host, port); ``ConfigError`` when the host
    is missing or the port is not 0-65535 (0: any free port)."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"invalid listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8600 "
            "or [::1]:8600"
        )
    return host, int(port)


# --- loading ---------------------------------------------------------------------------------


def load_config(
    path: str | None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PlaneConfig:
    """Read the TOML file at ``path`` (None: defaults only), apply the environment variables of
    ``ENVIRONMENT`` (empty ones count as unset), then ``overrides`` (flags: ``"section.key"``
    or the bare key name, a None value meaning "not given"), fill in what derives from
    ``state_dir`` and validate everything. ``ConfigError`` names the first bad key."""
    raw: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    if path is not None:
        for section, values in _read_file(path).items():
            raw[section].update(values)
    env = os.environ if environ is None else environ
    for key, var in ENVIRONMENT.items():
        if env.get(var):
            section, name = key.split(".", 1)
            raw[section][name] = env[var]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        full = key if key in CONFIG_KEYS else _BY_NAME.get(key.replace("-", "_"))
        if full is None:
            raise ConfigError(f"unknown configuration key {key!r}")
        section, name = full.split(".", 1)
        raw[section][name] = value
    return _build(raw)


def _read_file(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{section}] in {path} (known: {', '.join(_SECTIONS)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{section} in {path} must be a [{section}] table")
        known = {f.name for f in _fields(section)}
        for name in values:
            if name not in known:
                raise ConfigError(
                    f"unknown key {section}.{name} in {path} (known in [{section}]: "
                    f"{', '.join(sorted(known))})"
                )
        out[section] = dict(values)
    return out


def _text(raw: dict[str, Any], section: str, name: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(f"{section}.{name} must be a string, not {value!r}")
    return value.strip()


def _build(raw: dict[str, dict[str, Any]]) -> PlaneConfig:
    server = _build_server(raw["server"])
    storage = _build_storage(raw["storage"], server)
    metadata = _build_metadata(raw["metadata"])
    return PlaneConfig(server=server, storage=storage, metadata=metadata)


def _abs_path(section: str, name: str, text: str) -> str:
    if "\0" in text:
        raise ConfigError(f"{section}.{name}: invalid path {text!r}")
    return os.path.abspath(os.path.expanduser(text))


def _build_server(raw: dict[str, Any]) -> ServerConfig:
    d = ServerConfig()
    state_dir = _text(raw, "server", "state_dir", d.state_dir)
    if not state_dir:
        raise ConfigError("server.state_dir must not be empty")
    state_dir = _abs_path("server", "state_dir", state_dir)
    listen = _text(raw, "server", "listen", d.listen)
    try:
        split_listen(listen)
    except ConfigError as e:
        raise ConfigError(f"server.listen: {e}") from None
    database = _text(raw, "server", "database", "") or "sqlite:///" + os.path.join(
        state_dir, "plane.db"
    )
    _check_database(database)
    key_file = _text(raw, "server", "master_key_file", "")
    if key_file:
        key_file = _abs_path("server", "master_key_file", key_file)
    else:
        key_file = os.path.join(state_dir, "master.key")
    tls_cert = _text(raw, "server", "tls_cert", "")
    tls_key = _text(raw, "server", "tls_key", "")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("server.tls_cert and server.tls_key go together: give both or neither")
    for name, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value and not os.path.isfile(value):
            raise ConfigError(f"server.{name}: no such file {value!r}")
    grace = _duration(raw, "delete_grace", d.delete_grace)
    interval = _duration(raw, "usage_interval", d.usage_interval)
    max_body = raw.get("max_body", d.max_body)
    try:
        if isinstance(max_body, bool) or not isinstance(max_body, int | str):
            raise ConfigError("not a size")
        body = parse_size(max_body)
    except ConfigError:
        raise ConfigError(
            f"server.max_body: invalid size {max_body!r} (bytes, or e.g. 1M)"
        ) from None
    if body < 1024:
        raise ConfigError(f"server.max_body must be at least 1024 bytes, not {body}")
    return ServerConfig(
        listen=listen,
        database=database,
        master_key_file=key_file,
        state_dir=state_dir,
        tls_cert=os.path.abspath(tls_cert) if tls_cert else "",
        tls_key=os.path.abspath(tls_key) if tls_key else "",
        delete_grace=grace,
        usage_interval=interval,
        max_body=body,
    )


def _duration(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    try:
        return parse_duration(value)
    except ConfigError as e:
        raise ConfigError(f"server.{name}: {e}") from None


def _check_database(url: str) -> None:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not rest:
        raise ConfigError(
            f"server.database: invalid URL {_redacted(url)!r} (use sqlite:////path/plane.db "
            "or postgresql://user:password@host:port/db)"
        )
    if scheme != "sqlite" and scheme.split("+", 1)[0] not in ("postgres", "postgresql"):
        raise ConfigError(
            f"server.database: unsupported database {scheme!r} (use sqlite or postgresql)"
        )


def _redacted(url: str) -> str:
    from loftfs.cli.common import redact_url

    return redact_url(url)


def _build_storage(raw: dict[str, Any], server: ServerConfig) -> StorageConfig:
    d = StorageConfig()
    kind = _text(raw, "storage", "kind", d.kind).lower()
    if kind not in STORAGE_KINDS:
        raise ConfigError(f"storage.kind: unknown kind {kind!r} (use {' or '.join(STORAGE_KINDS)})")
    policy = _text(raw, "storage", "policy", d.policy).lower()
    if policy not in POLICIES:
        raise ConfigError(f"storage.policy: unknown policy {policy!r} (use bucket or prefix)")
    root = _text(raw, "storage", "root", "")
    root = _abs_path("storage", "root", root) if root else os.path.join(server.state_dir, "data")
    endpoint = _text(raw, "storage", "endpoint", "")
    region = _text(raw, "storage", "region", "")
    access_key = _text(raw, "storage", "access_key", "")
    secret_key = _text(raw, "storage", "secret_key", "")
    if kind == "s3":
        if endpoint:
            from loftfs.object.s3 import normalize_endpoint

            try:
                endpoint = normalize_endpoint(endpoint)
            except ConfigError as e:
                raise ConfigError(f"storage.endpoint: {e}") from None
        if bool(access_key) != bool(secret_key):
            raise ConfigError(
                "storage.access_key and storage.secret_key (or "
                f"{ENV_S3_SECRET_KEY}) go together: give both or neither"
            )
    else:
        given = [n for n, v in (("endpoint", endpoint), ("region", region)) if v]
        given += [n for n, v in (("access_key", access_key), ("secret_key", secret_key)) if v]
        if given:
            raise ConfigError(f'storage.{given[0]} applies to storage.kind = "s3" only')
    bucket_prefix = _text(raw, "storage", "bucket_prefix", d.bucket_prefix)
    max_prefix = 63 - VOLUME_ID_LENGTH
    if not _BUCKET_PREFIX_RE.match(bucket_prefix) or len(bucket_prefix) > max_prefix:
        raise ConfigError(
            f"storage.bucket_prefix: invalid {bucket_prefix!r}: at most {max_prefix} characters "
            "a-z, 0-9, '.' and '-', starting with a letter or digit"
        )
    shared_bucket = _text(raw, "storage", "shared_bucket", d.shared_bucket)
    if not _BUCKET_RE.match(shared_bucket) or ".." in shared_bucket:
        raise ConfigError(
            f"storage.shared_bucket: invalid bucket name {shared_bucket!r}: use 3-63 "
            "characters a-z, 0-9, '.' and '-', starting and ending with a letter or digit"
        )
    return StorageConfig(
        kind=kind,
        root=root,
        endpoint=endpoint,
        region=region,
        access_key=access_key,
        secret_key=secret_key,
        policy=policy,
        bucket_prefix=bucket_prefix,
        shared_bucket=shared_bucket,
    )


def _build_metadata(raw: dict[str, Any]) -> MetadataConfig:
    default = _text(raw, "metadata", "default", "sqlite").lower()
    redis_url = _text(raw, "metadata", "redis_url", "")
    postgres_url = _text(raw, "metadata", "postgres_url", "")
    if redis_url:
        from loftfs.meta.redis import parse_url as parse_redis_url

        try:
            parse_redis_url(redis_url)
        except ConfigError as e:
            raise ConfigError(f"metadata.redis_url: {e}") from None
    if postgres_url:
        from loftfs.meta.postgres import parse_url as parse_postgres_url

        try:
            parse_postgres_url(postgres_url)
        except ConfigError as e:
            raise ConfigError(f"metadata.postgres_url: {e}") from None
    config = MetadataConfig(default=default, redis_url=redis_url, postgres_url=postgres_url)
    if default not in ENGINES:
        raise ConfigError(
            f"metadata.default: unknown engine {default!r} (use {', '.join(ENGINES)})"
        )
    if default not in config.engines():
        var = ENV_REDIS_URL if default == "redis" else ENV_POSTGRES_URL
        raise ConfigError(
            f"metadata.default is {default!r}, but metadata.{default}_url (or {var}) is not set"
        )
    return config
