"""Blocking lock requests of the low-level binding, waited for off the FUSE worker threads.

A ``F_SETLKW`` or a ``flock`` without ``LOCK_NB`` that meets a conflicting lock (possibly held
by another mount) is parked here instead of sleeping in a libfuse worker: a thousand blocked
lockers then cost one thread, not a thousand, and can never starve the mount of workers. One
thread retries each parked request with exponential backoff (the metadata engine has no lock
notifications) and answers it when the lock is granted, when the caller is interrupted by a
signal (``EINTR``: the kernel restarts the call if the signal handler asks for it), or with
``ENOLCK`` when the lock owner closes the file or the mount goes away. ``EINTR`` must not be
used without a pending signal: the kernel turns it into ERESTARTSYS, which would leak to the
caller as error 512.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from loftfs.errors import FSError, LoftError

log = logging.getLogger(__name__)

POLL_MIN_S = 0.005  # first retry after a conflict
POLL_MAX_S = 0.1  # retry interval once backed off (bounds the latency of a lock hand-over)
INTERRUPT_CHECK_S = 0.05  # how often parked requests are checked for signals


@dataclass
class _Waiter:
    req: int
    key: Hashable
    attempt: Callable[[], None]
    delay: float
    due: float


class LockWaiters:
    """Parked lock requests and the thread that retries them.

    ``attempt`` tries the lock without blocking: it returns when the lock is granted and raises
    ``FSError(EAGAIN)`` on a conflict. ``reply(req, err)`` answers a request (0 for success).
    ``interrupted(req)`` tells whether the kernel interrupted the request.
    """

    def __init__(
        self,
        reply: Callable[[int, int], None],
        interrupted: Callable[[int], bool],
        poll_min_s: float = POLL_MIN_S,
        poll_max_s: float = POLL_MAX_S,
    ) -> None:
        self._reply = reply
        self._interrupted = interrupted
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self._pending: list[_Waiter] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def park(self, req: int, key: Hashable, attempt: Callable[[], None]) -> None:
        """Answer ``req`` later, once ``attempt`` succeeds (it just failed with EAGAIN)."""
        now = time.monotonic()
        waiter = _Waiter(req, key, attempt, self.poll_min_s, now + self.poll_min_s)
        with self._cond:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                self._pending.append(waiter)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="loft-lock-wait", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        if stopped:
            self._reply(req, errno.ENOLCK)

    def cancel(self, key: Hashable) -> int:
        """Answer ENOLCK to the parked requests of ``key``; returns how many there were."""
        with self._cond:
            gone = [w for w in self._pending if w.key == key]
            self._pending = [w for w in self._pending if w.key != key]
        for w in gone:
            self._reply(w.req, errno.ENOLCK)
        return len(gone)

    def stop(self) -> None:
        """Answer ENOLCK to every parked request and end the thread (at unmount)."""
        with self._cond:
            self._stopped = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopped and self._pending:
                    now = time.monotonic()
                    wait = min(w.due for w in self._pending) - now
                    if wait > 0:
                        self._cond.wait(min(wait, INTERRUPT_CHECK_S))
                elif not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    left, self._pending = self._pending, []
                    break
                now = time.monotonic()
                due: list[_Waiter] = []
                keep: list[_Waiter] = []
                gone: list[_Waiter] = []
                for w in self._pending:
                    if self._interrupted(w.req):
                        gone.append(w)
                    elif w.due <= now:
                        due.append(w)
                    else:
                        keep.append(w)
                self._pending = keep
            for w in gone:
                self._reply(w.req, errno.EINTR)
            for w in due:
                self._retry(w)
        for w in left:
            self._reply(w.req, errno.ENOLCK)

    def _retry(self, w: _Waiter) -> None:
        try:
            w.attempt()
        except FSError as e:
            if e.errno == errno.EAGAIN:
                w.delay = min(w.delay * 2, self.poll_max_s)
                w.due = time.monotonic() + w.delay
                with self._cond:
                    if not self._stopped:
                        self._pending.append(w)
                        return
                self._reply(w.req, errno.ENOLCK)
                return
            self._reply(w.req, e.errno or errno.EIO)
            return
        except LoftError as e:
            log.error("waiting for a lock failed: %s", e)
            self._reply(w.req, errno.EIO)
            return
        except Exception:
            log.exception("unexpected error while waiting for a lock")
            self._reply(w.req, errno.EIO)
            return
        self._reply(w.req, 0)
