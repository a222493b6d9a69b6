"""``loft mount``: serve a volume at a mountpoint, in the foreground or as a background process.

``-d`` starts the same command in the foreground in a new session, with its output going to a
log file, and waits on a pipe until the child says the mount answers (or why it failed): the
parent's exit status then tells the truth about the mount, which scripts and agents rely on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import subprocess
import time
from typing import Annotated

import typer

from loftfs.cli.child import (
    ERROR_PREFIX,
    READY,
    child_args,
    launch_document,
    run_foreground,
)
from loftfs.cli.common import (
    absolute_meta_url,
    debug_enabled,
    say,
    setup_logging,
)
from loftfs.errors import ConfigError, LoftError
from loftfs.metrics import parse_listen_address
from loftfs.object.encrypt import ENV_PASSPHRASE, VolumeSecret, secret_from_sources
from loftfs.plane import ENV_TOKEN
from loftfs.plane.mountspec import ControlSpec, fetch_spec
from loftfs.utils import parse_size
from loftfs.vfs.options import FUSE_BINDINGS, MountOptions, default_cache_dir

_DEFAULTS = MountOptions()
SYSTEM_LOG_DIR = "/var/log/loftfs"
# what a control-plane mount's child must not inherit: its spec comes through a pipe
_CONTROL_ENV = (
    ENV_PASSPHRASE,
    ENV_TOKEN,
    "LOFT_ACCESS_KEY",
    "LOFT_SECRET_KEY",
    "LOFT_SESSION_TOKEN",
)


def mountpoint_slug(mountpoint: str) -> str:
    """A file name for a mountpoint: ``/mnt/loft/demo`` -> ``mnt-loft-demo``."""
    path = os.path.abspath(mountpoint).strip("/")
    return path.replace("/", "-") or "root"


def size_text(n: int) -> str:
    """The shortest exact size flag for ``n`` bytes: ``300M``, ``1G``, ``4097``."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def default_log_path(mountpoint: str) -> str:
    """``/var/log/loftfs/<slug>.log`` where writable, else ``~/.loftfs/log/<slug>.log``."""
    name = f"{mountpoint_slug(mountpoint)}.log"
    try:
        os.makedirs(SYSTEM_LOG_DIR, exist_ok=True)
        if os.access(SYSTEM_LOG_DIR, os.W_OK):
            return os.path.join(SYSTEM_LOG_DIR, name)
    except OSError:
        pass
    return os.path.join(os.path.expanduser("~/.loftfs/log"), name)


def build_options(
    *,
    buffer_size: str,
    upload_threads: int,
    fetch_threads: int,
    readahead_blocks: int,
    attr_timeout: float,
    entry_timeout: float,
    dir_entry_timeout: float,
    enable_xattr: bool,
    read_only: bool,
    heartbeat: float,
    gc_interval: float,
    fuse_options: list[str],
    fuse_binding: str = _DEFAULTS.fuse_binding,
    cache_dir: str | None = None,
    cache_size: str = "",
    free_space_ratio: float = _DEFAULTS.free_space_ratio,
    writeback: bool = False,
    metrics: str = "",
) -> MountOptions:
    """Validated ``MountOptions`` from command-line values."""
    cache_dirs = [d for d in (cache_dir or default_cache_dir()).split(":") if d]
    if not cache_dirs:
        raise ConfigError("--cache-dir needs at least one directory")
    cache_dirs = [os.path.abspath(d) for d in cache_dirs]
    cache_bytes = parse_size(cache_size) if cache_size else _DEFAULTS.cache_size
    if not 0.0 <= free_space_ratio < 1.0:
        raise ConfigError(f"--free-space-ratio must be in [0, 1), not {free_space_ratio}")
    if writeback and cache_bytes == 0:
        raise ConfigError("--writeback stages blocks in the disk cache: it needs --cache-size > 0")
    if writeback and read_only:
        raise ConfigError("--writeback makes no sense on a read-only mount")
    if metrics:
        parse_listen_address(metrics)
    buffer = parse_size(buffer_size)
    if buffer < (1 << 20):
        raise ConfigError(f"--buffer-size must be at least 1M, not {buffer_size!r}")
    for flag, count in (("--upload-threads", upload_threads), ("--fetch-threads", fetch_threads)):
        if count < 1:
            raise ConfigError(f"{flag} must be at least 1, not {count}")
    if readahead_blocks < 0:
        raise ConfigError(f"--readahead-blocks must be 0 or more, not {readahead_blocks}")
    for flag, seconds in (
        ("--attr-timeout", attr_timeout),
        ("--entry-timeout", entry_timeout),
        ("--dir-entry-timeout", dir_entry_timeout),
        ("--gc-interval", gc_interval),
    ):
        if seconds < 0:
            raise ConfigError(f"{flag} must be 0 or more, not {seconds}")
    if heartbeat <= 0:
        raise ConfigError(f"--heartbeat must be more than 0, not {heartbeat}")
    if fuse_binding not in FUSE_BINDINGS:
        raise ConfigError(
            f"--fuse-binding must be one of {', '.join(FUSE_BINDINGS)}, not {fuse_binding!r}"
        )
    options: list[str] = []
    for group in fuse_options:
        for opt in group.split(","):
            opt = opt.strip()
            if opt:
                options.append(opt)
    if "ro" in options:
        read_only = True
    return MountOptions(
        buffer_size=buffer,
        upload_threads=upload_threads,
        fetch_threads=fetch_threads,
        readahead_blocks=readahead_blocks,
        attr_timeout=attr_timeout,
        entry_timeout=entry_timeout,
        dir_entry_timeout=dir_entry_timeout,
        enable_xattr=enable_xattr,
        read_only=read_only,
        heartbeat_s=heartbeat,
        gc_interval_s=gc_interval,
        fuse_options=options,
        fuse_binding=fuse_binding,
        cache_dirs=cache_dirs,
        cache_size=cache_bytes,
        free_space_ratio=free_space_ratio,
        writeback=writeback,
        metrics=metrics,
    )


