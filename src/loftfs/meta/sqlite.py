"""SQLite engine: ``sqlite3:///abs/path/meta.db`` (or ``sqlite3://relative/path.db``).

One connection per thread. The database runs in WAL mode with ``synchronous=NORMAL``: a
committed transaction survives a crash of the process (the WAL is in the OS page cache), while
a power loss may drop the last transactions but never corrupts the file. Readers never block the
writer. Write transactions start with ``BEGIN IMMEDIATE`` (no lock upgrades, hence no deadlocks)
and wait on a busy database through ``busy_timeout``, then retry; several threads and several
processes (two mounts of one volume on one host) can use one file at the same time.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from loftfs.errors import ConfigError, MetaUnavailable, NotFormatted
from loftfs.meta.sql import SQLDialect, SQLMeta
from loftfs.meta.types import VolumeSettings

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000

_CONFLICT_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (extended codes keep these low bits)


class SQLiteDialect(SQLDialect):
    int_type = "INTEGER"
    blob_type = "BLOB"
    norowid = " WITHOUT ROWID"
    placeholder = "?"

    def blob_concat(self, a: str, b: str) -> str:
        # || yields TEXT in SQLite; the cast keeps the bytes as they are
        return f"CAST({a} || {b} AS BLOB)"


def path_of(url: str) -> str:
    """The database file named by a ``sqlite3://`` URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite3":
        raise ConfigError(f"not a SQLite metadata URL: {url!r}")
    path = unquote(parts.netloc + parts.path)
    if not path or path.endswith("/"):
        raise ConfigError(f"invalid SQLite metadata URL {url!r}: expected sqlite3:///path/meta.db")
    return os.path.abspath(path)


class SQLiteMeta(SQLMeta):
    """The embedded default engine (one database file per volume)."""

    dialect = SQLiteDialect()
    remote = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = path_of(url)
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise MetaUnavailable(f"directory of the metadata database does not exist: {directory}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise MetaUnavailable(
                f"directory of the metadata database is not writable: {directory}"
            )
        if os.path.exists(self.path) and not os.access(self.path, os.R_OK | os.W_OK):
            raise MetaUnavailable(f"metadata database is not readable and writable: {self.path}")
        self._may_create = False  # only init_volume creates the database file
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # One writer at a time in this process: SQLite allows one anyway, and a thread that
        # waits here wakes the moment the writer commits, where SQLite's busy handler would
        # sleep in steps of up to 100 ms between tries (other processes still meet that).
        self._write_lock = threading.RLock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise MetaUnavailable("the metadata engine is closed")
        if not self._may_create and not os.path.exists(self.path):
            raise NotFormatted(
                f"no loftfs volume at {self.url}: the database {self.path} does not exist "
                "(run 'loft format' first)"
            )
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise MetaUnavailable(f"cannot open metadata database {self.path}: {e}") from e
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def init_volume(self, settings: VolumeSettings) -> None:
        self._may_create = True
        try:
            super().init_volume(settings)
        finally:
            self._may_create = False

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        if not write:
            return super()._run(fn, write)
        with self._write_lock:
            return super()._run(fn, write)

    def _begin(self, cur: Any, write: bool) -> None:
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _is_conflict(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _CONFLICT_CODES
        msg = str(exc)
        return "locked" in msg or "busy" in msg

    def _is_missing_schema(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)

    def _is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def _engine_close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def _engine_destroy(self) -> None:
        super()._engine_destroy()
        try:
            self._conn().execute("VACUUM")
        except sqlite3.Error:
            pass  # another client holds the file open: the space is reused later
