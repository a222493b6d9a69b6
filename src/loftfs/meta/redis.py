"""Redis engine: ``redis://[user:password@]host[:port][/db][?prefix=NAME&...]``, ``rediss://`` for TLS.

Volumes sharing a server are isolated by database number (the URL's path, ``/0`` when omitted)
and/or by key prefix (``?prefix=``: 1-64 characters of ``A-Z a-z 0-9 . _ -``, starting with a
letter or digit; ``loft`` when omitted). Every key of a volume starts with ``<prefix>:``, so
``destroy`` removes one volume's keys (``SCAN`` + ``UNLINK``) and nothing else. The key layout
and the transaction primitives are in ``loftfs.meta.redis_txn``.

Query options (seconds): ``connect_timeout`` (5), ``read_timeout`` (15) of one socket
operation, ``retry_timeout`` (30): how long connection failures and timeouts are retried
before ``MetaUnavailable``. TLS (``rediss://``) options are passed to redis-py:
``ssl_cert_reqs`` (``required`` by default, ``optional``, ``none``), ``ssl_ca_certs`` (a PEM
file), ``ssl_ca_path`` (a directory of CA certificates), ``ssl_certfile`` and ``ssl_keyfile``
(a client certificate), ``ssl_password`` (of the key file), ``ssl_check_hostname`` (``true``
by default when certificates are verified), ``ssl_ciphers``. Any other option is an error.

Transactions. A write transaction watches what it reads (each read goes out in one round trip
with its ``WATCH``) and sends its writes as one ``MULTI``/``EXEC``; when a watched key changed
meanwhile, ``EXEC`` applies nothing and the transaction function runs again (at once, then with
jittered exponential backoff, for at most ``RETRY_DEADLINE_S``). A write transaction that read
several keys and then fails (``ENOENT``, ``EEXIST``, ...) or returns without writing first
checks with an empty ``MULTI``/``EXEC`` that nothing it read changed, and runs again if
something did: its outcome never rests on a torn view. A read-only transaction sends its reads
without ``WATCH`` and never conflicts; the reads that must agree come from one script (a
directory entry with its inode's attributes, a listing with every entry's attributes), the
others see each key as last committed. Usage counters change with ``INCRBY`` inside the commit
(exact across clients); quota checks read them watched, so only volumes with quotas see
writers conflict on them.

Failures. Connection errors and timeouts are retried with backoff on a fresh connection for
``retry_timeout`` seconds (plus the socket timeout of the attempt under way), then
``MetaUnavailable`` names the server (never the password); the same engine object works again
once the server is back. A wrong password, missing permissions, an unknown host or a database
number the server does not have fail at once.

A commit whose reply is lost (the connection broke after ``EXEC`` was sent) may or may not have
been applied. Every ``MULTI`` also sets a marker key of its connection (``P:cm:<token>``) to a
per-connection sequence number, so after reconnecting the engine reads the marker: when it holds
the commit's number the change was applied and the operation returns its result; otherwise it
was not, and the transaction runs again on the current state. What stays ambiguous: a server
that receives the old connection's ``EXEC`` only after the marker was read (a stalled network
path delivering it late) applies it after the rerun; and when the server stays away for the
whole ``retry_timeout``, ``MetaUnavailable`` says that the outcome of the last change is
unknown.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ExecAbortError,
    InvalidResponse,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from loftfs.errors import ConfigError, FSError, LoftError, MetaUnavailable, NotFormatted
from loftfs.meta import perm
from loftfs.meta.base import BaseMeta
from loftfs.meta.redis_assume import (
    LUA_APPLY,
    REFS,
    Assumed,
    Known,
    ScriptEffects,
    apply_args,
    changes_nothing_remembered,
)
from loftfs.meta.redis_txn import (
    LUA_DEL_INDEXED,
    LUA_DEL_LOCKS,
    LUA_DEL_SESSION_OPENS,
    LUA_FORGET_SLICES,
    LUA_LOOKUP,
    LUA_SLICE_REFS,
    Command,
    Keys,
    RedisTxn,
    _checked,
    unpack_attr,
    unpack_entry,
    unpack_slices,
)
from loftfs.meta.txn import Txn
from loftfs.meta.types import (
    MAX_NAME,
    X_OK,
    Attr,
    Ctx,
    FileType,
    Listing,
    Slice,
    VolumeSettings,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_PORT = 6379
DEFAULT_PREFIX = "loft"
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MARKER_TTL_MS = 3_600_000  # a commit marker outlives any retry by far
MAX_IDLE_LINKS = 64
LISTING_THREADS = 2  # threads that read listings' attribute records ahead (see RedisTxn.list_dir)

_TIMEOUTS = {"connect_timeout": 5.0, "read_timeout": 15.0, "retry_timeout": 30.0}
_TLS_STR = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_TLS_OPTIONS = (*_TLS_STR, "ssl_password", "ssl_check_hostname", "ssl_ciphers")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_NOT_FORMATTED = "no volume is formatted at this metadata URL (run `loft format`)"
# getaddrinfo failures that retrying does not fix
_UNKNOWN_HOST = {
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_SERVICE")
    if hasattr(socket, name)
}


@dataclass(frozen=True)
class RedisURL:
    """A parsed metadata URL of the Redis engine."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str
    connect_timeout: float
    read_timeout: float
    retry_timeout: float
    tls_options: dict[str, Any] = field(default_factory=dict)

    @property
    def server(self) -> str:
        """How messages name the server: ``host:port/db``, never the credentials."""
        return f"{self.host}:{self.port}/{self.db}"

    def redacted(self) -> str:
        """The URL with the password masked."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="") + (":****" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        query = "" if self.prefix == DEFAULT_PREFIX else f"?prefix={self.prefix}"
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}{query}"

    def connection(self) -> redis.Connection:
        """A new (not yet connected) redis-py connection to the server."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.read_timeout,
            "protocol": 2,  # the replies redis_txn parses (redis-py 8 defaults to RESP3)
        }
        if self.tls:
            return redis.SSLConnection(**kwargs, **self.tls_options)
        return redis.Connection(**kwargs)


