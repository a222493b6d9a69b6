"""Session-wide fixtures: the real servers of ``servers.py``, started once per test run.

``redis_server``, ``postgres_server`` and ``seaweed_server`` are shared by every test of a run;
tests isolate themselves by database/prefix/schema/bucket. ``redis_factory``,
``postgres_factory`` and ``seaweed_factory`` make servers of a test's own, for tests that kill
or pause them. Every server is stopped and its directory removed at teardown.

A server whose binary is missing fails the tests that need it (``scripts/setup.sh --test``
installs them all); set ``LOFT_SKIP_MISSING_SERVERS=1`` to skip those tests instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from servers import (
    PostgresServer,
    RedisServer,
    SeaweedServer,
    Server,
    server_unavailable,
)

S = TypeVar("S", bound=Server)


@pytest.fixture(scope="session", autouse=True)
def _disk_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every mount of a test run keeps its disk cache under the run's temporary directory
    (``LOFT_CACHE_DIR`` is the default of ``--cache-dir``), not in /var/cache/loftfs."""
    old = os.environ.get("LOFT_CACHE_DIR")
    os.environ["LOFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOFT_CACHE_DIR", None)
        else:
            os.environ["LOFT_CACHE_DIR"] = old


def _require(kind: str) -> None:
    reason = server_unavailable(kind)
    if reason is None:
        return
    if os.environ.get("LOFT_SKIP_MISSING_SERVERS"):
        pytest.skip(reason)
    pytest.fail(f"{reason}: run `bash scripts/setup.sh --test`", pytrace=False)


def _session_server(
    kind: str, cls: Callable[[Path], S], factory: pytest.TempPathFactory
) -> Iterator[S]:
    _require(kind)
    server = cls(factory.mktemp(kind))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _session_server("redis", RedisServer, tmp_path_factory)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    yield from _session_server("postgres", PostgresServer, tmp_path_factory)


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from _session_server("seaweedfs", SeaweedServer, tmp_path_factory)


def _factory(kind: str, cls: Callable[..., S], tmp_path: Path) -> Iterator[Callable[..., S]]:
    made: list[S] = []

    def make(**kwargs: object) -> S:
        """``kwargs`` go to the server class (e.g. ``password=`` of ``RedisServer``)."""
        _require(kind)
        server = cls(tmp_path / f"{kind}{len(made)}", **kwargs)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start Redis servers owned by one test (to kill, pause or restart them)."""
    yield from _factory("redis", RedisServer, tmp_path)


@pytest.fixture
def postgres_factory(tmp_path: Path) -> Iterator[Callable[[], PostgresServer]]:
    yield from _factory("postgres", PostgresServer, tmp_path)


@pytest.fixture
def seaweed_factory(tmp_path: Path) -> Iterator[Callable[[], SeaweedServer]]:
    yield from _factory("seaweedfs", SeaweedServer, tmp_path)
