"""The control plane's database: SQLite by default, PostgreSQL in production, migrated with
Alembic on start (``Database.migrate``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from loftfs.errors import ConfigError, LoftError

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")


def engine_url(url: str) -> str:
    """``sqlite:///path`` or ``postgres(ql)://...`` as SQLAlchemy wants it (psycopg 3 driver);
    ``ConfigError`` for anything else."""
    url = url.strip()
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "invalid control plane database URL: use sqlite:////path/plane.db or "
            "postgres://user:password@host:port/db"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported control plane database {parsed.get_backend_name()!r}: "
            "use sqlite or postgres"
        )
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        raise ConfigError("the control plane needs a file for SQLite: sqlite:////path/plane.db")
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Database:
    """An engine and a session factory for the control plane's database."""

    def __init__(self, url: str) -> None:
        self.url = engine_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            path = parsed.database or ""
            if path != ":memory:":
                parent = os.path.dirname(os.path.abspath(path))
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"cannot create {parent}: {e.strerror}") from None
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=8, max_overflow=8, pool_timeout=30)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def describe(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def migrate(self) -> None:
        """Apply every migration not applied yet (``alembic upgrade head``)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", MIGRATIONS)
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except OperationalError as e:
            raise LoftError(
                f"cannot reach the control plane database {self.describe()}: {e.orig}"
            ) from None

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed at the end of the block, rolled back on an exception."""
        with self.sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()
