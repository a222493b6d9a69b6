"""PostgreSQL engine: ``postgres://user:password@host:port/dbname?schema=NAME``.

A volume lives in one schema of a database (default ``public``), so many volumes can share one
database: ``format`` creates the schema when missing, every connection sets its
``search_path`` to it, and ``destroy`` drops this volume's tables (and the schema, when it is
not ``public`` and holds nothing else).

URL query parameters of loftfs (every other one goes to libpq unchanged, e.g. ``sslmode``,
``sslrootcert``, ``connect_timeout``, ``application_name``, ``target_session_attrs``):

- ``schema``: lowercase identifier (``[a-z_][a-z0-9_]*``, at most 63 bytes, not ``pg_*``).
- ``pool_max``: connections this client may open (default 10); one is kept open when idle.
- ``retry_timeout``: seconds an operation keeps retrying while the server is unreachable or
  the database stays busy, before it fails with ``MetaUnavailable`` (default 30).
- ``statement_timeout``: seconds one statement may run, and a transaction may stay idle, on
  the server (default 30); a server that does not answer at all for that long (hung, paused,
  network black hole) has its connection cut by the client.
- ``isolation``: ``read_committed`` (default) or ``serializable``; see below.
- ``pipeline``: ``auto`` (default), ``on`` or ``off``; see below.

Transactions. Writers run at READ COMMITTED and lock, with ``SELECT ... FOR UPDATE``, every
inode, chunk and session row they read before deciding what to write (the shared layer reads
every inode it changes, usually the parent directory first, before writing), so two
operations on the same inodes queue behind each other instead of failing; deadlocks (40P01),
serialization failures (40001) and unique violations of racing inserts (23505) are retried.
Readers run as REPEATABLE READ READ ONLY snapshots, which never conflict, or as a single statement (its own snapshot) when that is all
they need. ``format`` alone runs SERIALIZABLE, so that two concurrent formats cannot both see
an empty schema. ``isolation=serializable`` runs writers SERIALIZABLE without row locks
instead (optimistic, retried on 40001): measured slower under contention, kept for comparison
and for databases whose READ COMMITTED is not PostgreSQL's.

Round trips. A read that needs one statement (getattr, reading a chunk) is that statement
alone: one round trip. Write transactions run in libpq pipeline mode: ``BEGIN`` travels with
the first read, and all writes travel with ``COMMIT``, so a create costs three round trips
whatever the number of statements. Reads of several statements are pipelined too when the
server is on another machine; on this machine (loopback address or Unix socket) a round trip
costs less than pipelining's own work, so they are sent one by one (``pipeline=auto``).
``pipeline=on``/``off`` force either way for every transaction. Statements are prepared by
psycopg after their fifth use per connection.

Usage counters are accumulated in memory and flushed about once a second
(``COUNTERS_IN_TXN = False``): in every transaction they would be two rows that every write
of the volume locks until its commit is on disk.

Failures. Connection errors (server down, restarting, network) are retried with backoff for
``retry_timeout`` seconds, then ``MetaUnavailable`` names host and database (never the
password); the pool reconnects by itself once the server is back, so the same engine object
works again. A wrong password, unknown host, missing database or refused TLS fails at once.
A connection lost while ``COMMIT`` was on its way is not retried (the change may or may not
have been applied): ``MetaUnavailable`` says so.
A server that stops answering is cut off by a watchdog thread (see ``_Watchdog``). Measured
figures and the reasons behind each choice: ``docs/backends/postgres.md``.

Compatibility with PostgreSQL-compatible distributed SQL (CockroachDB, YugabyteDB): the engine
uses plain tables, a partial index, ``INSERT ... ON CONFLICT ... DO UPDATE ... RETURNING``,
``SELECT ... FOR UPDATE`` and session settings only: no advisory locks, LISTEN/NOTIFY,
sequences, triggers, server-side functions, ``SKIP LOCKED`` or ``LOCK TABLE``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import psycopg
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from loftfs.errors import ConfigError, MetaUnavailable, NotFormatted
from loftfs.meta.sql import TABLES, SQLDialect, SQLMeta, SQLTxn
from loftfs.meta.txn import Txn
from loftfs.meta.types import VolumeSettings

T = TypeVar("T")
log = logging.getLogger(__name__)

SCHEMES = ("postgres", "postgresql")
DEFAULT_SCHEMA = "public"
DEFAULT_POOL_MAX = 10
DEFAULT_RETRY_TIMEOUT_S = 30.0
DEFAULT_STATEMENT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 10
ISOLATIONS = ("read_committed", "serializable")
OUTAGE_DELAY_MAX_S = 0.5  # while the server is down, it is tried at least this often
_OWN_PARAMS = (
    "schema",
    "pool_max",
    "retry_timeout",
    "statement_timeout",
    "isolation",
    "pipeline",
)
PIPELINE_MODES = ("auto", "on", "off")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# SQLSTATEs: retried at once (with a short backoff) as write conflicts
_CONFLICTS = frozenset({"40001", "40P01", "23505", "55P03"})
# the volume's tables or schema do not exist
_MISSING = frozenset({"42P01", "3F000"})
# connection-level failures reported by a server that stays reachable: retried as an outage
_OUTAGE_CLASSES = ("08", "57P")
# connection failures that retrying cannot fix: reported at once
_PERMANENT_CONNECT = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "failed to resolve host",
    "could not translate host name",
    "name or service not known",
    "ssl",
    "certificate",
    "permission denied",
    "invalid",
)
_TRANSIENT_CONNECT = ("temporary failure", "try again")


@dataclass(frozen=True, slots=True)
class PgConfig:
    """A parsed ``postgres://`` URL. ``conninfo`` holds the password: never print it."""

    conninfo: str
    where: str  # host:port/dbname, for messages
    connect_timeout: int
    schema: str
    pool_max: int
    retry_timeout: float
    statement_timeout: float
    isolation: str
    pipeline: str  # auto, on, off
    local: bool  # every server named is on this machine
    password: str


