"""Prometheus exposition of a mount's ``Metrics``: the families made at scrape time and the
HTTP endpoint of ``--metrics``. Kept apart from ``loftfs.metrics`` so that a mount imports
prometheus_client (with the HTTP server modules it loads) only when it serves or renders them.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loftfs.errors import ConfigError
from loftfs.metrics import LatencyStats, Metrics, is_counter_key


def new_registry(metrics: Metrics) -> CollectorRegistry:
    """A registry of its own for ``metrics`` (nothing shared through the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MetricsCollector(metrics))
    return registry


class _MetricsCollector(Collector):
    """Turns a ``Metrics`` into Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        if m.info:
            info = GaugeMetricFamily(
                "loftfs_mount_info", "The mount this process serves", labels=sorted(m.info)
            )
            info.add_metric([m.info[k] for k in sorted(m.info)], 1)
            yield info
        yield GaugeMetricFamily(
            "loftfs_uptime_seconds", "Seconds since the mount started", value=m.uptime_s()
        )
        yield from _latency_families(
            m.ops(),
            "op",
            "loftfs_fuse_ops",
            "FUSE requests answered",
            "loftfs_fuse_errors",
            "FUSE requests answered with EIO (POSIX answers such as ENOENT are not errors)",
            "loftfs_fuse_op_seconds",
            "Time to answer a FUSE request",
        )
        yield from _latency_families(
            m.requests(),
            "method",
            "loftfs_object_requests",
            "Object-store requests (each retry is a request)",
            "loftfs_object_errors",
            "Object-store requests that failed",
            "loftfs_object_request_seconds",
            "Time of an object-store request",
        )
        moved = CounterMetricFamily(
            "loftfs_object_bytes",
            "Bytes received by GETs and sent by PUTs, as stored (compressed, encrypted)",
            labels=["direction"],
        )
        for direction, n in sorted(m.bytes_transferred().items()):
            moved.add_metric([direction], n)
        yield moved
        for name, figures in sorted(m.read_sources().items()):
            for key, value in sorted(figures.items()):
                full = f"loftfs_{name}_{key}"
                help_text = f"{key.replace('_', ' ')} of the {name.replace('_', ' ')}"
                if is_counter_key(key):
                    yield CounterMetricFamily(full, help_text, value=value)
                else:
                    yield GaugeMetricFamily(full, help_text, value=value)


def _latency_families(
    table: Iterable[tuple[str, LatencyStats]],
    label: str,
    count_name: str,
    count_help: str,
    errors_name: str,
    errors_help: str,
    hist_name: str,
    hist_help: str,
) -> Iterator[Metric]:
    counts = CounterMetricFamily(count_name, count_help, labels=[label])
    errors = CounterMetricFamily(errors_name, errors_help, labels=[label])
    hist = HistogramMetricFamily(hist_name, hist_help, labels=[label])
    for name, stats in sorted(table):
        count, failed, seconds, buckets = stats.read()
        if not count:
            continue  # hundreds of empty series help nobody
        counts.add_metric([name], count)
        errors.add_metric([name], failed)
        cumulative = stats.cumulative_buckets(buckets)
        hist.add_metric([name], [(floatToGoString(b), n) for b, n in cumulative], seconds)
    yield counts
    yield errors
    yield hist


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_registry(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[int, Callable[[], None]]:
    """Serve ``registry`` at ``http://host:port/metrics`` (other paths answer 404)."""
    app = make_wsgi_app(registry)

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            result: Iterable[bytes] = app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"loftfs serves its metrics at /metrics\n"]

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None

    class Server(ThreadingWSGIServer):
        address_family = family

    try:
        httpd = make_server(host, port, routed, Server, handler_class=_QuietHandler)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    thread = threading.Thread(target=httpd.serve_forever, name="loft-metrics-http", daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_port), stop
