"""Import sources: buckets (or local trees) whose objects a volume reads in place.

A source is registered once per volume (``loft source add``) under a name and a small id; the
external slices of imported files name the id, so a source can be described again (new
endpoint, rotated credentials) without touching any file. Everything about the sources lives in
one setting of the metadata engine (``SETTING_SOURCES``), as JSON::

    {"version": 1, "next_id": 3,
     "sources": {"photos": {"id": 1, "url": "s3://bucket/prefix/", "endpoint": "...",
                            "region": "...", "added_ns": ..., "credentials": {sealed}}}}

Credentials are sealed with AES-256-GCM under a key that is not in the metadata engine: a
random key stored as an object of the volume's own bucket (``<uuid>/.loftfs-sources-key``),
written through the volume's store, so on an encrypted volume it is itself encrypted with the
volume's data key. Reading a source's credentials therefore needs the metadata *and* the
volume's bucket (and its secret when encrypted): a dump of the metadata, or access to the
database alone, does not reveal them. They are never printed: ``loft source ls`` shows whether
a source has stored credentials, not what they are.

A source with no stored credentials uses the usual AWS chain (``AWS_ACCESS_KEY_ID``..., a
profile, an instance role) of the process that reads it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from loftfs.errors import ConfigError, ObjectNotFound
from loftfs.meta.interface import Meta
from loftfs.meta.txn import SETTING_SOURCES
from loftfs.object.interface import ObjectStore

SOURCES_FORMAT = 1
KEY_OBJECT = ".loftfs-sources-key"
_KEY_SIZE = 32
_NONCE_SIZE = 12
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_CREDENTIALS = ("access_key", "secret_key", "session_token")


@dataclass
class Source:
    """One registered source. ``url`` is ``s3://bucket[/prefix/]``,
    ``http(s)://host:port/bucket[/prefix/]`` or ``file:///dir``; ``prefix`` (derived) is where
    the source's keys start in its bucket."""

    name: str
    id: int
    url: str
    endpoint: str = ""
    region: str = ""
    added_ns: int = 0
    credentials: dict[str, str] = field(default_factory=dict)  # sealed record, or empty

    @property
    def kind(self) -> str:
        return "file" if self.url.startswith("file://") else "s3"

    @property
    def bucket_url(self) -> str:
        """The URL of the source's bucket (or root directory), without the prefix."""
        return split_source_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return split_source_url(self.url)[1]

    def describe(self) -> str:
        return f"{self.name} ({self.url})"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "endpoint": self.endpoint,
            "region": self.region,
            "added_ns": self.added_ns,
            "credentials": dict(self.credentials),
        }


def check_source_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid source name {name!r}: 1-63 characters a-z, 0-9, '-', '_', starting with "
            "a letter or digit"
        )
    return name


def split_source_url(url: str) -> tuple[str, str]:
    """(bucket URL, key prefix ending in ``/`` or empty) of a source URL. ``ConfigError`` for
    anything else than ``s3://``, ``http(s)://`` and absolute ``file://`` URLs."""
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"invalid source URL {url!r}: use file:///absolute/dir")
        path = os.path.normpath(unquote(parts.path))
        return f"file://{path}", ""
    if scheme not in ("s3", "http", "https"):
        raise ConfigError(
            f"invalid source URL {url!r}: use s3://bucket[/prefix], "
            "http(s)://host:port/bucket[/prefix] or file:///dir"
        )
    # bucket names, endpoints, credentials in the URL: checked as for a volume's own bucket
    from loftfs.object.s3 import parse_s3_url  # obstore and boto3 load only with S3 in use

    location = parse_s3_url(text)
    return location.describe().rstrip("/"), location.prefix


def normalize_source_url(url: str) -> str:
    base, prefix = split_source_url(url)
    return base + ("/" + prefix if prefix else "")


# --- the setting ------------------------------------------------------------------------------


@dataclass
class SourceTable:
    next_id: int = 1
    sources: dict[str, Source] = field(default_factory=dict)

    def by_id(self, source_id: int) -> Source | None:
        for s in self.sources.values():
            if s.id == source_id:
                return s
        return None

    def get(self, name: str) -> Source:
        source = self.sources.get(name)
        if source is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(f"no source named {name!r} in this volume (sources: {known})")
        return source

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SOURCES_FORMAT,
                "next_id": self.next_id,
                "sources": {n: s.to_json() for n, s in sorted(self.sources.items())},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> SourceTable:
        if not text:
            return cls()
        try:
            doc = json.loads(text)
            if doc.get("version") != SOURCES_FORMAT:
                raise ConfigError(
                    f"the volume's sources are of format {doc.get('version')!r}, which this "
                    "loftfs cannot read (upgrade loftfs)"
                )
            table = cls(next_id=int(doc["next_id"]))
            for name, rec in doc["sources"].items():
                table.sources[name] = Source(
                    name=name,
                    id=int(rec["id"]),
                    url=str(rec["url"]),
                    endpoint=str(rec.get("endpoint", "")),
                    region=str(rec.get("region", "")),
                    added_ns=int(rec.get("added_ns", 0)),
                    credentials=dict(rec.get("credentials") or {}),
                )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"the volume's source table is damaged ({e})") from None
        return table


