"""Metadata engines. ``open_meta(url)`` picks the engine by URL scheme, importing it lazily."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from loftfs.errors import ConfigError
from loftfs.meta.interface import Meta

# scheme -> (module, class, pip extra hint)
_ENGINES: dict[str, tuple[str, str, str]] = {
    "sqlite3": ("loftfs.meta.sqlite", "SQLiteMeta", ""),
    "redis": ("loftfs.meta.redis", "RedisMeta", "redis"),
    "rediss": ("loftfs.meta.redis", "RedisMeta", "redis"),
    "postgres": ("loftfs.meta.postgres", "PostgresMeta", "psycopg[binary], psycopg-pool"),
    "postgresql": ("loftfs.meta.postgres", "PostgresMeta", "psycopg[binary], psycopg-pool"),
}


def engine_schemes() -> list[str]:
    return sorted(_ENGINES)


def open_meta(url: str) -> Meta:
    """Connect to the metadata engine named by ``url`` (e.g. ``sqlite3:///var/lib/loft/v.db``).

    Raises ``ConfigError`` for an unknown scheme or a malformed URL; ``MetaUnavailable`` when the
    engine cannot be reached. Does not require the volume to be formatted.
    """
    if "://" not in url:
        raise ConfigError(
            f"invalid metadata URL {url!r}: expected SCHEME://..., e.g. sqlite3:///path/meta.db"
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _ENGINES:
        raise ConfigError(
            f"unsupported metadata engine {scheme!r} in {url!r} "
            f"(supported: {', '.join(engine_schemes())})"
        )
    module, cls, hint = _ENGINES[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on installed extras
        raise ConfigError(f"engine {scheme!r} needs extra packages: {hint or e}") from e
    meta: Meta = getattr(mod, cls)(url)
    return meta


__all__ = ["Meta", "engine_schemes", "open_meta"]