def _scrub(text: str, secret: str) -> str:
    """One line, without the password."""
    line = " ".join(str(text).split())
    return line.replace(secret, "****") if secret else line


def _number(name: str, text: str, low: float, high: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"invalid {name}={text!r} in the metadata URL: expected {kind} in "
                          f"[{low:g}, {high:g}]")  # fmt: skip
    return value


def parse_url(url: str) -> PgConfig:
    """Split a ``postgres://`` or ``postgresql://`` URL into libpq connection parameters and
    the loftfs options (see the module docstring). Raises ``ConfigError`` for anything
    malformed, without the password in the message."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ConfigError(f"not a PostgreSQL metadata URL (postgres://...): {scheme}://...")
    if "#" in rest:
        raise ConfigError("invalid PostgreSQL metadata URL: '#' must be percent-encoded (%23)")
    base, _, query = rest.partition("?")
    own: dict[str, str] = {}
    libpq: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _OWN_PARAMS:
            if key in own:
                raise ConfigError(f"parameter {key!r} appears twice in the metadata URL")
            own[key] = value
        else:
            libpq.append((key, value))
    uri = "postgresql://" + base + ("?" + urlencode(libpq) if libpq else "")
    try:
        params: dict[str, Any] = conninfo_to_dict(uri)
    except psycopg.Error as e:
        secret = base.rsplit("@", 1)[0].partition(":")[2] if "@" in base else ""
        raise ConfigError(f"invalid PostgreSQL metadata URL: {_scrub(str(e), secret)}") from None
    password = str(params.get("password") or "")
    dbname = str(params.get("dbname") or "")
    if not dbname:
        raise ConfigError(
            "the PostgreSQL metadata URL names no database: "
            "expected postgres://user:password@host:port/DATABASE?schema=NAME"
        )
    for port_text in str(params.get("port") or "").split(","):
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ConfigError(f"invalid port {port_text!r} in the metadata URL")
    params.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT_S))
    connect_timeout = int(_number("connect_timeout", str(params["connect_timeout"]), 1, 3600, True))
    params.setdefault("application_name", "loftfs")
    schema = own.get("schema", DEFAULT_SCHEMA)
    if not _SCHEMA_RE.match(schema) or schema.startswith("pg_") or schema == "information_schema":
        raise ConfigError(
            f"invalid schema {schema!r} in the metadata URL: use 1-63 characters a-z, 0-9 and "
            "'_', not starting with a digit or 'pg_'"
        )
    isolation = own.get("isolation", "read_committed").lower()
    if isolation not in ISOLATIONS:
        raise ConfigError(
            f"invalid isolation={isolation!r} in the metadata URL "
            f"(expected one of: {', '.join(ISOLATIONS)})"
        )
    mode = own.get("pipeline", "auto").lower()
    if mode not in PIPELINE_MODES:
        raise ConfigError(
            f"invalid pipeline={mode!r} in the metadata URL "
            f"(expected one of: {', '.join(PIPELINE_MODES)})"
        )
    host = str(params.get("host") or params.get("hostaddr") or "local socket")
    port = str(params.get("port") or "5432")
    return PgConfig(
        conninfo=make_conninfo("", **params),
        where=f"{host}:{port}/{dbname}",
        connect_timeout=connect_timeout,
        schema=schema,
        pool_max=int(
            _number("pool_max", own.get("pool_max", str(DEFAULT_POOL_MAX)), 1, 1000, True)
        ),
        retry_timeout=_number(
            "retry_timeout", own.get("retry_timeout", str(DEFAULT_RETRY_TIMEOUT_S)), 0, 86400
        ),
        statement_timeout=_number(
            "statement_timeout",
            own.get("statement_timeout", str(DEFAULT_STATEMENT_TIMEOUT_S)),
            0.1,
            86400,
        ),
        isolation=isolation,
        pipeline=mode,
        local=_local(params),
        password=password,
    )


def _local(params: dict[str, Any]) -> bool:
    """Whether every server the parameters name is on this machine (a Unix socket or a
    loopback address), where a round trip costs less than pipelining's own work."""
    hosts = str(params.get("hostaddr") or params.get("host") or "").split(",")
    for host in hosts:
        host = host.strip().strip("[]").lower()
        if not host or host.startswith("/") or host.startswith("@") or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        return False
    return True


