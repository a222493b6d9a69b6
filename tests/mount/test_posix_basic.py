"""Everyday POSIX operations through a real loftfs mount (one shared mount, a directory per test)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from loftmount import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

MIB = 1 << 20
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    """``renameat2(2)`` through libc: the os module has no binding for its flags."""
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def read_all(path: Path) -> bytes:
    return path.read_bytes()


def test_create_write_read_and_overwrite(workdir: Path) -> None:
    f = workdir / "a.txt"
    f.write_bytes(b"hello world")
    assert read_all(f) == b"hello world"
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1
    f.write_bytes(b"bye")  # O_TRUNC
    assert read_all(f) == b"bye"
    assert os.stat(f).st_size == 3
    with open(f, "r+b") as fh:
        fh.seek(1)
        fh.write(b"EE")
    assert read_all(f) == b"bEE"


def test_create_exclusive(workdir: Path) -> None:
    f = workdir / "x"
    os.close(os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640 & ~_umask()
    with pytest.raises(FileExistsError):
        os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_read_sees_write_in_same_fd(workdir: Path) -> None:
    fd = os.open(workdir / "rw", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"0123456789")
        assert os.pread(fd, 4, 3) == b"3456"
        os.pwrite(fd, b"XY", 8)
        assert os.pread(fd, 100, 0) == b"01234567XY"
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)


def test_directories(workdir: Path) -> None:
    d = workdir / "d1" / "d2" / "d3"
    d.mkdir(parents=True)
    for i in range(50):
        (workdir / "d1" / f"f{i:02}").write_bytes(b"x" * i)
    names = sorted(os.listdir(workdir / "d1"))
    assert names == sorted([f"f{i:02}" for i in range(50)] + ["d2"])
    st = os.stat(workdir / "d1")
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_nlink == 3  # ".", its entry in the parent, ".." of d2
    assert os.stat(workdir / "d1" / "d2").st_nlink == 3
    assert os.stat(d).st_nlink == 2
    with os.scandir(workdir / "d1") as it:
        kinds = {
            e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in it
        }
    assert kinds["d2"] == (True, False) and kinds["f07"] == (False, True)
    os.rmdir(d)
    assert os.stat(workdir / "d1" / "d2").st_nlink == 2


def test_large_directory_listing(workdir: Path) -> None:
    names = {f"entry-{i:04}-{'n' * (i % 40)}" for i in range(1500)}
    for name in names:
        (workdir / name).touch()
    assert set(os.listdir(workdir)) == names
    for name in list(names)[:700]:
        (workdir / name).unlink()
    assert set(os.listdir(workdir)) == set(list(names)[700:])


class _Dirent(ctypes.Structure):  # glibc's struct dirent on Linux (64-bit)
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


class _Dir:
    """One directory stream through libc (the os module has no telldir/seekdir/rewinddir)."""

    def __init__(self, path: Path) -> None:
        for name, res, args in (
            ("opendir", ctypes.c_void_p, [ctypes.c_char_p]),
            ("readdir", ctypes.POINTER(_Dirent), [ctypes.c_void_p]),
            ("telldir", ctypes.c_long, [ctypes.c_void_p]),
            ("seekdir", None, [ctypes.c_void_p, ctypes.c_long]),
            ("rewinddir", None, [ctypes.c_void_p]),
            ("closedir", ctypes.c_int, [ctypes.c_void_p]),
        ):
            fn = getattr(_libc, name)
            fn.restype, fn.argtypes = res, args
        self.d = _libc.opendir(os.fsencode(path))
        assert self.d

    def read(self, n: int = 1 << 30) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            e = _libc.readdir(self.d)
            if not e:
                break
            name = e.contents.d_name.decode()
            if name not in (".", ".."):
                out.append(name)
        return out

    def tell(self) -> int:
        return int(_libc.telldir(self.d))

    def seek(self, pos: int) -> None:
        _libc.seekdir(self.d, pos)

    def rewind(self) -> None:
        _libc.rewinddir(self.d)

    def close(self) -> None:
        _libc.closedir(self.d)


def test_paging_a_listing_with_seek_and_rewind(workdir: Path) -> None:
    """A listing of many reply pages (each page after the first is packed ahead): every entry
    exactly once per pass, two streams of one directory interleaved, telldir/seekdir back to a
    position repeats what followed it, and rewinddir lists the directory as it is now."""
    names = {f"p{i:05}-{'x' * (i % 50)}" for i in range(3000)}
    for name in names:
        (workdir / name).touch()
    a, b = _Dir(workdir), _Dir(workdir)
    try:
        first = a.read(700)
        b_all = b.read(100)
        pos = a.tell()
        middle = a.read(900)
        b_all += b.read()
        rest = a.read()
        assert len(first) + len(middle) + len(rest) == len(names)
        assert set(first) | set(middle) | set(rest) == names
        assert sorted(b_all) == sorted(names)
        a.seek(pos)
        assert a.read(900) == middle
        gone = set(sorted(names)[::3])
        for name in gone:
            (workdir / name).unlink()
        (workdir / "new-entry").touch()
        a.rewind()
        assert sorted(a.read()) == sorted((names - gone) | {"new-entry"})
    finally:
        a.close()
        b.close()


def test_symlinks(workdir: Path) -> None:
    (workdir / "target").write_bytes(b"data")
    os.symlink("target", workdir / "rel")
    os.symlink(str(workdir / "target"), workdir / "abs")
    os.symlink("nowhere/at/all", workdir / "dangling")
    long_target = "x" * 1000 + "/y" * 500
    os.symlink(long_target, workdir / "long")
    assert os.readlink(workdir / "rel") == "target"
    assert os.readlink(workdir / "abs") == str(workdir / "target")
    assert os.readlink(workdir / "long") == long_target
    assert read_all(workdir / "rel") == b"data"
    st = os.lstat(workdir / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert not (workdir / "dangling").exists() and (workdir / "dangling").is_symlink()
    with pytest.raises(FileNotFoundError):
        (workdir / "dangling").read_bytes()
    with pytest.raises(OSError) as e:
        os.readlink(workdir / "target")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError):
        os.symlink("other", workdir / "rel")
    os.unlink(workdir / "rel")
    assert (workdir / "target").exists()


def test_hard_links(workdir: Path) -> None:
    a = workdir / "a"
    a.write_bytes(b"shared")
    os.link(a, workdir / "b")
    os.mkdir(workdir / "sub")
    os.link(a, workdir / "sub" / "c")
    for p in (a, workdir / "b", workdir / "sub" / "c"):
        assert os.stat(p).st_nlink == 3
    assert os.stat(a).st_ino == os.stat(workdir / "sub" / "c").st_ino
    with open(workdir / "b", "ab") as fh:
        fh.write(b"+more")
    assert read_all(workdir / "sub" / "c") == b"shared+more"
    os.unlink(a)
    assert os.stat(workdir / "b").st_nlink == 2
    assert read_all(workdir / "b") == b"shared+more"
    with pytest.raises(PermissionError):  # no hard links to directories
        os.link(workdir / "sub", workdir / "sub2")
    with pytest.raises(FileExistsError):
        os.link(workdir / "b", workdir / "sub" / "c")


def test_rename_variants(workdir: Path) -> None:
    (workdir / "a").write_bytes(b"A")
    (workdir / "b").write_bytes(b"B")
    os.mkdir(workdir / "d")
    os.mkdir(workdir / "e")
    (workdir / "e" / "inner").write_bytes(b"I")

    os.rename(workdir / "a", workdir / "a2")  # plain
    assert not (workdir / "a").exists() and read_all(workdir / "a2") == b"A"
    os.rename(workdir / "a2", workdir / "b")  # over an existing file
    assert read_all(workdir / "b") == b"A" and not (workdir / "a2").exists()
    os.rename(workdir / "b", workdir / "d" / "b")  # across directories
    assert read_all(workdir / "d" / "b") == b"A"
    os.rename(workdir / "d" / "b", workdir / "d" / "b")  # onto itself: no-op
    assert read_all(workdir / "d" / "b") == b"A"

    os.mkdir(workdir / "empty")
    os.rename(workdir / "e", workdir / "empty")  # dir over an empty dir
    assert read_all(workdir / "empty" / "inner") == b"I" and not (workdir / "e").exists()
    os.rename(workdir / "empty", workdir / "d" / "moved")  # dir across dirs: nlinks move
    assert os.stat(workdir / "d").st_nlink == 3
    assert read_all(workdir / "d" / "moved" / "inner") == b"I"

    (workdir / "f").write_bytes(b"F")
    with pytest.raises(OSError) as e:
        os.rename(workdir / "d", workdir / "d" / "moved" / "sub")  # into its own subtree
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.rename(workdir / "d", workdir / "f")  # dir over file
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as e:
        os.rename(workdir / "f", workdir / "d")  # file over dir
    assert e.value.errno == errno.EISDIR
    with pytest.raises(OSError) as e:
        os.rename(workdir / "d" / "moved", workdir / "d")  # over a non-empty dir (its parent)
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EINVAL)
    os.mkdir(workdir / "full")
    (workdir / "full" / "x").touch()
    with pytest.raises(OSError) as e:
        os.rename(workdir / "d" / "moved", workdir / "full")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(FileNotFoundError):
        os.rename(workdir / "missing", workdir / "z")


def test_rename_keeps_hard_link_and_open_fd(workdir: Path) -> None:
    (workdir / "a").write_bytes(b"one")
    os.link(workdir / "a", workdir / "b")
    os.rename(workdir / "a", workdir / "b")  # same inode: POSIX says do nothing
    assert (workdir / "a").exists() and (workdir / "b").exists()
    (workdir / "c").write_bytes(b"victim")
    with open(workdir / "c", "rb") as fh:
        os.rename(workdir / "a", workdir / "c")  # replaces c while it is open
        assert fh.read() == b"victim"
    assert read_all(workdir / "c") == b"one"
    assert os.stat(workdir / "c").st_nlink == 2


def test_renameat2_noreplace_and_exchange(workdir: Path) -> None:
    (workdir / "a").write_bytes(b"A")
    (workdir / "b").write_bytes(b"B")
    os.mkdir(workdir / "d")
    (workdir / "d" / "x").write_bytes(b"X")

    with pytest.raises(OSError) as e:
        renameat2(workdir / "a", workdir / "b", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    assert read_all(workdir / "a") == b"A" and read_all(workdir / "b") == b"B"
    renameat2(workdir / "a", workdir / "c", RENAME_NOREPLACE)
    assert read_all(workdir / "c") == b"A" and not (workdir / "a").exists()

    renameat2(workdir / "c", workdir / "b", RENAME_EXCHANGE)
    assert read_all(workdir / "c") == b"B" and read_all(workdir / "b") == b"A"
    renameat2(workdir / "b", workdir / "d", RENAME_EXCHANGE)  # file <-> dir
    assert read_all(workdir / "d") == b"A"
    assert read_all(workdir / "b" / "x") == b"X"
    assert stat.S_ISDIR(os.lstat(workdir / "b").st_mode)
    with pytest.raises(FileNotFoundError):
        renameat2(workdir / "c", workdir / "nope", RENAME_EXCHANGE)


def test_chmod_chown_utime(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x")
    for mode in (0o600, 0o755, 0o4755, 0o2711, 0o1777, 0o000):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 42)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 42)

    atime_ns = 1_000_000_123_456_789
    mtime_ns = 1_500_000_987_654_321
    os.utime(f, ns=(atime_ns, mtime_ns))
    st = os.stat(f)
    assert st.st_atime_ns == atime_ns and st.st_mtime_ns == mtime_ns
    before = time.time_ns()
    os.utime(f)  # now
    st = os.stat(f)
    assert abs(st.st_mtime_ns - before) < 5_000_000_000
    os.utime(f, ns=(atime_ns, -5_000_000_000))  # before the epoch
    assert os.stat(f).st_mtime_ns == -5_000_000_000

    os.symlink("f", workdir / "ln")
    os.utime(workdir / "ln", ns=(atime_ns, mtime_ns), follow_symlinks=False)
    assert os.lstat(workdir / "ln").st_mtime_ns == mtime_ns


def test_write_updates_mtime_and_ctime(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(10**17, 10**17))  # 1973
    old_ctime = os.stat(f).st_ctime_ns
    time.sleep(0.02)
    with open(f, "ab") as fh:
        fh.write(b"y")
    st = os.stat(f)
    assert abs(st.st_mtime_ns - time.time_ns()) < 10_000_000_000  # the write set it to now
    assert st.st_ctime_ns >= old_ctime
    os.chmod(f, 0o600)
    assert os.stat(f).st_ctime_ns >= st.st_ctime_ns


def test_truncate_grow_and_shrink(workdir: Path) -> None:
    f = workdir / "t"
    data = random.Random(1).randbytes(3 * MIB + 123)
    f.write_bytes(data)
    os.truncate(f, 2 * MIB + 7)
    assert read_all(f) == data[: 2 * MIB + 7]
    os.truncate(f, 5 * MIB)
    assert read_all(f) == data[: 2 * MIB + 7] + bytes(5 * MIB - (2 * MIB + 7))
    os.truncate(f, 0)
    assert read_all(f) == b"" and os.stat(f).st_size == 0
    # shrink then write past the cut: the cut-off data must not come back
    f.write_bytes(b"A" * 100)
    with open(f, "r+b") as fh:
        fh.truncate(10)
        fh.seek(50)
        fh.write(b"B")
    assert read_all(f) == b"A" * 10 + bytes(40) + b"B"
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
        assert os.pread(fd, 100, 0) == b"AAA"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.truncate(f, -1)
    assert e.value.errno == errno.EINVAL


def test_sparse_file(workdir: Path) -> None:
    f = workdir / "sparse"
    far = 3 * (64 * MIB) + 12345  # beyond several chunks
    with open(f, "wb") as fh:
        fh.write(b"head")
        fh.seek(far)
        fh.write(b"tail")
    assert os.stat(f).st_size == far + 4
    with open(f, "rb") as fh:
        assert fh.read(4) == b"head"
        fh.seek(64 * MIB - 10)
        assert fh.read(MIB) == bytes(MIB)
        fh.seek(far - 3)
        assert fh.read(100) == b"\0\0\0tail"


def test_random_writes_against_model(workdir: Path) -> None:
    rng = random.Random(42)
    f = workdir / "model"
    model = bytearray(rng.randbytes(5 * MIB // 2))
    f.write_bytes(model)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(300):
            off = rng.randrange(0, 4 * MIB)
            size = rng.choice([1, 7, 4096, 65536, 300_000, MIB + 17])
            data = rng.randbytes(size)
            assert os.pwrite(fd, data, off) == size
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + size] = data
            if i % 37 == 0:
                check = rng.randrange(0, len(model))
                assert os.pread(fd, 200_000, check) == bytes(model[check : check + 200_000])
            if i % 100 == 99:
                os.fsync(fd)
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert hashlib.sha256(read_all(f)).hexdigest() == hashlib.sha256(model).hexdigest()


def test_append(workdir: Path) -> None:
    f = workdir / "log"
    expected = b""
    for i in range(200):
        line = f"line {i} {'z' * (i * 13 % 5000)}\n".encode()
        fd = os.open(f, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the position
            os.write(fd, line)
        finally:
            os.close(fd)
        expected += line
    assert read_all(f) == expected


def test_concurrent_appenders(workdir: Path) -> None:
    """Two processes appending through O_APPEND never overwrite each other's records."""
    f = workdir / "shared.log"
    f.touch()
    script = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND)\n"
        "for i in range(300): os.write(fd, (sys.argv[2]*63+'\\n').encode())\n"
        "os.close(fd)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(f), tag]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = read_all(f).splitlines()
    assert len(lines) == 600
    assert sorted(set(lines)) == [b"a" * 63, b"b" * 63]


