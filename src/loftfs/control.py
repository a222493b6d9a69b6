"""The control channel of a mount: a Unix socket next to its mount record, through which
``loft stats`` reads the mount's figures and ``loft warmup`` has it fetch files into its cache.

The socket lives in the mount-record directory (``/run/loftfs/mounts/<digest>.sock``), never
in the mount itself, and has mode 0600: only the user that mounted (usually root) may use it.

Protocol: JSON lines over one stream connection. The client sends a request as one line,
``{"cmd": NAME, "args": {...}}``, and reads answer lines until the request is complete:

* ``{"data": {...}}``  a message of the command; a command may stream several (progress)
* ``{"end": true}``    the request is complete
* ``{"error": TEXT}``  the request failed; this also completes it

A connection may carry any number of requests, one after another. A bad request (not JSON,
too large, unknown command) or a failing command is answered with an error line; nothing a
client sends can stop the server or disturb the mount. Each connection is served by its own
daemon thread, so that several clients (``loft warmup --threads N``) are served at once; their
number is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from loftfs.errors import ConfigError, LoftError

log = logging.getLogger(__name__)

#: Largest request line: a warmup batch of tens of thousands of inodes fits.
MAX_REQUEST_BYTES = 1 << 20
#: Largest answer line a client accepts.
MAX_ANSWER_BYTES = 16 << 20
MAX_CONNECTIONS = 64
#: A connection that neither sends a request nor reads its answers for this long is dropped.
IDLE_TIMEOUT_S = 600.0
#: How long a client waits for the next answer line by default.
CLIENT_TIMEOUT_S = 30.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL

Message = dict[str, Any]
Handler = Callable[[Message], Iterator[Message] | Message]


class ControlError(LoftError):
    """A command sent over the control socket failed, or the mount stopped answering."""


class BadRequest(LoftError):
    """A request's arguments are wrong; handlers raise it and the client sees its message."""


def control_socket_path(real_mountpoint: str) -> Path:
    """The control socket of the mount at ``real_mountpoint`` (already resolved: the mount
    process must not touch its own mountpoint): its mount record's path, suffix ``.sock``."""
    from loftfs.fuse.mount import _record_path

    return _record_path(real_mountpoint).with_suffix(".sock")


def int_list(args: Message, key: str, *, max_items: int = 100_000) -> list[int]:
    """``args[key]`` as a list of non-negative integers, or ``BadRequest``: a helper for
    handlers, whose arguments come from another process."""
    value = args.get(key)
    if not isinstance(value, list):
        raise BadRequest(f"{key!r} must be a list of integers")
    if len(value) > max_items:
        raise BadRequest(f"{key!r} holds {len(value)} items, at most {max_items} are allowed")
    if not all(type(v) is int and v >= 0 for v in value):
        raise BadRequest(f"{key!r} must hold non-negative integers only")
    return value


def _encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


class _ClientGone(Exception):
    """Writing an answer failed: the client closed its connection or stopped reading."""


# --- server ------------------------------------------------------------------------------------


