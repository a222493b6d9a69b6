"""Encryption at rest as a wrapper around any store: AES-256-GCM, one random nonce per object.

Keys. A volume has one **data key** (32 random bytes, made by ``loft format``) that encrypts
every object. It is stored only wrapped (AES-256-GCM) by a **key-encryption key** derived from
the volume's secret: a passphrase (scrypt with a random 16-byte salt; the parameters are
recorded) or a 32-byte key file used as is. The wrapped key, salt, KDF parameters and an
algorithm/format tag form the volume's encryption record (``VolumeSettings.encryption``, see
``new_record``); the wrapping binds the volume uuid, so a record copied to another volume does
not unwrap. A wrong secret fails the unwrap (``ConfigError``) before any object is touched;
changing the secret rewraps the same data key (``rewrap_record``), objects stay as they are.

Objects (format 1)::

    0x01 | nonce (12 random bytes) | ciphertext | tag (16 bytes)

with the format byte and the object key as associated data: an object that was changed,
truncated or stored under another key fails authentication and ``get`` raises
``ObjectCorrupted`` naming the key, never returning data. A ranged ``get`` decrypts the whole
object and slices it (blocks are at most the block size). ``head`` and ``list`` report the
stored sizes (``OVERHEAD`` = 29 bytes more than what was put), as ``CompressedStore`` does.

Order in a volume's stack (``open_volume_storage``): compression outside, encryption inside
(``CompressedStore(EncryptedStore(RetryStore(backend)))``): data is compressed, then encrypted;
ciphertext does not compress. Random nonces keep the chance of a repeat below 2**-32 for the
first 2**32 objects of a volume (16 PiB of 4 MiB blocks).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loftfs.errors import ConfigError, ObjectCorrupted
from loftfs.object.interface import ObjectStore, ObjectStoreWrapper

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# cryptography (about 7 MiB resident) is imported by the functions that use it: a mount of a
# volume without encryption never loads it.

ALGORITHM = "aes-256-gcm"
RECORD_FORMAT = 1  # layout of the encryption record in the volume settings
OBJECT_FORMAT = 1  # first byte of every encrypted object
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

ENV_PASSPHRASE = "LOFT_ENCRYPT_PASSPHRASE"
SECRET_HINT = (
    "--encrypt-passphrase-file FILE, the LOFT_ENCRYPT_PASSPHRASE environment variable, "
    "or --encrypt-key-file FILE"
)

# scrypt: 128 MiB and about 0.3 s per derivation (once per format or mount); the OWASP minimum
SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
MIN_PASSPHRASE = 8  # characters, checked when a passphrase is set (format, rewrap)
MAX_SECRET_FILE = 4096  # bytes: anything larger is not a passphrase or key file

_WRAP_AAD = b"loftfs data key v1 "  # + volume uuid


@dataclass(frozen=True)
class VolumeSecret:
    """What unlocks an encrypted volume: a passphrase, or a 32-byte key (``kind`` ``key``).
    ``origin`` says where it came from, for messages; the value never appears in a repr."""

    kind: str  # "passphrase" | "key"
    value: bytes = field(repr=False)
    origin: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("passphrase", "key"):
            raise ValueError(f"unknown secret kind {self.kind!r}")
        if self.kind == "key" and len(self.value) != KEY_SIZE:
            raise ValueError(f"a key must be {KEY_SIZE} bytes")

    def describe(self) -> str:
        return f"{self.kind} from {self.origin}" if self.origin else self.kind

    def to_wire(self) -> bytes:
        """For handing the secret to a child process over a pipe (never argv or a file)."""
        return json.dumps(
            {
                "kind": self.kind,
                "value": base64.b64encode(self.value).decode(),
                "origin": self.origin,
            }
        ).encode()

    @classmethod
    def from_wire(cls, data: bytes) -> VolumeSecret:
        try:
            obj = json.loads(data)
            return cls(obj["kind"], base64.b64decode(obj["value"], validate=True), obj["origin"])
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ConfigError(f"malformed volume secret from the parent process ({e})") from None


# --- where secrets come from -----------------------------------------------------------------


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_SECRET_FILE:
        raise ConfigError(f"the {what} {path} is larger than {MAX_SECRET_FILE} bytes")
    return data


def passphrase_secret(raw: bytes, origin: str) -> VolumeSecret:
    """A passphrase without its line end (one trailing ``\\n`` or ``\\r\\n`` is dropped)."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if not raw:
        raise ConfigError(f"the passphrase from {origin} is empty")
    return VolumeSecret("passphrase", raw, origin)


