"""Parts of the low-level binding that need no mount: the C struct layouts against the installed
headers, option escaping, lock range conversion and the parked-lock waiter."""

from __future__ import annotations

import ctypes
import errno
import platform
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loftfs.errors import FSError
from loftfs.fuse import ll_abi as abi
from loftfs.fuse.ll_locks import LockWaiters
from loftfs.fuse.ll_ops import (
    _DIRENTPLUS,
    _timeout,
    dirent_page,
    direntplus_page,
    fill_stat,
    lock_owner,
    lock_range,
)
from loftfs.fuse.lowlevel import fuse_argv
from loftfs.meta.types import LOCK_EOF, Attr, AttrRow, FileType

HEADERS = Path("/usr/include/fuse3/fuse_lowlevel.h")

OFFSETS_C = r"""
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#define O(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f))
#define S(s) printf(#s " %zu\n", sizeof(struct s))
int main(void) {
    struct fuse_file_info fi;
    memset(&fi, 0, sizeof fi);
    fi.direct_io = 1; fi.keep_cache = 1; fi.flock_release = 1;
    unsigned int bits; memcpy(&bits, (char *)&fi + 4, 4);
    printf("fi.bits %u\n", bits);
    O(fuse_file_info, fh); O(fuse_file_info, lock_owner); O(fuse_file_info, poll_events);
    O(fuse_conn_info, max_write); O(fuse_conn_info, capable); O(fuse_conn_info, want);
    O(fuse_conn_info, max_background); O(fuse_conn_info, time_gran);
    S(stat); O(stat, st_mode); O(stat, st_nlink); O(stat, st_size); O(stat, st_blocks);
    O(stat, st_atim); O(stat, st_ctim);
    S(fuse_entry_param); O(fuse_entry_param, attr); O(fuse_entry_param, entry_timeout);
    S(statvfs); O(statvfs, f_files); O(statvfs, f_namemax);
    S(flock); O(flock, l_start); O(flock, l_len); O(flock, l_pid);
    S(fuse_ctx); S(fuse_forget_data); S(fuse_args);
    O(fuse_lowlevel_ops, getlk); O(fuse_lowlevel_ops, forget_multi); O(fuse_lowlevel_ops, flock);
    O(fuse_lowlevel_ops, readdirplus); O(fuse_lowlevel_ops, copy_file_range);
    O(fuse_lowlevel_ops, lseek);
    return 0;
}
"""


def _ours() -> dict[str, int]:
    o = {}
    for cls, cname, fields in (
        (abi.FileInfo, "fuse_file_info", ("fh", "lock_owner", "poll_events")),
        (
            abi.ConnInfo,
            "fuse_conn_info",
            ("max_write", "capable", "want", "max_background", "time_gran"),
        ),
        (abi.Stat, "stat", ("st_mode", "st_nlink", "st_size", "st_blocks", "st_atim", "st_ctim")),
        (abi.EntryParam, "fuse_entry_param", ("attr", "entry_timeout")),
        (abi.StatVFS, "statvfs", ("f_files", "f_namemax")),
        (abi.Flock, "flock", ("l_start", "l_len", "l_pid")),
        (
            abi.LowLevelOps,
            "fuse_lowlevel_ops",
            ("getlk", "forget_multi", "flock", "readdirplus", "copy_file_range", "lseek"),
        ),
    ):
        for f in fields:
            o[f"{cname}.{f}"] = getattr(cls, f).offset
    sized: tuple[tuple[type[ctypes.Structure], str], ...] = (
        (abi.Stat, "stat"),
        (abi.EntryParam, "fuse_entry_param"),
        (abi.StatVFS, "statvfs"),
        (abi.Flock, "flock"),
        (abi.FuseCtx, "fuse_ctx"),
        (abi.ForgetData, "fuse_forget_data"),
        (abi.FuseArgs, "fuse_args"),
    )
    for struct, cname in sized:
        o[cname] = ctypes.sizeof(struct)
    o["fi.bits"] = abi.FI_DIRECT_IO | abi.FI_KEEP_CACHE | abi.FI_FLOCK_RELEASE
    return o


@pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADERS.exists(), reason="needs gcc and libfuse3 headers"
)
def test_struct_layouts_match_the_installed_headers(tmp_path: Path) -> None:
    src = tmp_path / "offsets.c"
    src.write_text(OFFSETS_C)
    exe = tmp_path / "offsets"
    subprocess.run(
        ["gcc", "-I/usr/include/fuse3", "-D_FILE_OFFSET_BITS=64", str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    theirs = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    ours = _ours()
    assert {k: ours[k] for k in theirs} == theirs


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 figures")
def test_struct_sizes_on_x86_64() -> None:
    assert ctypes.sizeof(abi.Stat) == 144
    assert ctypes.sizeof(abi.EntryParam) == 176
    assert ctypes.sizeof(abi.LowLevelOps) == 44 * 8
    assert abi.FileInfo.fh.offset == 16
    assert abi.FileInfo.lock_owner.offset == 24


def test_library_loads_with_a_multithreaded_loop() -> None:
    try:
        lib = abi.load()
    except Exception as e:
        pytest.skip(f"libfuse3 not loadable: {e}")
    assert lib.version >= 300
    assert lib.loop_kind in {"312", "32", "31"}
    if lib.version >= 312:
        assert lib.loop_kind == "312"


def test_fuse_argv_escapes_commas_and_backslashes() -> None:
    assert fuse_argv(set()) == [b"loftfs"]
    argv = fuse_argv({"fsname=loftfs:a,b", "allow_other", "subtype=x\\y"})
    assert argv[:2] == [b"loftfs", b"-o"]
    assert argv[2] == b"allow_other,fsname=loftfs:a\\,b,subtype=x\\\\y"


@given(st.integers(0, 1 << 62), st.integers(-(1 << 62), 1 << 62))
def test_lock_range_matches_posix(start: int, length: int) -> None:
    lk = abi.Flock(l_type=0, l_whence=0, l_start=start, l_len=length, l_pid=1)
    if length < 0 and start + length < 0:
        with pytest.raises(FSError):
            lock_range(lk)
        return
    lo, hi = lock_range(lk)
    if length == 0:
        assert (lo, hi) == (start, LOCK_EOF)
    elif length > 0:
        assert (lo, hi) == (start, start + length - 1)
    else:  # a negative length covers the bytes before start
        assert (lo, hi) == (start + length, start - 1)


@given(st.integers(0, (1 << 64) - 1))
def test_lock_owner_fits_a_signed_64_bit_column(owner: int) -> None:
    fi = abi.FileInfo(lock_owner=owner)
    mapped = lock_owner(fi)
    assert -(1 << 63) <= mapped < 1 << 63
    assert mapped % (1 << 64) == owner  # one to one


class Answers:
    """Records the answers a LockWaiters gives (request id -> errno)."""

    def __init__(self) -> None:
        self.got: dict[int, int] = {}
        self.interrupted: set[int] = set()
        self.event = threading.Condition()

    def reply(self, req: int, err: int) -> None:
        with self.event:
            self.got[req] = err
            self.event.notify_all()

    def wait_for(self, req: int, timeout: float = 5) -> int:
        with self.event:
            assert self.event.wait_for(lambda: req in self.got, timeout), f"no answer to {req}"
            return self.got[req]


def test_parked_lock_is_granted_when_free() -> None:
    answers = Answers()
    waiters = LockWaiters(answers.reply, lambda r: r in answers.interrupted, 0.001, 0.01)
    free_at = time.monotonic() + 0.2
    tries = []

    def attempt() -> None:
        tries.append(1)
        if time.monotonic() < free_at:
            raise FSError(errno.EAGAIN)

    waiters.park(1, "k", attempt)
    assert answers.wait_for(1) == 0
    assert time.monotonic() >= free_at
    assert len(tries) < 100  # backed off, not spinning
    waiters.stop()


def test_parked_lock_interrupted_cancelled_and_stopped() -> None:
    answers = Answers()
    waiters = LockWaiters(answers.reply, lambda r: r in answers.interrupted, 0.001, 0.01)

    def never() -> None:
        raise FSError(errno.EAGAIN)

    def broken() -> None:
        raise FSError(errno.EBADF)

    waiters.park(1, "a", never)
    waiters.park(2, "b", never)
    waiters.park(3, "b", never)
    waiters.park(4, "c", never)
    waiters.park(5, "d", broken)
    answers.interrupted.add(1)
    assert answers.wait_for(1) == errno.EINTR
    assert answers.wait_for(5) == errno.EBADF
    assert waiters.cancel("b") == 2
    assert answers.got[2] == answers.got[3] == errno.ENOLCK
    assert len(waiters) == 1
    waiters.stop()
    assert answers.got[4] == errno.ENOLCK
    waiters.park(6, "e", never)  # after stop: answered at once
    assert answers.got[6] == errno.ENOLCK


attr_values = st.builds(
    lambda inode, size, nlink, mode, uid, gid, rdev, times: Attr(
        inode=inode, type=FileType.FILE, mode=mode, uid=uid, gid=gid, nlink=nlink, size=size,
        rdev=rdev, atime_ns=times[0], mtime_ns=times[1], ctime_ns=times[2], parent=1,
    ),
    st.integers(1, 2**63 - 1),
    st.integers(0, 2**62),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0o7777),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.tuples(*[st.integers(-(2**62), 2**62)] * 3),
)  # fmt: skip


names = st.binary(min_size=1, max_size=300).filter(lambda n: b"\0" not in n)
kinds = st.sampled_from(list(FileType))


@given(
    listing=st.lists(st.tuples(names, attr_values, kinds), min_size=1, max_size=40),
    first=st.integers(1, 2**62),
    size=st.integers(0, 8192),
    timeouts=st.tuples(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e6)),
)
def test_readdirplus_page_equals_libfuse(
    listing: list[tuple[bytes, Attr, FileType]],
    first: int,
    size: int,
    timeouts: tuple[float, float, float],
) -> None:
    """READDIRPLUS pages are packed in Python; every byte must equal what libfuse's own
    fuse_add_direntry_plus writes for the same entries, and a page ends at the first entry
    that does not fit."""
    lib = abi.load()
    entries = []
    for name, attr, kind in listing:
        attr.type = kind
        entries.append((name, attr))
    theirs = ctypes.create_string_buffer(max(size, 1))
    pos = 0
    expected = []
    for index, (name, attr) in enumerate(entries, start=first):
        e = abi.EntryParam()
        e.ino = attr.inode if attr.nlink else 0  # nlink 0: listed without attributes
        fill_stat(e.attr, attr)
        e.attr_timeout = timeouts[2]
        e.entry_timeout = timeouts[1] if attr.type == FileType.DIR else timeouts[0]
        room = size - pos
        n = lib.fuse_add_direntry_plus(None, ctypes.addressof(theirs) + pos, room, name, e, index)
        if n > room:
            break
        pos += n
        expected.append(attr.row())
    rows = ((name, attr.row()) for name, attr in entries)
    listed: list[AttrRow] = []
    page = direntplus_page(rows, first, size, *(_timeout(t) for t in timeouts), listed)
    assert page == theirs.raw[:pos]
    assert listed == expected


