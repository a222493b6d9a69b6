"""``loft umount``: detach a mount and wait until its process has flushed and exited.

The kernel lets go of the mountpoint at once, but data written shortly before may still be on
its way to the object store: the mount process uploads and commits it before exiting. Waiting
for that process is what makes "umount returned 0" mean "the data is durable".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from loftfs.cli.common import say
from loftfs.errors import ConfigError, LoftError
from loftfs.utils import format_size


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has finished its work)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # the state follows the parenthesised command name, which may itself contain ')'
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return True


def unmount_kernel(mountpoint: str, *, lazy: bool) -> None:
    """Ask the kernel to detach the mount; a busy mount is a clear error."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    elif shutil.which("umount"):
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    else:
        raise LoftError("neither fusermount3 nor umount is installed (install fuse3)")
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return
    detail = " ".join(proc.stderr.split()) or f"{cmd[0]} exited with {proc.returncode}"
    if "busy" in detail.lower():
        raise LoftError(
            f"{mountpoint} is busy (a process has a file open or its working directory "
            "there); close them, or use --force to detach it lazily"
        )
    raise LoftError(f"cannot unmount {mountpoint}: {detail}")


def umount_cmd(
    mountpoint: Annotated[
        str, typer.Argument(metavar="MOUNTPOINT", help="The mountpoint of a loftfs mount")
    ],
    force: Annotated[
        bool,
        typer.Option("--force", "-f", help="Detach lazily even while files are open"),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for the mount process to flush and exit"),
    ] = 120.0,
) -> None:
    """Unmount a volume and wait until its mount process has written all data and exited."""
    from loftfs.fuse.mount import find_mount_root, read_mount_record, result_path

    path = os.path.abspath(mountpoint)
    if timeout < 0:
        raise ConfigError(f"--timeout must be 0 or more, not {timeout}")
    root = find_mount_root(path)
    if root is None:
        raise ConfigError(f"{path} is not a loftfs mount")
    if os.path.realpath(root) != os.path.realpath(path):
        raise ConfigError(f"{path} is not a mountpoint (it is inside the loftfs mount {root})")
    record = read_mount_record(root)
    result = result_path(os.path.realpath(root))
    with contextlib.suppress(OSError):
        result.unlink()
    unmount_kernel(root, lazy=force)
    if record is None or record.pid == os.getpid():
        say(f"Unmounted {root}")
        return
    if not _wait_showing_uploads(root, record.pid, timeout):
        if force:
            raise LoftError(
                f"{root} is detached, but files are still open in it: its mount process "
                f"(pid {record.pid}) serves them and exits once they are closed"
            )
        raise LoftError(
            f"{root} is unmounted, but its mount process (pid {record.pid}) is still writing "
            f"data after {timeout:.0f}s; it will exit when done (do not kill it)"
        )
    remaining = _remaining_uploads(result)
    if remaining:
        say(
            f"Unmounted {root}; {remaining} written blocks could not be uploaded yet: they stay "
            "staged in its disk cache and the next mount of the volume with the same "
            "--cache-dir uploads them"
        )
        return
    say(f"Unmounted {root}")


def _wait_showing_uploads(root: str, pid: int, timeout_s: float) -> bool:
    """``wait_for_exit``, telling the user how many write-back uploads the process still has
    (its control socket answers until the uploads are done)."""
    from loftfs.control import ask_pending_uploads

    deadline = time.monotonic() + timeout_s
    real = os.path.realpath(root)
    shown = -1
    while not wait_for_exit(pid, min(1.0, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
        pending = ask_pending_uploads(real)
        if pending is None:
            continue
        blocks, nbytes = pending
        if blocks and blocks != shown:
            say(f"Waiting for {blocks} blocks ({format_size(nbytes)}) to upload")
            shown = blocks
    return True


def _remaining_uploads(result: Path) -> int:
    try:
        data = json.loads(result.read_text())
        result.unlink()
        return int(data.get("remaining_uploads", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
