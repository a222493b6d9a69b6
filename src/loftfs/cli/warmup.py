"""``loft warmup``: have mounts fetch files into their cache ahead of use (a dataset before a
training run, a model before inference starts).

The files are found through the mount (metadata only: directory listings and stats, no data
read); each file's inode number is its ``st_ino``. The inodes go to the mount that holds them
over its control socket (``loftfs.control``), in batches, from several client threads: each
thread has its own connection, and the mount fetches the batches of different connections in
parallel. The data never travels through this process.
"""

from __future__ import annotations

import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from loftfs.cli.common import kv_table, plural, print_warning, stderr_console, stdout_console
from loftfs.control import ControlClient, control_socket_path
from loftfs.errors import ConfigError, LoftError
from loftfs.utils import format_size

#: A batch holds at most this many files or this many bytes: small enough that the threads
#: share the work evenly, large enough that small files do not cost one request each.
BATCH_FILES = 64
BATCH_BYTES = 256 << 20
#: How long a client waits for the mount's next answer: one answer comes per file, and a large
#: file from a slow store takes a while.
ANSWER_TIMEOUT_S = 3600.0
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class WarmFile:
    path: str
    inode: int
    size: int


@dataclass
class WarmupJob:
    """The files of one mount and how to reach its control socket."""

    socket: Path
    where: str
    files: list[WarmFile] = field(default_factory=list)


@dataclass
class WarmupSummary:
    files: int = 0
    bytes: int = 0
    fetched_bytes: int = 0
    cached_bytes: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


#: Called once per file as its answer arrives: (file, fetched bytes, cached bytes, error).
FileDone = Callable[[WarmFile, int, int, str | None], None]


# --- finding the files -------------------------------------------------------------------------


def walk_files(top: str, problems: list[str]) -> Iterator[WarmFile]:
    """The regular files at or below ``top`` (symlinks inside are not followed, other file
    systems mounted below are not entered). Unreadable directories are noted in ``problems``
    and skipped."""
    try:
        st = os.stat(top)
    except OSError as e:
        problems.append(f"{top}: {e.strerror}")
        return
    if stat.S_ISREG(st.st_mode):
        yield WarmFile(top, st.st_ino, st.st_size)
        return
    if not stat.S_ISDIR(st.st_mode):
        problems.append(f"{top}: not a regular file or directory")
        return
    device = st.st_dev
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                subdirs = []
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.stat(follow_symlinks=False).st_dev == device:
                                subdirs.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            est = entry.stat(follow_symlinks=False)
                            yield WarmFile(entry.path, est.st_ino, est.st_size)
                    except OSError as e:  # removed meanwhile, or unreadable
                        problems.append(f"{entry.path}: {e.strerror}")
                stack.extend(sorted(subdirs, reverse=True))  # depth first, in name order
        except OSError as e:
            problems.append(f"{directory}: {e.strerror}")


def plan_warmup(paths: Iterable[str]) -> tuple[list[WarmupJob], list[str]]:
    """The files under ``paths`` grouped by the loftfs mount that holds them (each inode
    once), and the problems found: paths missing, unreadable or not in a loftfs mount."""
    from loftfs.fuse.mount import find_mount_root

    jobs: dict[str, WarmupJob] = {}
    seen: dict[str, set[int]] = {}
    problems: list[str] = []
    for path in paths:
        if not os.path.lexists(path):
            problems.append(f"{path}: no such file or directory")
            continue
        root = find_mount_root(path)
        if root is None:
            problems.append(f"{path} is not in a loftfs mount")
            continue
        job = jobs.get(root)
        if job is None:
            job = jobs[root] = WarmupJob(control_socket_path(root), f"the loftfs mount {root}")
            seen[root] = set()
        for f in walk_files(path, problems):
            if f.inode not in seen[root]:  # hard links, or a path given twice
                seen[root].add(f.inode)
                job.files.append(f)
    return [job for job in jobs.values() if job.files], problems


def read_path_list(source: str) -> list[str]:
    """Paths from a file, one per line (``-``: standard input); blank lines are skipped."""
    try:
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the path list {source}: {e.strerror}") from None
    return [line for line in lines if line.strip()]


