"""Mounting: validate, wire meta + storage + data path + vfs, serve until unmounted.

A live mount leaves a record in ``/run/loftfs/mounts/`` (pid, metadata URL, volume) so that
``loft umount`` and ``loft info`` can find the process and the volume behind a mountpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import hashlib
import json
import logging
import os
import re
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loftfs.chunk.datapath import DataPath
from loftfs.control import ControlServer, Handler, Message, control_socket_path, int_list
from loftfs.errors import ConfigError, FSError, LoftError
from loftfs.fuse.common import mount_options
from loftfs.meta import open_meta
from loftfs.meta.base import process_identity
from loftfs.meta.interface import Meta
from loftfs.meta.types import FileType
from loftfs.metrics import Metrics, parse_listen_address
from loftfs.object import open_volume_storage, probe_volume_storage
from loftfs.object.encrypt import VolumeSecret
from loftfs.vfs.options import FUSE_BINDINGS, MountOptions
from loftfs.vfs.vfs import VFS

log = logging.getLogger(__name__)

RECORD_DIR = Path(os.environ.get("LOFT_RUN_DIR", "/run/loftfs")) / "mounts"
FSTYPE = "fuse.loftfs"
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
READ_AHEAD_KB = 1024  # DESIGN 2.4: the kernel default (128 KiB) halves sequential reads
_OCTAL = re.compile(rb"\\([0-7]{3})")  # /proc/mounts escapes space, tab, newline, backslash


@dataclass
class MountRecord:
    pid: int
    meta_url: str
    mountpoint: str
    volume: str
    uuid: str


def _record_path(real_mountpoint: str) -> Path:
    # No realpath() here: the mount process must never touch its own mountpoint before it
    # serves requests (the lstat would wait for this very process).
    digest = hashlib.sha1(real_mountpoint.encode()).hexdigest()[:16]
    return RECORD_DIR / f"{digest}.json"


def read_mount_record(mountpoint: str) -> MountRecord | None:
    """The record of the live mount at ``mountpoint``, or None."""
    try:
        data = json.loads(_record_path(os.path.realpath(mountpoint)).read_text())
        return MountRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_record(rec: MountRecord) -> Path:
    path = _record_path(rec.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec)))
    os.chmod(tmp, 0o600)  # the metadata URL may hold a password
    tmp.rename(path)
    return path


def _mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount, from /proc/self/mounts (octal escapes decoded)."""
    out = []
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mp = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), parts[1])
                out.append((os.fsdecode(mp), os.fsdecode(parts[2])))
    return out


def is_mounted(mountpoint: str) -> bool:
    real = os.path.realpath(mountpoint)
    return any(mp == real for mp, _ in _mounts())


def find_mount_root(path: str) -> str | None:
    """The loftfs mountpoint that contains ``path``, or None."""
    real = os.path.realpath(path)
    best = None
    for mp, fstype in _mounts():
        if fstype != FSTYPE:
            continue
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best)
        ):
            best = mp
    return best


def _check_mountpoint(mountpoint: str) -> str:
    real = os.path.realpath(mountpoint)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise ConfigError(
                f"mountpoint {mountpoint} is a dead mount (transport endpoint is not connected); "
                f"run 'loft umount --force {mountpoint}' first"
            ) from None
        raise ConfigError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(real):
        raise ConfigError(f"mountpoint {mountpoint} is already in use by another mount")
    return real