@given(
    listing=st.lists(st.tuples(names, st.integers(1, 2**64 - 1), kinds), min_size=1, max_size=60),
    first=st.integers(1, 2**62),
    size=st.integers(0, 8192),
)
def test_readdir_page_equals_libfuse(
    listing: list[tuple[bytes, int, FileType]], first: int, size: int
) -> None:
    """Plain pages too: every byte equals what fuse_add_direntry writes."""
    lib = abi.load()
    entries = [(name, Attr(inode, kind, 0o644, 0, 0)) for name, inode, kind in listing]
    theirs = ctypes.create_string_buffer(max(size, 1))
    pos = 0
    for index, (name, attr) in enumerate(entries, start=first):
        st_ = abi.Stat()
        st_.st_ino = attr.inode
        st_.st_mode = attr.st_mode
        room = size - pos
        n = lib.fuse_add_direntry(None, ctypes.addressof(theirs) + pos, room, name, st_, index)
        if n > room:
            break
        pos += n
    listed: list[AttrRow] = []
    assert dirent_page(((n, a.row()) for n, a in entries), first, size, listed) == theirs.raw[:pos]
    assert listed == [a.row() for _, a in entries[: len(listed)]]


def test_entry_without_attributes_has_nodeid_zero() -> None:
    """An entry whose inode was removed while listed (nlink 0, see Listing) goes out with
    nodeid 0, which the kernel reads as "no attributes" (it makes no dentry), and keeps its
    inode number and type in the dirent part; the others are unchanged."""
    gone = (7, FileType.FILE, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    alive = Attr(8, FileType.DIR, 0o755, 1, 2, nlink=2).row()
    listed: list[AttrRow] = []
    page = direntplus_page(
        [(b"gone", gone), (b"alive", alive)], 3, 4096, (1, 0), (1, 0), (1, 0), listed
    )
    assert listed == [gone, alive]
    head = _DIRENTPLUS.size
    first = _DIRENTPLUS.unpack_from(page, 0)
    assert first[0] == 0 and first[22:] == (7, 3, 4, stat.S_IFREG >> 12)
    second = _DIRENTPLUS.unpack_from(page, head + 8)
    assert second[0] == 8 and second[22:] == (8, 4, 5, stat.S_IFDIR >> 12)
