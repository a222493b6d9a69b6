"""A second FUSE binding: libfuse3's low-level API through ctypes (``serve_lowlevel``).

Unlike pyfuse3 it forwards the requests loftfs needs for distributed semantics (POSIX and BSD
locks, fallocate, copy_file_range, lseek) and runs the blocking vfs directly in libfuse's own
worker threads (``fuse_session_loop_mt``), without a hop from an event loop to a worker thread.
The handlers are in ``ll_ops``, the C declarations in ``ll_abi``.

Threads: the loop runs in a thread of its own (``loft-fuse-loop``) while the calling thread
(the main thread) waits and handles SIGTERM, SIGINT and SIGHUP: Python runs signal handlers only
there, and a C loop blocking the main thread would never let them run. A signal marks the
session as exited and then issues one ``statfs`` on the mountpoint from a helper thread: the
worker that answers it sees the exit mark and ends the loop (libfuse's workers otherwise sleep
in ``read(/dev/fuse)`` until the next request). The loop also ends by itself when the file
system is unmounted from outside (``umount``, ``fusermount3 -u``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

from loftfs.errors import ConfigError, LoftError
from loftfs.fuse import ll_abi as abi
from loftfs.fuse.ll_ops import LowLevelOperations
from loftfs.metrics import Metrics
from loftfs.vfs.options import MountOptions
from loftfs.vfs.vfs import VFS

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MIN_THREADS = 4
WAIT_TICK_S = 0.5  # the main thread wakes this often to run signal handlers


def fuse_argv(options: Iterable[str], progname: str = "loftfs") -> list[bytes]:
    """``argv`` for ``fuse_session_new``: the options as one ``-o`` list, with commas and
    backslashes inside an option escaped the way libfuse's option parser expects."""
    escaped = [o.replace("\\", "\\\\").replace(",", "\\,") for o in sorted(options) if o]
    argv = [progname.encode()]
    if escaped:
        argv += [b"-o", os.fsencode(",".join(escaped))]
    return argv


