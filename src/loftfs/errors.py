"""Typed errors. POSIX errors carry an errno; they are mapped to the kernel in one place (fuse/)."""

from __future__ import annotations

import os


def one_line(text: str) -> str:
    """Collapse a message to one line: error output must stay greppable."""
    return " ".join(str(text).split())


class LoftError(Exception):
    """Base of every error loftfs raises on purpose. ``str(e)`` is a one-line message for users."""


class FSError(LoftError):
    """A POSIX error of a file-system operation, e.g. ``FSError(errno.ENOENT)``."""

    def __init__(self, errno: int, msg: str = "") -> None:
        self.errno = errno
        super().__init__(msg or os.strerror(errno))


# --- volume / configuration errors ------------------------------------------------------------


class ConfigError(LoftError):
    """Bad user input: a malformed URL, flag or setting."""


class VolumeExists(LoftError):
    """``format`` found a volume already at that metadata URL."""


class NotFormatted(LoftError):
    """The metadata engine holds no volume (run ``loft format`` first)."""


class MetaUnavailable(LoftError):
    """The metadata engine cannot be reached or answered with an error."""


# --- object storage errors --------------------------------------------------------------------


class ObjectStoreError(LoftError):
    """An object-store operation failed. Subclasses say why; callers branch on the type."""


class ObjectNotFound(ObjectStoreError):
    """The object (or bucket) does not exist."""


class ObjectAuthError(ObjectStoreError):
    """The credentials are wrong or lack a permission."""


class ObjectCorrupted(ObjectStoreError):
    """The object's content failed a check (checksum, decompression, decryption, length)."""


class ObjectChanged(ObjectStoreError):
    """The object is not the version asked for any more (its ETag or version differs): it was
    overwritten or replaced after it was recorded."""


class ObjectTransientError(ObjectStoreError):
    """A failure worth retrying: timeout, throttling, 5xx, connection reset."""
