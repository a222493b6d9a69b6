"""Fixtures of the metadata conformance suite.

``backend`` is parametrized over every engine; each test gets a freshly formatted volume from
``meta`` and may open more clients of the same volume with ``backend.open()``. Adding an engine
is one branch in ``backend``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from meta_helpers import Backend

from loftfs.meta import Meta, open_meta
from loftfs.meta.types import VolumeSettings

ENGINES = ["sqlite", "sqlite-batched", "redis", "postgres"]
_POSTGRES_DBS: dict[int, str] = {}


def _postgres_db(server: Any) -> str:
    """One database per PostgreSQL server of the run (each test gets a schema in it)."""
    key = id(server)
    if key not in _POSTGRES_DBS:
        _POSTGRES_DBS[key] = server.new_database()
    return _POSTGRES_DBS[key]


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name = request.param
    if name in ("sqlite", "sqlite-batched"):
        b = Backend(name, f"sqlite3://{tmp_path}/meta.db", batched=name.endswith("batched"))
    elif name == "redis":  # the session's server, a key prefix of the test's own
        server = request.getfixturevalue("redis_server")
        b = Backend(name, server.url(db=1, prefix=f"t{uuid.uuid4().hex[:12]}"))
    elif name == "postgres":  # the session's server and database, a schema of the test's own
        server = request.getfixturevalue("postgres_server")
        b = Backend(name, server.url(_postgres_db(server), schema=f"t{uuid.uuid4().hex[:12]}"))
    else:  # pragma: no cover - engines added later get their branch here
        raise AssertionError(name)
    yield b
    b.close_all()


@pytest.fixture
def settings() -> VolumeSettings:
    """Settings the ``meta`` fixture formats with; tests may override this fixture."""
    return VolumeSettings(name="test")


@pytest.fixture
def meta(backend: Backend, settings: VolumeSettings) -> Meta:
    m = backend.open()
    m.init_volume(settings)
    return m


@pytest.fixture
def opened() -> Iterator[Callable[[str], Meta]]:
    """``open(url)``: clients of any engine URL, every one closed at teardown."""
    metas: list[Meta] = []

    def open_(url: str) -> Meta:
        meta = open_meta(url)
        metas.append(meta)
        return meta

    yield open_
    for meta in metas:
        meta.close()
