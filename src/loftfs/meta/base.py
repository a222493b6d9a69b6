"""``BaseMeta``: the complete ``Meta`` implementation shared by every engine.

The operation families live in ``ops_ns`` (namespace), ``ops_data`` (file data, trash,
accounting) and ``ops_ext`` (xattrs, locks); this module adds the volume lifecycle and sessions.
An engine subclasses ``BaseMeta`` and implements ``_transaction`` plus the ``_engine_*`` hooks
(see ``loftfs.meta.core.MetaCore`` and ``loftfs.meta.txn.Txn``).

Semantics every engine shares (Linux/ext4 unless said otherwise):

- Timestamps: creating, linking, unlinking and renaming set the parents' mtime/ctime; every
  attribute change, link count change and rename sets the inode's ctime. atime changes only
  through ``setattr`` (the volume behaves as mounted ``noatime``).
- Link counts: files count their hard links; directories 2 + their subdirectories. An unlinked
  file that a session holds open keeps its inode with ``nlink == 0`` until the last ``release``
  of any client (or until its session is closed or found stale).
- Quotas: ``capacity`` and ``inodes`` are enforced by ``write_slice``, ``truncate``,
  ``fallocate``, ``copy_file_range`` and node creation with ``ENOSPC``. Usage charges files and
  symlinks their size rounded up to 4 KiB and directories 4 KiB.
- Trash (``trash_days > 0``): a regular file whose last link goes (and that nobody holds open)
  is kept, invisible to POSIX, until ``cleanup_trash`` purges it after that many days; it still
  counts in usage until then. Other node types are deleted at once.
- Data is never deleted here: slices whose reference count reaches zero are listed by
  ``deleted_slices`` for the block GC of the data path.
- Sessions: ``open`` and locks register a session implicitly when ``new_session`` was not
  called; every session has a heartbeat thread that also cleans stale sessions of others.
- ``chown`` clears S_ISUID (and S_ISGID when group-executable) of non-directories whoever
  the caller is, as Linux does. A refused flock upgrade keeps the shared lock.
- ``create`` raises EEXIST when the name exists: the vfs retries with ``lookup`` + ``open`` for
  an ``O_CREAT`` without ``O_EXCL``.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from loftfs.errors import ConfigError, VolumeExists
from loftfs.meta.core import DIR_SIZE, Acct, now_ns
from loftfs.meta.ops_data import DataOps
from loftfs.meta.ops_ext import ExtOps
from loftfs.meta.ops_import import ImportOps
from loftfs.meta.ops_ns import NamespaceOps
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
    ROOT_INODE,
    Attr,
    FileType,
    SessionInfo,
    VolumeSettings,
)

log = logging.getLogger(__name__)

ROOT_MODE = 0o777  # the root directory of a new volume is world-writable, like JuiceFS's


class BaseMeta(NamespaceOps, DataOps, ExtOps, ImportOps):
    """Every ``Meta`` method, written once over ``Txn``; engines add storage only."""

    # --- volume -------------------------------------------------------------------------------

    def init_volume(self, settings: VolumeSettings) -> None:
        self._engine_create()
        now = now_ns()
        stored = VolumeSettings.from_json(settings.to_json())
        if not stored.created_ns:
            stored.created_ns = now

        def fn(tx: Txn) -> None:
            existing = tx.get_setting(SETTING_VOLUME)
            if existing is not None:
                name = VolumeSettings.from_json(existing).name
                raise VolumeExists(f"volume {name!r} is already formatted at {self.url}")
            tx.put_setting(SETTING_VOLUME, stored.to_json())
            tx.add_counter(NEXT_INODE, ROOT_INODE + 1)
            tx.add_counter(NEXT_SLICE, 1)
            tx.add_counter(NEXT_SESSION, 1)
            tx.add_counter(USED_SPACE, DIR_SIZE)
            tx.add_counter(USED_INODES, 1)
            tx.put_attr(
                Attr(
                    inode=ROOT_INODE,
                    type=FileType.DIR,
                    mode=ROOT_MODE,
                    uid=0,
                    gid=0,
                    nlink=2,
                    size=DIR_SIZE,
                    atime_ns=now,
                    mtime_ns=now,
                    ctime_ns=now,
                    parent=ROOT_INODE,
                )
            )

        self._transaction(fn, True)
        self._reset_local_state()

    def load_settings(self) -> VolumeSettings:
        settings = self._read(self._settings_from)
        self._settings_cache = settings
        return settings

    def update_settings(self, settings: VolumeSettings) -> None:
        text = settings.to_json()

        def fn(tx: Txn) -> None:
            current = self._settings_from(tx)
            if current.uuid != settings.uuid:
                raise ConfigError(
                    f"the volume uuid cannot change ({current.uuid} -> {settings.uuid})"
                )
            tx.put_setting(SETTING_VOLUME, text)

        self._transaction(fn, True)
        self._settings_cache = None

    def destroy_volume(self) -> None:
        self._stop_heartbeat()
        self._sid = 0
        self._engine_destroy()
        self._reset_local_state()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._sid:
                self.close_session()
            if not self.COUNTERS_IN_TXN:
                self._flush_counters()
        except Exception as e:  # the engine may be gone: still release the connections
            log.warning("closing the metadata session failed: %s", e)
        finally:
            self._closed = True
            self._stop_heartbeat()
            self._engine_close()

    # --- sessions -----------------------------------------------------------------------------

    @property
    def sid(self) -> int:
        """This client's session id (0 before the first session is registered)."""
        return self._sid

    def new_session(self, info: dict, *, heartbeat_s: float = 12.0) -> int:
        """A client registered implicitly (by an ``open`` or a lock before this call) keeps its
        session id; its info and heartbeat period are updated."""
        with self._session_lock:
            if self._sid:
                sid = self._sid
                self._session_info = dict(info)
                self._hb_interval = heartbeat_s
                text = json.dumps(info, sort_keys=True, default=str)
                self._transaction(lambda tx: tx.put_session(sid, now_ns(), text), True)
            else:
                self._start_session(info, heartbeat_s)
        self.clean_stale_sessions(self.session_timeout_s)
        return self._sid

    def close_session(self) -> None:
        with self._session_lock:
            sid = self._sid
            self._stop_heartbeat()
            if not sid:
                return
            self._write(lambda tx, acct: self._finish_session(tx, acct, sid, now_ns()))
            self._sid = 0

    def list_sessions(self) -> list[SessionInfo]:
        recs = self._read(lambda tx: tx.list_sessions())
        return [SessionInfo(r.sid, r.heartbeat_ns, json.loads(r.info or "{}")) for r in recs]

    def clean_stale_sessions(self, timeout_s: float = 60.0) -> int:
        cutoff = now_ns() - int(timeout_s * 1e9)
        own = self._sid
        stale = [
            r.sid
            for r in self._read(lambda tx: tx.list_sessions())
            if r.sid != own and (r.heartbeat_ns < cutoff or _process_gone(r.info))
        ]
        removed = 0
        for sid in stale:

            def fn(tx: Txn, acct: Acct, sid: int = sid) -> bool:
                rec = tx.get_session(sid)
                if rec is None or (rec.heartbeat_ns >= cutoff and not _process_gone(rec.info)):
                    return False  # cleaned by someone else, or alive again
                self._finish_session(tx, acct, sid, now_ns())
                return True

            if self._write(fn):
                removed += 1
                log.info("removed stale metadata session %d", sid)
        return removed


def process_identity() -> dict:
    """What identifies this process on this machine: a session that carries it is known dead
    at once when the process is gone, instead of after the heartbeat timeout."""
    ident: dict = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        ident["pidns"] = os.readlink("/proc/self/ns/pid")
        with open("/proc/self/stat") as f:
            ident["start"] = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        pass
    return ident


def _process_gone(info_text: str | None) -> bool:
    """True when the session's process ran on this machine, in this pid namespace, and has
    exited (a reused pid is told apart by its start time)."""
    try:
        info = json.loads(info_text or "{}")
    except ValueError:
        return False
    if not isinstance(info, dict) or "start" not in info or "pidns" not in info:
        return False
    mine = process_identity()
    if info.get("host") != mine["host"] or info.get("pidns") != mine.get("pidns"):
        return False
    try:
        with open(f"/proc/{int(info['pid'])}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, TypeError):
        return True
    return start != info["start"]
