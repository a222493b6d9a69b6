"""``loft load``: restore a dump written by ``loft dump`` into an empty metadata engine.

The target may be any engine (``loft load`` of a SQLite volume's dump into Redis or PostgreSQL
moves a volume between engines). It must hold no volume; the dump is parsed line by line and
written in batched transactions; a failure removes what was written, so the target ends either
complete or unformatted. The data blocks are not copied: the loaded volume uses the bucket and
uuid recorded in the dump, so never use it and the dumped volume at the same time.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Callable
from typing import Annotated, BinaryIO, cast

import typer

from loftfs.cli.common import meta_session, redact_url, say
from loftfs.cli.dump import progress_bar, summary_text
from loftfs.errors import ConfigError, LoftError, VolumeExists
from loftfs.meta.dump import PartialLoad, ProgressFn, load_meta

_BUFFER = 1 << 20


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from ``inner`` (the progress of a load, compressed or not)."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        # read1: what a pipe has now, not a full buffer (a load must not wait for more input
        # than the line it parses)
        read = getattr(self.inner, "read1", self.inner.read)
        data = read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n


def _by_bytes(update: Callable[[int], None], counting: _CountingReader) -> ProgressFn:
    return lambda _stats: update(counting.count)


def load_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL to load into (empty)")
    ],
    file: Annotated[
        str,
        typer.Argument(
            metavar="[FILE|-]", help="The dump to load ('-', the default: stdin); gzip or plain"
        ),
    ] = "-",
    discard_interrupted: Annotated[
        bool,
        typer.Option(
            "--discard-interrupted",
            help="Delete the metadata left at META_URL by an interrupted load first "
            "(never its bucket)",
        ),
    ] = False,
) -> None:
    """Restore a volume's metadata from a 'loft dump' into an empty metadata engine.

    The volume keeps its settings, uuid and bucket: never use it while the dumped one is in use.
    """
    if file == "-":
        if sys.stdin.isatty():
            raise ConfigError("the dump would be read from a terminal: give FILE or pipe it in")
        source: BinaryIO = sys.stdin.buffer
        total = None
    else:
        try:
            source = open(file, "rb")  # noqa: SIM115 - closed below
        except IsADirectoryError:
            raise ConfigError(f"{file} is a directory, not a dump") from None
        info = os.fstat(source.fileno())
        total = info.st_size if stat.S_ISREG(info.st_mode) else None
    counting = _CountingReader(source)
    reader = cast(BinaryIO, io.BufferedReader(counting, _BUFFER))
    try:
        with meta_session(meta_url) as meta, progress_bar("loading", "bytes", total) as update:
            report = None if update is None else _by_bytes(update, counting)
            try:
                stats = load_meta(
                    meta, reader, discard_interrupted=discard_interrupted, progress=report
                )
            except (PartialLoad, VolumeExists):
                raise
            except LoftError as e:
                raise LoftError(f"{e}; nothing was loaded") from e
            settings = meta.load_settings()
    finally:
        if file != "-":
            source.close()
    say(
        f"Loaded volume {settings.name} ({settings.uuid}) into {redact_url(meta_url)}: "
        f"{summary_text(stats)}"
    )