def read_passphrase_file(path: str) -> VolumeSecret:
    return passphrase_secret(_read_secret_file(path, "passphrase file"), path)


def read_key_file(path: str) -> VolumeSecret:
    """A key file holds the 32 key bytes themselves, or 64 hex digits (whitespace ignored)."""
    data = _read_secret_file(path, "key file")
    if len(data) == KEY_SIZE:
        return VolumeSecret("key", data, path)
    try:
        key = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"the key file {path} must hold {KEY_SIZE} raw bytes or {2 * KEY_SIZE} hex digits "
            f"(it has {len(data)} bytes; make one with: head -c 32 /dev/urandom > FILE)"
        )
    return VolumeSecret("key", key, path)


def secret_from_sources(
    passphrase_file: str | None,
    key_file: str | None,
    environ: Mapping[str, str] | None = None,
) -> VolumeSecret | None:
    """The secret a command was given: ``--encrypt-passphrase-file``, ``--encrypt-key-file``,
    else ``LOFT_ENCRYPT_PASSPHRASE``; None when there is none. A passphrase never has to appear
    on a command line. Both files at once, an unreadable file or an empty passphrase (a set but
    empty variable included: a script's unset variable must not mean "no encryption") raise
    ``ConfigError``."""
    if passphrase_file and key_file:
        raise ConfigError("give --encrypt-passphrase-file or --encrypt-key-file, not both")
    if passphrase_file:
        return read_passphrase_file(passphrase_file)
    if key_file:
        return read_key_file(key_file)
    env = os.environ if environ is None else environ
    value = env.get(ENV_PASSPHRASE)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{ENV_PASSPHRASE} is set but empty")
    return passphrase_secret(os.fsencode(value), ENV_PASSPHRASE)


def check_new_secret(secret: VolumeSecret) -> None:
    """Refuse a passphrase too short to protect anything (when one is set, not when used)."""
    if secret.kind == "passphrase" and len(secret.value) < MIN_PASSPHRASE:
        raise ConfigError(
            f"the passphrase from {secret.origin} is too short: use at least "
            f"{MIN_PASSPHRASE} characters"
        )


# --- the encryption record -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kek(secret: VolumeSecret, kdf: dict[str, Any]) -> bytes:
    """The key-encryption key of ``secret`` under the record's KDF parameters."""
    if kdf.get("name") == "none":
        return secret.value
    if kdf.get("name") != "scrypt":
        raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    salt = base64.b64decode(kdf["salt"], validate=True)
    if n < 2 or n & (n - 1) or n > 1 << 24 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError(f"scrypt parameters out of range (n={n}, r={r}, p={p})")
    if len(salt) < SALT_SIZE:
        raise ValueError(f"scrypt salt of {len(salt)} bytes")
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(secret.value)


def _wrap(secret: VolumeSecret, data_key: bytes, volume_uuid: str, scrypt_n: int) -> dict:
    if secret.kind == "passphrase":
        kdf: dict[str, Any] = {
            "name": "scrypt",
            "n": scrypt_n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(os.urandom(SALT_SIZE)),
        }
    else:
        kdf = {"name": "none"}
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_SIZE)
    wrapped = AESGCM(_kek(secret, kdf)).encrypt(nonce, data_key, _WRAP_AAD + volume_uuid.encode())
    return {
        "algorithm": ALGORITHM,
        "format": RECORD_FORMAT,
        "secret": secret.kind,
        "kdf": kdf,
        "wrap": ALGORITHM,
        "wrapped_key": _b64(nonce + wrapped),
        "changed_ns": time.time_ns(),
    }