def _filled_pipe(payload: bytes) -> int:
    """A pipe already holding ``payload`` (the launch document, secrets included) and closed
    for writing; returns its read end. The payload is far below the pipe's buffer, so the
    write never blocks."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, payload)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def _last_log_line(log_path: str) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


def _read_status(fd: int, deadline: float) -> bytes | None:
    """The child's one status line, ``b""`` if it closed the pipe without one, ``None`` on
    timeout."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.strip()
        data += chunk
    return data.split(b"\n", 1)[0].strip()


def _stop(child: subprocess.Popen[bytes], mountpoint: str) -> bool:
    """Stop a child that failed to become ready: SIGTERM (it unmounts cleanly on it), then
    SIGKILL, then detach whatever mount it left. True if the child is gone afterwards."""
    gone = False
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)
        try:
            child.wait(wait_s)
            gone = True
            break
        except subprocess.TimeoutExpired:
            continue
    from loftfs.fuse.mount import find_mount_root

    real = os.path.realpath(mountpoint)
    if find_mount_root(real) == real:
        # run_mount refuses a mountpoint in use, so a loftfs mount here is the child's
        subprocess.run(
            ["fusermount3", "-uz", real], capture_output=True, check=False, stdin=subprocess.DEVNULL
        )
    return gone


def mount_in_background(
    meta_url: str,
    mountpoint: str,
    opts: MountOptions,
    log_path: str,
    ready_timeout: float,
    secret: VolumeSecret | None = None,
    spec: ControlSpec | None = None,
) -> int:
    """Start the mount as a detached child (``loftfs.cli.child``); return its pid once the
    mount answers. The options, the secret and a control-plane ``spec`` go to it through a
    pipe: with a spec its command line names only the volume, its environment holds no
    credential."""
    log_path = os.path.abspath(log_path)
    try:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    except OSError as e:
        raise ConfigError(f"cannot write the log file {log_path}: {e.strerror}") from e
    read_fd, write_fd = os.pipe()
    launch_fd = -1
    try:
        with log_file:
            launch_fd = _filled_pipe(
                launch_document(opts, secret=secret, spec=spec, debug=debug_enabled())
            )
            hidden = _CONTROL_ENV if spec is not None else (ENV_PASSPHRASE,)
            child = subprocess.Popen(
                child_args(
                    spec.label if spec is not None else meta_url, mountpoint, write_fd, launch_fd
                ),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(write_fd, launch_fd),
                # the passphrase, if any, went into the pipe: the long-lived process's
                # environment (/proc/PID/environ) does not keep a copy
                env={k: v for k, v in os.environ.items() if k not in hidden},
                start_new_session=True,  # the caller's cwd is kept: URLs may be relative
                close_fds=True,
            )
        os.close(write_fd)
        write_fd = -1
        os.close(launch_fd)
        launch_fd = -1
        try:
            status = _read_status(read_fd, time.monotonic() + ready_timeout)
        except BaseException:
            _stop(child, mountpoint)
            raise
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        if launch_fd >= 0:
            os.close(launch_fd)

    if status == READY:
        return child.pid
    if status is None:
        gone = _stop(child, mountpoint)
        raise LoftError(
            f"the mount was not ready after {ready_timeout:.0f}s; "
            + ("its process was stopped" if gone else f"its process (pid {child.pid}) is stuck")
            + f" (log: {log_path})"
        )
    if status.startswith(ERROR_PREFIX):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(10)
        raise LoftError(status[len(ERROR_PREFIX) :].decode(errors="replace"))
    try:
        code: int | None = child.wait(10)
    except subprocess.TimeoutExpired:
        code = None
    hint = _last_log_line(log_path)
    raise LoftError(
        f"the mount process exited (code {code}) before the mount was ready"
        + (f": {hint}" if hint else "")
        + f" (log: {log_path})"
    )