def test_fifo_and_device_nodes(workdir: Path) -> None:
    os.mkfifo(workdir / "fifo", 0o600)
    st = os.lstat(workdir / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    os.mknod(workdir / "chr", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(workdir / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(workdir / "reg", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.lstat(workdir / "reg").st_mode)
    # the FIFO works as a FIFO (the kernel handles the data, the mount only the inode)
    writer = subprocess.Popen(
        [sys.executable, "-c", f"open({str(workdir / 'fifo')!r}, 'wb').write(b'through the pipe')"]
    )
    with open(workdir / "fifo", "rb") as fh:
        assert fh.read() == b"through the pipe"
    assert writer.wait(timeout=30) == 0
    os.unlink(workdir / "fifo")


def test_fallocate(workdir: Path) -> None:
    f = workdir / "alloc"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        try:
            fallocate(fd, 0, 0, 3 * MIB)
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP
        else:
            assert os.fstat(fd).st_size == 3 * MIB
            assert os.pread(fd, 10, 0) == b"abc" + bytes(7)
            assert os.pread(fd, 10, 3 * MIB - 10) == bytes(10)
        try:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 8 * MIB)
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP
        else:
            assert os.fstat(fd).st_size in (3, 3 * MIB)
        os.pwrite(fd, b"Q" * 100, 0)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20)
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP
        else:
            assert os.pread(fd, 40, 0) == b"Q" * 10 + bytes(20) + b"Q" * 10
        os.posix_fallocate(fd, 0, 4 * MIB)  # glibc emulates when the fs does not support it
        assert os.fstat(fd).st_size == 4 * MIB
    finally:
        os.close(fd)


def test_copy_file_range(workdir: Path) -> None:
    rng = random.Random(7)
    src_data = rng.randbytes(5 * MIB + 333)
    (workdir / "src").write_bytes(src_data)
    (workdir / "dst").write_bytes(b"D" * 100)
    sfd = os.open(workdir / "src", os.O_RDONLY)
    dfd = os.open(workdir / "dst", os.O_RDWR)
    try:
        copied = 0
        want = 3 * MIB
        while copied < want:
            n = os.copy_file_range(sfd, dfd, want - copied, MIB + 5 + copied, 50 + copied)
            assert n > 0
            copied += n
        whole = 0
        while True:  # a second copy, from the fd offsets
            n = os.copy_file_range(sfd, dfd, 2 * MIB)
            if n == 0:
                break
            whole += n
    finally:
        os.close(sfd)
        os.close(dfd)
    expected = bytearray(b"D" * 50 + src_data[MIB + 5 : 4 * MIB + 5])
    expected[0:whole] = src_data[:whole]
    assert whole == len(src_data)
    assert read_all(workdir / "dst") == bytes(expected) + src_data[len(expected) :]


def test_open_unlink_read(workdir: Path) -> None:
    f = workdir / "doomed"
    data = random.Random(3).randbytes(2 * MIB + 1)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert os.listdir(workdir) == []
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data) + 10, 0) == data
        os.pwrite(fd, b"still writable", MIB)
        os.fsync(fd)
        assert os.pread(fd, 14, MIB) == b"still writable"
        f.write_bytes(b"new file, same name")
        assert os.pread(fd, 4, 0) == data[:4]
    finally:
        os.close(fd)
    assert read_all(f) == b"new file, same name"