class ControlServer:
    """Serves ``handlers`` (command name -> function) on the Unix socket at ``path``.

    A handler gets the request's ``args`` and returns one message (a dict) or an iterator of
    messages, which are sent as they come. It runs in the connection's thread, several at once:
    it must be thread-safe. ``BadRequest`` and other ``LoftError``s reach the client as their
    message; any other exception is logged with its traceback and answered in one line.
    The built-in ``ping`` answers the server's pid and its commands.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: Mapping[str, Handler],
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.handlers: dict[str, Handler] = {"ping": self._ping, **handlers}
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _ping(self, args: Message) -> Message:
        return {"pid": os.getpid(), "commands": sorted(self.handlers)}

    def start(self) -> None:
        """Bind the socket (replacing a stale one a dead process left) and serve from a daemon
        thread. ``ConfigError`` when the path is unusable or another process serves it."""
        if self._sock is not None:
            raise RuntimeError("the control server is already started")
        path = str(self.path)
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ConfigError(
                f"control socket path {path} is longer than {_SUN_PATH_MAX} bytes "
                "(set LOFT_RUN_DIR to a shorter directory)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Connections are refused until listen(): none can slip in before the chmod.
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot serve the control socket {path}: {e.strerror}") from None
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="loft-control", daemon=True)
        self._thread.start()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a process that died
            return
        except OSError as e:
            raise ConfigError(f"cannot check the control socket {self.path}: {e}") from None
        finally:
            probe.close()
        raise ConfigError(f"another process serves the control socket {self.path}")

    def stop(self) -> None:
        """Stop accepting, drop every connection, remove the socket file. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        # Only our own file: a new mount on the same mountpoint may have replaced it.
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                log.warning("control socket: accept failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._stopping.wait(0.1)
                continue
            with self._lock:
                busy = len(self._conns) >= self.max_connections
                if not busy:
                    self._conns.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    conn.sendall(_encode({"error": "the mount serves too many clients; retry"}))
                conn.close()
                continue
            threading.Thread(
                target=self._serve_connection, args=(conn,), name="loft-control-conn", daemon=True
            ).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        reader: BinaryIO | None = None
        try:
            conn.settimeout(self.idle_timeout_s)
            reader = conn.makefile("rb")
            while not self._stopping.is_set():
                line = reader.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    return  # the client closed its side
                if len(line) > MAX_REQUEST_BYTES:
                    # The rest of the line is still unread: the stream cannot be resynchronised.
                    self._send(conn, {"error": f"request larger than {MAX_REQUEST_BYTES} bytes"})
                    return
                if line.strip():
                    self._answer(conn, line)
        except (_ClientGone, OSError):
            return  # gone, idle too long, or the server is stopping
        except Exception:
            log.exception("control socket: serving a client failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
            if reader is not None:
                with contextlib.suppress(OSError):
                    reader.close()
            with contextlib.suppress(OSError):
                conn.close()

    def _send(self, conn: socket.socket, message: Message) -> None:
        data = _encode(message)
        try:
            conn.sendall(data)
        except OSError as e:
            raise _ClientGone() from e

    def _answer(self, conn: socket.socket, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            self._send(conn, {"error": "bad request: not a JSON line"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self._send(conn, {"error": 'bad request: expected {"cmd": NAME, "args": {...}}'})
            return
        cmd: str = request["cmd"]
        args = request.get("args", {})
        if not isinstance(args, dict):
            self._send(conn, {"error": f"bad request: the args of {cmd!r} must be an object"})
            return
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            self._send(conn, {"error": f"unknown command {cmd!r} (known: {known})"})
            return
        self._run(conn, cmd, handler, args)

    def _run(self, conn: socket.socket, cmd: str, handler: Handler, args: Message) -> None:
        result: Iterator[Message] | Message | None = None
        try:
            result = handler(args)
            messages = iter([result]) if isinstance(result, dict) else result
            for message in messages:
                if not isinstance(message, dict):
                    raise TypeError(f"answered a {type(message).__name__}, not an object")
                try:
                    data = _encode({"data": message})
                except (TypeError, ValueError) as e:
                    raise TypeError(f"answered something that is not JSON: {e}") from None
                try:
                    conn.sendall(data)
                except OSError as e:
                    raise _ClientGone() from e
        except _ClientGone:
            raise
        except LoftError as e:
            self._send(conn, {"error": str(e) or type(e).__name__})
            return
        except Exception as e:
            log.exception("control command %s failed", cmd)
            self._send(conn, {"error": f"{cmd} failed: {type(e).__name__}: {e}"})
            return
        finally:
            close = getattr(result, "close", None)  # stop a generator the client abandoned
            if callable(close) and not isinstance(result, dict):
                with contextlib.suppress(Exception):
                    close()
        self._send(conn, {"end": True})


# --- client ------------------------------------------------------------------------------------


class ControlClient:
    """One connection to a mount's control socket; requests go one after another (a client is
    not for several threads at once: open one per thread).

    ``where`` names the mount in error messages. Connection problems raise ``ConfigError``
    (nothing serves there, no permission), failed commands ``ControlError``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = CLIENT_TIMEOUT_S,
        where: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.where = where or f"the control socket {self.path}"
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ConfigError(
                f"no live loftfs mount process answers at {self.where} "
                f"(control socket {self.path}): it has stopped, or its version has no "
                "control socket"
            ) from None
        except PermissionError:
            sock.close()
            raise ConfigError(
                f"permission denied on the control socket {self.path} of {self.where}: "
                "run as the user that mounted it (usually root)"
            ) from None
        except OSError as e:
            sock.close()
            raise ConfigError(
                f"cannot connect to {self.where} (control socket {self.path}): {e.strerror or e}"
            ) from None
        self._sock: socket.socket | None = sock
        self._reader = sock.makefile("rb")
        self._lock = threading.Lock()

    @classmethod
    def for_mount(cls, path: str, *, timeout: float | None = CLIENT_TIMEOUT_S) -> ControlClient:
        """A client of the loftfs mount that holds ``path`` (the mountpoint or any path in it).
        ``ConfigError`` when no loftfs mount holds it."""
        from loftfs.fuse.mount import find_mount_root

        root = find_mount_root(path)
        if root is None:
            raise ConfigError(f"{path} is not in a loftfs mount")
        return cls(control_socket_path(root), timeout=timeout, where=f"the loftfs mount {root}")

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
            sock.close()

    def request(self, cmd: str, **args: Any) -> Generator[Message, None, None]:
        """Send ``cmd`` and yield its messages as they arrive; ``ControlError`` when it fails.
        Abandoning the iterator early closes the connection (its stream would be out of step)."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a ControlClient serves one request at a time")
        complete = True  # nothing sent yet: the connection stays in step
        try:
            try:
                data = _encode({"cmd": cmd, "args": args})
            except (TypeError, ValueError) as e:
                raise ControlError(f"the arguments of {cmd!r} are not JSON: {e}") from None
            if len(data) > MAX_REQUEST_BYTES:
                raise ControlError(
                    f"request {cmd!r} is larger than {MAX_REQUEST_BYTES} bytes "
                    "(send it in smaller parts)"
                )
            complete = False
            self._write(cmd, data)
            while True:
                answer = self._read_answer(cmd)
                if "data" in answer and isinstance(answer["data"], dict):
                    yield answer["data"]
                elif answer.get("end") is True:
                    complete = True
                    return
                elif "error" in answer:
                    complete = True
                    raise ControlError(f"{self.where}: {answer['error']}")
                else:
                    raise ControlError(f"{self.where} sent an answer of unknown form: {answer}")
        finally:
            self._lock.release()
            if not complete:
                self.close()

    def call(self, cmd: str, **args: Any) -> Message:
        """Send ``cmd`` and return its only (or last) message."""
        last: Message | None = None
        for message in self.request(cmd, **args):
            last = message
        if last is None:
            raise ControlError(f"{self.where} answered nothing to {cmd!r}")
        return last

    def _write(self, cmd: str, data: bytes) -> None:
        if self._sock is None:
            raise ControlError(f"the connection to {self.where} is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            # The server may have said why it hung up before the write failed.
            answer: Message = {}
            with contextlib.suppress(ControlError):
                answer = self._read_answer(cmd)
            if "error" in answer:
                raise ControlError(f"{self.where}: {answer['error']}") from None
            raise ControlError(f"lost the connection to {self.where}: {e.strerror or e}") from None

    def _read_answer(self, cmd: str) -> Message:
        try:
            line = self._reader.readline(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            raise ControlError(
                f"{self.where} did not answer {cmd!r} within {self.timeout:g}s"
            ) from None
        except OSError as e:
            raise ControlError(f"lost the connection to {self.where}: {e.strerror or e}") from None
        if not line:
            raise ControlError(f"{self.where} closed the connection during {cmd!r}")
        if len(line) > MAX_ANSWER_BYTES:
            raise ControlError(f"{self.where} sent an answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(f"{self.where} sent a line that is not JSON") from None
        if not isinstance(answer, dict):
            raise ControlError(f"{self.where} sent an answer of unknown form: {answer!r}")
        return answer


def ask_pending_uploads(real_mountpoint: str, timeout: float = 2.0) -> tuple[int, int] | None:
    """(blocks, bytes) of write-back uploads the mount at ``real_mountpoint`` still has, or
    None when no mount answers there."""
    try:
        with ControlClient(control_socket_path(real_mountpoint), timeout=timeout) as client:
            pending = client.call("pending")
        return int(pending.get("blocks", 0)), int(pending.get("bytes", 0))
    except (LoftError, OSError, ValueError, TypeError, AttributeError):
        return None


def control_request(
    mountpoint: str, cmd: str, *, timeout: float | None = CLIENT_TIMEOUT_S, **args: Any
) -> Iterator[Message]:
    """Send ``cmd`` with ``args`` to the loftfs mount holding ``mountpoint`` and yield its
    messages. ``ConfigError`` when no live loftfs mount is there, ``ControlError`` when the
    command fails."""
    with ControlClient.for_mount(mountpoint, timeout=timeout) as client:
        yield from client.request(cmd, **args)
