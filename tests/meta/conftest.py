"""Fixtures of the metadata conformance suite.

``backend`` is parametrized over every engine; each test gets a freshly formatted volume from
``meta`` and may open more clients of the same volume with ``backend.open()``. Adding an engine
is one branch in ``backend``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loftfs.meta import Meta, open_meta
from loftfs.meta.core import MetaCore
from loftfs.meta.types import VolumeSettings

ENGINES = ["sqlite", "sqlite-batched"]


@dataclass
class Backend:
    """One engine instance under test: its URL and the clients opened on it."""

    name: str
    url: str
    batched: bool = False
    clients: list[Meta] = field(default_factory=list)

    def open(self) -> Meta:
        """A new client of the volume (as another mount would be)."""
        meta = open_meta(self.url)
        if self.batched and isinstance(meta, MetaCore):
            meta.COUNTERS_IN_TXN = False  # usage counters accumulated in memory
        self.clients.append(meta)
        return meta

    def close_all(self) -> None:
        for meta in self.clients:
            meta.close()


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name = request.param
    if name in ("sqlite", "sqlite-batched"):
        b = Backend(name, f"sqlite3://{tmp_path}/meta.db", batched=name.endswith("batched"))
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
