"""``loft format``: create a volume (settings in the metadata engine, a marker in the bucket).

Everything that can be checked is checked before anything is written: the name, the sizes, that
no volume exists at the metadata URL, that the bucket accepts put/get/list/delete and holds no
other volume. Only then the bucket marker and the metadata are written.

``format_volume`` does the same for programs (the control plane formats the volumes it
provisions through it); ``format_cmd`` adds the command line: flags, ``--if-missing`` and the
summary table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

import typer

from loftfs import __version__
from loftfs.cli.common import (
    kv_table,
    meta_session,
    non_negative,
    print_table,
    redact_url,
    say,
)
from loftfs.errors import (
    ConfigError,
    LoftError,
    NotFormatted,
    ObjectNotFound,
    ObjectStoreError,
    VolumeExists,
)
from loftfs.meta import Meta
from loftfs.meta.types import CHUNK_SIZE, VolumeSettings
from loftfs.object import marker_key
from loftfs.object.encrypt import (
    VolumeSecret,
    check_new_secret,
    describe_record,
    new_record,
    secret_from_sources,
    unlock,
)
from loftfs.object.interface import ObjectStore
from loftfs.utils import format_size, parse_size

MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = CHUNK_SIZE  # a block never spans chunks
_PROBE_PREFIX = ".loftfs-probe-"
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61})[a-z0-9]$")


class Compression(StrEnum):
    none = "none"
    lz4 = "lz4"
    zstd = "zstd"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid volume name {name!r}: use 3-63 characters a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_block_size(text: str | int) -> int:
    size = parse_size(text)
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise ConfigError(
            f"invalid block size {text!r}: must be a power of two between "
            f"{format_size(MIN_BLOCK_SIZE)} and {format_size(MAX_BLOCK_SIZE)}"
        )
    return size


def validate_compress(compress: str) -> str:
    if compress not in {c.value for c in Compression}:
        raise ConfigError(
            f"unknown compression {compress!r} (use {', '.join(c.value for c in Compression)})"
        )
    return compress


def normalize_bucket(storage: str, bucket: str) -> str:
    """A local bucket is stored as an absolute path: mounts may run from another directory.
    An s3 bucket is stored as its canonical URL (``s3://bucket/prefix`` or
    ``http(s)://host:port/bucket/prefix``); ``ConfigError`` when it is malformed."""
    if not bucket:
        raise ConfigError("--bucket must not be empty")
    if storage == "file" and "://" not in bucket:
        return os.path.abspath(os.path.expanduser(bucket))
    if storage == "s3":
        from loftfs.object.s3 import canonical_url

        return canonical_url(bucket)
    return bucket


_S3_URL = re.compile(r"^(s3|https?)://", re.IGNORECASE)


def infer_storage(storage: str, bucket: str) -> str:
    """``s3`` for an ``s3://`` or ``http(s)://`` bucket given without ``--storage``."""
    if storage == "file" and _S3_URL.match(bucket.strip()):
        return "s3"
    return storage


def storage_flags(
    storage: str,
    *,
    access_key: str | None,
    secret_key: str | None,
    region: str | None,
    endpoint: str | None,
    store_credentials: bool,
) -> tuple[dict[str, object], dict[str, object]]:
    """The backend options to open the store with, and those the settings keep for mounts
    (the keys only with ``store_credentials``). Empty for the file backend, which refuses
    the s3 flags (``ConfigError``)."""
    given = {
        "access_key": (access_key or "").strip(),
        "secret_key": (secret_key or "").strip(),
        "region": (region or "").strip(),
        "endpoint": (endpoint or "").strip(),
    }
    given = {k: v for k, v in given.items() if v}
    if storage != "s3":
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            raise ConfigError(f"{flags} apply to --storage s3 only")
        return {}, {}
    if bool(given.get("access_key")) != bool(given.get("secret_key")):
        raise ConfigError(
            "give both --access-key and --secret-key (or LOFT_SECRET_KEY), or neither"
        )
    opened: dict[str, object] = dict(given)
    stored: dict[str, object] = dict(given)
    if not store_credentials:
        stored.pop("access_key", None)
        stored.pop("secret_key", None)
    return opened, stored


def _storage_error(store_desc: str, e: BaseException) -> ConfigError:
    detail = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        detail = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return ConfigError(f"storage {store_desc} is not usable: {detail}")


def check_storage(store: ObjectStore) -> None:
    """Create the bucket and round-trip a probe object through it."""
    desc = store.describe()
    probe = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
    payload = secrets.token_bytes(64)
    try:
        store.create()
        store.put(probe, payload)
        try:
            got = store.get(probe)
            if got != payload:
                raise ConfigError(
                    f"storage {desc} is not usable: a probe object read back differently"
                )
            if not any(o.key == probe for o in store.list(prefix=_PROBE_PREFIX)):
                raise ConfigError(
                    f"storage {desc} is not usable: a probe object is missing from its listing"
                )
        finally:
            store.delete(probe)
    except ConfigError:
        raise
    except (ObjectStoreError, OSError) as e:
        raise _storage_error(desc, e) from e


def existing_volumes(store: ObjectStore) -> list[tuple[str, dict]]:
    """Volumes whose marker lies at the bucket root, as (uuid, marker content)."""
    found: list[tuple[str, dict]] = []
    try:
        for entry in store.list(delimiter="/"):
            if not entry.is_prefix:
                continue
            volume_uuid = entry.key.rstrip("/")
            try:
                raw = store.get(marker_key(volume_uuid))
            except ObjectNotFound:
                continue
            try:
                content = json.loads(raw)
            except ValueError:
                content = {}
            found.append((volume_uuid, content if isinstance(content, dict) else {}))
    except (ObjectStoreError, OSError) as e:
        raise _storage_error(store.describe(), e) from e
    return found


def marker_content(settings: VolumeSettings, meta_url: str) -> bytes:
    return json.dumps(
        {
            "name": settings.name,
            "uuid": settings.uuid,
            "meta": redact_url(meta_url),
            "created_ns": settings.created_ns,
            "host": socket.gethostname(),
            "loftfs": __version__,
        },
        sort_keys=True,
    ).encode()


def summary_rows(
    settings: VolumeSettings, meta_url: str, storage_desc: str
) -> list[tuple[str, str]]:
    return [
        ("name", settings.name),
        ("uuid", settings.uuid),
        ("metadata", redact_url(meta_url)),
        ("storage", storage_desc),
        ("block size", format_size(settings.block_size)),
        ("compression", settings.compress),
        ("encryption", describe_record(settings.encryption)),
        ("capacity", format_size(settings.capacity) if settings.capacity else "unlimited"),
        ("inodes", str(settings.inodes) if settings.inodes else "unlimited"),
        ("trash days", str(settings.trash_days) if settings.trash_days else "off"),
    ]


def format_cmd(
    meta_url: Annotated[
        str,
        typer.Argument(
            metavar="META_URL", help="Metadata engine URL, e.g. sqlite3:///var/lib/loftfs/v.db"
        ),
    ],
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Volume name: 3-63 characters a-z, 0-9, '-'")
    ],
    bucket: Annotated[
        str,
        typer.Option(
            "--bucket",
            help="Where data objects go: a directory, s3://bucket/[PREFIX] or "
            "http(s)://host:port/bucket/[PREFIX]",
        ),
    ],
    storage: Annotated[
        str, typer.Option("--storage", help="Object storage type: file or s3 (implied by URLs)")
    ] = "file",
    access_key: Annotated[
        str | None,
        typer.Option(
            "--access-key",
            envvar="LOFT_ACCESS_KEY",
            help="s3: access key (else AWS_ACCESS_KEY_ID, an AWS profile or role)",
        ),
    ] = None,
    secret_key: Annotated[
        str | None,
        typer.Option(
            "--secret-key",
            envvar="LOFT_SECRET_KEY",
            show_envvar=True,
            help="s3: secret key; prefer the environment variable, which no process list shows",
        ),
    ] = None,
    region: Annotated[
        str | None, typer.Option("--region", help="s3: the bucket's region (default us-east-1)")
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint", help="s3: endpoint URL for s3://bucket, e.g. https://minio.local:9000"
        ),
    ] = None,
    store_credentials: Annotated[
        bool,
        typer.Option(
            "--store-credentials/--no-store-credentials",
            help="s3: keep the given keys in the volume's settings, so mounts need none",
        ),
    ] = True,
    block_size: Annotated[
        str,
        typer.Option("--block-size", help="Size of data blocks (objects): a power of two, 64K-64M"),
    ] = "4M",
    compress: Annotated[
        Compression, typer.Option("--compress", help="Compression of data blocks")
    ] = Compression.none,
    capacity: Annotated[
        str, typer.Option("--capacity", help="Space quota, e.g. 10T (0: unlimited)")
    ] = "0",
    inodes: Annotated[int, typer.Option("--inodes", help="Inode quota (0: unlimited)")] = 0,
    trash_days: Annotated[
        int, typer.Option("--trash-days", help="Keep deleted files this many days (0: off)")
    ] = 0,
    if_missing: Annotated[
        bool,
        typer.Option(
            "--if-missing",
            help="Succeed without changes if this volume (same name, storage, bucket) exists",
        ),
    ] = False,
    encrypt_passphrase_file: Annotated[
        str | None,
        typer.Option(
            "--encrypt-passphrase-file",
            metavar="FILE",
            help="Encrypt data blocks (AES-256-GCM) under a key that the passphrase in FILE "
            "protects (or set LOFT_ENCRYPT_PASSPHRASE); mounts need the same passphrase",
        ),
    ] = None,
    encrypt_key_file: Annotated[
        str | None,
        typer.Option(
            "--encrypt-key-file",
            metavar="FILE",
            help="Encrypt data blocks under a key that the 32-byte key in FILE (raw or 64 hex "
            "digits) protects; mounts need the same file",
        ),
    ] = None,
) -> None:
    """Create a volume: settings in META_URL, data objects in the bucket."""
    storage = infer_storage(storage.lower(), bucket)
    storage_options, stored_options = storage_flags(
        storage,
        access_key=access_key,
        secret_key=secret_key,
        region=region,
        endpoint=endpoint,
        store_credentials=store_credentials,
    )
    validate_name(name)
    block = validate_block_size(block_size)
    quota = parse_size(capacity)
    non_negative(inodes, "--inodes")
    non_negative(trash_days, "--trash-days")
    bucket = normalize_bucket(storage, bucket)
    secret = secret_from_sources(encrypt_passphrase_file, encrypt_key_file)
    if secret is not None:
        check_new_secret(secret)

    with meta_session(meta_url) as meta:
        existing = _existing_settings(meta)
        if existing is not None:
            _report_existing(existing, meta_url, name, storage, bucket, if_missing, secret)
            return
        settings, storage_desc = _create_volume(
            meta,
            meta_url,
            name,
            storage=storage,
            bucket=bucket,
            storage_options=storage_options,
            stored_options=stored_options,
            secret=secret,
            block_size=block,
            compress=compress.value,
            capacity=quota,
            inodes=inodes,
            trash_days=trash_days,
        )

    say(f"Formatted volume {name}")
    print_table(kv_table("", summary_rows(settings, meta_url, storage_desc)))


