"""The control plane's master key: every secret it keeps (a volume's metadata credentials, its
storage keys, its data key) is stored sealed under it, so a copy of the control plane's database
alone unlocks nothing.

Sealing is AES-256-GCM with a random nonce; the associated data names what the secret belongs to
(``volume:<id>``), so a sealed value copied onto another row does not open there.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from loftfs.errors import ConfigError, LoftError

log = logging.getLogger(__name__)

KEY_SIZE = 32
NONCE_SIZE = 12
_VERSION = "v1"


class MasterKey:
    """Seals and opens the control plane's secrets. The key never appears in a repr."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ConfigError(f"the master key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "MasterKey(****)"

    def seal(self, plaintext: bytes, context: str) -> str:
        """``v1:<base64 nonce + ciphertext>``, bound to ``context``."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return f"{_VERSION}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, context: str) -> bytes:
        """The plaintext of ``seal(..., context)``; ``LoftError`` when it was sealed under another
        key or for another context, or was altered."""
        version, _, body = sealed.partition(":")
        try:
            if version != _VERSION:
                raise ValueError(f"unknown format {version!r}")
            raw = base64.b64decode(body, validate=True)
            return self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], context.encode())
        except (ValueError, binascii.Error, InvalidTag):
            raise LoftError(
                f"a stored secret ({context}) does not open with this master key: "
                "is the control plane running with the master key it was created with?"
            ) from None


def load_master_key(path: str, *, create: bool) -> MasterKey:
    """The key in ``path`` (32 raw bytes or 64 hex digits). With ``create``, a missing file is
    made (mode 0600, written atomically) and its creation logged; the key itself never is."""
    try:
        with open(path, "rb") as f:
            data = f.read(4 * KEY_SIZE + 1)
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"the master key file {path} does not exist") from None
        created = _create_key_file(path)
        if created is None:  # another process created it first
            return load_master_key(path, create=False)
        return MasterKey(created)
    except OSError as e:
        raise ConfigError(f"cannot read the master key file {path}: {e.strerror}") from None
    if len(data) == KEY_SIZE:
        return MasterKey(data)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"the master key file {path} must hold {KEY_SIZE} raw bytes or {2 * KEY_SIZE} "
            "hex digits"
        )
    return MasterKey(key)


def _create_key_file(path: str) -> bytes | None:
    key = secrets.token_bytes(KEY_SIZE)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # never replaces a key another process created meanwhile
        os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        return None
    except OSError as e:
        raise ConfigError(f"cannot create the master key file {path}: {e.strerror}") from None
    log.warning("created a new master key in %s: back it up, the volumes' secrets need it", path)
    return key
