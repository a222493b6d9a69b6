"""Engine-independent machinery of the shared metadata layer.

``MetaCore`` holds what every operation family needs: transaction runners with usage
accounting, batched id allocation, cached volume settings, the client session and the helpers
that delete an inode's records. Engines subclass ``loftfs.meta.base.BaseMeta`` and implement the
four ``_engine_*``/``_transaction`` hooks over a ``loftfs.meta.txn.Txn``.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from loftfs.errors import FSError, NotFormatted
from loftfs.meta.interface import Meta
from loftfs.meta.txn import (
    NEXT_INODE,
    NEXT_SESSION,
    NEXT_SLICE,
    SETTING_VOLUME,
    USED_INODES,
    USED_SPACE,
    Txn,
)
from loftfs.meta.types import (
    MAX_NAME,
    NOW,
    Attr,
    FileType,
    Slice,
    VolumeSettings,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

BLOCK = 4096  # space is accounted in units of this many bytes, like local file systems report
DIR_SIZE = 4096  # st_size of a directory
MAX_FILE_SIZE = 1 << 60  # EFBIG beyond this
MAX_XATTR_VALUE = 64 << 10
SETTINGS_TTL_S = 5.0  # how long a client trusts its cached copy of the volume settings
NS_PER_DAY = 86_400 * 1_000_000_000


def now_ns() -> int:
    return time.time_ns()


def space_of(type: FileType, size: int) -> int:
    """Bytes a node is charged: directories 4 KiB, files and symlinks their size rounded up to
    4 KiB, other nodes nothing (as ``du`` reports on ext4)."""
    if type == FileType.DIR:
        return BLOCK
    if type in (FileType.FILE, FileType.SYMLINK):
        return (size + BLOCK - 1) // BLOCK * BLOCK
    return 0


def check_name(name: bytes) -> None:
    """EINVAL for an empty name or one holding '/' or NUL; ENAMETOOLONG past 255 bytes."""
    if not name or b"/" in name or b"\0" in name:
        raise FSError(errno.EINVAL)
    if len(name) > MAX_NAME:
        raise FSError(errno.ENAMETOOLONG)


def time_arg(value: int, now: int) -> int:
    return now if value == NOW else value


@dataclass
class Acct:
    """Usage deltas of one transaction attempt (bytes, inodes)."""

    space: int = 0
    inodes: int = 0


class MetaCore(Meta):
    """Infrastructure shared by every operation family (see module docstring)."""

    INODE_BATCH = 100
    SLICE_BATCH = 1000
    #: True: usage counters are updated inside every transaction (exact across clients; right
    #: for engines that serialize writers anyway, like SQLite). False: deltas accumulate in
    #: memory and are flushed every ``COUNTER_FLUSH_S`` (no hot row; quotas exact per client).
    COUNTERS_IN_TXN = True
    COUNTER_FLUSH_S = 1.0
    #: A session whose heartbeat is older than this is stale; the heartbeat thread cleans such
    #: sessions of other clients. The vfs may set it from ``MountOptions.session_timeout_s``.
    session_timeout_s = 60.0
    #: Polling interval bounds of blocking lock requests.
    LOCK_POLL_MIN_S = 0.005
    LOCK_POLL_MAX_S = 0.1

    def __init__(self, url: str) -> None:
        self.url = url
        self._alloc_lock = threading.Lock()
        self._inode_next = self._inode_end = 0
        self._slice_next = self._slice_end = 0
        self._acct_lock = threading.Lock()
        self._pending = Acct()
        self._flushing = Acct()
        self._last_flush = time.monotonic()
        self._settings_cache: VolumeSettings | None = None
        self._settings_at = 0.0
        self._session_lock = threading.RLock()
        self._sid = 0
        self._session_info: dict = {}
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._hb_interval = 12.0
        self._last_clean = 0.0
        self._closed = False

    def _reset_local_state(self) -> None:
        """Forget what this client cached about a volume (after format or destroy)."""
        with self._alloc_lock:
            self._inode_next = self._inode_end = 0
            self._slice_next = self._slice_end = 0
        with self._acct_lock:
            self._pending = Acct()
            self._flushing = Acct()
        self._settings_cache = None

    # --- engine hooks -------------------------------------------------------------------------

    @abstractmethod
    def _transaction(self, fn: Callable[[Txn], T], write: bool) -> T:
        """Run ``fn`` in one transaction and commit; rerun it on a conflict. Exceptions from
        ``fn`` roll back and propagate. Raises ``NotFormatted`` when the volume's tables/keys do
        not exist and ``MetaUnavailable`` when the engine fails."""

    @abstractmethod
    def _engine_create(self) -> None:
        """Create the engine's schema if missing (idempotent)."""

    @abstractmethod
    def _engine_destroy(self) -> None:
        """Remove every table/key of the volume."""

    @abstractmethod
    def _engine_close(self) -> None:
        """Release connections."""

    # --- transaction helpers ------------------------------------------------------------------

    def _read(self, fn: Callable[[Txn], T]) -> T:
        return self._transaction(fn, False)

    def _write(self, fn: Callable[[Txn, Acct], T]) -> T:
        """Run a write transaction whose function reports usage deltas in an ``Acct``."""
        in_txn = self.COUNTERS_IN_TXN

        def attempt(tx: Txn) -> tuple[T, Acct]:
            acct = Acct()
            result = fn(tx, acct)
            if in_txn:
                if acct.space:
                    tx.add_counter(USED_SPACE, acct.space)
                if acct.inodes:
                    tx.add_counter(USED_INODES, acct.inodes)
            return result, acct

        result, acct = self._transaction(attempt, True)
        if not in_txn and (acct.space or acct.inodes):
            with self._acct_lock:
                self._pending.space += acct.space
                self._pending.inodes += acct.inodes
            if time.monotonic() - self._last_flush > self.COUNTER_FLUSH_S:
                self._flush_counters()
        return result

    def _flush_counters(self) -> None:
        """Write accumulated usage deltas (batched mode) to the engine. Deltas in flight stay
        visible to ``_pending_usage`` until committed, so quotas never undercount."""
        with self._acct_lock:
            pending, self._pending = self._pending, Acct()
            self._flushing.space += pending.space
            self._flushing.inodes += pending.inodes
            self._last_flush = time.monotonic()
        if not pending.space and not pending.inodes:
            return

        def fn(tx: Txn) -> None:
            if pending.space:
                tx.add_counter(USED_SPACE, pending.space)
            if pending.inodes:
                tx.add_counter(USED_INODES, pending.inodes)

        try:
            self._transaction(fn, True)
        except BaseException:
            with self._acct_lock:
                self._pending.space += pending.space
                self._pending.inodes += pending.inodes
            raise
        finally:
            with self._acct_lock:
                self._flushing.space -= pending.space
                self._flushing.inodes -= pending.inodes

    def _pending_usage(self) -> tuple[int, int]:
        with self._acct_lock:
            return (
                self._pending.space + self._flushing.space,
                self._pending.inodes + self._flushing.inodes,
            )

    # --- settings -----------------------------------------------------------------------------

    @staticmethod
    def _settings_from(tx: Txn) -> VolumeSettings:
        text = tx.get_setting(SETTING_VOLUME)
        if text is None:
            raise NotFormatted("no volume is formatted at this metadata URL (run `loft format`)")
        return VolumeSettings.from_json(text)

    def _settings(self, tx: Txn | None = None) -> VolumeSettings:
        """The volume settings, cached for ``SETTINGS_TTL_S`` (quotas and trash read them).
        Inside a transaction pass ``tx``: engines do not nest transactions."""
        cached = self._settings_cache
        if cached is not None and time.monotonic() - self._settings_at < SETTINGS_TTL_S:
            return cached
        settings = self._settings_from(tx) if tx is not None else self._read(self._settings_from)
        self._settings_cache, self._settings_at = settings, time.monotonic()
        return settings

    def recent_settings(self) -> VolumeSettings:
        return self._settings()

    def _check_space(self, tx: Txn, delta: int) -> None:
        """ENOSPC when growing usage by ``delta`` bytes would pass the capacity quota."""
        if delta <= 0:
            return
        capacity = self._settings(tx).capacity
        if capacity <= 0:
            return
        used = tx.get_counter(USED_SPACE) + self._pending_usage()[0]
        if used + delta > capacity:
            raise FSError(errno.ENOSPC)

    def _check_inodes(self, tx: Txn, count: int) -> None:
        """ENOSPC when ``count`` more inodes would pass the inode quota."""
        limit = self._settings(tx).inodes
        if limit <= 0:
            return
        used = tx.get_counter(USED_INODES) + self._pending_usage()[1]
        if used + count > limit:
            raise FSError(errno.ENOSPC)

    # --- id allocation ------------------------------------------------------------------------

    def _alloc(self, counter: str, batch: int) -> tuple[int, int]:
        end = self._transaction(lambda tx: tx.incr_counter(counter, batch), True)
        return end - batch, end

    def _alloc_inode(self) -> int:
        with self._alloc_lock:
            if self._inode_next >= self._inode_end:
                self._inode_next, self._inode_end = self._alloc(NEXT_INODE, self.INODE_BATCH)
            inode = self._inode_next
            self._inode_next += 1
            return inode

    def new_slice_id(self) -> int:
        with self._alloc_lock:
            if self._slice_next >= self._slice_end:
                self._slice_next, self._slice_end = self._alloc(NEXT_SLICE, self.SLICE_BATCH)
            sid = self._slice_next
            self._slice_next += 1
            return sid

    # --- reading helpers ----------------------------------------------------------------------

    @staticmethod
    def _get(tx: Txn, inode: int) -> Attr:
        attr = tx.get_attr(inode)
        if attr is None:
            raise FSError(errno.ENOENT)
        return attr

    @staticmethod
    def _get_dir(tx: Txn, inode: int) -> Attr:
        attr = MetaCore._get(tx, inode)
        if attr.type != FileType.DIR:
            raise FSError(errno.ENOTDIR)
        return attr

    @staticmethod
    def _get_file(tx: Txn, inode: int) -> Attr:
        """A regular file: EISDIR for a directory, EINVAL for other nodes."""
        attr = MetaCore._get(tx, inode)
        if attr.type == FileType.DIR:
            raise FSError(errno.EISDIR)
        if attr.type != FileType.FILE:
            raise FSError(errno.EINVAL)
        return attr

    # --- deleting -----------------------------------------------------------------------------

    @staticmethod
    def _release_slices(tx: Txn, lists: Iterable[list[Slice]], sign: int = -1) -> None:
        """Change the reference count of every slice occurrence in ``lists`` by ``sign``."""
        deltas: dict[int, tuple[int, int]] = {}
        for slices in lists:
            for s in slices:
                if s.id:
                    size, n = deltas.get(s.id, (s.size, 0))
                    deltas[s.id] = (size, n + sign)
        deltas = {k: v for k, v in deltas.items() if v[1]}
        if deltas:
            tx.add_slice_refs(deltas)

    def _purge(self, tx: Txn, acct: Acct, attr: Attr) -> None:
        """Delete an inode for good: its data references, symlink, xattrs and attributes."""
        inode = attr.inode
        if attr.type == FileType.FILE:
            indexes = tx.chunk_indexes(inode)
            self._release_slices(tx, [tx.get_chunk(inode, i) for i in indexes])
            if indexes:
                tx.del_chunks(inode)
        elif attr.type == FileType.SYMLINK:
            tx.del_symlink(inode)
        tx.del_xattrs(inode)
        tx.del_attr(inode)
        acct.space -= space_of(attr.type, attr.size)
        acct.inodes -= 1

    def _drop_unreferenced(self, tx: Txn, acct: Acct, attr: Attr, now: int) -> None:
        """An inode reached nlink 0 and nobody holds it open: move a regular file to the trash
        when the volume keeps one, delete anything else at once. ``attr`` is already stored
        with nlink 0 when the trash keeps it."""
        if attr.type == FileType.FILE and self._settings(tx).trash_days > 0:
            tx.put_trash(attr.inode, now)
        else:
            self._purge(tx, acct, attr)

    def _unlink_inode(self, tx: Txn, acct: Acct, attr: Attr, now: int) -> None:
        """Drop one link of a non-directory: store the new nlink/ctime, and when no link is left
        either keep it for the clients that hold it open or drop it."""
        new = attr.copy()
        new.nlink = max(0, attr.nlink - 1)
        new.ctime_ns = now
        if new.nlink > 0 or tx.open_sessions(attr.inode):
            tx.put_attr(new)
            return
        if new.type == FileType.FILE and self._settings(tx).trash_days > 0:
            tx.put_attr(new)
        self._drop_unreferenced(tx, acct, new, now)

    def _remove_dir_inode(self, tx: Txn, acct: Acct, attr: Attr, now: int) -> None:
        """A directory lost its entry: keep it with nlink 0 while open, else delete it."""
        if tx.open_sessions(attr.inode):
            new = attr.copy()
            new.nlink = 0
            new.ctime_ns = now
            tx.put_attr(new)
        else:
            self._purge(tx, acct, attr)

    def _finish_session(self, tx: Txn, acct: Acct, sid: int, now: int) -> None:
        """Remove a session: its open records (deleting files unlinked meanwhile that nobody
        else holds open), its locks and its row."""
        for inode in tx.session_opens(sid):
            attr = tx.get_attr(inode)
            if attr is None or attr.nlink > 0:
                continue
            if any(s != sid for s in tx.open_sessions(inode)):
                continue
            self._drop_unreferenced(tx, acct, attr, now)
        tx.del_session_opens(sid)
        tx.del_locks(sid)
        tx.del_session(sid)

    # --- session plumbing ---------------------------------------------------------------------

    def _session_id(self) -> int:
        """This client's session id, registering an implicit session on first need so that
        open files and locks are always tied to a live, heart-beating session."""
        sid = self._sid
        if sid:
            return sid
        with self._session_lock:
            if not self._sid:
                self._start_session({"implicit": True}, self._hb_interval)
            return self._sid

    def _start_session(self, info: dict, heartbeat_s: float) -> None:
        sid = self._alloc(NEXT_SESSION, 1)[0]
        text = json.dumps(info, sort_keys=True, default=str)
        self._transaction(lambda tx: tx.put_session(sid, now_ns(), text), True)
        self._sid = sid
        self._session_info = dict(info)
        self._hb_interval = heartbeat_s
        self._hb_stop = threading.Event()
        thread = threading.Thread(
            target=self._heartbeat_loop,
            args=(sid, self._hb_stop),
            name=f"loftfs-meta-heartbeat-{sid}",
            daemon=True,
        )
        self._hb_thread = thread
        thread.start()

    def _heartbeat_loop(self, sid: int, stop: threading.Event) -> None:
        """Refresh the session row, flush counters and clean stale sessions of others."""
        while not stop.wait(self._hb_interval):
            try:
                self._heartbeat(sid)
                if not self.COUNTERS_IN_TXN:
                    self._flush_counters()
                if time.monotonic() - self._last_clean > self.session_timeout_s / 2:
                    self._last_clean = time.monotonic()
                    self.clean_stale_sessions(self.session_timeout_s)
            except Exception as e:  # keep beating: the next round may succeed
                log.warning("metadata heartbeat failed: %s", e)

    def _heartbeat(self, sid: int) -> None:
        text = json.dumps(self._session_info, sort_keys=True, default=str)

        def fn(tx: Txn) -> bool:
            if tx.get_session(sid) is None:
                tx.put_session(sid, now_ns(), text)
                return False
            tx.touch_session(sid, now_ns())
            return True

        if not self._transaction(fn, True):
            log.warning(
                "session %d was removed as stale by another client; registered it again "
                "(files it had open may have been deleted meanwhile)",
                sid,
            )

    def _stop_heartbeat(self) -> None:
        self._hb_stop.set()
        thread = self._hb_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self._hb_thread = None
