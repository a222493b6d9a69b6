"""Metrics of one mount: FUSE requests, object-store requests, and the state of the data path
(caches, memory buffer, uploads), for Prometheus (``loft mount --metrics HOST:PORT``) and for
``loft stats`` (``Metrics.snapshot()`` over the control socket).

Each mount owns its ``CollectorRegistry``: one process may serve several mounts, and nothing
leaks between them through prometheus_client's global registry.

Every FUSE request is recorded, so recording must cost little next to the request itself. A
prometheus_client ``Counter`` plus ``Histogram`` costs about 1.2 us per request (a lock per
value, a linear scan of the buckets); ``LatencyStats`` keeps the same figures behind one lock
with a binary search of the bounds, about 0.3 us, and turns them into Prometheus families only
when scraped.

The data path publishes its own figures through sources: ``register_source("mem_cache", fn)``
where ``fn()`` returns ``{"hits": .., "used_bytes": ..}``. They are read at scrape time, so the
data path keeps counting in its own structures and never calls into this module on its hot
path.
"""

from __future__ import annotations

import bisect
import errno
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from loftfs.errors import ConfigError, FSError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Upper bounds of the FUSE latency histogram: a cached getattr answers in tens of
#: microseconds, a read that waits for the object store in seconds.
FUSE_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds of the object-request histogram: a local directory answers in a millisecond,
#: a large PUT to a remote store may take tens of seconds.
OBJECT_BUCKETS = (
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: The requests of the FUSE low-level table, recorded from the start so that the hot path never
#: creates an entry (other names are created on first use).
FUSE_OPS = (
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink",
    "rename", "link", "open", "read", "write", "flush", "release", "fsync", "opendir",
    "readdir", "readdirplus", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr",
    "listxattr", "removexattr", "access", "create", "getlk", "setlk", "flock", "fallocate",
    "copy_file_range", "lseek",
)  # fmt: skip
OBJECT_METHODS = ("get", "put", "head", "delete", "delete_many", "list")

#: Keys of a source that only ever grow: exposed as Prometheus counters (``..._total``). So is
#: any key that ends in ``_total``; every other key is a gauge.
COUNTER_KEYS = frozenset(
    {
        "hits",
        "misses",
        "evictions",
        "errors",
        "fetched_blocks",
        "fetched_bytes",
        "uploaded_blocks",
        "uploaded_bytes",
        "failed_uploads",
    }
)

Source = Callable[[], Mapping[str, int | float]]
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def is_counter_key(key: str) -> bool:
    """Whether a source's ``key`` only grows (a counter) rather than goes up and down."""
    return key in COUNTER_KEYS or key.endswith("_total")


def is_failure(exc: BaseException) -> bool:
    """Whether a request that raised ``exc`` failed, as opposed to got a POSIX answer.

    ENOENT, EEXIST, EACCES, ENOSPC... are the file system's answers to what was asked; EIO (and
    anything that is not an ``FSError``: the FUSE layer answers it with EIO) means loftfs, its
    metadata engine or its object store failed. Only those are counted as errors.
    """
    return not isinstance(exc, FSError) or exc.errno in (0, errno.EIO)


class LatencyStats:
    """Count, failures, total seconds and latency histogram of one kind of request.

    ``observe`` is called from many threads at once; one lock keeps the figures consistent
    with each other (the count always equals the sum of the buckets).
    """

    __slots__ = ("_bounds", "_buckets", "_lock", "count", "errors", "seconds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._lock = threading.Lock()
        self.count = 0
        self.errors = 0
        self.seconds = 0.0

    def observe(self, seconds: float, failed: bool = False) -> None:
        i = bisect.bisect_left(self._bounds, seconds)  # Prometheus buckets are "<= bound"
        with self._lock:
            self._buckets[i] += 1
            self.count += 1
            self.seconds += seconds
            if failed:
                self.errors += 1

    def read(self) -> tuple[int, int, float, list[int]]:
        """(count, errors, seconds, per-bucket counts) at one instant."""
        with self._lock:
            return self.count, self.errors, self.seconds, list(self._buckets)

    def cumulative_buckets(self, buckets: list[int]) -> list[tuple[float, int]]:
        """(upper bound, count up to it) of each bucket, ``+Inf`` last."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self._bounds, float("inf")), buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """Every figure of one mount, with its own Prometheus registry.

    ``info`` (volume name, mountpoint...) becomes the labels of ``loftfs_mount_info`` and the
    ``info`` of the snapshot, so that scrapes of several mounts can be told apart.
    """

    def __init__(self, info: Mapping[str, str] | None = None) -> None:
        self.info = {str(k): str(v) for k, v in (info or {}).items()}
        for key in self.info:
            if not _NAME.match(key):
                raise ValueError(f"bad info label {key!r}: use lowercase letters, digits and _")
        self.started = time.time()
        self._started_mono = time.monotonic()
        self._lock = threading.Lock()
        self._ops: dict[str, LatencyStats] = {op: LatencyStats(FUSE_BUCKETS) for op in FUSE_OPS}
        self._requests: dict[str, LatencyStats] = {
            m: LatencyStats(OBJECT_BUCKETS) for m in OBJECT_METHODS
        }
        self._bytes = {"get": 0, "put": 0}
        self._sources: dict[str, Source] = {}
        self._failing_sources: set[str] = set()
        self._registry: CollectorRegistry | None = None

    # --- recording ---------------------------------------------------------------------------

    def _stats(
        self, table: dict[str, LatencyStats], name: str, bounds: tuple[float, ...]
    ) -> LatencyStats:
        stats = table.get(name)
        if stats is None:
            with self._lock:
                stats = table.setdefault(name, LatencyStats(bounds))
        return stats

    def op_observer(self, op: str) -> Callable[[float, bool], None]:
        """The recorder of one FUSE request type, bound once: ``observer(seconds, failed)``."""
        return self._stats(self._ops, op, FUSE_BUCKETS).observe

    def observe_op(self, op: str, seconds: float, failed: bool = False) -> None:
        """Record one FUSE request: its type, how long it took, whether it failed
        (``is_failure``)."""
        stats = self._ops.get(op)
        if stats is None:
            stats = self._stats(self._ops, op, FUSE_BUCKETS)
        stats.observe(seconds, failed)

    def observe_request(
        self, method: str, seconds: float, failed: bool = False, nbytes: int = 0
    ) -> None:
        """Record one object-store request; ``nbytes`` received by a ``get`` or sent by a
        ``put``."""
        stats = self._requests.get(method)
        if stats is None:
            stats = self._stats(self._requests, method, OBJECT_BUCKETS)
        stats.observe(seconds, failed)
        if nbytes and method in self._bytes:
            with self._lock:
                self._bytes[method] += nbytes

    def register_source(self, name: str, fn: Source) -> None:
        """Publish the figures ``fn()`` returns as ``loftfs_<name>_<key>``: counters for the
        keys ``is_counter_key`` names, gauges for the rest. ``fn`` is called at each scrape and
        snapshot, from another thread: it must be cheap and thread-safe. Registering a name
        again replaces its function."""
        if not _NAME.match(name):
            raise ValueError(f"bad source name {name!r}: use lowercase letters, digits and _")
        with self._lock:
            self._sources[name] = fn
            self._failing_sources.discard(name)

    def unregister_source(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    # --- reading -----------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def requests_served(self) -> int:
        """FUSE requests recorded so far, of every type (the mount's foreground activity)."""
        return sum(stats.count for stats in list(self._ops.values()))

    def ops(self) -> Iterator[tuple[str, LatencyStats]]:
        with self._lock:
            items = list(self._ops.items())
        return iter(items)

    def requests(self) -> Iterator[tuple[str, LatencyStats]]:
        with self._lock:
            items = list(self._requests.items())
        return iter(items)

    def bytes_transferred(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def read_sources(self) -> dict[str, dict[str, int | float]]:
        """The current figures of every source; a source that fails is left out (and logged
        once, until it works again), so one broken callback never breaks a scrape."""
        with self._lock:
            sources = list(self._sources.items())
        out: dict[str, dict[str, int | float]] = {}
        for name, fn in sources:
            try:
                figures = fn()
            except Exception:
                if name not in self._failing_sources:
                    self._failing_sources.add(name)
                    log.warning("metrics source %s failed", name, exc_info=True)
                continue
            self._failing_sources.discard(name)
            values: dict[str, int | float] = {}
            for key, value in figures.items():
                if isinstance(key, str) and _NAME.match(key) and isinstance(value, int | float):
                    values[key] = value
            out[name] = values
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything as plain JSON-able data (what ``loft stats`` shows): per FUSE request
        type and per object-store method the request count, failures and total seconds (only
        those seen at least once), bytes moved, and the figures of every source."""
        fuse: dict[str, dict[str, float]] = {}
        for op, stats in self.ops():
            count, errors, seconds, _ = stats.read()
            if count:
                fuse[op] = {"count": count, "errors": errors, "seconds": seconds}
        requests: dict[str, dict[str, float]] = {}
        for method, stats in self.requests():
            count, errors, seconds, _ = stats.read()
            if count:
                requests[method] = {"count": count, "errors": errors, "seconds": seconds}
        return {
            "time": time.time(),
            "uptime_s": self.uptime_s(),
            "info": dict(self.info),
            "fuse": fuse,
            "object": {"requests": requests, "bytes": self.bytes_transferred()},
            "sources": self.read_sources(),
        }

    @property
    def registry(self) -> CollectorRegistry:
        """This mount's Prometheus registry, made on first use: prometheus_client (and the
        HTTP server modules it loads, about 14 MiB resident) is imported only by a mount that
        serves ``--metrics`` or renders its figures."""
        from loftfs.metrics_export import new_registry

        with self._lock:
            if self._registry is None:
                self._registry = new_registry(self)
            return self._registry

    def render(self) -> bytes:
        """The Prometheus text exposition of this mount."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # --- HTTP endpoint -----------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; port 0 picks a free one.
        Returns the port and a function that stops the server. ``ConfigError`` when the
        address cannot be used (taken, unknown host)."""
        from loftfs.metrics_export import serve_registry

        return serve_registry(self.registry, host, port)


def parse_listen_address(text: str) -> tuple[str, int]:
    """(host, port) of ``--metrics``: ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` (every
    interface) or ``PORT`` (127.0.0.1). Port 0 picks a free port. ``ConfigError`` otherwise."""
    s = text.strip()
    hint = "expected HOST:PORT, e.g. 127.0.0.1:9567"

    def bad(why: str) -> ConfigError:
        return ConfigError(f"bad listen address {text!r}: {why} ({hint})")

    if not s:
        raise bad("empty")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not host:
            raise bad("unclosed or empty [IPv6] address")
        if not rest.startswith(":"):
            raise bad("missing :PORT after the IPv6 address")
        port_text = rest[1:]
    elif ":" not in s:
        host, port_text = "127.0.0.1", s
    elif s.count(":") > 1:
        raise bad("write an IPv6 address in brackets, e.g. [::1]:9567")
    else:
        host, _, port_text = s.partition(":")
        host = host or "0.0.0.0"
    if not port_text.isdigit():
        raise bad(f"port {port_text!r} is not a number" if port_text else "missing port")
    port = int(port_text)
    if port > 65535:
        raise bad(f"port {port} is out of range (0-65535)")
    if any(c.isspace() for c in host):
        raise bad("spaces in the host")
    return host, port