def parse_url(url: str) -> RedisURL:
    """Parse a ``redis://`` or ``rediss://`` metadata URL; ``ConfigError`` says what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"invalid Redis metadata URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a Redis metadata URL (redis:// or rediss://): {scheme}://...")
    if not parts.hostname:
        raise ConfigError("invalid Redis metadata URL: no host (redis://host:port/db)")
    path = unquote(parts.path).strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"invalid Redis metadata URL: database must be a number, not {path!r}")
    db = int(path) if path else 0
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in options:
            raise ConfigError(f"invalid Redis metadata URL: option {name!r} given twice")
        options[name] = value
    prefix = options.pop("prefix", DEFAULT_PREFIX)
    if not PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"invalid key prefix {prefix!r} in the Redis metadata URL: use 1-64 characters of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    timeouts: dict[str, float] = {}
    for name, default in _TIMEOUTS.items():
        text = options.pop(name, None)
        try:
            seconds = default if text is None else float(text)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise ConfigError(f"invalid {name} {text!r} in the Redis metadata URL: seconds > 0")
        timeouts[name] = seconds
    tls_options = _tls_options(options, scheme == "rediss")
    if options:
        known = ", ".join(["prefix", *_TIMEOUTS, *_TLS_OPTIONS])
        raise ConfigError(
            f"unknown option(s) {', '.join(sorted(options))} in the Redis metadata URL "
            f"(known: {known})"
        )
    return RedisURL(
        tls=scheme == "rediss",
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        prefix=prefix,
        tls_options=tls_options,
        **timeouts,
    )


def _tls_options(options: dict[str, str], tls: bool) -> dict[str, Any]:
    """Take the ``ssl_*`` options out of ``options`` as redis-py ``SSLConnection`` arguments."""
    given = {name: options.pop(name) for name in _TLS_OPTIONS if name in options}
    if not given:
        return {}
    if not tls:
        raise ConfigError(f"TLS option(s) {', '.join(sorted(given))} need a rediss:// URL")
    out: dict[str, Any] = dict(given)
    reqs = given.get("ssl_cert_reqs")
    if reqs is not None and reqs not in ("none", "optional", "required"):
        raise ConfigError(f"invalid ssl_cert_reqs {reqs!r}: none, optional or required")
    if "ssl_check_hostname" in given:
        flag = given["ssl_check_hostname"].lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"invalid ssl_check_hostname {flag!r}: true or false")
        out["ssl_check_hostname"] = flag in ("true", "1", "yes")
    for name in _TLS_FILES:
        if name in given and not os.path.isfile(given[name]):
            raise ConfigError(f"{name}: no such file {given[name]!r}")
    if "ssl_ca_path" in given and not os.path.isdir(given["ssl_ca_path"]):
        raise ConfigError(f"ssl_ca_path: no such directory {given['ssl_ca_path']!r}")
    return out


# --- connections ------------------------------------------------------------------------------


class Link:
    """One connection of the engine's pool, used by one transaction at a time.

    It reconnects by itself on the next call after a failure (redis-py connects lazily).
    ``watching``: keys are watched on the server (a ``WATCH`` was sent and no ``EXEC``,
    ``UNWATCH`` or reconnect followed); a new transaction that finds them sends ``UNWATCH``
    first, in the same round trip as its first command. ``token``/``seq`` name the commit
    marker of this connection.
    """

    __slots__ = ("conn", "seq", "token", "unwatch", "watching")

    def __init__(self, conn: redis.Connection) -> None:
        self.conn = conn
        self.watching = False
        self.unwatch = False
        self.token = secrets.token_hex(8)
        self.seq = 0

    def begin(self) -> None:
        """Start a transaction (attempt): forget what an earlier one left watched."""
        self.unwatch = self.watching

    def call(self, cmds: Sequence[Command]) -> list[Any]:
        """Send ``cmds`` in one round trip and return every reply, error replies as exception
        objects. A connection failure closes the connection and raises."""
        conn = self.conn
        unwatch = self.unwatch
        if unwatch:
            cmds = [("UNWATCH",), *cmds]
        replies: list[Any] = []
        try:
            conn.send_packed_command([pack_commands(cmds)], check_health=False)
            for _ in range(len(cmds)):
                try:
                    replies.append(conn.read_response())
                except ResponseError as e:
                    replies.append(e)
        except BaseException:
            self.drop()
            raise
        watching = self.watching
        for cmd in cmds:
            name = cmd[0]
            if name == "WATCH":
                watching = True
            elif name in ("EXEC", "UNWATCH", "DISCARD"):
                watching = False
        self.watching = watching
        if unwatch:
            self.unwatch = False
            del replies[0]
        return replies

    def eval_ro(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self.eval(script, keys, args)

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script, by its digest (sent in full once the server lacks it)."""
        digest = _sha1(script)
        reply = self.call([("EVALSHA", digest, len(keys), *keys, *args)])[0]
        if isinstance(reply, NoScriptError):
            reply = self.call([("EVAL", script, len(keys), *keys, *args)])[0]
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def drop(self) -> None:
        """Close the connection (its server-side state, watches included, goes with it)."""
        self.unwatch = self.watching = False
        try:
            self.conn.disconnect()
        except Exception:  # closing a broken socket may fail too
            pass


