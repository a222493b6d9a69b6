"""A view of a store under a key prefix: several volumes (or tenants) can share one bucket
without seeing each other's keys."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from loftfs.errors import ConfigError
from loftfs.object.interface import ObjectInfo, ObjectStore, ObjectStoreWrapper


class PrefixStore(ObjectStoreWrapper):
    """Every key ``k`` is stored as ``prefix + k``; listings strip the prefix again."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        super().__init__(inner)
        if not prefix or prefix.startswith("/") or "\0" in prefix:
            raise ConfigError(f"invalid key prefix {prefix!r}")
        self.prefix = prefix

    def describe(self) -> str:
        return f"{self.inner.describe()}{self.prefix}"

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        return self.inner.get(self.prefix + key, offset, limit)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(self.prefix + key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(self.prefix + key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self.inner.delete_many(self.prefix + k for k in keys)

    def head(self, key: str) -> ObjectInfo:
        return replace(self.inner.head(self.prefix + key), key=key)

    def get_checked(self, key: str, etag: str, offset: int = 0, limit: int = -1) -> bytes:
        return self.inner.get_checked(self.prefix + key, etag, offset, limit)

    def list(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", limit: int = 0
    ) -> Iterator[ObjectInfo]:
        n = len(self.prefix)
        after = self.prefix + start_after if start_after else ""
        for info in self.inner.list(self.prefix + prefix, after, delimiter, limit):
            yield replace(info, key=info.key[n:])
