"""Object storage. ``create_storage(storage, bucket)`` picks the backend by name, importing it
lazily; ``open_volume_storage(settings)`` builds the whole stack a volume uses."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loftfs.errors import ConfigError, ObjectNotFound, ObjectStoreError
from loftfs.meta.types import VolumeSettings
from loftfs.object.compress import ALGORITHMS, CompressedStore
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper
from loftfs.object.retry import RetryStore

if TYPE_CHECKING:
    from loftfs.metrics import Metrics
    from loftfs.object.encrypt import VolumeSecret


def _open_file(bucket: str, **kw: object) -> ObjectStore:
    if kw:
        raise ConfigError(f"file storage takes no options (got {', '.join(sorted(kw))})")
    path = bucket[len("file://") :] if bucket.startswith("file://") else bucket
    if not path:
        raise ConfigError("file storage needs a directory as bucket, e.g. /var/lib/loft/data")
    if "\0" in path or not os.path.isabs(path):
        raise ConfigError(f"bucket {bucket!r} must be an absolute directory path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"bucket {bucket!r} exists and is not a directory")
    from loftfs.object.file import FileObjectStore

    try:
        return FileObjectStore(path)
    except ObjectStoreError as e:
        raise ConfigError(str(e)) from e


# storage name -> (module, factory function, pip extra hint); modules load on first use so a
# backend's client library is only needed by those who use it.
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "file": (__name__, "_open_file", ""),
    "s3": ("loftfs.object.s3", "open_s3", "pip install boto3 obstore"),
}


def storage_names() -> list[str]:
    return sorted(_BACKENDS)


def create_storage(
    storage: str,
    bucket: str,
    *,
    compress: str = "none",
    metrics: Any = None,  # Metrics | None (Any: callers pass backend options as **dict)
    **kw: object,
) -> ObjectStore:
    """The store for ``bucket`` of backend ``storage`` (``file``: a directory path), wrapped
    with retries of transient errors and, unless ``compress`` is ``none``, compression.
    Backend options (credentials, endpoint...) go in ``kw``. Raises ``ConfigError`` with a
    one-line message for an unknown backend, algorithm or a malformed bucket. Does not create
    the bucket: ``format`` calls ``create()``. With ``metrics``, every request the backend
    answers (each retry included, with the bytes actually sent) is counted there."""
    name = storage.lower()
    if name not in _BACKENDS:
        raise ConfigError(
            f"unsupported storage {storage!r} (supported: {', '.join(storage_names())})"
        )
    if compress not in ALGORITHMS:
        raise ConfigError(
            f"unknown compression {compress!r} (supported: {', '.join(sorted(ALGORITHMS))})"
        )
    module, func, hint = _BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on installed extras
        raise ConfigError(f"storage {storage!r} needs extra packages: {hint or e}") from e
    factory: Callable[..., ObjectStore] = getattr(mod, func)
    store: ObjectStore = factory(bucket, **kw)
    if metrics is not None:
        from loftfs.object.metered import MeteredStore

        store = MeteredStore(store, metrics)
    store = RetryStore(store)
    if compress != "none":
        store = CompressedStore(store, compress)
    return store


def open_storage_url(url: str, **options: object) -> ObjectStore:
    """The store a storage URL names, wrapped like ``create_storage`` does (retries; compression
    when ``compress=...`` is among ``options``): ``file:///abs/dir`` is the file backend,
    ``http(s)://host[:port]/bucket[/prefix]`` (path-style, custom endpoint) and
    ``s3://bucket[/prefix]`` are the s3 backend. Other ``options`` go to the backend
    (credentials, region...). Raises ``ConfigError`` with a one-line message for any other
    scheme or a malformed URL. Does not create the bucket."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError(
            f"storage URL {url!r} has no scheme (use file:///dir, s3://bucket or "
            "http(s)://host:port/bucket)"
        )
    scheme = scheme.lower()
    compress = options.pop("compress", "none")
    if not isinstance(compress, str):
        raise ConfigError(f"compress must be a string, not {compress!r}")
    if scheme == "file":
        return create_storage("file", url, compress=compress, **options)
    if scheme in ("s3", "http", "https"):
        return create_storage("s3", url, compress=compress, **options)
    raise ConfigError(
        f"unsupported storage URL scheme {scheme!r} in {url!r} (use file, s3, http or https)"
    )