def new_record(
    secret: VolumeSecret, volume_uuid: str, *, scrypt_n: int = SCRYPT_N
) -> tuple[dict, bytes]:
    """A fresh random data key and the record (for ``VolumeSettings.encryption``) that keeps
    it wrapped by ``secret``. Returns (record, data key)."""
    data_key = os.urandom(KEY_SIZE)
    return _wrap(secret, data_key, volume_uuid, scrypt_n), data_key


def _how_to_give(record: Mapping[str, Any], volume: str) -> str:
    if record.get("secret") == "passphrase":
        return (
            f"volume '{volume}' is encrypted with a passphrase: give it with "
            f"--encrypt-passphrase-file FILE or {ENV_PASSPHRASE}"
        )
    return f"volume '{volume}' is encrypted with a key file: give it with --encrypt-key-file FILE"


def unlock(
    record: Mapping[str, Any], secret: VolumeSecret, volume_uuid: str, volume: str = ""
) -> bytes:
    """The data key of a volume, unwrapped with ``secret``. ``ConfigError`` with one line when
    the secret is wrong or of the other kind, or the record is damaged or of a newer format."""
    volume = volume or volume_uuid
    if record.get("algorithm") != ALGORITHM or record.get("format") != RECORD_FORMAT:
        raise ConfigError(
            f"volume '{volume}' uses encryption {record.get('algorithm')!r} format "
            f"{record.get('format')!r}, which this loftfs cannot read (upgrade loftfs)"
        )
    if record.get("secret") != secret.kind:
        raise ConfigError(f"{_how_to_give(record, volume)} (a {secret.kind} was given)")
    try:
        blob = base64.b64decode(record["wrapped_key"], validate=True)
        kek = _kek(secret, dict(record["kdf"]))
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise ConfigError(f"the encryption record of volume '{volume}' is damaged ({e})") from None
    if len(blob) != NONCE_SIZE + KEY_SIZE + TAG_SIZE:
        raise ConfigError(
            f"the encryption record of volume '{volume}' is damaged (wrapped key of "
            f"{len(blob)} bytes)"
        )
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(kek).decrypt(
            blob[:NONCE_SIZE], blob[NONCE_SIZE:], _WRAP_AAD + volume_uuid.encode()
        )
    except InvalidTag:
        raise ConfigError(
            f"wrong {secret.kind} for volume '{volume}' ({secret.describe()}): it does not "
            "unlock the volume's data key"
        ) from None


def rewrap_record(
    record: Mapping[str, Any],
    old: VolumeSecret,
    new: VolumeSecret,
    volume_uuid: str,
    volume: str = "",
    *,
    scrypt_n: int = SCRYPT_N,
) -> dict:
    """The record with the same data key wrapped by ``new`` instead of ``old`` (which must
    unlock it): changing a passphrase rewrites no object."""
    data_key = unlock(record, old, volume_uuid, volume)
    check_new_secret(new)
    return _wrap(new, data_key, volume_uuid, scrypt_n)


