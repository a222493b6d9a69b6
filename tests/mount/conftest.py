"""Fixtures for tests through real FUSE mounts of loftfs.

Volumes are real SQLite files and real bucket directories; mounts are real ``loft mount -d``
processes. Every mount a fixture makes is unmounted in teardown, whatever the test did: ``loft
umount`` first, then a lazy ``fusermount3 -uz``, then SIGKILL of the mount process, so a failed
test never leaves a mount behind. A mount process that died during a test (and was not killed on
purpose) is reported as a teardown error with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import loftmount
import pytest
from loftmount import (
    STACKS,
    Mount,
    Mounter,
    Stack,
    Volume,
    fuse_unavailable,
    kill_all_mounts,
    make_volume,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``mount``; skip them all where FUSE cannot be used."""
    here = Path(__file__).parent
    reason = fuse_unavailable()
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.mount)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack of this run (``LOFT_TEST_STACK``, default ``sqlite+file``), its servers started
    once for the session; every volume of the folder's fixtures is made on it."""
    name = os.environ.get("LOFT_TEST_STACK", "sqlite+file")
    if name not in STACKS:
        pytest.exit(f"LOFT_TEST_STACK={name!r}: expected one of {', '.join(STACKS)}", 2)
    stack = Stack(name)
    if stack.meta_kind == "redis":
        stack.redis = request.getfixturevalue("redis_server")
    elif stack.meta_kind == "postgres":
        stack.postgres = request.getfixturevalue("postgres_server")
        stack.pg_db = stack.postgres.new_database()
    if stack.storage == "s3":
        stack.seaweed = request.getfixturevalue("seaweed_server")
    loftmount.STACK = stack
    yield stack
    loftmount.STACK = Stack()


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill the mount processes shortly before pytest-timeout would end a hung test.

    A system call blocked on a stuck FUSE connection ignores pytest-timeout's signal; killing
    the mount process aborts the connection, the call fails with ENOTCONN, the test fails and
    its fixtures still unmount everything.
    """
    marker = request.node.get_closest_marker("timeout")
    if marker and marker.args:
        limit = float(marker.args[0])
    else:
        option = request.config.getoption("timeout", None)
        limit = float(option if option is not None else request.config.getini("timeout") or 0)
    if limit <= 0:
        yield
        return
    timer = threading.Timer(max(limit - 20, limit * 0.8), kill_all_mounts)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def mount_base() -> Iterator[Path]:
    """A world-traversable folder for mountpoints (non-root test users must reach them)."""
    base = Path(tempfile.mkdtemp(prefix="loftfs-mnt-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _mounter(base: Path) -> Iterator[Mounter]:
    mounter = Mounter(base)
    try:
        yield mounter
    finally:
        crashed = mounter.cleanup()
        if crashed:
            pytest.fail("\n\n".join(crashed))


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    """A fresh volume with 1 MiB blocks (multi-block paths with small files)."""
    return make_volume(tmp_path / "vol")


@pytest.fixture
def new_volume(tmp_path: Path) -> Callable[..., Volume]:
    """Factory of extra volumes with custom ``loft format`` flags (``capacity="64M"``...)."""
    count = 0

    def factory(**opts: Any) -> Volume:
        nonlocal count
        count += 1
        return make_volume(tmp_path / f"vol{count}", **opts)

    return factory


@pytest.fixture
def mounter(mount_base: Path) -> Iterator[Mounter]:
    """Mount any number of volumes (the same one twice too: two processes); all unmounted after."""
    with _mounter(mount_base) as m:
        yield m


@pytest.fixture
def mount(mounter: Mounter, volume: Volume) -> Mount:
    """A private mount of a fresh volume, for tests that need isolation (remount, crash, quota)."""
    return mounter.mount(volume)


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory, mount_base: Path) -> Iterator[Mount]:
    """One mount for a whole test module, for speed; tests use ``workdir`` inside it."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable() or "")
    with _mounter(mount_base) as m:
        # extended attributes on: the POSIX files exercise them through this mount
        yield m.mount(make_volume(tmp_path_factory.mktemp("shared") / "vol"), "--enable-xattr")


@pytest.fixture
def workdir(shared_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, empty, world-writable directory in the module's shared mount.

    After the test, the shared mount must still be alive: a crash is blamed on this test.
    """
    path = shared_mount.path / request.node.name.replace("/", "_")[:200]
    path.mkdir()
    path.chmod(0o777)
    yield path
    if not shared_mount.alive():
        shared_mount.expected_dead = True
        pytest.fail(f"the shared mount died during this test\n{shared_mount.log_tail()}")