def format_volume(
    meta_url: str,
    name: str,
    *,
    bucket: str,
    storage: str = "file",
    storage_options: Mapping[str, object] | None = None,
    stored_options: Mapping[str, object] | None = None,
    secret: VolumeSecret | None = None,
    block_size: int = 4 << 20,
    compress: str = "none",
    capacity: int = 0,
    inodes: int = 0,
    trash_days: int = 0,
) -> VolumeSettings:
    """Create a volume as ``loft format`` does, for programs: the same checks before anything
    is written (name, sizes, no volume at ``meta_url``, a working bucket that holds no other
    volume), then the bucket marker and the metadata. ``storage_options`` open the store
    (credentials, endpoint, region); ``stored_options`` are kept in the settings for mounts.
    With ``secret`` the volume is encrypted under a fresh data key that it wraps. Returns the
    settings written; raises ``ConfigError`` for bad input or an unusable bucket,
    ``VolumeExists`` when ``meta_url`` holds a volume already (nothing is changed then), and
    the engine's errors (``MetaUnavailable``...) as they come."""
    storage = infer_storage(storage.lower(), bucket)
    validate_name(name)
    block = validate_block_size(block_size)
    validate_compress(compress)
    non_negative(capacity, "capacity")
    non_negative(inodes, "inodes")
    non_negative(trash_days, "trash_days")
    bucket = normalize_bucket(storage, bucket)
    if secret is not None:
        check_new_secret(secret)
    with meta_session(meta_url) as meta:
        existing = _existing_settings(meta)
        if existing is not None:
            raise VolumeExists(_exists_message(existing, meta_url))
        settings, _ = _create_volume(
            meta,
            meta_url,
            name,
            storage=storage,
            bucket=bucket,
            storage_options=dict(storage_options or {}),
            stored_options=dict(stored_options or {}),
            secret=secret,
            block_size=block,
            compress=compress,
            capacity=capacity,
            inodes=inodes,
            trash_days=trash_days,
        )
    return settings