def _raise_read_ahead(mountpoint: str) -> None:
    try:
        dev = os.stat(mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if bdi.exists() and int(bdi.read_text()) < READ_AHEAD_KB:
            bdi.write_text(str(READ_AHEAD_KB))
    except (OSError, ValueError) as e:
        log.info("could not raise read_ahead_kb: %s", e)


SWITCH_INTERVAL_S = 0.0005


def _tune_gc() -> None:
    """Fewer, cheaper cyclic garbage collections: what exists once the mount is set up (modules,
    the engine's and the caches' structures) is frozen out of the collector's scans, and the
    youngest generation is collected every 20,000 allocations instead of 700. A full collection
    of a large heap stalls every request for milliseconds; the request path itself creates
    hardly any reference cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # A thread whose reply arrived waits for the interpreter lock until the running thread
    # gives it up: every 5 ms by default, which a request waiting on a 0.1 ms round trip
    # feels. Switching more often costs the busy threads little.
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _tune_malloc() -> None:
    """Let block-sized buffers be reused from one heap instead of mapped afresh each time.

    Every block read or written passes through a few block-sized buffers (the object store's
    response, the ``bytes`` made of it, a write buffer). Served by ``mmap`` (glibc's default
    for the first ones, and what a fixed low threshold would force), each is a fresh mapping
    whose every page faults in and is zeroed: on this machine's VM that cost a third of the
    mount's CPU on a cold read from S3. Served from the heap, a freed 4 MiB buffer is reused by
    the next one, already resident. What bounds the resident size then:

    - one arena for all threads (``M_ARENA_MAX``): per-thread arenas each kept their own freed
      buffers (a 1 GiB write peaked at 530 MiB with the default arenas, 380-435 MiB with one;
      the mount's threads mostly allocate under the interpreter lock, so one arena costs no
      contention worth measuring);
    - a fixed mmap threshold of 32 MiB (glibc's largest) so the threshold never moves, and
      blocks up to 32 MiB come from the heap from the first one;
    - a trim threshold of 16 MiB: free space at the top of the heap beyond it goes back to the
      kernel (64 MiB measured no faster, within this machine's noise).

    Measured (``docs/PERFORMANCE.md``, 2026-11-29): cold sequential read from S3 305 -> 360-407
    MB/s, warm read from the disk cache 590-720 -> 1,000 MB/s; peak RSS of the read mount
    153-163 -> 155-172 MiB, of a 1 GiB write 362-401 -> 378-435 MiB.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 16 << 20)
    except (OSError, AttributeError) as e:  # not glibc: nothing to tune
        log.debug("mallopt unavailable: %s", e)


def run_mount(
    meta_url: str,
    mountpoint: str,
    opts: MountOptions,
    *,
    on_ready: Callable[[], None] | None = None,
    secret: VolumeSecret | None = None,
    record_url: str | None = None,
) -> None:
    """Mount the volume at ``meta_url`` on ``mountpoint`` and serve until unmounted.
    ``record_url`` is what the mount record keeps instead of ``meta_url`` (a control-plane
    mount records ``control:TENANT/VOLUME``: its metadata credentials stay in memory).

    Bad input raises ``LoftError`` subclasses before anything is mounted: an encrypted volume
    without its ``secret``, or with a wrong one, included. SIGTERM, SIGINT and SIGHUP unmount
    cleanly: buffered data is committed, the session is closed.
    """
    if opts.fuse_binding not in FUSE_BINDINGS:
        raise ConfigError(
            f"unknown FUSE binding {opts.fuse_binding!r} (choose from {', '.join(FUSE_BINDINGS)})"
        )
    real = _check_mountpoint(mountpoint)
    _tune_malloc()
    meta = open_meta(meta_url)
    try:
        settings = meta.load_settings()
        metrics = Metrics({"volume": settings.name, "mountpoint": real})
        store = open_volume_storage(settings, secret, metrics=metrics)
        probe_volume_storage(store, settings)
    except BaseException:
        meta.close()
        raise
    if hasattr(meta, "session_timeout_s"):
        meta.session_timeout_s = opts.session_timeout_s
    try:
        data = DataPath(meta, store, settings, opts)
    except BaseException:
        meta.close()
        raise
    data.register_metrics(metrics)
    vfs = VFS(meta, data, settings, opts)
    metrics.register_source("lazy", vfs.lazy.figures)
    metrics.register_source("meta_cache", vfs.cache.figures)
    if vfs.sweep is not None:
        metrics.register_source("dir_sweep", vfs.sweep.figures)
    meta.new_session(
        {**process_identity(), "mountpoint": real, "version": _version()},
        heartbeat_s=opts.heartbeat_s,
    )
    record: Path | None = None
    # From here on a signal never kills the process outright: before the loop runs it is
    # remembered and served as soon as the loop starts, during shutdown it is logged, so the
    # commit of buffered data is never cut short (a second SIGTERM is common: timeout(1),
    # systemd and pkill all send their own).
    _signals_seen.clear()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _remember_signal)

    def announce_mounted() -> None:
        nonlocal record
        record = _write_record(
            MountRecord(os.getpid(), record_url or meta_url, real, settings.name, settings.uuid)
        )
        log.info(
            "volume %s (%s) mounted at %s (%s binding)",
            settings.name,
            settings.uuid,
            real,
            opts.fuse_binding,
        )

    control: ControlServer | None = None
    stop_http: Callable[[], None] | None = None
    try:
        data.start()
        _tune_gc()
        if opts.metrics:
            host, port = parse_listen_address(opts.metrics)
            port, stop_http = metrics.serve_http(host, port)
            log.info("Prometheus metrics at http://%s:%d/metrics", host, port)
        control = ControlServer(control_socket_path(real), mount_handlers(meta, data, metrics))
        control.start()
        options = mount_options(settings.name, opts)

        def ready() -> None:
            _raise_read_ahead(real)
            if on_ready is not None:
                on_ready()

        # Each unmounts by itself before it returns, whatever ended it.
        if opts.fuse_binding == "lowlevel":
            from loftfs.fuse.lowlevel import serve_lowlevel

            serve_lowlevel(
                vfs,
                opts,
                real,
                options,
                ready,
                on_mounted=announce_mounted,
                signals_seen=_signals_seen,
                metrics=metrics,
            )
        else:
            from loftfs.fuse.adapter import serve_pyfuse3

            serve_pyfuse3(
                vfs,
                opts,
                real,
                options,
                metrics,
                on_ready=ready,
                on_mounted=announce_mounted,
                signals_seen=_signals_seen,
                stop_signals=_STOP_SIGNALS,
            )
    finally:
        try:
            vfs.shutdown()
            data.close()  # the control socket still answers: umount shows pending uploads
        finally:
            if data.remaining_uploads:
                log.warning(
                    "%d written blocks are staged in the disk cache and not uploaded yet; "
                    "the next mount of this volume with the same --cache-dir uploads them",
                    data.remaining_uploads,
                )
            _write_result(real, {"remaining_uploads": data.remaining_uploads})
            if control is not None:
                control.stop()
            if stop_http is not None:
                stop_http()
            with contextlib.suppress(Exception):
                meta.close_session()
            meta.close()
            if record is not None:
                with contextlib.suppress(OSError):
                    record.unlink()
        log.info("volume %s unmounted from %s", settings.name, real)


def result_path(real_mountpoint: str) -> Path:
    """Where a mount process leaves what ``loft umount`` should report after it exited."""
    return _record_path(real_mountpoint).with_suffix(".result")


def _write_result(real_mountpoint: str, result: dict[str, int]) -> None:
    with contextlib.suppress(OSError):
        path = result_path(real_mountpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))