def test_open_unlink_directory_handle(workdir: Path) -> None:
    d = workdir / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert os.fstat(fd).st_nlink in (0, 1)
        with pytest.raises(FileNotFoundError):
            os.open("new", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
    finally:
        os.close(fd)


def test_errno_values(workdir: Path) -> None:
    (workdir / "file").write_bytes(b"f")
    (workdir / "dir").mkdir()
    (workdir / "dir" / "child").touch()

    def errno_of(fn: Callable[..., object], *args: object) -> int | None:
        with pytest.raises(OSError) as e:
            fn(*args)
        return e.value.errno

    assert errno_of(os.stat, workdir / "missing") == errno.ENOENT
    assert errno_of(os.open, workdir / "missing" / "x", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.mkdir, workdir / "file") == errno.EEXIST
    assert errno_of(os.mkdir, workdir / "dir") == errno.EEXIST
    assert errno_of(os.rmdir, workdir / "dir") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, workdir / "file") == errno.ENOTDIR
    assert errno_of(os.unlink, workdir / "dir") == errno.EISDIR
    assert errno_of(os.open, workdir / "dir", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, workdir / "file" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.mkdir, workdir / "file" / "x") == errno.ENOTDIR
    assert errno_of(os.listdir, workdir / "file") == errno.ENOTDIR
    assert errno_of(os.rename, workdir / "dir", workdir / "dir" / "inside") == errno.EINVAL
    assert errno_of(os.rmdir, f"{workdir}/dir/.") == errno.EINVAL  # (pathlib drops the ".")
    assert errno_of(os.unlink, workdir / "missing") == errno.ENOENT
    assert errno_of(os.open, workdir / "nodir" / "f", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert errno_of(os.symlink, "t", workdir / "file") == errno.EEXIST
    assert errno_of(os.link, workdir / "missing", workdir / "l") == errno.ENOENT
    assert errno_of(os.readlink, workdir / "missing") == errno.ENOENT
    assert errno_of(os.open, workdir / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    fd = os.open(workdir / "file", os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EBADF
    finally:
        os.close(fd)
    os.symlink("loop2", workdir / "loop1")
    os.symlink("loop1", workdir / "loop2")
    assert errno_of(os.stat, workdir / "loop1") == errno.ELOOP


def test_fsync_and_fdatasync_dirs_and_files(workdir: Path) -> None:
    f = workdir / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 1000)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert read_all(f) == b"x" * 1000


def test_statvfs_reports_sane_values(workdir: Path) -> None:
    st = os.statvfs(workdir)
    assert st.f_bsize == 4096 and st.f_frsize > 0
    assert st.f_blocks >= st.f_bfree >= st.f_bavail >= 0
    assert st.f_files >= st.f_ffree >= 0
    assert st.f_namemax == 255


def test_many_small_files_round_trip(workdir: Path) -> None:
    rng = random.Random(11)
    contents = {f"d{i % 10}/f{i}": rng.randbytes(rng.randrange(0, 9000)) for i in range(400)}
    for name, data in contents.items():
        p = workdir / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
    for name, data in contents.items():
        assert read_all(workdir / name) == data
        assert os.stat(workdir / name).st_size == len(data)