def _existing_settings(meta: Meta) -> VolumeSettings | None:
    try:
        return meta.load_settings()
    except NotFormatted:
        return None


def _exists_message(existing: VolumeSettings, meta_url: str) -> str:
    return (
        f"a volume ('{existing.name}', {existing.uuid}) already exists at "
        f"{redact_url(meta_url)}; nothing was changed"
    )


def _create_volume(
    meta: Meta,
    meta_url: str,
    name: str,
    *,
    storage: str,
    bucket: str,
    storage_options: dict[str, object],
    stored_options: dict[str, object],
    secret: VolumeSecret | None,
    block_size: int,
    compress: str,
    capacity: int,
    inodes: int,
    trash_days: int,
) -> tuple[VolumeSettings, str]:
    """Check the bucket, then write the marker and the metadata of a volume whose input was
    validated and whose metadata URL holds none. Returns the settings and the store's
    description. A failed metadata write takes the marker back."""
    from loftfs.object import create_storage

    store = create_storage(storage, bucket, compress="none", **storage_options)
    try:
        check_storage(store)
        others = existing_volumes(store)
        if others:
            volume_uuid, info = others[0]
            label = f"'{info['name']}' " if info.get("name") else ""
            raise ConfigError(
                f"bucket {store.describe()} already holds volume {label}({volume_uuid}); "
                "use another bucket, or 'loft destroy' that volume first"
            )
        settings = VolumeSettings(
            name=name,
            storage=storage,
            bucket=bucket,
            block_size=block_size,
            compress=compress,
            capacity=capacity,
            inodes=inodes,
            trash_days=trash_days,
            created_ns=time.time_ns(),
            storage_options=stored_options,
        )
        if secret is not None:
            settings.encryption, _ = new_record(secret, settings.uuid)
        marker = marker_key(settings.uuid)
        try:
            store.put(marker, marker_content(settings, meta_url))
        except (ObjectStoreError, OSError) as e:
            raise _storage_error(store.describe(), e) from e
        try:
            meta.init_volume(settings)
        except BaseException:
            _forget_marker(store, marker)
            raise
        return settings, store.describe()
    finally:
        store.close()