def pack_commands(cmds: Sequence[Command]) -> bytes:
    """Commands in the Redis protocol. Arguments are str, bytes or int; this is a third of
    the cost of redis-py's general packer, which shows in every transaction."""
    out: list[bytes] = []
    for cmd in cmds:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if arg.__class__ is not bytes:
                arg = arg.encode() if isinstance(arg, str) else b"%d" % arg
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


_SHA1: dict[str, str] = {}


def _sha1(script: str) -> str:
    digest = _SHA1.get(script)
    if digest is None:
        digest = _SHA1[script] = hashlib.sha1(script.encode()).hexdigest()
    return digest


class LinkPool:
    """Connections shared by the threads of one engine: a transaction takes one for its whole
    run (``WATCH`` state is per connection) and gives it back; at most ``MAX_IDLE_LINKS`` stay
    open while idle. A forked child never uses its parent's connections: it opens its own."""

    def __init__(self, make: Callable[[], redis.Connection]) -> None:
        self._make = make
        self._idle: list[Link] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def acquire(self) -> Link:
        with self._lock:
            if self._closed:
                raise MetaUnavailable("the metadata engine is closed")
            if self._pid != os.getpid():  # forked: the sockets belong to the parent
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return Link(self._make())

    def release(self, link: Link) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE_LINKS:
                self._idle.append(link)
                return
        link.drop()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for link in idle:
            link.drop()