def mount_handlers(meta: Meta, data: DataPath, metrics: Metrics) -> dict[str, Handler]:
    """The commands of the mount's control socket (``loftfs.control``): ``stats`` for ``loft
    stats``, ``warmup`` for ``loft warmup``, ``materialize`` for ``loft materialize``,
    ``pending`` for ``loft umount``/``status``."""

    def stats(args: Message) -> Message:
        return metrics.snapshot()

    def pending(args: Message) -> Message:
        blocks, nbytes = data.pending_uploads()
        return {"blocks": blocks, "bytes": nbytes}

    def warmup(args: Message) -> Iterator[Message]:
        for inode in int_list(args, "inodes"):
            fetched = cached = 0
            error: str | None = None
            try:
                attr = meta.getattr(inode)
                if attr.type != FileType.FILE:
                    raise FSError(errno.EISDIR, "not a regular file")
                fetched, cached = data.warm(inode, attr.size)
            except LoftError as e:
                error = str(e)
            except OSError as e:
                error = e.strerror or str(e)
            yield {"inode": inode, "fetched_bytes": fetched, "cached_bytes": cached, "error": error}
        yield {"done": True}

    def materialize(args: Message) -> Iterator[Message]:
        for inode in int_list(args, "inodes"):
            copied = native = 0
            error: str | None = None
            try:
                attr = meta.getattr(inode)
                if attr.type != FileType.FILE:
                    raise FSError(errno.EISDIR, "not a regular file")
                copied, native = data.materialize(inode, attr.size)
            except LoftError as e:
                error = str(e) or errno.errorcode.get(getattr(e, "errno", 0), "error")
            except OSError as e:
                error = e.strerror or str(e)
            yield {"inode": inode, "fetched_bytes": copied, "cached_bytes": native, "error": error}
        yield {"done": True}

    return {
        "stats": stats,
        "pending": pending,
        "warmup": warmup,
        "materialize": materialize,
    }


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_signals_seen: list[int] = []


def _remember_signal(signum: int, frame: object) -> None:
    if _signals_seen:
        log.warning("signal %s: already unmounting, committing buffered data", signum)
    _signals_seen.append(signum)


def _version() -> str:
    from loftfs import __version__

    return __version__