class LowLevelSession:
    """One libfuse session: mount, serve in libfuse's threads, stop on a signal, unmount."""

    def __init__(
        self,
        vfs: VFS,
        opts: MountOptions,
        mountpoint: str,
        options: set[str],
        metrics: Metrics | None = None,
    ) -> None:
        self.lib = abi.load()
        self.vfs = vfs
        self.opts = opts
        self.mountpoint = mountpoint
        self.options = set(options)
        self.ops = LowLevelOperations(
            self.lib,
            vfs,
            opts,
            kernel_checks_permissions="default_permissions" in self.options,
            metrics=metrics,
        )
        self.max_threads = max(MIN_THREADS, opts.max_fuse_tasks)
        self._se: int | None = None
        self._state = threading.RLock()  # re-entered by a signal handler on the main thread
        self._stop_requested = False
        self._loop_started = False
        self._loop_done = threading.Event()
        self._loop_rc = 0
        self._loop_error: BaseException | None = None
        self._signals_seen: list[int] = []

    # --- public ----------------------------------------------------------------------------------

    def serve(
        self,
        on_ready: Callable[[], None] | None = None,
        on_mounted: Callable[[], None] | None = None,
        signals_seen: list[int] | None = None,
    ) -> None:
        """Mount, serve until unmounted or stopped, unmount. ``on_mounted`` runs right after the
        kernel mount exists (before any request is answered: it must not touch the
        mountpoint); ``on_ready`` once a ``stat`` of the mountpoint was answered.
        ``signals_seen``: see ``serve_lowlevel``."""
        if signals_seen is not None:
            self._signals_seen = signals_seen
        self._install_signal_handlers()
        if self._signals_seen:  # a stop signal came before this call: do not mount at all
            log.info("signal %s before mounting: not mounting", self._signals_seen[0])
            return
        se = self._new_session()
        try:
            if self.lib.fuse_session_mount(se, os.fsencode(self.mountpoint)) != 0:
                raise ConfigError(
                    f"cannot mount {self.mountpoint} (libfuse printed the reason above)"
                )
            try:
                if on_mounted is not None:
                    on_mounted()
                self._run(on_ready)
            finally:
                if self._loop_started and not self._loop_done.is_set():
                    # Only reached when _run failed: the loop must end before the session goes.
                    self.request_stop()
                    while not self._loop_done.wait(WAIT_TICK_S):
                        self._wake_loop()
                self.ops.shutdown()  # answer parked lock requests while the device is open
                self.lib.fuse_session_unmount(se)
        finally:
            with self._state:
                self._se = None
            self.ops.vfs.kernel_store = None
            self.ops.session = None
            self.lib.fuse_session_destroy(se)
            if self._loop_done.is_set() or not self._loop_started:
                self.ops.threads.release()  # every worker thread has been joined
        if self._loop_error is not None:
            raise LoftError(f"the FUSE loop failed: {self._loop_error}")
        if self._loop_rc and not self._stop_requested:
            raise LoftError(f"the FUSE session ended with an error: {_strerror(self._loop_rc)}")

    def request_stop(self) -> bool:
        """End the loop (from any thread); False when a stop was already requested."""
        with self._state:
            if self._stop_requested:
                return False
            self._stop_requested = True
            if self._se is not None:
                self.lib.fuse_session_exit(self._se)
            wake = self._loop_started and not self._loop_done.is_set()
        if wake:
            threading.Thread(target=self._wake_loop, name="loft-fuse-wake", daemon=True).start()
        return True

    # --- internals -------------------------------------------------------------------------------

    def _new_session(self) -> int:
        argv = fuse_argv(self.options)
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        args = abi.FuseArgs(len(argv), c_argv, 0)
        se = self.lib.fuse_session_new(
            ctypes.byref(args),
            ctypes.byref(self.ops.table),
            ctypes.sizeof(abi.LowLevelOps),
            None,
        )
        self.lib.fuse_opt_free_args(ctypes.byref(args))
        if not se:
            raise ConfigError(
                f"libfuse refused the mount options {', '.join(sorted(self.options))} "
                "(its message is above)"
            )
        with self._state:
            self._se = se
        self.ops.session = se
        self.ops.vfs.kernel_store = self.ops.store_in_kernel
        return int(se)

    def _run(self, on_ready: Callable[[], None] | None) -> None:
        se = self._se
        assert se is not None
        loop = threading.Thread(target=self._loop, args=(se,), name="loft-fuse-loop", daemon=True)
        with self._state:
            if self._stop_requested:
                return
            self._loop_started = True
            loop.start()
        threading.Thread(
            target=self._announce_ready, args=(on_ready,), name="loft-fuse-ready", daemon=True
        ).start()
        while not self._loop_done.wait(WAIT_TICK_S):
            pass
        loop.join()

    def _loop(self, se: int) -> None:
        try:
            self._loop_rc = self.lib.loop_mt(se, self.max_threads)
        except BaseException as e:
            log.exception("the FUSE loop failed")
            self._loop_error = e
        finally:
            self._loop_done.set()

    def _wake_loop(self) -> None:
        # Any request wakes a worker, which then sees the exit mark; statfs is never cached.
        with contextlib.suppress(OSError):
            os.statvfs(self.mountpoint)

    def _announce_ready(self, on_ready: Callable[[], None] | None) -> None:
        try:
            os.stat(self.mountpoint)
        except OSError as e:
            log.error("the mount at %s does not answer: %s", self.mountpoint, e)
            return
        # After the loop ended, that stat may have reached the directory under the mount.
        if self._loop_done.is_set() or self._stop_requested:
            return
        log.info("serving %s (libfuse %d, low-level binding)", self.mountpoint, self.lib.version)
        if on_ready is not None:
            try:
                on_ready()
            except Exception:
                log.exception("on_ready failed")

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT/SIGHUP stop the loop. The handlers stay after ``serve`` returns, so a
        second signal cannot cut the caller's commit of buffered data short."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen.append(signum)
        name = signal.Signals(signum).name
        if self.request_stop():
            log.info("signal %s: unmounting", name)
        else:
            log.warning("signal %s: already unmounting, committing buffered data", name)


def _strerror(rc: int) -> str:
    try:
        return os.strerror(abs(rc))
    except ValueError:
        return f"error {rc}"


def serve_lowlevel(
    vfs: VFS,
    opts: MountOptions,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[], None] | None = None,
    *,
    on_mounted: Callable[[], None] | None = None,
    signals_seen: list[int] | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Mount ``mountpoint`` with the kernel ``options`` (as ``mount_options()`` builds them) and
    serve ``vfs`` through libfuse's low-level API until the file system is unmounted or the
    process gets SIGTERM, SIGINT or SIGHUP; the kernel mount is gone when this returns.

    ``on_mounted`` runs once the kernel mount exists (it must not touch the mountpoint),
    ``on_ready`` once the mount has answered a ``stat``. ``signals_seen`` is the caller's
    record of stop signals caught before this call (a non-empty list returns at once,
    mounting nothing); the signals handled here are appended to it. Committing buffered data
    and closing the session afterwards stay with the caller (``vfs.shutdown()``, as
    ``run_mount`` does). Raises ``ConfigError`` when libfuse is missing or refuses the options
    or the mount.
    """
    LowLevelSession(vfs, opts, mountpoint, options, metrics).serve(
        on_ready, on_mounted, signals_seen
    )
