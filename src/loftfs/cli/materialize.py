"""``loft materialize``: copy the data of imported files from their source into the volume's
own store, for customers who finish a migration.

Like ``loft warmup``, the files are found through the mount and handed to it over its control
socket; the mount rewrites each chunk that shows external data as native blocks, with a
compare-and-replace, so writes made meanwhile are never lost. What was copied stays copied: an
interrupted run resumes where it stopped when run again (files already native cost a metadata
read each). Once no file reads from a source, ``loft source rm`` can remove it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from loftfs.cli.common import kv_table, plural, stdout_console
from loftfs.cli.warmup import WarmupSummary, run_on_files
from loftfs.errors import LoftError
from loftfs.utils import format_size


def _rows(summary: WarmupSummary) -> list[tuple[str, str]]:
    seconds = max(summary.seconds, 1e-9)
    return [
        ("files", f"{summary.files:,}"),
        ("bytes", format_size(summary.bytes)),
        ("copied from sources", format_size(summary.fetched_bytes)),
        ("already in the volume", format_size(summary.cached_bytes)),
        ("time", f"{summary.seconds:.1f}s"),
        ("rate", f"{format_size(summary.fetched_bytes / seconds)}/s copied"),
        ("errors", f"{len(summary.errors):,}"),
    ]


def materialize_cmd(
    paths: Annotated[
        list[str] | None,
        typer.Argument(metavar="PATH...", help="Files or directories inside loftfs mounts"),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", "-p", help="Batches of files in flight at once")
    ] = 4,
    from_file: Annotated[
        str | None,
        typer.Option(
            "--from-file", "-f", metavar="LISTFILE", help="Read paths from a file, one per line"
        ),
    ] = None,
) -> None:
    """Copy imported files' data from their source into the volume (resumable)."""
    summary, problems = run_on_files(
        paths or [],
        threads,
        from_file,
        command="materialize",
        label="materializing",
        verb="materialized",
    )
    stdout_console().print(kv_table("Materialize", _rows(summary)))
    if summary.errors:
        raise LoftError(
            f"{len(summary.errors)} of {plural(summary.files, 'file')} failed "
            "(run the command again to resume)"
        )
    if problems:
        raise LoftError(f"{plural(len(problems), 'path')} skipped")
