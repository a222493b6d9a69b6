"""Fixtures for the low-level FUSE binding: real volumes (SQLite file + bucket directory) served
by real mount processes (``llserve.py``), each unmounted in teardown whatever the test did:
SIGTERM first, then SIGKILL, then a lazy ``fusermount3 -uz``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from llmount import Mount, Mounter, Volume, fuse_unavailable, make_volume

_ACTIVE: list[Mounter] = []
MOUNT_FIXTURES = {"mount", "mounter", "shared_mount", "workdir", "second_mount"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use a mount fixture are marked ``mount`` and skipped where FUSE cannot be
    used; the others (struct layouts, pure helpers) run everywhere."""
    here = Path(__file__).parent
    reason: str | None = None
    checked = False
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if here not in item.path.parents or not fixtures & MOUNT_FIXTURES:
            continue
        if not checked:
            reason, checked = fuse_unavailable(), True
        item.add_marker(pytest.mark.mount)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill the mount processes shortly before pytest-timeout would end a hung test: a system
    call blocked on a FUSE connection ignores the timeout's signal, but fails with ENOTCONN
    once the serving process is gone."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else 0.0
    limit = limit or float(request.config.getini("timeout") or 0)
    if limit <= 0:
        yield
        return

    def kill() -> None:
        for mounter in list(_ACTIVE):
            mounter.kill_all()

    timer = threading.Timer(max(limit - 20, limit * 0.8), kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def mount_base() -> Iterator[Path]:
    """A world-traversable folder for mountpoints (tests also act as an unprivileged user)."""
    base = Path(tempfile.mkdtemp(prefix="loftfs-ll-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return make_volume(tmp_path / "vol")


@pytest.fixture
def mounter(mount_base: Path) -> Iterator[Mounter]:
    m = Mounter(mount_base)
    _ACTIVE.append(m)
    try:
        yield m
    finally:
        problems = m.cleanup()
        _ACTIVE.remove(m)
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def mount(mounter: Mounter, volume: Volume) -> Mount:
    return mounter.mount(volume)


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory, mount_base: Path) -> Iterator[Mount]:
    """One mount for a whole module (faster); tests work in ``workdir``."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable() or "")
    m = Mounter(mount_base)
    _ACTIVE.append(m)
    try:
        yield m.mount(make_volume(tmp_path_factory.mktemp("shared") / "vol"))
    finally:
        problems = m.cleanup()
        _ACTIVE.remove(m)
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def workdir(shared_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh world-writable directory in the module's shared mount, which must still be
    alive after the test."""
    path = shared_mount.path / request.node.name.replace("/", "_")[:200]
    path.mkdir()
    path.chmod(0o777)
    yield path
    if not shared_mount.alive():
        pytest.fail(f"the shared mount died during this test\n{shared_mount.log_text()[-4000:]}")


@pytest.fixture
def second_mount(mounter: Mounter, shared_mount: Mount) -> Callable[[], Mount]:
    """Another mount process of the shared mount's volume (for cross-mount tests)."""
    return lambda: mounter.mount(shared_mount.volume)
