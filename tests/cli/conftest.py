"""Fixtures for the ``loft`` command-line tests: real SQLite metadata files and real bucket
directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from loftcli import Volume, loft, ok


@pytest.fixture
def meta_url(tmp_path: Path) -> str:
    return f"sqlite3://{tmp_path / 'meta.db'}"


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    return tmp_path / "bucket"


@pytest.fixture
def volume(meta_url: str, bucket: Path) -> Iterator[Volume]:
    ok(loft("format", meta_url, "vol1", "--storage", "file", "--bucket", str(bucket)))
    yield Volume(meta_url, bucket, "vol1")
