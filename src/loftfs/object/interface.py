"""The ``ObjectStore`` interface: the small surface loftfs needs from any object storage.

Blocking and thread-safe; the data path runs many calls at once from a bounded thread pool.
Errors are typed (``loftfs.errors``): ``ObjectNotFound``, ``ObjectAuthError``,
``ObjectCorrupted``, ``ObjectTransientError``, else ``ObjectStoreError``. Cross-cutting concerns
(prefix, compression, encryption, retries, fault injection) are wrappers, not backend flags.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from loftfs.errors import ObjectChanged


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime_ns: int = 0
    etag: str = ""
    is_prefix: bool = False  # a common prefix ("directory") from a delimiter listing


class ObjectStore(ABC):
    """Keys are ``/``-separated strings without a leading slash."""

    @abstractmethod
    def describe(self) -> str:
        """A URL-like description without secrets, e.g. ``file:///data/bucket/``."""

    @abstractmethod
    def create(self) -> None:
        """Create the bucket (or directory) if missing. Idempotent."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        """``limit`` bytes from ``offset`` (all of the rest when -1). ``ObjectNotFound``."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store atomically and durably: readers see the old object or the new, never a part."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove; deleting a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and metadata of one object. ``ObjectNotFound``."""

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        """``get`` of the object as it was when its ETag (as ``head`` and ``list`` report it)
        was ``etag``: ``ObjectChanged`` when it is another version now, so bytes of two
        versions are never mixed. Backends override this to check in the same request; the
        fallback asks ``head`` first."""
        current = self.head(key).etag
        if current != etag:
            raise ObjectChanged(f"{key!r} in {self.describe()} changed: {etag!r} -> {current!r}")
        return self.get(key, offset, limit)

    @abstractmethod
    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order, after ``start_after``.
        With a ``delimiter``, keys with it past the prefix fold into one ``is_prefix`` entry.
        ``limit`` 0 means no limit (pages are fetched lazily)."""

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Make every object ``put`` so far durable on stable storage (a power failure keeps
        it). Stores that are durable once ``put`` returns (S3) do nothing; the ``file``
        backend syncs the files written since the last call. Called for ``fsync()`` and at
        unmount. ``ObjectStoreError`` when the data may not be durable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class ObjectStoreWrapper(ObjectStore):
    """Base of decorators: forwards everything to ``inner``."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    def describe(self) -> str:
        return self.inner.describe()

    def create(self) -> None:
        self.inner.create()

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        return self.inner.get(key, offset, limit)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(keys)

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        return self.inner.get_checked(key, etag, offset, limit)

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, start_after, delimiter, limit)

    def sync(self) -> None:
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()