# --- the engine -------------------------------------------------------------------------------


@dataclass
class _Outage:
    """Retry state of one transaction across connection failures."""

    since: float | None = None  # the first failure
    delay: float = 0.05  # the next sleep (doubles up to 1 s, jittered)
    warned: bool = False


class RedisMeta(BaseMeta):
    """A metadata engine over one Redis database (see the module docstring)."""

    #: give up on a transaction that keeps conflicting after this long (MetaUnavailable)
    RETRY_DEADLINE_S = 60.0
    #: Lua scripts a commit on assumed values runs inside ``LUA_APPLY`` (as pseudo-commands);
    #: a transaction that queues another checks its assumptions with a WATCH first.
    APPLY_SCRIPTS: ClassVar[dict[str, str]] = {LUA_SLICE_REFS: REFS}
    #: What each queued script changes among the keys ``Known`` remembers (see there).
    SCRIPT_EFFECTS: ClassVar[ScriptEffects] = {
        LUA_DEL_INDEXED: lambda cmd: [cmd[4]],  # the chunks of one inode, by their head
        LUA_SLICE_REFS: changes_nothing_remembered,  # reference counts
        LUA_FORGET_SLICES: changes_nothing_remembered,
        LUA_DEL_SESSION_OPENS: changes_nothing_remembered,  # open records
        LUA_DEL_LOCKS: changes_nothing_remembered,  # lock records
    }

    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        super().__init__(self.config.redacted())
        self.keys = Keys(self.config.prefix)
        self._pool = LinkPool(self.config.connection)
        # values of attribute, chunk and entry keys as this process last read or wrote them:
        # some write transactions assume them and commit in one round trip (redis_assume)
        head = self.keys.head
        self._known = Known((head + "i", head + "c", head + "d"), head + "c")
        # reads a listing's next batch of attribute records while one is paged out
        self._listing_pool: ThreadPoolExecutor | None = None
        self._listing_pid = 0
        self._listing_lock = threading.Lock()
        self._may_create = False  # init_volume runs before the volume exists
        self._volume_seen = False  # the settings were seen once: skip the NotFormatted probe

    # --- fast paths ---------------------------------------------------------------------------

    def open(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        return self._open(ctx, inode, flags, False)[0]

    def open_with_chunk(self, ctx: Ctx, inode: int, flags: int) -> tuple[Attr, list[Slice] | None]:
        return self._open(ctx, inode, flags, True)

    def _multi(self, cmds: list[Command], write: bool) -> list[Any]:
        """Send ``cmds`` (``MULTI`` ... ``EXEC``) in one round trip; the replies of the queued
        commands. An error reply (of the ``EXEC`` or of any command) is raised."""

        def fn(tx: RedisTxn) -> list[Any]:
            result = tx.link.call(cmds)[-1]
            if isinstance(result, ResponseError):
                raise result
            for reply in result:
                if isinstance(reply, ResponseError):
                    raise reply
            return result  # type: ignore[no-any-return]

        return self._transaction(fn, write)  # type: ignore[arg-type]

    def _open(
        self, ctx: Ctx, inode: int, flags: int, chunk0: bool
    ) -> tuple[Attr, list[Slice] | None]:
        """``open`` in one round trip instead of two (a watched read, then MULTI/EXEC): the
        open record is added in the same MULTI that reads the attributes, so it exists exactly
        when the inode did at that instant; a concurrent unlink either sees it (its watch on
        the record fails and it runs again) or ran first (the read finds nothing). The record
        is idempotent, so a lost reply is simply sent again. When the inode is gone or the
        permission check fails, the record is taken back. With ``chunk0`` the same MULTI reads
        the slice list of chunk 0."""
        sid = self._session_id()
        mask = perm.open_mask(flags)
        k = self.keys
        cmds: list[Command] = [
            ("MULTI",),
            ("GET", k.attr(inode)),
            ("SADD", k.open_by(inode), sid),
            ("SADD", k.opens_of(sid), inode),
        ]
        if chunk0:
            cmds.append(("GET", k.chunk(inode, 0)))
        cmds.append(("EXEC",))
        result = self._multi(cmds, True)
        data = result[0]
        try:
            if data is None:
                raise FSError(errno.ENOENT)
            attr = unpack_attr(inode, data)
            perm.check_open(ctx, attr, mask)
        except BaseException:
            self._drop_open_record(sid, inode)
            raise
        slices = unpack_slices(result[3]) if chunk0 and attr.type == FileType.FILE else None
        return attr, slices

    def peek(self, ctx: Ctx, inode: int, flags: int) -> tuple[Attr, list[Slice] | None]:
        """One round trip: the attributes and chunk 0 read in one MULTI (a consistent pair;
        nothing is written, so nothing waits for the append-only file's fsync)."""
        mask = perm.open_mask(flags)
        k = self.keys
        result = self._multi(
            [("MULTI",), ("GET", k.attr(inode)), ("GET", k.chunk(inode, 0)), ("EXEC",)], False
        )
        if result[0] is None:
            raise FSError(errno.ENOENT)
        attr = unpack_attr(inode, result[0])
        perm.check_open(ctx, attr, mask)
        slices = unpack_slices(result[1]) if attr.type == FileType.FILE else None
        return attr, slices

    def _listing(self, tx: Txn, inode: int) -> Listing:
        """Entries and a first batch of attributes now, the rest as the listing is read."""
        assert isinstance(tx, RedisTxn)
        return tx.list_dir(inode, later=self._records, submit=self._read_ahead)

    def _read_ahead(
        self, read: Callable[[list[bytes]], list[bytes | None]], keys: list[bytes]
    ) -> Future[list[bytes | None]]:
        """Run ``read(keys)`` on a listing thread (started in this process: a forked child
        gets threads of its own)."""
        with self._listing_lock:
            if self._listing_pool is None or self._listing_pid != os.getpid():
                self._listing_pool = ThreadPoolExecutor(LISTING_THREADS, "loft-listing")
                self._listing_pid = os.getpid()
            pool = self._listing_pool
        return pool.submit(read, keys)

    def _records(self, keys: list[bytes]) -> list[bytes | None]:
        def fn(tx: RedisTxn) -> list[bytes | None]:
            reply = tx.server_call([("MGET", *keys)])[0]
            if isinstance(reply, Exception):
                raise reply
            return list(reply)

        return self._run(fn, False)

    def lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        """``lookup`` in one round trip (a Lua script reads the parent, the entry and the
        child atomically) instead of two; ``.`` and ``..`` take the general path."""
        if name in (b".", b".."):
            return super().lookup(ctx, parent, name)
        return self._lookup(ctx, parent, name, False)[0]

    def lookup_peek(self, ctx: Ctx, parent: int, name: bytes) -> tuple[Attr, list[Slice] | None]:
        """The same round trip as ``lookup``, the script also reading a file's chunk 0."""
        if name in (b".", b".."):
            return super().lookup_peek(ctx, parent, name)
        return self._lookup(ctx, parent, name, True)

    def _lookup(
        self, ctx: Ctx, parent: int, name: bytes, chunk0: bool
    ) -> tuple[Attr, list[Slice] | None]:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        k = self.keys
        keys, args = [k.attr(parent), k.dir(parent)], [name, k.head + "i"]
        if chunk0:
            args.append(k.head + "c")

        def fn(tx: RedisTxn) -> list[bytes]:
            reply: list[bytes] = tx.link.eval_ro(LUA_LOOKUP, keys, args)
            return reply

        reply = self._transaction(fn, False)  # type: ignore[arg-type]
        if not reply:
            raise FSError(errno.ENOENT)
        pattr = unpack_attr(parent, reply[0])
        if pattr.type != FileType.DIR:
            raise FSError(errno.ENOTDIR)
        perm.check(ctx, pattr, X_OK)
        if len(reply) < 3:
            raise FSError(errno.ENOENT)
        inode, _ = unpack_entry(reply[1])
        attr = unpack_attr(inode, reply[2])
        return attr, unpack_slices(reply[3]) if len(reply) > 3 else None

    def _drop_open_record(self, sid: int, inode: int) -> None:
        k = self.keys

        def fn(tx: RedisTxn) -> None:
            tx.link.call(
                [
                    ("MULTI",),
                    ("SREM", k.open_by(inode), sid),
                    ("SREM", k.opens_of(sid), inode),
                    ("EXEC",),
                ]
            )

        self._transaction(fn, True)  # type: ignore[arg-type]

    # --- BaseMeta hooks -----------------------------------------------------------------------

    def init_volume(self, settings: VolumeSettings) -> None:
        self._may_create = True
        try:
            super().init_volume(settings)
            self._volume_seen = True
        finally:
            self._may_create = False

    def _transaction(self, fn: Callable[[Txn], T], write: bool) -> T:
        if not self._volume_seen and not self._may_create:
            if not self._run(lambda tx: tx.has_volume(), False):
                raise NotFormatted(_NOT_FORMATTED)
            self._volume_seen = True
        return self._run(fn, write)

    def _engine_create(self) -> None:
        """Nothing to create (keys appear with their first write); check that the server
        answers and warn when its eviction policy could drop metadata."""
        replies = self._run(
            lambda tx: tx.server_call([("CONFIG", "GET", "maxmemory-policy")]), False
        )
        reply = replies[0]
        if isinstance(reply, list) and len(reply) == 2:
            policy = bytes(reply[1]).decode()
            if policy != "noeviction":
                log.warning(
                    "Redis at %s evicts keys under memory pressure (maxmemory-policy %s): "
                    "metadata may be lost; set maxmemory-policy noeviction",
                    self.config.server,
                    policy,
                )

    def _engine_destroy(self) -> None:
        """Delete every key of this volume (its prefix) and nothing else."""
        pattern = self.keys.pattern
        cursor = b"0"
        while True:

            def step(tx: RedisTxn, cursor: bytes = cursor) -> tuple[bytes, list[bytes]]:
                reply = tx.server_call([("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)])[0]
                if isinstance(reply, ResponseError):
                    raise reply
                found = list(reply[1])
                if found:
                    unlinked = tx.server_call([("UNLINK", *found)])[0]
                    if isinstance(unlinked, ResponseError):
                        raise unlinked
                return bytes(reply[0]), found

            cursor, _ = self._run(step, False)
            if cursor == b"0":
                break
        self._volume_seen = False

    def _engine_close(self) -> None:
        with self._listing_lock:
            pool, self._listing_pool = self._listing_pool, None
        if pool is not None and self._listing_pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pool.close()

    # --- the runner ---------------------------------------------------------------------------

    def _run(self, fn: Callable[[RedisTxn], T], write: bool) -> T:
        """Run ``fn`` in one transaction on one pooled connection: rerun it on a conflict
        and after connection failures (see the module docstring)."""
        if self._closed:
            raise MetaUnavailable("the metadata engine is closed")
        link = self._pool.acquire()
        try:
            return self._attempts(link, fn, write)
        finally:
            self._pool.release(link)

    def _attempts(self, link: Link, fn: Callable[[RedisTxn], T], write: bool) -> T:
        outage = _Outage()
        conflicts = 0
        deadline = 0.0
        delay = 0.001
        while True:
            link.begin()
            tx = RedisTxn(link, self.keys, write, self._known)
            try:
                try:
                    result = fn(tx)
                except RedisError:
                    raise
                except Exception:
                    # an error drawn from reads of several keys counts only when they were
                    # consistent: else a concurrent commit fooled it, so run it again; one
                    # drawn from assumed values, only once they are read for real
                    if tx.assumed:
                        self._known.drop(tx.assumed)
                        applied = False
                    elif tx.reads > 1 and not self._unchanged(link):
                        applied = False
                    else:
                        raise
                else:
                    if tx.queued:
                        try:
                            applied = self._commit(link, tx)
                        except RedisError as e:
                            self._known.drop(tx.assumed)
                            self._known.forget(tx.queued, self.SCRIPT_EFFECTS)  # outcome unknown
                            applied = self._resolve(link, e, outage)
                    elif tx.assumed:  # nothing written, but on assumptions: read for real
                        self._known.drop(tx.assumed)
                        applied = False
                    elif tx.reads > 1:
                        applied = self._unchanged(link)  # the result must rest on a snapshot
                    else:
                        applied = True
            except RedisError as e:
                self._wait_out(e, outage)
                continue
            if applied:
                return result
            # a watched key changed: run again, at once the first time
            conflicts += 1
            now = time.monotonic()
            if conflicts == 1:
                deadline = now + self.RETRY_DEADLINE_S
                continue
            if now > deadline:
                raise MetaUnavailable(
                    f"metadata transaction on Redis at {self.config.server} kept conflicting "
                    f"with other clients for {self.RETRY_DEADLINE_S:.0f} s ({conflicts} tries)"
                )
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _unchanged(link: Link) -> bool:
        """Whether no watched key changed since it was read (an empty MULTI/EXEC, which also
        ends the watch)."""
        return link.call([("MULTI",), ("EXEC",)])[-1] is not None

    def _commit(self, link: Link, tx: RedisTxn) -> bool:
        """Send the queued writes as one MULTI/EXEC (with ``LUA_APPLY`` inside when the
        transaction assumed values, or alone when it watched nothing); False when a watched
        key changed or an assumption did not hold."""
        link.seq += 1
        marker = ("SET", self.keys.marker(link.token), link.seq, "PX", MARKER_TTL_MS)
        queued = [*tx.queued, marker]
        if tx.assumed:
            applied = self._commit_assumed(link, tx, queued)
        else:
            applied = self._exec(link, queued)
        if applied:
            self._known.learn(tx.queued, tx.seen, self.SCRIPT_EFFECTS)
        else:  # read for real when the transaction runs again
            self._known.drop(tx.assumed)
        return applied

    def _exec(self, link: Link, queued: list[Command]) -> bool:
        replies = link.call([("MULTI",), *queued, ("EXEC",)])
        result = replies[-1]
        if isinstance(result, ResponseError):
            # refused while queueing (out of memory, no permission, ...): nothing applied
            refused = [r for r in replies[:-1] if isinstance(r, ResponseError)]
            raise refused[0] if refused and isinstance(result, ExecAbortError) else result
        if result is None:
            return False
        failed = [r for r in result if isinstance(r, ResponseError)]
        if failed:
            self._applied_in_part(failed[0])
        return True

    def _commit_assumed(self, link: Link, tx: RedisTxn, queued: list[Command]) -> bool:
        args = apply_args(tx.assumed, queued, self.APPLY_SCRIPTS)
        if args is None:  # a script that cannot run inside LUA_APPLY: check the old way
            return self._still_holds(link, tx.assumed) and self._exec(link, queued)
        keys, argv = args
        if tx.watched:  # reads of other keys watched: EXEC checks them, the script the rest
            replies = link.call(
                [("MULTI",), ("EVAL", LUA_APPLY, len(keys), *keys, *argv), ("EXEC",)]
            )
            result = replies[-1]
            if isinstance(result, ResponseError):
                raise result
            if result is None:
                return False
            reply = result[0]
        else:
            reply = link.eval(LUA_APPLY, keys, argv)
        if isinstance(reply, ResponseError):
            raise reply
        if reply == 0:
            return False
        if reply != 1:
            self._applied_in_part(reply[1])
        return True

    def _still_holds(self, link: Link, assumed: Assumed) -> bool:
        """Watch the assumed keys and read them: whether they hold what was assumed (the
        watch then guards them until the commit)."""
        strings = [k for k in assumed if isinstance(k, str)]
        fields = [k for k in assumed if not isinstance(k, str)]
        watch = [*strings, *{k[0] for k in fields}]
        cmds: list[Command] = [("WATCH", *watch)]
        cmds += [("GET", k) for k in strings] + [("HGET", k, f) for k, f in fields]
        replies = _checked(link.call(cmds))[1:]
        expected = [assumed[k] for k in strings] + [assumed[k] for k in fields]
        return all(
            (r is None and e is None) or (r is not None and bytes(r) == e)
            for r, e in zip(replies, expected, strict=True)
        )

    def _applied_in_part(self, error: Any) -> NoReturn:
        raise MetaUnavailable(
            f"Redis at {self.config.server} failed a command of a committed transaction, "
            f"which was applied in part: {error} (are keys of this prefix written by "
            "another program?)"
        )

    def _resolve(self, link: Link, error: RedisError, outage: _Outage) -> bool:
        """The reply of a commit was lost: read its marker once the server answers again.
        True when the commit was applied, False when it was not (run the transaction again)."""
        seq = link.seq
        marker = self.keys.marker(link.token)
        while True:
            try:
                self._wait_out(error, outage, unknown_outcome=True)
                reply = link.call([("GET", marker)])[0]
                if isinstance(reply, ResponseError):
                    raise reply
                return reply is not None and int(reply) == seq
            except RedisError as e:
                error = e

    def _wait_out(
        self, error: RedisError, outage: _Outage, *, unknown_outcome: bool = False
    ) -> None:
        """Sleep before the next try after ``error``; raise when it is not worth retrying
        (wrong credentials, unknown host, ...) or when ``retry_timeout`` has passed."""
        permanent = self._permanent(error)
        if permanent is not None:
            raise permanent from error
        now = time.monotonic()
        if outage.since is None:
            # often a pooled connection the server closed meanwhile (idle timeout, restart):
            # try again at once on a new one before calling it an outage
            outage.since = now
            log.debug("Redis at %s failed (%s); retrying", self.config.server, _one_line(error))
            return
        if not outage.warned:
            outage.warned = True
            log.warning(
                "Redis at %s failed (%s); retrying for up to %.0f s",
                self.config.server,
                _one_line(error),
                self.config.retry_timeout,
            )
        waited = now - outage.since
        left = self.config.retry_timeout - waited
        if left <= 0:
            what = "; the outcome of the last change is unknown" if unknown_outcome else ""
            raise MetaUnavailable(
                f"Redis at {self.config.server} unavailable for {waited:.0f} s: "
                f"{_one_line(error)}{what}"
            ) from error
        time.sleep(min(left, outage.delay * random.uniform(0.5, 1.5)))
        outage.delay = min(outage.delay * 2, 1.0)

    def _permanent(self, error: RedisError) -> LoftError | None:
        """The error to raise at once for ``error``, or None when it is worth retrying."""
        server = self.config.server
        msg = _one_line(error)
        if isinstance(error, (AuthenticationError, AuthenticationWrongNumberOfArgsError)):
            return MetaUnavailable(f"Redis at {server} refused the credentials: {msg}")
        if isinstance(error, (AuthorizationError, NoPermissionError)):
            return MetaUnavailable(f"Redis at {server} denied a command to this user: {msg}")
        cause = _root_cause(error)
        if isinstance(cause, socket.gaierror) and cause.errno in _UNKNOWN_HOST:
            return ConfigError(f"unknown Redis host {self.config.host!r} ({cause.strerror})")
        if isinstance(cause, ssl.SSLError):
            return MetaUnavailable(f"TLS connection to Redis at {server} failed: {msg}")
        if isinstance(error, InvalidResponse):
            return MetaUnavailable(f"{server} does not answer as a Redis server: {msg}")
        if isinstance(error, ResponseError) and "DB index is out of range" in str(error):
            return ConfigError(
                f"Redis at {self.config.host}:{self.config.port} has no database "
                f"{self.config.db} (see its 'databases' setting)"
            )
        if isinstance(error, OutOfMemoryError):
            return MetaUnavailable(f"Redis at {server} is out of memory (maxmemory): {msg}")
        if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
            return None  # refused, reset, timed out, loading, too many clients: retry
        if isinstance(error, (ReadOnlyError, MasterDownError, TryAgainError)):
            return None  # a replica or cluster during failover
        return MetaUnavailable(f"Redis at {server} answered with an error: {msg}")


def _root_cause(error: BaseException) -> BaseException:
    seen = 0
    while seen < 10:
        nxt = error.__cause__ or error.__context__
        if nxt is None:
            return error
        error = nxt
        seen += 1
    return error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text
