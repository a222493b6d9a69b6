"""Python thread states for libfuse's worker threads.

A ctypes callback entered from a thread that Python did not create gets a fresh thread state
for that one call, destroyed when the callback returns. Everything keyed by thread state would
then be lost after each request: ``threading.local`` data above all, where the SQLite engine
keeps one connection per thread (a new connection per request, never closed until the engine
closes). ``ThreadStates.pin()``, called at the start of every callback, takes one extra
``PyGILState_Ensure`` reference the first time a worker thread enters Python, so that thread
keeps one thread state for its whole life, as a Python-created thread does. After the loop
has joined its workers, ``release()`` clears and frees those thread states.
"""

from __future__ import annotations

import ctypes
import itertools
import threading

_api = ctypes.pythonapi
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Ensure.argtypes = []
_api.PyGILState_GetThisThreadState.restype = ctypes.c_void_p
_api.PyGILState_GetThisThreadState.argtypes = []
_api.PyThreadState_Clear.restype = None
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.restype = None
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]


class ThreadStates:
    def __init__(self, name: str = "loft-fuse") -> None:
        self.name = name
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pinned: list[int] = []
        self._count = itertools.count(1)

    def pin(self) -> None:
        """Keep the calling foreign thread's thread state alive past this callback."""
        if getattr(self._local, "pinned", False):
            return
        _api.PyGILState_Ensure()  # never released: the thread state outlives the callback
        state = _api.PyGILState_GetThisThreadState()
        self._local.pinned = True
        if state:
            with self._lock:
                self._pinned.append(state)
        threading.current_thread().name = f"{self.name}-{next(self._count)}"  # for log lines

    def __len__(self) -> int:
        with self._lock:
            return len(self._pinned)

    def release(self) -> None:
        """Free the pinned thread states. Only once their threads have ended."""
        with self._lock:
            states, self._pinned = self._pinned, []
        for state in states:
            _api.PyThreadState_Clear(state)
            _api.PyThreadState_Delete(state)
