"""The control plane's configuration: defaults derived from ``state_dir``, the file, the
environment and flags in order of precedence, and a one-line ``ConfigError`` naming the key for
every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from loftfs.errors import ConfigError
from loftfs.plane.config import (
    CONFIG_KEYS,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    ENV_S3_SECRET_KEY,
    load_config,
    parse_duration,
    split_listen,
)

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plane.toml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str, **overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides, environ=NO_ENV)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_derive_from_state_dir(tmp_path: Path) -> None:
    config = load_config(None, {"state_dir": str(tmp_path / "st")}, environ=NO_ENV)
    st = tmp_path / "st"
    assert config.server.listen == "127.0.0.1:8600"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8600)
    assert config.server.database == f"sqlite:///{st}/plane.db"
    assert config.server.master_key_file == f"{st}/master.key"
    assert config.server.volumes_dir == f"{st}/volumes"
    assert config.server.delete_grace == 7 * 86400
    assert config.server.usage_interval == 60
    assert config.server.max_body == 1 << 20
    assert not config.server.tls
    assert config.storage.kind == "file"
    assert config.storage.root == f"{st}/data"
    assert (config.storage.policy, config.storage.bucket_prefix) == ("bucket", "loft-")
    assert config.storage.shared_bucket == "loft-volumes"
    assert config.metadata.default == "sqlite"
    assert config.engines() == ["sqlite"]


def test_file_values_and_explicit_paths(tmp_path: Path) -> None:
    key = tmp_path / "mk"
    path = write(
        tmp_path,
        f"""
[server]
listen = "[::1]:9000"
database = "postgresql://plane:pw@db.example:5432/plane"
master_key_file = "{key}"
state_dir = "{tmp_path}/state"
delete_grace = "12h"
usage_interval = "30m"
max_body = "2M"

[storage]
kind = "s3"
endpoint = "http://minio.local:9000/"
region = "eu-1"
access_key = "AK"
secret_key = "SK"
policy = "prefix"
shared_bucket = "team-volumes"

[metadata]
default = "redis"
redis_url = "redis://default:redispw@127.0.0.1:6379/2"
postgres_url = "postgres://postgres:pgpw@127.0.0.1:5432/loft"
""",
    )
    config = load_config(path, {}, environ=NO_ENV)
    assert (config.server.host, config.server.port) == ("::1", 9000)
    assert config.server.database == "postgresql://plane:pw@db.example:5432/plane"
    assert config.server.master_key_file == str(key)
    assert config.server.delete_grace == 12 * 3600
    assert config.server.usage_interval == 30 * 60
    assert config.server.max_body == 2 << 20
    assert config.storage.endpoint == "http://minio.local:9000"  # normalized
    assert config.storage.root == f"{tmp_path}/state/data"
    assert (config.storage.policy, config.storage.shared_bucket) == ("prefix", "team-volumes")
    assert config.engines() == ["sqlite", "redis", "postgres"]


def test_environment_then_flags_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = "127.0.0.1:8601"
[storage]
kind = "s3"
access_key = "AK"
secret_key = "from-file"
[metadata]
redis_url = "redis://127.0.0.1:1/0"
""",
    )
    env = {
        ENV_S3_SECRET_KEY: "from-env",
        ENV_REDIS_URL: "redis://127.0.0.1:2/0",
        ENV_POSTGRES_URL: "",  # empty: unset
    }
    config = load_config(path, {}, environ=env)
    assert config.storage.secret_key == "from-env"
    assert config.metadata.redis_url == "redis://127.0.0.1:2/0"
    assert config.engines() == ["sqlite", "redis"]
    flags = {
        "server.listen": "0.0.0.0:0",
        "secret_key": "from-flag",
        "usage-interval": 0,
        "metadata.postgres_url": "postgres://u:p@127.0.0.1:5432/db",
        "tls_cert": None,  # a flag not given
    }
    config = load_config(path, flags, environ=env)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 0)
    assert config.storage.secret_key == "from-flag"
    assert config.server.usage_interval == 0
    assert "postgres" in config.engines()
    with pytest.raises(ConfigError, match="unknown configuration key 'colour'"):
        load_config(path, {"colour": "blue"}, environ=env)


