"""Sessions, open files across clients, deferred deletion and stale-session cleanup."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

from meta_helpers import ROOT, RW, Backend, fs_error, mkfile

from loftfs.meta import Meta
from loftfs.meta.types import F_WRLCK, LOCK_EOF, NOW, ROOT_CTX, Slice

C = ROOT_CTX


def test_sessions_listed(backend: Backend, meta: Meta) -> None:
    sid = meta.new_session({"host": "a", "mountpoint": "/mnt/x"}, heartbeat_s=3600)
    other = backend.open()
    sid2 = other.new_session({"host": "b"}, heartbeat_s=3600)
    assert sid != sid2
    sessions = meta.list_sessions()
    assert [s.sid for s in sessions] == [sid, sid2]
    assert sessions[0].info == {"host": "a", "mountpoint": "/mnt/x"}
    assert sessions[0].heartbeat_ns <= sessions[1].heartbeat_ns
    other.close_session()
    assert [s.sid for s in meta.list_sessions()] == [sid]
    assert meta.new_session({"host": "a2"}) == sid  # same client, same session
    assert meta.list_sessions()[0].info == {"host": "a2"}


def test_heartbeat_refreshes(backend: Backend, meta: Meta) -> None:
    meta.new_session({"h": 1}, heartbeat_s=0.05)
    first = meta.list_sessions()[0].heartbeat_ns
    time.sleep(0.3)
    assert meta.list_sessions()[0].heartbeat_ns > first


def test_open_unlink_release_across_clients(backend: Backend, meta: Meta) -> None:
    other = backend.open()
    f = meta.create(C, ROOT, b"f", 0o644, RW)
    sid = meta.new_slice_id()
    meta.write_slice(f.inode, 0, Slice(0, sid, 10, 0, 10), NOW)
    other.open(C, f.inode, os.O_RDONLY)
    meta.unlink(C, ROOT, b"f")  # both have it open
    assert other.getattr(f.inode).nlink == 0
    meta.release(f.inode)
    assert other.getattr(f.inode).size == 10  # still open by the other client
    assert other.read_chunk(f.inode, 0) == [Slice(0, sid, 10, 0, 10)]
    assert meta.deleted_slices() == []
    other.release(f.inode)  # the last holder deletes it
    with fs_error(errno.ENOENT):
        meta.getattr(f.inode)
    assert meta.deleted_slices() == [(sid, 10)]


def test_unlink_by_other_client_of_open_file(backend: Backend, meta: Meta) -> None:
    other = backend.open()
    f = mkfile(meta, ROOT, b"f")
    meta.open(C, f.inode, os.O_RDONLY)
    other.unlink(C, ROOT, b"f")
    assert meta.getattr(f.inode).nlink == 0
    meta.release(f.inode)
    with fs_error(errno.ENOENT):
        other.getattr(f.inode)


def test_close_session_deletes_unlinked_open_files(backend: Backend, meta: Meta) -> None:
    other = backend.open()
    f = other.create(C, ROOT, b"f", 0o644, RW)
    g = mkfile(meta, ROOT, b"g")
    other.open(C, g.inode, os.O_RDONLY)
    meta.open(C, g.inode, os.O_RDONLY)
    meta.unlink(C, ROOT, b"f")
    meta.unlink(C, ROOT, b"g")
    other.close_session()
    with fs_error(errno.ENOENT):
        meta.getattr(f.inode)
    assert meta.getattr(g.inode).nlink == 0  # this client still holds it
    meta.close_session()
    with fs_error(errno.ENOENT):
        other.getattr(g.inode)


def test_stale_session_cleanup(backend: Backend, meta: Meta) -> None:
    crashed = backend.open()
    crashed.new_session({"host": "gone"}, heartbeat_s=3600)
    f = crashed.create(C, ROOT, b"f", 0o644, RW)
    kept = crashed.create(C, ROOT, b"kept", 0o644, RW)
    crashed.setlk(C, f.inode, 1, False, F_WRLCK, 0, LOCK_EOF, 99)
    crashed.unlink(C, ROOT, b"f")
    assert meta.clean_stale_sessions(3600) == 0  # not stale yet
    time.sleep(0.01)
    meta.new_session({"host": "alive"}, heartbeat_s=3600)
    assert meta.clean_stale_sessions(0.005) == 1
    assert len(meta.list_sessions()) == 1
    with fs_error(errno.ENOENT):
        meta.getattr(f.inode)
    assert meta.getattr(kept.inode).nlink == 1  # linked files stay
    meta.unlink(C, ROOT, b"kept")
    with fs_error(errno.ENOENT):  # nobody holds it any more
        meta.getattr(kept.inode)
    assert meta.clean_stale_sessions(0) == 0


def test_killed_process_is_cleaned(backend: Backend, meta: Meta) -> None:
    """A client process killed with SIGKILL: its WAL-committed work survives, and its session
    is cleaned by the next client once stale."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from loftfs.meta import open_meta
        from loftfs.meta.types import ROOT_CTX
        m = open_meta({backend.url!r})
        m.new_session({{"who": "child"}}, heartbeat_s=3600)
        f = m.create(ROOT_CTX, 1, b"tmpfile", 0o644, os.O_RDWR)
        m.unlink(ROOT_CTX, 1, b"tmpfile")
        m.mkdir(ROOT_CTX, 1, b"made-by-child", 0o755)
        print(f.inode, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        inode = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert meta.getattr(inode).nlink == 0
    assert meta.lookup(C, ROOT, b"made-by-child").nlink == 2
    time.sleep(0.02)
    assert meta.clean_stale_sessions(0.01) == 1
    with fs_error(errno.ENOENT):
        meta.getattr(inode)


def test_implicit_session(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    assert meta.list_sessions() == []
    meta.open(C, f.inode, os.O_RDONLY)
    sessions = meta.list_sessions()
    assert len(sessions) == 1 and sessions[0].info == {"implicit": True}