def redact_url(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` parameter) as ``****``."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            authority = userinfo.split(":", 1)[0] + ":****@" + host
    tail = re.sub(r"(?i)(^|[?&])(password=)[^&]*", r"\1\2****", tail)
    return scheme + sep + authority + slash + tail


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresDialect(SQLDialect):
    int_type = "BIGINT"
    blob_type = "BYTEA"
    placeholder = "%s"
    returning = True
    join_entry_attr = True

    def __init__(self, row_lock: str) -> None:
        super().__init__()
        self.row_lock = row_lock


# --- failures ---------------------------------------------------------------------------------


class _Outage(Exception):
    """The server cannot be reached now; worth retrying until the deadline."""


class _CommitUnknown(Exception):
    """The connection broke while COMMIT was on its way."""


def _broken(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


def _message(e: BaseException) -> str:
    notes = getattr(e, "__notes__", None)
    if notes:
        return str(notes[-1])
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return str(primary or e or type(e).__name__)


class _Watchdog:
    """Cuts the connection of a transaction whose server has not answered for ``limit``
    seconds. ``statement_timeout`` is enforced by the server, so it cannot fire when the
    server hangs (stopped process, black-holed network), and TCP keeps such a connection open
    forever: shutting the socket down makes the blocked call fail at once, and the transaction
    is retried (or reported) like any lost connection."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active: dict[int, list[Any]] = {}  # token -> [deadline, connection]
        self._cut: set[int] = set()  # tokens whose connection was cut
        self._token = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def begin(self, conn: psycopg.Connection[Any]) -> int:
        with self._lock:
            self._token += 1
            token = self._token
            self._active[token] = [time.monotonic() + self.limit, conn]
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, name="loftfs-pg-watchdog", daemon=True
                )
                self._thread.start()
        return token

    def touch(self, token: int) -> None:
        """The client is about to wait for the server again: restart its clock."""
        entry = self._active.get(token)
        if entry is not None:
            entry[0] = time.monotonic() + self.limit

    def end(self, token: int) -> bool:
        """Forget the transaction; True when its connection was cut."""
        with self._lock:
            if self._active.pop(token, None) is not None:
                return False
            if token in self._cut:
                self._cut.discard(token)
                return True
            return False

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 4)):
            now = time.monotonic()
            with self._lock:
                for token, (deadline, conn) in list(self._active.items()):
                    if deadline < now:
                        del self._active[token]
                        self._cut.add(token)
                        log.warning(
                            "metadata server did not answer for %.0fs: closing the connection",
                            self.limit,
                        )
                        _cut(conn)


def _cut(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down so that a thread blocked on it wakes with an error."""
    try:
        fd = conn.pgconn.socket
        with socket.socket(fileno=socket.dup(fd)) as s:
            s.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


class _NeedTxn(Exception):
    """A read guessed to need one statement needs more: rerun it in a transaction."""


class _Cursor:
    """A cursor that tells the watchdog before every wait for the server, and allows at most
    ``limit`` statements (0: any number)."""

    __slots__ = ("_cur", "_left", "_token", "_touch")

    def __init__(
        self, cur: psycopg.Cursor[Any], watchdog: _Watchdog, token: int, limit: int = 0
    ) -> None:
        self._cur = cur
        self._touch = watchdog.touch
        self._token = token
        self._left = limit or -1

    def execute(self, query: str, args: tuple[Any, ...] = ()) -> _Cursor:
        if self._left == 0:
            raise _NeedTxn
        self._left -= 1
        self._touch(self._token)
        self._cur.execute(query, args or None)  # type: ignore[arg-type]
        return self

    def executemany(self, query: str, rows: list[tuple[Any, ...]]) -> _Cursor:
        if self._left == 0:
            raise _NeedTxn
        self._left -= 1
        self._touch(self._token)
        self._cur.executemany(query, rows)  # type: ignore[arg-type]
        return self

    def fetchone(self) -> Any:
        self._touch(self._token)
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        self._touch(self._token)
        return self._cur.fetchall()


# --- the engine -------------------------------------------------------------------------------


class PostgresMeta(SQLMeta):
    """A volume in one schema of a PostgreSQL database (see the module docstring)."""

    COUNTERS_IN_TXN = False
    #: how long one request for a pooled connection waits before the server is probed
    POOL_WAIT_S = 5.0
    #: a hung server's connection is cut after statement_timeout plus this
    HANG_GRACE_S = 2.0

    def __init__(self, url: str) -> None:
        cfg = parse_url(url)
        super().__init__(redact_url(url))  # ``self.url`` appears in messages
        self.cfg = cfg
        read_committed = self.cfg.isolation == "read_committed"
        self.dialect = PostgresDialect(" FOR UPDATE" if read_committed else "")
        self._begin_write = "BEGIN ISOLATION LEVEL " + (
            "READ COMMITTED" if read_committed else "SERIALIZABLE"
        )
        self._begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        self._begin_strict = "BEGIN ISOLATION LEVEL SERIALIZABLE"
        self._strict = threading.local()
        self._multi_statement: set[CodeType] = set()  # read functions that need a snapshot
        self.pipeline_writes = self.cfg.pipeline != "off"
        self.pipeline_reads = self.cfg.pipeline == "on" or (
            self.cfg.pipeline == "auto" and not self.cfg.local
        )
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pool_lock = threading.Lock()
        self._down = False  # the last attempt found the server unreachable
        self._watchdog = _Watchdog(self.cfg.statement_timeout + self.HANG_GRACE_S)
        timeout_ms = int(self.cfg.statement_timeout * 1000)
        self._session_sql = (
            f"SET search_path TO {quote_ident(self.cfg.schema)}",
            f"SET statement_timeout = {timeout_ms}",
            f"SET idle_in_transaction_session_timeout = {timeout_ms}",
        )

    def __repr__(self) -> str:
        return f"PostgresMeta({self.cfg.where}, schema={self.cfg.schema})"

    @property
    def where(self) -> str:
        """host:port/dbname and schema, for messages."""
        return f"{self.cfg.where} (schema {self.cfg.schema})"

    # --- connections --------------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        for stmt in self._session_sql:
            conn.execute(stmt)

    def _probe(self, deadline: float) -> None:
        """Connect once, outside the pool, to learn whether (and why not) the server accepts
        connections: raises ``MetaUnavailable`` for errors that retrying cannot fix, and
        ``_Outage`` (marking the server down) otherwise."""
        left = max(1, min(self.cfg.connect_timeout, int(deadline - time.monotonic() + 0.999)))
        try:
            conn = psycopg.connect(self.cfg.conninfo, autocommit=True, connect_timeout=left)
        except psycopg.Error as e:
            text = _scrub(_message(e), self.cfg.password)
            low = text.lower()
            transient = any(w in low for w in _TRANSIENT_CONNECT)
            if not transient and any(w in low for w in _PERMANENT_CONNECT):
                raise MetaUnavailable(
                    f"cannot connect to the metadata database {self.cfg.where}: {text}"
                ) from None
            self._down = True
            raise _Outage(text) from None
        conn.close()

    def _get_pool(self, deadline: float) -> ConnectionPool[psycopg.Connection[Any]]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._closed:
                raise MetaUnavailable("the metadata engine is closed")
            if self._pool is None:
                self._probe(deadline)  # a wrong password fails here, at once
                self._pool = ConnectionPool(
                    self.cfg.conninfo,
                    min_size=1,
                    max_size=self.cfg.pool_max,
                    kwargs={"autocommit": True},
                    configure=self._configure,
                    name=f"loftfs {self.cfg.where}",
                    timeout=self.POOL_WAIT_S,
                    # give up a failing background reconnection soon: the next request
                    # starts a fresh attempt at once, so a returning server is used at once
                    reconnect_timeout=1.0,
                    num_workers=2,
                    open=True,
                )
            return self._pool

    def _acquire(
        self, deadline: float
    ) -> tuple[ConnectionPool[psycopg.Connection[Any]], psycopg.Connection[Any]]:
        """A pooled connection. While the server is known to be down, each call first tries a
        direct connection (refused at once), so that the pool is asked again only once the
        server answers; raises ``_Outage`` to wait and retry."""
        if self._down:
            self._probe(deadline)
            self._down = False
        pool = self._get_pool(deadline)
        wait = max(0.05, min(self.POOL_WAIT_S, deadline - time.monotonic()))
        try:
            return pool, pool.getconn(timeout=wait)
        except PoolTimeout:
            # all connections busy, or the server is gone: ask the server directly
            self._probe(deadline)
            raise _Outage(
                f"no free connection among {self.cfg.pool_max} (pool_max) within {wait:.0f}s"
            ) from None
        except PoolClosed:
            raise MetaUnavailable("the metadata engine is closed") from None

    @staticmethod
    def _release(
        pool: ConnectionPool[psycopg.Connection[Any]], conn: psycopg.Connection[Any]
    ) -> None:
        """Give the connection back, rolling back what is left open. After a failed statement
        psycopg's ``rollback()`` also forgets the connection's prepared statements: in
        pipeline mode the statements queued behind the failed one were skipped, their
        PREPARE included, so the client's list may name statements the server never made."""
        if not _broken(conn):
            status = conn.info.transaction_status
            try:
                if status == TransactionStatus.INERROR:
                    conn.rollback()
                elif status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
            except psycopg.Error:
                conn.close()  # unusable: the pool replaces it
        try:
            pool.putconn(conn)
        except Exception:  # a pool closed meanwhile: just drop the connection
            conn.close()

    # --- transactions -------------------------------------------------------------------------

    def _attempt(
        self,
        conn: psycopg.Connection[Any],
        fn: Callable[[Any], T],
        write: bool,
        key: CodeType | None,
    ) -> T:
        """One try of one transaction on ``conn``.

        A read function that has only ever needed one statement (``key``: its code) runs
        that statement alone, outside any transaction: one round trip, and one statement
        sees one snapshot anyway. When it asks for a second statement it is rerun in a
        transaction, and is never tried alone again. Other transactions send ``BEGIN``, the
        statements and ``COMMIT``, pipelined where ``pipeline_writes``/``pipeline_reads``
        say: ``BEGIN`` then travels with the first read and the writes with ``COMMIT``.
        """
        watchdog = self._watchdog
        token = watchdog.begin(conn)
        committing = False
        try:
            if write:
                begin = (
                    self._begin_strict if getattr(self._strict, "on", False) else self._begin_write
                )
            else:
                begin = self._begin_read
                if key is not None and key not in self._multi_statement:
                    try:
                        return fn(_Cursor(conn.cursor(), watchdog, token, limit=1))
                    except _NeedTxn:
                        self._multi_statement.add(key)
            cur = _Cursor(conn.cursor(), watchdog, token)
            if not (self.pipeline_writes if write else self.pipeline_reads):
                cur.execute(begin)
                result = fn(cur)
                committing = write
                cur.execute("COMMIT")
                return result
            with conn.pipeline() as pipeline:
                try:
                    cur.execute(begin)
                    result = fn(cur)
                    committing = write
                    cur.execute("COMMIT")
                except BaseException:
                    # collect what the server answered to the queued statements now, so that
                    # leaving the pipeline does not log the failure a second time
                    with contextlib.suppress(psycopg.Error):
                        pipeline.sync()
                    raise
            return result
        except psycopg.Error as e:
            if watchdog.end(token):
                e.add_note(f"the server did not answer for {watchdog.limit:g}s")
            if committing and _broken(conn):
                raise _CommitUnknown(_message(e)) from e
            raise
        finally:
            watchdog.end(token)

    def _transaction(self, fn: Callable[[Txn], T], write: bool) -> T:
        dialect = self.dialect
        key = None if write else getattr(fn, "__code__", None)
        return self._run(lambda cur: fn(SQLTxn(cur, dialect, write)), write, key)

    def _run(self, fn: Callable[[Any], T], write: bool, key: CodeType | None = None) -> T:
        """Run ``fn(cursor)`` in one transaction: retry conflicts and outages until
        ``retry_timeout`` has passed (see the module docstring)."""
        if self._closed:
            raise MetaUnavailable("the metadata engine is closed")
        deadline = time.monotonic() + self.cfg.retry_timeout
        conflict_delay = 0.001
        outage_delay = 0.05
        fast_retries = self.cfg.pool_max + 1  # stale pooled connections after a restart
        while True:
            try:
                pool, conn = self._acquire(deadline)
            except _Outage as e:
                outage_delay = self._wait_outage(deadline, outage_delay, str(e))
                continue
            try:
                result = self._attempt(conn, fn, write, key)
            except _CommitUnknown as e:
                self._release(pool, conn)
                raise MetaUnavailable(
                    f"the connection to the metadata database {self.cfg.where} was lost while "
                    f"committing; the change may or may not have been applied: "
                    f"{_scrub(str(e), self.cfg.password)}"
                ) from e
            except psycopg.Error as e:
                broken = _broken(conn)
                self._release(pool, conn)
                state = getattr(e, "sqlstate", None) or ""
                text = _scrub(_message(e), self.cfg.password)
                if broken or state.startswith(_OUTAGE_CLASSES):
                    # the next try first checks with a connection of its own that the server
                    # answers (refused at once while it is down), then takes the next pooled
                    # connection; stale ones, after a restart, each cost one quick failure
                    self._down = True
                    if fast_retries > 0 and time.monotonic() < deadline:
                        fast_retries -= 1
                        continue
                    outage_delay = self._wait_outage(deadline, outage_delay, text)
                    continue
                if state in _CONFLICTS:
                    if time.monotonic() < deadline:
                        time.sleep(conflict_delay * (1 + random.random()))
                        conflict_delay = min(conflict_delay * 2, 0.05)
                        continue
                    raise MetaUnavailable(
                        f"the metadata database {self.cfg.where} stays busy: {text}"
                    ) from e
                if state in _MISSING:
                    if self._later_table_missing(e):
                        self._add_later_tables()
                        continue
                    if self._schema_denied():
                        raise MetaUnavailable(
                            f"permission denied for schema {self.cfg.schema} on "
                            f"{self.cfg.where}: the user may not use it"
                        ) from e
                    raise NotFormatted(
                        f"no loftfs volume in {self.where} (run 'loft format' first)"
                    ) from e
                if state == "57014":
                    raise MetaUnavailable(
                        f"a metadata statement ran past statement_timeout="
                        f"{self.cfg.statement_timeout:g}s on {self.cfg.where}"
                    ) from e
                raise MetaUnavailable(f"metadata database error on {self.cfg.where}: {text}") from e
            except BaseException:
                self._release(pool, conn)
                raise
            self._release(pool, conn)
            return result

    def _schema_denied(self) -> bool:
        """Whether the schema exists but this user lacks USAGE on it: PostgreSQL then leaves
        it out of ``search_path`` and reports the tables as missing."""
        pool = self._pool
        if pool is None:
            return False
        try:
            with pool.connection(timeout=self.POOL_WAIT_S) as conn:
                row = conn.execute(
                    "SELECT has_schema_privilege(oid, 'USAGE') FROM pg_catalog.pg_namespace "
                    "WHERE nspname = %s",
                    (self.cfg.schema,),
                ).fetchone()
        except (psycopg.Error, PoolTimeout, PoolClosed):
            return False
        return row is not None and not row[0]

    def _wait_outage(self, deadline: float, delay: float, reason: str) -> float:
        """Sleep before the next try while the server is unreachable; ``MetaUnavailable``
        once ``retry_timeout`` has passed. Returns the next delay."""
        if self._closed:
            raise MetaUnavailable("the metadata engine is closed")
        left = deadline - time.monotonic()
        if left <= 0:
            raise MetaUnavailable(
                f"cannot reach the metadata database {self.cfg.where} "
                f"(retried for {self.cfg.retry_timeout:g}s): {reason}"
            )
        time.sleep(min(left, delay * (0.5 + random.random())))
        return min(delay * 2, OUTAGE_DELAY_MAX_S)

    # --- dialect hooks (error classes, used by the shared SQL layer) --------------------------

    def _is_conflict(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _CONFLICTS

    def _is_missing_schema(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _MISSING

    def _is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error)

    # --- volume lifecycle ---------------------------------------------------------------------

    def init_volume(self, settings: VolumeSettings) -> None:
        """Format. Runs SERIALIZABLE: of two concurrent formats of one schema, one fails with
        ``VolumeExists``."""
        self._strict.on = True
        try:
            super().init_volume(settings)
        finally:
            self._strict.on = False

    def _engine_create(self) -> None:
        """The schema when missing (``CREATE SCHEMA`` needs ``CREATE`` on the database even
        with ``IF NOT EXISTS``, so a schema an administrator made for a tenant role is left
        alone), then the tables."""
        create_schema = f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.cfg.schema)}"
        statements = self.dialect.schema()

        def fn(cur: Any) -> None:
            cur.execute(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (self.cfg.schema,)
            )
            if cur.fetchone() is None:
                cur.execute(create_schema)
            for stmt in statements:
                cur.execute(stmt)

        self._run(fn, True)

    def _engine_destroy(self) -> None:
        """Drop this volume's tables, named with their schema, then the schema itself unless
        it is ``public`` or holds anything else (then it stays)."""
        schema = quote_ident(self.cfg.schema)

        def drop_tables(cur: Any) -> None:
            for table in TABLES:
                cur.execute(f"DROP TABLE IF EXISTS {schema}.{table}")

        self._run(drop_tables, True)
        if self.cfg.schema == DEFAULT_SCHEMA:
            return

        def drop_schema(cur: Any) -> None:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} RESTRICT")

        try:
            self._run(drop_schema, True)
        except MetaUnavailable as e:
            if not isinstance(e.__cause__, pgerr.DependentObjectsStillExist):
                raise
            log.info("schema %s holds other objects: kept", self.cfg.schema)

    def _engine_close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)
        self._watchdog.close()
