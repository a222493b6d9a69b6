"""Volume lifecycle: format, settings, destroy, bad URLs, usage of an empty volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from meta_helpers import ROOT, Backend, fs_error

from loftfs.errors import ConfigError, MetaUnavailable, NotFormatted, VolumeExists
from loftfs.meta import Meta, open_meta
from loftfs.meta.types import ROOT_CTX, FileType, VolumeSettings


def test_root_directory(meta: Meta) -> None:
    root = meta.getattr(ROOT)
    assert root.type == FileType.DIR
    assert root.nlink == 2
    assert root.size == 4096
    assert root.mode == 0o777
    assert meta.readdir(ROOT_CTX, ROOT) == []
    assert meta.lookup(ROOT_CTX, ROOT, b"..").inode == ROOT
    assert meta.lookup(ROOT_CTX, ROOT, b".").inode == ROOT


def test_settings_roundtrip(meta: Meta) -> None:
    s = meta.load_settings()
    assert s.name == "test"
    assert s.created_ns > 0
    s.capacity = 1 << 30
    s.trash_days = 3
    meta.update_settings(s)
    assert meta.load_settings().capacity == 1 << 30
    assert meta.load_settings().trash_days == 3


def test_update_settings_keeps_uuid(meta: Meta) -> None:
    s = meta.load_settings()
    s.uuid = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(ConfigError):
        meta.update_settings(s)


def test_format_twice(meta: Meta) -> None:
    before = meta.load_settings()
    with pytest.raises(VolumeExists):
        meta.init_volume(VolumeSettings(name="other"))
    assert meta.load_settings() == before


def test_unformatted(tmp_path: Path) -> None:
    meta = open_meta(f"sqlite3://{tmp_path}/none.db")
    try:
        with pytest.raises(NotFormatted):
            meta.load_settings()
        with pytest.raises(NotFormatted):
            meta.getattr(ROOT)
    finally:
        meta.close()


def test_destroy(meta: Meta) -> None:
    meta.mkdir(ROOT_CTX, ROOT, b"d", 0o755)
    meta.destroy_volume()
    with pytest.raises(NotFormatted):
        meta.load_settings()
    meta.init_volume(VolumeSettings(name="again"))
    assert meta.readdir(ROOT_CTX, ROOT) == []
    assert meta.usage() == (4096, 1)


def test_usage_empty(meta: Meta) -> None:
    assert meta.usage() == (4096, 1)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(MetaUnavailable, match="does not exist"):
        open_meta(f"sqlite3://{tmp_path}/missing/meta.db")
    with pytest.raises(ConfigError):
        open_meta("sqlite3://")
    with pytest.raises(ConfigError):
        open_meta("nosuch://x")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(MetaUnavailable, match="not writable"):
            open_meta(f"sqlite3://{ro}/meta.db")


def test_relative_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    meta = open_meta("sqlite3://rel.db")
    try:
        meta.init_volume(VolumeSettings(name="rel"))
    finally:
        meta.close()
    assert (tmp_path / "rel.db").exists()


def test_closed_engine_is_unusable(backend: Backend) -> None:
    meta = backend.open()
    meta.init_volume(VolumeSettings(name="x"))
    meta.close()
    meta.close()  # idempotent
    with pytest.raises(MetaUnavailable):
        meta.getattr(ROOT)


def test_two_clients_share_namespace(backend: Backend, meta: Meta) -> None:
    other = backend.open()
    d = meta.mkdir(ROOT_CTX, ROOT, b"d", 0o755)
    assert other.lookup(ROOT_CTX, ROOT, b"d").inode == d.inode
    f = other.mknod(ROOT_CTX, d.inode, b"f", FileType.FILE, 0o644)
    assert meta.lookup(ROOT_CTX, d.inode, b"f").inode == f.inode
    assert f.inode != d.inode
    with fs_error(17):
        meta.mknod(ROOT_CTX, d.inode, b"f", FileType.FILE, 0o644)


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is no sqlite file" * 100)
    meta = open_meta(f"sqlite3://{tmp_path}/junk.db")
    try:
        with pytest.raises(MetaUnavailable):
            meta.load_settings()
    finally:
        meta.close()
