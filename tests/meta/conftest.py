"""Fixtures of the metadata conformance suite.

``backend`` is parametrized over every engine; each test gets a freshly formatted volume from
``meta`` and may open more clients of the same volume with ``backend.open()``. Adding an engine
is one branch in ``backend``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from meta_helpers import Backend

from loftfs.meta import Meta
from loftfs.meta.types import VolumeSettings

ENGINES = ["sqlite", "sqlite-batched"]


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
