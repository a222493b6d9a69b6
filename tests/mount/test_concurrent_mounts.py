"""Two mounts of one volume in two processes changing one directory at the same time.

Runs on every stack (``LOFT_TEST_STACK``): on ``redis+s3`` and ``postgres+s3`` this is what the
engines' concurrency control is for. Nothing may be lost: every create and rename that returned
success is visible in a third, fresh mount, link counts and usage figures are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from loftmount import Mounter, Volume, loft

FILES = 150  # per worker
SUBDIRS = 20  # per worker
SHARED = 40  # rename targets both workers race for

WORKER = textwrap.dedent(
    """
    import errno, json, os, sys
    d, tag, files, subdirs, shared = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    made, renamed, won = [], [], []
    for i in range(files):
        p = os.path.join(d, f"{tag}-f{i}")
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, f"{tag}:{i}".encode())
        os.close(fd)
        made.append(p)
        if i % 2:
            q = os.path.join(d, f"{tag}-r{i}")
            os.rename(p, q)
            renamed.append(q)
        if i % 10 == 0:
            os.mkdir(os.path.join(d, f"{tag}-d{i}"))
    for i in range(shared):
        src = os.path.join(d, f"{tag}-s{i}")
        with open(src, "w") as f:
            f.write(f"{tag}:{i}")
        os.rename(src, os.path.join(d, f"t{i}"))  # both workers: one of the two stays
    print(json.dumps({"done": True}))
    """
)


def _start(path: Path, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), tag, str(FILES), str(SUBDIRS), str(SHARED)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_creates_and_renames_lose_nothing(mounter: Mounter, volume: Volume) -> None:
    base_inodes = _used_inodes(volume)  # before any mount: nothing can be pending
    a = mounter.mount(volume)
    b = mounter.mount(volume)
    (a.path / "d").mkdir()

    workers = [_start(a.path / "d", "a"), _start(b.path / "d", "b")]
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
        assert json.loads(out)["done"]

    # A third mount has no cached state of either writer.
    c = mounter.mount(volume)
    d = c.path / "d"
    names = set(os.listdir(d))
    expected: set[str] = set()
    for tag in "ab":
        for i in range(FILES):
            expected.add(f"{tag}-r{i}" if i % 2 else f"{tag}-f{i}")
            if i % 10 == 0:
                expected.add(f"{tag}-d{i}")
    expected |= {f"t{i}" for i in range(SHARED)}
    assert names == expected, (sorted(names - expected)[:10], sorted(expected - names)[:10])

    subdirs = sum(1 for n in names if "-d" in n)
    assert os.stat(d).st_nlink == 2 + subdirs
    for i in range(0, FILES, 7):
        for tag in "ab":
            name = f"{tag}-r{i}" if i % 2 else f"{tag}-f{i}"
            assert (d / name).read_text() == f"{tag}:{i}"
            assert os.stat(d / name).st_nlink == 1
    for i in range(SHARED):
        assert (d / f"t{i}").read_text() in (f"a:{i}", f"b:{i}")

    # Every rename over a shared target freed the loser's inode: usage counts what exists
    # (engines that batch usage counters publish them at the latest when a mount ends).
    for m in (a, b, c):
        m.umount()
    assert _used_inodes(volume) - base_inodes == 1 + len(names)  # d and what is in it


def _used_inodes(volume: Volume) -> int:
    return int(json.loads(loft("status", volume.meta_url, "--json").stdout)["usage"]["inodes"])