def test_describe_shows_no_secret(tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path),
            "database": "postgresql://plane:dbsecret@h:5432/plane",
            "kind": "s3",
            "access_key": "AK",
            "secret_key": "s3secret",
            "redis_url": "redis://default:redissecret@127.0.0.1:6379/0",
            "postgres_url": "postgres://postgres:pgsecret@127.0.0.1:5432/loft",
        },
        environ=NO_ENV,
    )
    shown = config.describe()
    text = repr(shown) + repr(config)
    for secret in ("dbsecret", "s3secret", "redissecret", "pgsecret"):
        assert secret not in text
    assert shown["storage"]["secret_key"] == "****"
    assert shown["storage"]["access_key"] == "AK"
    assert shown["metadata"]["engines"] == ["sqlite", "redis", "postgres"]
    assert set(shown) == {"server", "storage", "metadata"}
    assert {f"{s}.{k}" for s in ("server", "storage", "metadata") for k in shown[s]} >= set(
        CONFIG_KEYS
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", 7 * 86400.0),
        ("12h", 12 * 3600.0),
        ("30m", 1800.0),
        ("45s", 45.0),
        ("0", 0.0),
        ("90", 90.0),
        ("1.5h", 5400.0),
        (60, 60.0),
    ],
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7w", "-1s", "h", "1 d 2h", "1e3", True])
def test_parse_duration_refuses(text: str | bool) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["8600", "localhost", ":8600", "h:99999", "::1:8600", "h:x"])
def test_listen_address_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid listen address"):
        split_listen(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\ncolour = "blue"\n', "unknown key server.colour"),
        ('[servers]\nlisten = "h:1"\n', "unknown section [servers]"),
        ("server = 3\n", "server in"),
        ('[server]\nlisten = "nowhere"\n', "server.listen: invalid listen address 'nowhere'"),
        ("[server]\nlisten = 8600\n", "server.listen must be a string"),
        ('[server]\ndelete_grace = "7 days"\n', "server.delete_grace: invalid duration"),
        ('[server]\nusage_interval = "-5"\n', "server.usage_interval: invalid duration"),
        ('[server]\nmax_body = "lots"\n', "server.max_body: invalid size"),
        ("[server]\nmax_body = 10\n", "server.max_body must be at least 1024"),
        ('[server]\ndatabase = "mysql://x/y"\n', "server.database: unsupported database"),
        ('[server]\ntls_cert = "/c.pem"\n', "tls_cert and server.tls_key go together"),
        (
            '[server]\ntls_cert = "/nope/c.pem"\ntls_key = "/nope/k.pem"\n',
            "server.tls_cert: no such file",
        ),
        ('[storage]\nkind = "gcs"\n', "storage.kind: unknown kind 'gcs'"),
        ('[storage]\npolicy = "shared"\n', "storage.policy: unknown policy 'shared'"),
        ('[storage]\nendpoint = "http://h:9000"\n', "storage.endpoint applies to"),
        ('[storage]\nkind = "s3"\nendpoint = "ftp://h"\n', "storage.endpoint: invalid endpoint"),
        ('[storage]\nkind = "s3"\naccess_key = "AK"\n', "storage.access_key and storage.secret"),
        ('[storage]\nbucket_prefix = "Loft_"\n', "storage.bucket_prefix: invalid 'Loft_'"),
        ('[storage]\nbucket_prefix = "' + "a" * 47 + '"\n', "storage.bucket_prefix: invalid"),
        ('[storage]\nshared_bucket = "x"\n', "storage.shared_bucket: invalid bucket name"),
        ('[metadata]\ndefault = "mysql"\n', "metadata.default: unknown engine 'mysql'"),
        ('[metadata]\ndefault = "redis"\n', "metadata.redis_url (or LOFT_PLANE_REDIS_URL)"),
        ('[metadata]\ndefault = "postgres"\n', "metadata.postgres_url (or LOFT_PLANE_POSTGRES"),
        ('[metadata]\nredis_url = "http://h:6379"\n', "metadata.redis_url: not a Redis"),
        ('[metadata]\npostgres_url = "postgres://u:pw@h"\n', "metadata.postgres_url:"),
        ("[server\n", "is not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_bad_urls_do_not_show_passwords(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[metadata]\npostgres_url = "postgres://u:hunter2@h?x=1"\n')
    assert "hunter2" not in message
    message = error_of(tmp_path, '[metadata]\nredis_url = "redis://u:hunter2@h/abc"\n')
    assert "hunter2" not in message


def test_database_takes_either_postgres_scheme() -> None:
    for url in ("postgres://u:pw@h:5432/plane", "postgresql://u:pw@h:5432/plane"):
        assert load_config(None, {"database": url}, environ={}).server.database == url
    env = {"LOFT_PLANE_DATABASE": "postgres://u:pw@h:5432/plane"}
    assert load_config(None, {}, environ=env).server.database == env["LOFT_PLANE_DATABASE"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the configuration .*nope\.toml"):
        load_config(str(tmp_path / "nope.toml"), {}, environ=NO_ENV)