def load_sources(meta: Meta) -> SourceTable:
    return SourceTable.from_json(meta.get_setting(SETTING_SOURCES))


def save_sources(meta: Meta, table: SourceTable) -> None:
    meta.set_setting(SETTING_SOURCES, table.to_json())


# --- sealing credentials ----------------------------------------------------------------------


def _key_object(volume_uuid: str) -> str:
    return f"{volume_uuid}/{KEY_OBJECT}"


def sealing_key(store: ObjectStore, volume_uuid: str, *, create: bool) -> bytes | None:
    """The volume's key for source credentials, kept as an object of its own store (through
    the encryption layer when the volume is encrypted). Made when missing and ``create``;
    None when missing otherwise."""
    key = _key_object(volume_uuid)
    try:
        data = store.get(key)
    except ObjectNotFound:
        if not create:
            return None
        data = secrets.token_bytes(_KEY_SIZE)
        store.put(key, data)
        store.sync()
    if len(data) != _KEY_SIZE:
        raise ConfigError(f"the source key object {key} is damaged ({len(data)} bytes)")
    return data


def _aad(volume_uuid: str, name: str) -> bytes:
    return f"loftfs source credentials\0{volume_uuid}\0{name}".encode()


def seal_credentials(
    key: bytes, volume_uuid: str, name: str, credentials: dict[str, str]
) -> dict[str, str]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only where sources are used

    nonce = secrets.token_bytes(_NONCE_SIZE)
    blob = AESGCM(key).encrypt(nonce, json.dumps(credentials).encode(), _aad(volume_uuid, name))
    return {
        "algorithm": "AES-256-GCM",
        "sealed": base64.b64encode(nonce + blob).decode(),
    }


def unseal_credentials(key: bytes | None, volume_uuid: str, source: Source) -> dict[str, str]:
    """The stored credentials of ``source`` in the clear (``{}`` when none are stored)."""
    record = source.credentials
    if not record:
        return {}
    if key is None:
        raise ConfigError(
            f"source {source.name!r} has stored credentials but the volume's source key "
            f"object ({KEY_OBJECT}) is missing from its bucket: add the source again"
        )
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.b64decode(record["sealed"], validate=True)
        plain = AESGCM(key).decrypt(
            raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], _aad(volume_uuid, source.name)
        )
        creds = json.loads(plain)
    except (KeyError, ValueError, binascii.Error, InvalidTag) as e:
        raise ConfigError(
            f"the stored credentials of source {source.name!r} cannot be unsealed "
            f"({type(e).__name__}): add the source again with its credentials"
        ) from None
    return {k: str(v) for k, v in creds.items() if k in _CREDENTIALS}


# --- opening ----------------------------------------------------------------------------------


def open_source_store(
    source: Source, credentials: dict[str, str], *, metrics: Any = None
) -> ObjectStore:
    """The store of the source's bucket (or root directory), at its root: keys are full keys
    (the source's prefix included). Wrapped with retries like the volume's store. Nothing is
    ever written through it."""
    from loftfs.object import create_storage

    base = source.bucket_url
    if source.kind == "file":
        return create_storage("file", base.removeprefix("file://"), metrics=metrics)
    options: dict[str, Any] = dict(credentials)
    if source.endpoint:
        options["endpoint"] = source.endpoint
    if source.region:
        options["region"] = source.region
    return create_storage("s3", base, metrics=metrics, **options)


def open_source(
    source: Source,
    volume_uuid: str,
    volume_store: Callable[[], AbstractContextManager[ObjectStore]],
    *,
    metrics: Any = None,
) -> ObjectStore:
    """``open_source_store`` with the source's stored credentials unsealed; ``volume_store``
    gives the volume's own store (where the sealing key is), asked for only when the source
    has stored credentials."""
    credentials: dict[str, str] = {}
    if source.credentials:
        with volume_store() as store:
            key = sealing_key(store, volume_uuid, create=False)
        credentials = unseal_credentials(key, volume_uuid, source)
    return open_source_store(source, credentials, metrics=metrics)


class SourceStores:
    """The open stores of a volume's sources, by id, opened on first use (thread-safe). The
    table is read again when an unknown id is asked for (a source added after the mount)."""

    def __init__(
        self, meta: Meta, volume_store: ObjectStore, volume_uuid: str, metrics: Any = None
    ) -> None:
        self.meta = meta
        self.volume_store = volume_store
        self.uuid = volume_uuid
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stores: dict[int, tuple[Source, ObjectStore]] = {}
        self._table: SourceTable | None = None
        self._loaded_at = 0.0

    def get(self, source_id: int) -> tuple[Source, ObjectStore]:
        with self._lock:
            hit = self._stores.get(source_id)
            if hit is not None:
                return hit
            if self._table is None or time.monotonic() - self._loaded_at > 1.0:
                self._table = load_sources(self.meta)
                self._loaded_at = time.monotonic()
            source = self._table.by_id(source_id)
            if source is None:
                raise ConfigError(f"source #{source_id} is not registered in this volume")
            store = open_source(
                source, self.uuid, lambda: nullcontext(self.volume_store), metrics=self.metrics
            )
            self._stores[source_id] = (source, store)
            return source, store

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for _, store in stores:
            try:
                store.close()
            except Exception:
                pass