# --- asking the mounts -------------------------------------------------------------------------


def batches(files: Sequence[WarmFile]) -> Iterator[list[WarmFile]]:
    batch: list[WarmFile] = []
    size = 0
    for f in files:
        if batch and (len(batch) >= BATCH_FILES or size + f.size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        yield batch


def _warm_batch(
    client: ControlClient,
    batch: list[WarmFile],
    report: Callable[[tuple[WarmFile, int, int, str | None]], None],
    command: str = "warmup",
) -> None:
    """Send one batch and report each file's answer. Files left unanswered are reported
    failed: with the error when the request failed (which is then raised again)."""
    waiting = {f.inode: f for f in batch}
    reason = "the mount gave no answer for this file"
    try:
        for msg in client.request(command, inodes=[f.inode for f in batch]):
            inode = msg.get("inode")
            f = waiting.pop(inode, None) if isinstance(inode, int) else None
            if f is None:
                continue  # the final {"done": true}, or an answer for no file of ours
            error = msg.get("error")
            fetched, cached = msg.get("fetched_bytes"), msg.get("cached_bytes")
            report(
                (
                    f,
                    fetched if isinstance(fetched, int) else 0,
                    cached if isinstance(cached, int) else 0,
                    str(error) if error else None,
                )
            )
    except LoftError as e:
        reason = str(e)
        raise
    finally:
        for f in waiting.values():
            report((f, 0, 0, reason))


def run_warmup(
    jobs: Sequence[WarmupJob],
    threads: int,
    on_file: FileDone | None = None,
    *,
    timeout: float | None = ANSWER_TIMEOUT_S,
    command: str = "warmup",
) -> WarmupSummary:
    """Warm up every job's files from ``threads`` client threads, calling ``on_file`` (in this
    thread) as each file's answer arrives. A batch that fails (the mount is gone, refuses the
    command) marks its files failed with the reason; the other batches go on. ``command``: the
    mount's per-file command (``warmup``; ``materialize`` answers in the same shape)."""
    work: queue.SimpleQueue[tuple[WarmupJob, list[WarmFile]] | None] = queue.SimpleQueue()
    total = 0
    for job in jobs:
        for batch in batches(job.files):
            work.put((job, batch))
            total += len(batch)
    results: queue.SimpleQueue[tuple[WarmFile, int, int, str | None]] = queue.SimpleQueue()
    n_threads = max(1, min(threads, total))
    for _ in range(n_threads):
        work.put(None)
    summary = WarmupSummary()
    start = time.monotonic()

    def worker() -> None:
        clients: dict[Path, ControlClient] = {}
        try:
            while (item := work.get()) is not None:
                job, batch = item
                client = clients.get(job.socket)
                if client is None:
                    try:
                        client = ControlClient(job.socket, timeout=timeout, where=job.where)
                    except LoftError as e:
                        for f in batch:
                            results.put((f, 0, 0, str(e)))
                        continue
                    clients[job.socket] = client
                try:
                    _warm_batch(client, batch, results.put, command)
                except LoftError:  # reported per file; the next batch reconnects
                    clients.pop(job.socket).close()
        finally:
            for client in clients.values():
                client.close()

    workers = [
        threading.Thread(target=worker, name="loft-warmup", daemon=True) for _ in range(n_threads)
    ]
    for t in workers:
        t.start()
    done = 0
    while done < total:
        try:
            f, fetched, cached, error = results.get(timeout=0.2)
        except queue.Empty:
            if not any(t.is_alive() for t in workers) and results.empty():
                raise LoftError("warmup threads ended before every file was answered") from None
            continue
        done += 1
        summary.files += 1
        summary.bytes += f.size
        summary.fetched_bytes += fetched
        summary.cached_bytes += cached
        if error:
            summary.errors.append((f.path, error))
        if on_file is not None:
            on_file(f, fetched, cached, error)
    for t in workers:
        t.join(timeout=5)
    summary.seconds = time.monotonic() - start
    return summary


# --- the command -------------------------------------------------------------------------------


class BinaryRateColumn(ProgressColumn):
    """Bytes per second in the binary units of the rest of the output (MiB/s, not MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{format_size(speed)}/s" if speed else "?", style="progress.data.speed")


def _progress(
    total_files: int, total_bytes: int, label: str = "warming up"
) -> tuple[Progress | None, FileDone | None]:
    console = stderr_console()
    if not console.is_terminal:
        return None, None
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.fields[files]}"),
        DownloadColumn(binary_units=True),
        BinaryRateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("warmup", total=total_bytes or None, files=f"0/{total_files} files")
    counted = [0, 0]

    def on_file(f: WarmFile, fetched: int, cached: int, error: str | None) -> None:
        counted[0] += 1
        counted[1] += f.size
        progress.update(task, completed=counted[1], files=f"{counted[0]}/{total_files} files")

    return progress, on_file


def summary_rows(summary: WarmupSummary) -> list[tuple[str, str]]:
    seconds = max(summary.seconds, 1e-9)
    return [
        ("files", f"{summary.files:,}"),
        ("bytes", format_size(summary.bytes)),
        ("fetched", format_size(summary.fetched_bytes)),
        ("already cached", format_size(summary.cached_bytes)),
        ("time", f"{summary.seconds:.1f}s"),
        (
            "rate",
            f"{format_size(summary.bytes / seconds)}/s "
            f"(fetched {format_size(summary.fetched_bytes / seconds)}/s)",
        ),
        ("errors", f"{len(summary.errors):,}"),
    ]


def run_on_files(
    paths: Sequence[str],
    threads: int,
    from_file: str | None,
    *,
    command: str,
    label: str,
    verb: str,
) -> tuple[WarmupSummary, list[str]]:
    """What ``loft warmup`` and ``loft materialize`` share: find the files of ``paths`` (and
    of ``from_file``) in their mounts, send them to the mounts' per-file ``command`` with a
    progress bar (``label``), print what failed. Returns the summary and the paths skipped;
    ``ConfigError``/``LoftError`` when there is nothing to do."""
    if threads < 1:
        raise ConfigError(f"--threads must be 1 or more, not {threads}")
    targets = list(paths)
    if from_file is not None:
        targets += read_path_list(from_file)
    if not targets:
        raise ConfigError("no path given (name files or directories, or use --from-file)")
    jobs, problems = plan_warmup(targets)
    if not jobs and len(problems) == 1:
        raise ConfigError(problems[0])
    for problem in problems:
        print_warning(problem)
    if not jobs and problems:
        raise LoftError(f"none of the {len(problems)} paths could be {verb}")
    total_files = sum(len(job.files) for job in jobs)
    total_bytes = sum(f.size for job in jobs for f in job.files)
    progress, on_file = _progress(total_files, total_bytes, label)
    if progress is not None:
        with progress:
            summary = run_warmup(jobs, threads, on_file, command=command)
    else:
        summary = run_warmup(jobs, threads, command=command)
    for path, why in summary.errors[:MAX_ERRORS_SHOWN]:
        print_warning(f"{path}: {why}")
    if len(summary.errors) > MAX_ERRORS_SHOWN:
        print_warning(f"... and {len(summary.errors) - MAX_ERRORS_SHOWN} more failed files")
    return summary, problems


def warmup_cmd(
    paths: Annotated[
        list[str] | None,
        typer.Argument(metavar="PATH...", help="Files or directories inside loftfs mounts"),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", "-p", help="Batches in flight at once (per command)")
    ] = 8,
    from_file: Annotated[
        str | None,
        typer.Option(
            "--from-file", "-f", metavar="LISTFILE", help="Read paths from a file, one per line"
        ),
    ] = None,
) -> None:
    """Fetch files into their mount's cache ahead of use."""
    summary, problems = run_on_files(
        paths or [], threads, from_file, command="warmup", label="warming up", verb="warmed up"
    )
    stdout_console().print(kv_table("Warmup", summary_rows(summary)))
    failed = []
    if summary.errors:
        failed.append(f"{len(summary.errors)} of {plural(summary.files, 'file')} failed")
    if problems:
        failed.append(
            f"{plural(len(problems), 'path')} skipped (missing, unreadable or not in a loftfs mount)"
        )
    if failed:
        raise LoftError("; ".join(failed))
