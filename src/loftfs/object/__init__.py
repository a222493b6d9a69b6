"""Object storage. ``create_storage(storage, bucket)`` picks the backend by name, importing it
lazily; ``open_volume_storage(settings)`` builds the whole stack a volume uses."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from loftfs.errors import ConfigError, ObjectStoreError
from loftfs.meta.types import VolumeSettings
from loftfs.object.compress import ALGORITHMS, CompressedStore
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper
from loftfs.object.retry import RetryStore


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
    # next: "s3" -> ("loftfs.object.s3", "open_s3", "pip install 'loftfs[s3]'")
}


def storage_names() -> list[str]:
    return sorted(_BACKENDS)


def create_storage(
    storage: str, bucket: str, *, compress: str = "none", **kw: object
) -> ObjectStore:
    """The store for ``bucket`` of backend ``storage`` (``file``: a directory path), wrapped
    with retries of transient errors and, unless ``compress`` is ``none``, compression.
    Backend options (credentials, endpoint...) go in ``kw``. Raises ``ConfigError`` with a
    one-line message for an unknown backend, algorithm or a malformed bucket. Does not create
    the bucket: ``format`` calls ``create()``."""
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
    store: ObjectStore = RetryStore(factory(bucket, **kw))
    if compress != "none":
        store = CompressedStore(store, compress)
    return store


def open_volume_storage(settings: VolumeSettings) -> ObjectStore:
    """The object store of a formatted volume, as its settings describe it. Block keys carry the
    volume's uuid, so volumes can share a bucket."""
    return create_storage(settings.storage, settings.bucket, compress=settings.compress)


__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "ObjectStoreWrapper",
    "create_storage",
    "open_volume_storage",
    "storage_names",
]
