"""``loft dump``: back up a volume's metadata as one JSON document (restored by ``loft load``).

The document is streamed to FILE (or stdout), so memory stays flat whatever the volume's size.
A FILE is written under a temporary name with mode 0600 (the volume settings it holds may carry
storage credentials) and renamed into place only when complete; a name ending in ``.gz`` is
gzip-compressed. The format is described in docs/DUMP.md.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, BinaryIO, cast

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loftfs.cli.common import (
    open_volume,
    plural,
    print_warning,
    say,
    session_is_stale,
    stderr_console,
)
from loftfs.errors import ConfigError
from loftfs.meta.dump import DumpStats, ProgressFn, dump_meta
from loftfs.meta.interface import Meta
from loftfs.utils import format_size

_BUFFER = 1 << 20


@contextmanager
def progress_bar(verb: str, unit: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr while stderr is a terminal. Yields the function that
    sets how much is done (``None`` without a terminal); ``unit`` is ``"inodes"`` (counted)
    or ``"bytes"`` (shown as sizes); ``total`` may be an estimate or unknown."""
    if not stderr_console().is_terminal:
        yield None
        return
    if unit == "bytes":
        count = "{task.fields[done]}" + (f" of {format_size(total)}" if total else "")
    else:
        count = "{task.completed:,}" + (" of ~{task.total:,}" if total else "") + f" {unit}"
    progress = Progress(
        TextColumn(verb),
        BarColumn(),
        TextColumn(count),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
    )
    with progress:
        task = progress.add_task(verb, total=total or None, done=format_size(0))

        def update(done: int) -> None:
            progress.update(task, completed=done, done=format_size(done))

        yield update


def summary_text(stats: DumpStats) -> str:
    """``N inodes, N entries, N chunks, SIZE of file data (N in the trash)``."""

    def count(n: int, one: str, many: str) -> str:
        return f"{n:,} {one if n == 1 else many}"

    return (
        f"{count(stats.inodes, 'inode', 'inodes')}, {count(stats.entries, 'entry', 'entries')}, "
        f"{count(stats.chunks, 'chunk', 'chunks')}, {format_size(stats.bytes)} of file data "
        f"({stats.trash:,} in the trash)"
    )


def _by_inodes(update: Callable[[int], None]) -> ProgressFn:
    return lambda stats: update(stats.inodes)


def _dump_to_file(
    meta: Meta, path: str, progress: ProgressFn | None, keep_secrets: bool
) -> DumpStats:
    """Write the dump next to ``path`` under a temporary name, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory: give the dump's file name")
    if not os.path.isdir(directory):
        raise ConfigError(f"directory {directory} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(fd, "wb", buffering=_BUFFER) as raw:
            if path.endswith(".gz"):
                # no name and no time in the header: equal dumps give equal files
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    out = cast(BinaryIO, gz)
                    stats = dump_meta(meta, out, progress=progress, keep_secrets=keep_secrets)
            else:
                stats = dump_meta(meta, raw, progress=progress, keep_secrets=keep_secrets)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # the rename is done; only its durability across a power loss is at stake
    return stats


def dump_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    file: Annotated[
        str,
        typer.Argument(
            metavar="[FILE|-]",
            help="Where to write the dump ('-', the default: stdout); FILE.gz is compressed",
        ),
    ] = "-",
    keep_secret_key: Annotated[
        bool,
        typer.Option(
            "--keep-secret-key",
            help="Keep the object store's secret key in the dump (left out by default)",
        ),
    ] = False,
) -> None:
    """Back up a volume's metadata (its namespace, not the data blocks) as one JSON document.

    For a consistent backup, dump a volume nobody writes to; run 'loft gc' first.
    Restore it with 'loft load'; docs/DUMP.md describes the format.
    """
    with open_volume(meta_url) as (meta, settings):
        live = [s for s in meta.list_sessions() if not session_is_stale(s)]
        if live:
            print_warning(
                f"volume '{settings.name}' has {plural(len(live), 'live session')}: a dump of "
                "a volume being changed mixes states; unmount it for a consistent backup"
            )
        total = meta.usage()[1]
        with progress_bar("dumping", "inodes", total) as update:
            report = None if update is None else _by_inodes(update)
            if file == "-":
                out: BinaryIO = sys.stdout.buffer
                stats = dump_meta(meta, out, progress=report, keep_secrets=keep_secret_key)
                out.flush()
            else:
                stats = _dump_to_file(meta, file, report, keep_secret_key)
    if stats.skipped:
        print_warning(
            f"{stats.skipped} director{'y' if stats.skipped == 1 else 'ies'} moved during the "
            f"dump and {'was' if stats.skipped == 1 else 'were'} written once only: the volume "
            "was being changed"
        )
    where = "stdout" if file == "-" else file
    message = (
        f"Dumped volume {settings.name} to {where}: {summary_text(stats)}; "
        f"dump {format_size(stats.doc_bytes)}"
    )
    if file == "-":
        stderr_console().print(message, markup=False, soft_wrap=True)
    else:
        say(message)