def describe_record(record: Mapping[str, Any]) -> str:
    """One line for ``status``/``info``: the algorithm and the kind of secret, never key
    material. ``off`` for a volume stored in the clear."""
    if not record:
        return "off"
    kdf = record.get("kdf") or {}
    how = "passphrase, scrypt" if record.get("secret") == "passphrase" else "key file"
    if record.get("secret") == "passphrase" and kdf.get("name") != "scrypt":
        how = f"passphrase, {kdf.get('name')}"
    return f"{record.get('algorithm', '?')} ({how})"


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What may be shown of a record (JSON output): no salt, no wrapped key."""
    if not record:
        return {}
    kdf = record.get("kdf") or {}
    return {
        "algorithm": record.get("algorithm"),
        "format": record.get("format"),
        "secret": record.get("secret"),
        "kdf": kdf.get("name"),
    }


# --- the store wrapper -----------------------------------------------------------------------


class EncryptedStore(ObjectStoreWrapper):
    """Encrypts on ``put`` and authenticates and decrypts on ``get`` with the volume's data
    key. Without a key (``data_key=None``) the store is *locked*: listings, ``head`` and deletes
    still work (``gc``, ``destroy``), ``get`` and ``put`` raise ``ConfigError``, so nothing is
    ever written in the clear by a command that was not given the secret."""

    def __init__(self, inner: ObjectStore, data_key: bytes | None, *, volume: str = "") -> None:
        super().__init__(inner)
        if data_key is not None and len(data_key) != KEY_SIZE:
            raise ValueError(f"the data key must be {KEY_SIZE} bytes")
        self._aead: AESGCM | None = None
        if data_key is not None:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(data_key)
            self._invalid_tag = InvalidTag
        self.volume = volume

    @property
    def locked(self) -> bool:
        return self._aead is None

    def describe(self) -> str:
        state = "" if self._aead is not None else ", locked"
        return f"{self.inner.describe()} (encrypt={ALGORITHM}{state})"

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            name = f"volume '{self.volume}'" if self.volume else "this volume"
            raise ConfigError(
                f"the data of {name} is encrypted and no passphrase or key was given "
                f"({SECRET_HINT})"
            )
        return self._aead

    @staticmethod
    def _aad(key: str) -> bytes:
        return bytes((OBJECT_FORMAT,)) + key.encode()

    def encode(self, key: str, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._cipher().encrypt(nonce, data, self._aad(key))
        return bytes((OBJECT_FORMAT,)) + nonce + sealed

    def decode(self, key: str, stored: bytes) -> bytes:
        cipher = self._cipher()

        def corrupted(why: str) -> ObjectCorrupted:
            return ObjectCorrupted(f"object {key!r} in {self.inner.describe()} is corrupted: {why}")

        if len(stored) < OVERHEAD:
            raise corrupted(f"{len(stored)} bytes, shorter than an encrypted object ({OVERHEAD})")
        if stored[0] != OBJECT_FORMAT:
            raise corrupted(f"unknown encryption format {stored[0]} (not an encrypted object?)")
        view = memoryview(stored)
        try:
            return cipher.decrypt(view[1 : 1 + NONCE_SIZE], view[1 + NONCE_SIZE :], self._aad(key))
        except self._invalid_tag:
            raise corrupted(
                "authentication failed (changed, truncated, or stored under another key)"
            ) from None

    # what is stored is not what is read: the version check goes through head() and get()
    get_checked = ObjectStore.get_checked

    def get(self, key: str, offset: int = 0, limit: int = -1) -> bytes:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        self._cipher()  # a locked store fails before fetching anything
        data = self.decode(key, self.inner.get(key))
        if offset == 0 and limit < 0:
            return data
        return data[offset:] if limit < 0 else data[offset : offset + limit]

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, self.encode(key, data))


def volume_store(
    inner: ObjectStore,
    record: Mapping[str, Any],
    secret: VolumeSecret | None,
    volume_uuid: str,
    volume: str,
    *,
    need_data: bool,
) -> EncryptedStore:
    """The encryption layer of a volume whose settings hold ``record``: unlocked with
    ``secret`` (a wrong one raises ``ConfigError`` here, before any object is read), or locked
    when no secret is given and ``need_data`` is false. ``need_data`` without a secret is a
    ``ConfigError`` that says how to give one."""
    if secret is not None:
        return EncryptedStore(inner, unlock(record, secret, volume_uuid, volume), volume=volume)
    if need_data:
        raise ConfigError(_how_to_give(record, volume))
    return EncryptedStore(inner, None, volume=volume)