def volume_storage_options(settings: VolumeSettings) -> dict[str, object]:
    """The backend options a volume's store opens with: those ``format`` stored (region,
    endpoint, credentials), with the credentials of the environment (``LOFT_ACCESS_KEY``,
    ``LOFT_SECRET_KEY``, ``LOFT_SESSION_TOKEN``; ``loft mount --access-key ...`` sets them) in
    place of the stored ones when set. ``ConfigError`` when only one key of a pair is set."""
    options: dict[str, object] = dict(settings.storage_options)
    if settings.storage.lower() == "s3":
        from loftfs.object.s3 import CREDENTIAL_OPTIONS, credentials_from_env

        override = credentials_from_env()
        if override:
            for name in CREDENTIAL_OPTIONS:
                options.pop(name, None)
            options.update(override)
    return options


def open_volume_storage(
    settings: VolumeSettings,
    secret: VolumeSecret | None = None,
    *,
    need_data: bool = True,
    metrics: Metrics | None = None,
) -> ObjectStore:
    """The object store of a formatted volume, as its settings describe it. Block keys carry the
    volume's uuid, so volumes can share a bucket.

    The stack, outermost first: compression, encryption, retries, the backend. Data is
    compressed, then encrypted (ciphertext does not compress); a read authenticates and
    decrypts, then decompresses. An encrypted volume needs its ``secret`` (``VolumeSecret``,
    see ``loftfs.object.encrypt.secret_from_sources``): it is checked here by unwrapping the
    data key, so a wrong one raises ``ConfigError`` before any object is read, and a missing
    one too unless ``need_data`` is false: commands that only list and delete objects (gc,
    destroy) then get a locked encryption layer, whose ``get``/``put`` refuse."""
    store = create_storage(
        settings.storage,
        settings.bucket,
        compress="none",
        metrics=metrics,
        **volume_storage_options(settings),
    )
    if settings.encryption:
        from loftfs.object.encrypt import volume_store

        store = volume_store(
            store,
            settings.encryption,
            secret,
            settings.uuid,
            settings.name,
            need_data=need_data,
        )
    elif secret is not None:
        logging.getLogger(__name__).warning(
            "volume %s is not encrypted: the %s is not used", settings.name, secret.describe()
        )
    if settings.compress != "none":
        store = CompressedStore(store, settings.compress)
    return store


VOLUME_MARKER = ".loftfs-volume"  # <uuid>/.loftfs-volume: "this bucket holds that volume"


def marker_key(volume_uuid: str) -> str:
    """The key of the object ``format`` writes to claim a bucket for a volume."""
    return f"{volume_uuid}/{VOLUME_MARKER}"


def probe_volume_storage(store: ObjectStore, settings: VolumeSettings) -> None:
    """Check that ``store`` answers and holds the volume's marker, so that a mount with wrong
    credentials, an unreachable endpoint or the wrong bucket fails at once with one line instead
    of answering every read with EIO later. Raises ``ConfigError`` or the store's typed error."""
    try:
        store.head(marker_key(settings.uuid))
    except ObjectNotFound as e:
        raise ConfigError(
            f"{store.describe()} holds no data of volume {settings.name} ({settings.uuid}): "
            "wrong bucket, or the bucket was emptied"
        ) from e
    except ObjectStoreError as e:
        raise type(e)(f"cannot use the storage of volume {settings.name}: {e}") from e


__all__ = [
    "VOLUME_MARKER",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStoreWrapper",
    "create_storage",
    "marker_key",
    "open_storage_url",
    "open_volume_storage",
    "probe_volume_storage",
    "storage_names",
    "volume_storage_options",
]