def export_storage_credentials(
    access_key: str | None, secret_key: str | None, session_token: str | None
) -> None:
    """Object-store credentials given to ``mount`` replace the volume's stored ones: they go
    into this process's environment (``LOFT_ACCESS_KEY``...), where ``open_volume_storage``
    reads them and a background mount inherits them, never onto a command line."""
    values = {
        "LOFT_ACCESS_KEY": (access_key or "").strip(),
        "LOFT_SECRET_KEY": (secret_key or "").strip(),
        "LOFT_SESSION_TOKEN": (session_token or "").strip(),
    }
    if not any(values.values()):
        return
    if not (values["LOFT_ACCESS_KEY"] and values["LOFT_SECRET_KEY"]):
        raise ConfigError(
            "give both --access-key and --secret-key (or LOFT_ACCESS_KEY and LOFT_SECRET_KEY)"
        )
    for name, value in values.items():
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)


def mount_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    mountpoint: Annotated[
        str, typer.Argument(metavar="MOUNTPOINT", help="An existing directory to mount on")
    ],
    background: Annotated[
        bool, typer.Option("--background", "-d", help="Run in the background once mounted")
    ] = False,
    buffer_size: Annotated[
        str, typer.Option("--buffer-size", help="Memory for file data being read or written")
    ] = size_text(_DEFAULTS.buffer_size),
    upload_threads: Annotated[
        int, typer.Option("--upload-threads", help="Concurrent block uploads")
    ] = _DEFAULTS.upload_threads,
    fetch_threads: Annotated[
        int, typer.Option("--fetch-threads", help="Concurrent block downloads")
    ] = _DEFAULTS.fetch_threads,
    readahead_blocks: Annotated[
        int, typer.Option("--readahead-blocks", help="Blocks read ahead on sequential reads")
    ] = _DEFAULTS.readahead_blocks,
    attr_timeout: Annotated[
        float, typer.Option("--attr-timeout", help="Kernel attribute cache, seconds")
    ] = _DEFAULTS.attr_timeout,
    entry_timeout: Annotated[
        float, typer.Option("--entry-timeout", help="Kernel name cache, seconds")
    ] = _DEFAULTS.entry_timeout,
    dir_entry_timeout: Annotated[
        float, typer.Option("--dir-entry-timeout", help="Kernel name cache for directories")
    ] = _DEFAULTS.dir_entry_timeout,
    enable_xattr: Annotated[
        bool,
        typer.Option(
            "--enable-xattr/--no-xattr",
            help="Extended attributes (off by default: each write and each entry of 'ls -l' "
            "then costs fewer kernel round trips)",
        ),
    ] = _DEFAULTS.enable_xattr,
    read_only: Annotated[bool, typer.Option("--read-only", help="Mount read-only")] = False,
    heartbeat: Annotated[
        float, typer.Option("--heartbeat", help="Session heartbeat interval, seconds")
    ] = _DEFAULTS.heartbeat_s,
    gc_interval: Annotated[
        float,
        typer.Option(
            "--gc-interval",
            help="Seconds between deletions of unused blocks (0: off); they wait while the"
            " mount is busy",
        ),
    ] = _DEFAULTS.gc_interval_s,
    fuse_options: Annotated[
        list[str] | None,
        typer.Option("-o", help="FUSE mount options, comma separated (e.g. allow_other)"),
    ] = None,
    fuse_binding: Annotated[
        str,
        typer.Option(
            "--fuse-binding",
            envvar="LOFT_FUSE_BINDING",
            help="FUSE binding: lowlevel (libfuse3, all operations) or pyfuse3",
        ),
    ] = _DEFAULTS.fuse_binding,
    log: Annotated[
        str | None,
        typer.Option(
            "--log",
            help="Log file (default: stderr; with -d /var/log/loftfs/<mountpoint>.log)",
        ),
    ] = None,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="With -d: seconds to wait for the mount")
    ] = 60.0,
    encrypt_passphrase_file: Annotated[
        str | None,
        typer.Option(
            "--encrypt-passphrase-file",
            metavar="FILE",
            help="Passphrase of an encrypted volume, in FILE (or set LOFT_ENCRYPT_PASSPHRASE)",
        ),
    ] = None,
    encrypt_key_file: Annotated[
        str | None,
        typer.Option(
            "--encrypt-key-file",
            metavar="FILE",
            help="Key file of an encrypted volume (32 raw bytes or 64 hex digits)",
        ),
    ] = None,
    access_key: Annotated[
        str | None,
        typer.Option(
            "--access-key",
            envvar="LOFT_ACCESS_KEY",
            help="s3: access key to use instead of the one stored at format",
        ),
    ] = None,
    secret_key: Annotated[
        str | None,
        typer.Option(
            "--secret-key",
            envvar="LOFT_SECRET_KEY",
            show_envvar=True,
            help="s3: secret key to use instead of the stored one; prefer the environment "
            "variable, which no process list shows",
        ),
    ] = None,
    session_token: Annotated[
        str | None,
        typer.Option(
            "--session-token",
            envvar="LOFT_SESSION_TOKEN",
            show_envvar=True,
            help="s3: session token of temporary credentials (with --access-key/--secret-key)",
        ),
    ] = None,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir",
            metavar="DIR[:DIR...]",
            help="Local disk block cache directories, blocks spread over them "
            "(default: LOFT_CACHE_DIR, else /var/cache/loftfs for root, ~/.cache/loftfs)",
        ),
    ] = None,
    cache_size: Annotated[
        str,
        typer.Option(
            "--cache-size", help="Disk cache size over all directories (e.g. 100G; 0: no cache)"
        ),
    ] = size_text(_DEFAULTS.cache_size),
    free_space_ratio: Annotated[
        float,
        typer.Option(
            "--free-space-ratio", help="Share of each cache disk kept free (evicts to keep it)"
        ),
    ] = _DEFAULTS.free_space_ratio,
    writeback: Annotated[
        bool,
        typer.Option(
            "--writeback",
            help="Acknowledge writes once staged on the local cache disk, upload in the "
            "background (other clients see the data once uploaded)",
        ),
    ] = False,
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics at /metrics there"
        ),
    ] = "",
    control: Annotated[
        str | None,
        typer.Option(
            "--control",
            metavar="URL",
            help="Mount through the control plane at URL: META_URL is then TENANT/VOLUME, and "
            "the volume's metadata URL, storage keys and encryption key come from the API",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=ENV_TOKEN,
            show_envvar=True,
            help="With --control: a mount token of the volume (or a tenant-admin token); "
            "prefer the environment variable, which no process list shows",
        ),
    ] = None,
    ca_file: Annotated[
        str | None,
        typer.Option("--ca-file", metavar="FILE", help="With --control: CA of the API's TLS"),
    ] = None,
) -> None:
    """Mount a volume. Runs until unmounted ('loft umount'); with -d, in the background.

    With --control URL, META_URL is TENANT/VOLUME and everything else comes from the control
    plane: 'loft mount --control https://plane:8600 acme/train /mnt/train' (token in LOFT_TOKEN).
    """
    opts = build_options(
        buffer_size=buffer_size,
        upload_threads=upload_threads,
        fetch_threads=fetch_threads,
        readahead_blocks=readahead_blocks,
        attr_timeout=attr_timeout,
        entry_timeout=entry_timeout,
        dir_entry_timeout=dir_entry_timeout,
        enable_xattr=enable_xattr,
        read_only=read_only,
        heartbeat=heartbeat,
        gc_interval=gc_interval,
        fuse_options=fuse_options or [],
        fuse_binding=fuse_binding,
        cache_dir=cache_dir,
        cache_size=cache_size,
        free_space_ratio=free_space_ratio,
        writeback=writeback,
        metrics=metrics,
    )
    spec: ControlSpec | None = None
    secret: VolumeSecret | None
    if control is not None:
        if access_key or secret_key or session_token or encrypt_passphrase_file or encrypt_key_file:
            raise ConfigError(
                "--control mounts take the storage keys and the encryption key from the "
                "control plane: drop --access-key/--secret-key/--session-token/--encrypt-*"
            )
        spec = fetch_spec(control, token, meta_url, read_only=read_only, ca_file=ca_file)
    if spec is not None:
        if spec.read_only and not opts.read_only:
            opts = dataclasses.replace(opts, read_only=True)
        if opts.read_only and opts.writeback:
            raise ConfigError("this mount is read-only (its token is): --writeback cannot apply")
        secret = spec.secret
        meta_url = spec.meta_url
    else:
        meta_url = absolute_meta_url(meta_url)
        export_storage_credentials(access_key, secret_key, session_token)
        secret = secret_from_sources(encrypt_passphrase_file, encrypt_key_file)
    if background:
        if ready_timeout <= 0:
            raise ConfigError(f"--ready-timeout must be more than 0, not {ready_timeout}")
        log_path = log or default_log_path(mountpoint)
        pid = mount_in_background(
            meta_url, mountpoint, opts, log_path, ready_timeout, secret, spec=spec
        )
        say(
            f"Mounted at {os.path.abspath(mountpoint)} (pid {pid}, log {os.path.abspath(log_path)})"
        )
        return
    setup_logging(log)
    if spec is not None:
        spec.apply_env()
    run_foreground(
        meta_url, mountpoint, opts, None, secret, record_url=spec.label if spec else None
    )
