"""Encryption at rest: the object format, the key record, where secrets come from, the stack a
volume builds, and what the data path does with an object that fails authentication."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
from pathlib import Path

import pytest

from loftfs.chunk.datapath import DataPath
from loftfs.errors import ConfigError, FSError, ObjectCorrupted, ObjectNotFound
from loftfs.meta import open_meta
from loftfs.meta.types import ROOT_CTX, ROOT_INODE, VolumeSettings
from loftfs.object import create_storage, open_volume_storage
from loftfs.object.compress import MAGIC as COMPRESS_MAGIC
from loftfs.object.compress import CompressedStore
from loftfs.object.encrypt import (
    ENV_PASSPHRASE,
    NONCE_SIZE,
    OVERHEAD,
    EncryptedStore,
    VolumeSecret,
    describe_record,
    new_record,
    public_record,
    read_key_file,
    rewrap_record,
    secret_from_sources,
    unlock,
)
from loftfs.object.file import FileObjectStore
from loftfs.object.interface import ObjectStore, ObjectStoreWrapper
from loftfs.vfs.options import MountOptions

FAST_N = 1 << 10  # scrypt cost for tests; the format default is far higher
UUID = "8d4f2f5e-0000-4000-8000-000000000001"


def passphrase(text: str = "correct horse battery") -> VolumeSecret:
    return VolumeSecret("passphrase", text.encode(), "test")


def key_secret(key: bytes | None = None) -> VolumeSecret:
    return VolumeSecret("key", key or os.urandom(32), "test")


@pytest.fixture
def raw(tmp_path: Path) -> FileObjectStore:
    store = FileObjectStore(str(tmp_path / "bucket"))
    store.create()
    return store


@pytest.fixture
def enc(raw: FileObjectStore) -> EncryptedStore:
    return EncryptedStore(raw, os.urandom(32), volume="vol")


# --- objects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, (4 << 20) + 3])
def test_round_trip_and_stored_form(enc: EncryptedStore, raw: FileObjectStore, size: int) -> None:
    data = (b"plaintext " * (size // 10 + 1))[:size]
    enc.put("v/chunks/0/0/1_0_x", data)
    assert enc.get("v/chunks/0/0/1_0_x") == data
    stored = raw.get("v/chunks/0/0/1_0_x")
    assert len(stored) == size + OVERHEAD
    assert stored[0] == 1  # format byte
    if size >= 20:
        assert data[:20] not in stored  # no plaintext reaches the bucket
    # head and list report the stored size, like the compression wrapper
    assert enc.head("v/chunks/0/0/1_0_x").size == size + OVERHEAD
    assert [i.size for i in enc.list("v/")] == [size + OVERHEAD]


def test_ranged_get_decrypts_then_slices(enc: EncryptedStore) -> None:
    data = bytes(range(256)) * 10
    enc.put("k", data)
    assert enc.get("k", 100, 50) == data[100:150]
    assert enc.get("k", 2500) == data[2500:]
    assert enc.get("k", 3000, 10) == b""
    with pytest.raises(ValueError):
        enc.get("k", -1)


def test_nonces_never_repeat(enc: EncryptedStore, raw: FileObjectStore) -> None:
    """The same bytes under the same key twice, and under many keys: every nonce is fresh, so
    no two ciphertexts are alike."""
    payload = b"\0" * 64
    nonces = set()
    bodies = set()
    for i in range(500):
        enc.put(f"n/{i % 250}", payload)  # every key written twice
        stored = raw.get(f"n/{i % 250}")
        nonces.add(stored[1 : 1 + NONCE_SIZE])
        bodies.add(stored[1 + NONCE_SIZE :])
    assert len(nonces) == 500
    assert len(bodies) == 500


def _corrupted(store: ObjectStore, key: str) -> str:
    with pytest.raises(ObjectCorrupted) as info:
        store.get(key)
    with pytest.raises(ObjectCorrupted):
        store.get(key, 1, 2)  # a ranged read authenticates the whole object too
    assert repr(key) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("where", [0, 1, NONCE_SIZE, NONCE_SIZE + 1, 500, -1])
def test_flipped_byte_is_detected(enc: EncryptedStore, raw: FileObjectStore, where: int) -> None:
    enc.put("blk", os.urandom(1000))
    stored = bytearray(raw.get("blk"))
    stored[where] ^= 0x01
    raw.put("blk", bytes(stored))
    _corrupted(enc, "blk")


@pytest.mark.parametrize("keep", [0, 5, OVERHEAD - 1, OVERHEAD, 100, 1000 + OVERHEAD - 1])
def test_truncated_object_is_detected(enc: EncryptedStore, raw: FileObjectStore, keep: int) -> None:
    enc.put("blk", os.urandom(1000))
    raw.put("blk", raw.get("blk")[:keep])
    _corrupted(enc, "blk")


def test_swapped_objects_are_detected(enc: EncryptedStore, raw: FileObjectStore) -> None:
    """Each object is bound to its key: a valid object copied under another key fails."""
    enc.put("a/1", b"A" * 100)
    enc.put("a/2", b"B" * 100)
    one, two = raw.get("a/1"), raw.get("a/2")
    raw.put("a/1", two)
    raw.put("a/2", one)
    assert "authentication failed" in _corrupted(enc, "a/1")
    _corrupted(enc, "a/2")


def test_wrong_key_and_plaintext_objects(enc: EncryptedStore, raw: FileObjectStore) -> None:
    enc.put("k", b"secret data")
    other = EncryptedStore(raw, os.urandom(32))
    _corrupted(other, "k")
    raw.put("plain", b"\x00not written by an encrypted volume")
    assert "unknown encryption format" in _corrupted(enc, "plain")
    with pytest.raises(ObjectNotFound):
        enc.get("missing")


def test_locked_store_lists_and_deletes_but_never_reads_or_writes(
    enc: EncryptedStore, raw: FileObjectStore
) -> None:
    enc.put("x/1", b"data")
    locked = EncryptedStore(raw, None, volume="vol")
    assert locked.locked and "locked" in locked.describe()
    assert [i.key for i in locked.list("x/")] == ["x/1"]
    assert locked.head("x/1").size == 4 + OVERHEAD
    for call in (lambda: locked.get("x/1"), lambda: locked.put("x/2", b"clear")):
        with pytest.raises(ConfigError, match="encrypted and no passphrase or key"):
            call()
    assert [i.key for i in raw.list("x/")] == ["x/1"]  # nothing written in the clear
    locked.delete_many(["x/1"])
    assert list(raw.list()) == []


def test_concurrent_use_from_threads(enc: EncryptedStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    blobs = {f"t/{i}": os.urandom(50_000 + i) for i in range(64)}

    def put_get(key: str) -> bool:
        enc.put(key, blobs[key])
        return enc.get(key) == blobs[key]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(put_get, blobs))


# --- the key record ---------------------------------------------------------------------------


def test_record_unlocks_with_its_passphrase_only() -> None:
    secret = passphrase()
    record, data_key = new_record(secret, UUID, scrypt_n=FAST_N)
    assert unlock(record, passphrase(), UUID, "vol") == data_key
    assert record["kdf"]["name"] == "scrypt" and record["kdf"]["n"] == FAST_N
    assert len(base64.b64decode(record["kdf"]["salt"])) == 16
    text = json.dumps(record)
    assert "correct horse" not in text
    assert base64.b64encode(data_key).decode() not in text and data_key.hex() not in text
    with pytest.raises(ConfigError, match=r"wrong passphrase for volume 'vol' \(passphrase from"):
        unlock(record, passphrase("correct horse battery!"), UUID, "vol")
    # the wrapping binds the volume uuid: the record of one volume does not open another
    with pytest.raises(ConfigError, match="wrong passphrase"):
        unlock(record, secret, UUID.replace("1", "2"), "vol")
    # a key file cannot stand in for the passphrase; the message says what is needed
    with pytest.raises(ConfigError, match=r"encrypted with a passphrase.*a key was given"):
        unlock(record, key_secret(), UUID, "vol")
    # two volumes with the same passphrase still get different salts and data keys
    record2, data_key2 = new_record(secret, UUID, scrypt_n=FAST_N)
    assert record2["kdf"]["salt"] != record["kdf"]["salt"] and data_key2 != data_key


def test_record_with_key_file() -> None:
    key = os.urandom(32)
    record, data_key = new_record(key_secret(key), UUID)
    assert record["kdf"] == {"name": "none"} and record["secret"] == "key"
    assert unlock(record, key_secret(key), UUID) == data_key
    with pytest.raises(ConfigError, match="wrong key"):
        unlock(record, key_secret(), UUID)
    with pytest.raises(ConfigError, match="encrypted with a key file"):
        unlock(record, passphrase(), UUID, "vol")


def test_damaged_or_unknown_records_are_refused() -> None:
    secret = passphrase()
    record, _ = new_record(secret, UUID, scrypt_n=FAST_N)
    for change, message in [
        ({"wrapped_key": "not base64!"}, "is damaged"),
        ({"wrapped_key": base64.b64encode(b"short").decode()}, "is damaged"),
        ({"kdf": {**record["kdf"], "n": 1000}}, "is damaged"),  # not a power of two
        ({"kdf": {"name": "argon9"}}, "is damaged"),
        ({"format": 2}, "upgrade loftfs"),
        ({"algorithm": "rot13"}, "upgrade loftfs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            unlock({**record, **change}, secret, UUID, "vol")


def test_rewrap_keeps_the_data_key() -> None:
    old = passphrase()
    record, data_key = new_record(old, UUID, scrypt_n=FAST_N)
    new_key = key_secret()
    rewrapped = rewrap_record(record, old, new_key, UUID, "vol", scrypt_n=FAST_N)
    assert unlock(rewrapped, new_key, UUID) == data_key
    with pytest.raises(ConfigError, match="encrypted with a key file"):
        unlock(rewrapped, old, UUID, "vol")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        rewrap_record(record, passphrase("not the one at all"), new_key, UUID, "vol")
    with pytest.raises(ConfigError, match="too short"):
        rewrap_record(record, old, passphrase("short"), UUID, "vol")


def test_descriptions_hold_no_key_material() -> None:
    record, _ = new_record(passphrase(), UUID, scrypt_n=FAST_N)
    assert describe_record(record) == "aes-256-gcm (passphrase, scrypt)"
    assert describe_record({}) == "off"
    shown = public_record(record)
    assert shown == {
        "algorithm": "aes-256-gcm",
        "format": 1,
        "secret": "passphrase",
        "kdf": "scrypt",
    }
    key_record, _ = new_record(key_secret(), UUID)
    assert describe_record(key_record) == "aes-256-gcm (key file)"


# --- where secrets come from ------------------------------------------------------------------


def test_secret_sources(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret passphrase\n")
    got = secret_from_sources(str(pw), None, {})
    assert got == VolumeSecret("passphrase", b"s3cret passphrase", str(pw))
    assert "s3cret" not in repr(got)
    pw.write_bytes(b"with crlf\r\n")
    assert secret_from_sources(str(pw), None, {}).value == b"with crlf"  # type: ignore[union-attr]
    # the environment, when no file is named; files win over it
    env = {ENV_PASSPHRASE: "from the env"}
    assert secret_from_sources(None, None, env) == VolumeSecret(
        "passphrase", b"from the env", ENV_PASSPHRASE
    )
    assert secret_from_sources(str(pw), None, env).origin == str(pw)  # type: ignore[union-attr]
    assert secret_from_sources(None, None, {}) is None
    with pytest.raises(ConfigError, match="set but empty"):
        secret_from_sources(None, None, {ENV_PASSPHRASE: ""})
    pw.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        secret_from_sources(str(pw), None, {})
    with pytest.raises(ConfigError, match="not both"):
        secret_from_sources(str(pw), str(pw), {})
    with pytest.raises(ConfigError, match=r"cannot read the passphrase file .*No such file"):
        secret_from_sources(str(tmp_path / "nope"), None, {})
    pw.write_bytes(b"x" * 5000)
    with pytest.raises(ConfigError, match="larger than"):
        secret_from_sources(str(pw), None, {})


def test_key_files(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "key"
    path.write_bytes(key)
    assert read_key_file(str(path)).value == key
    path.write_text(key.hex().upper() + "\n")
    assert read_key_file(str(path)).value == key
    for bad in (b"", key[:31], key + b"\n", b"zz" * 32, key.hex()[:62].encode()):
        path.write_bytes(bad)
        with pytest.raises(ConfigError, match="32 raw bytes or 64 hex digits"):
            read_key_file(str(path))


def test_wire_round_trip() -> None:
    secret = passphrase()
    assert VolumeSecret.from_wire(secret.to_wire()) == secret
    with pytest.raises(ConfigError, match="malformed"):
        VolumeSecret.from_wire(b"{}")


# --- the stack of a volume ----------------------------------------------------------------------


def _settings(root: Path, secret: VolumeSecret | None, compress: str = "none") -> VolumeSettings:
    settings = VolumeSettings(name="vol", bucket=str(root / "bucket"), compress=compress)
    if secret is not None:
        settings.encryption, _ = new_record(secret, settings.uuid, scrypt_n=FAST_N)
    return settings


def test_volume_stack_compresses_then_encrypts(tmp_path: Path) -> None:
    secret = passphrase()
    settings = _settings(tmp_path, secret, "zstd")
    store = open_volume_storage(settings, secret)
    assert isinstance(store, CompressedStore) and isinstance(store.inner, EncryptedStore)
    store.create()
    data = b"checkpoint tensor " * 50_000
    store.put("k", data)
    assert store.get("k") == data
    raw = create_storage("file", settings.bucket)
    stored = raw.get("k")
    assert len(stored) < len(data) // 20  # compressed before it was encrypted
    assert COMPRESS_MAGIC not in stored and b"checkpoint" not in stored
    # under the encryption lies the compression frame
    data_key = unlock(settings.encryption, secret, settings.uuid)
    assert EncryptedStore(raw, data_key).get("k").startswith(COMPRESS_MAGIC)
    # a flipped byte reaches the reader as ObjectCorrupted, from the encryption layer
    damaged = bytearray(stored)
    damaged[len(damaged) // 2] ^= 0x10
    raw.put("k", bytes(damaged))
    with pytest.raises(ObjectCorrupted, match=r"'k'.*authentication failed"):
        store.get("k")


def test_volume_stack_needs_the_right_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = passphrase()
    settings = _settings(tmp_path, secret)
    with pytest.raises(ConfigError, match="wrong passphrase for volume 'vol'"):
        open_volume_storage(settings, passphrase("another passphrase"))
    with pytest.raises(ConfigError, match="volume 'vol' is encrypted with a passphrase: give it"):
        open_volume_storage(settings)
    locked = open_volume_storage(settings, need_data=False)
    assert isinstance(locked, EncryptedStore) and locked.locked
    plain = _settings(tmp_path, None)
    with caplog.at_level(logging.WARNING):
        store = open_volume_storage(plain, secret)
    assert "not encrypted" in caplog.text
    assert not isinstance(store, EncryptedStore)


# --- the data path ------------------------------------------------------------------------------


class CountingStore(ObjectStoreWrapper):
    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gets = 0

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        self.gets += 1
        return self.inner.get(key, offset, limit)


@pytest.mark.parametrize("compress", ["none", "lz4"])
def test_data_path_answers_eio_and_caches_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, compress: str
) -> None:
    """A damaged block is EIO with a log line naming it, after one retry (not forever), and
    is not cached: once the object is whole again, the same data path reads it."""
    secret = key_secret()
    meta = open_meta(f"sqlite3://{tmp_path}/meta.db")
    settings = _settings(tmp_path, secret, compress)
    settings.block_size = 64 << 10
    meta.init_volume(settings)
    settings = meta.load_settings()
    opts = MountOptions(
        buffer_size=8 << 20,
        gc_interval_s=0,
        compact_threshold=0,
        readahead_blocks=0,
        cache_size=0,
    )
    paths: list[DataPath] = []
    try:
        store = open_volume_storage(settings, secret)
        store.create()
        writer = DataPath(meta, store, settings, opts)
        paths.append(writer)
        inode = meta.create(ROOT_CTX, ROOT_INODE, b"f", 0o644, os.O_RDWR).inode
        data = os.urandom(3 * settings.block_size)
        writer.writer(inode).write(0, data)
        writer.flush(inode)

        raw = create_storage("file", settings.bucket)
        victim = sorted(i.key for i in raw.list(f"{settings.uuid}/chunks/"))[1]
        good = raw.get(victim)
        assert data[settings.block_size : settings.block_size + 64] not in good
        damaged = bytearray(good)
        damaged[100] ^= 0x04
        raw.put(victim, bytes(damaged))

        counting = CountingStore(open_volume_storage(settings, secret))
        reader = DataPath(meta, counting, settings, opts)
        paths.append(reader)
        bs = settings.block_size
        with caplog.at_level(logging.ERROR), pytest.raises(FSError) as info:
            reader.read(inode, bs, 10, len(data))
        assert info.value.errno == errno.EIO
        assert victim in caplog.text and "corrupted" in caplog.text
        assert counting.gets == 2  # one retry, then EIO
        assert reader.read(inode, 0, 10, len(data)) == data[:10]  # other blocks still read
        raw.put(victim, good)
        assert reader.read(inode, bs, bs, len(data)) == data[bs : 2 * bs]
    finally:
        for dp in paths:
            dp.close()
        meta.close()