def _forget_marker(store: ObjectStore, marker: str) -> None:
    """Undo the marker of a format that failed; the original error matters more than this."""
    try:
        store.delete(marker)
    except (ObjectStoreError, OSError):
        logging.getLogger(__name__).warning("could not remove %s after a failed format", marker)


def _report_existing(
    existing: VolumeSettings,
    meta_url: str,
    name: str,
    storage: str,
    bucket: str,
    if_missing: bool,
    secret: VolumeSecret | None = None,
) -> None:
    where = redact_url(meta_url)
    if not if_missing:
        raise VolumeExists(_exists_message(existing, meta_url))
    if (existing.name, existing.storage, existing.bucket) != (name, storage, bucket):
        raise LoftError(
            f"a different volume ('{existing.name}' on {existing.storage} {existing.bucket}) "
            f"exists at {where}; nothing was changed"
        )
    if bool(existing.encryption) != (secret is not None):
        raise LoftError(
            f"volume '{existing.name}' exists at {where} "
            + (
                "encrypted, but no passphrase or key was given"
                if existing.encryption
                else "unencrypted, but a passphrase or key was given"
            )
            + "; nothing was changed"
        )
    if secret is not None:
        unlock(existing.encryption, secret, existing.uuid, existing.name)  # a wrong one: error
    say(f"Volume {existing.name} ({existing.uuid}) already exists at {where}; nothing changed")
