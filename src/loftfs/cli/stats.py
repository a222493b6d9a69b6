"""``loft stats``: what a live mount is doing, refreshed every interval: FUSE requests per
second with their mean latency, object-store requests and throughput, caches, memory buffer
and pending uploads.

The figures come from the mount process over its control socket (``loftfs.control``), as
totals since the mount started; rates are differences between two samples. The first table
shows averages since the mount started.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loftfs.cli.common import format_age, print_json, stdout_console
from loftfs.control import ControlClient
from loftfs.errors import ConfigError
from loftfs.metrics import is_counter_key
from loftfs.utils import format_size

Snapshot = dict[str, Any]
MAX_OP_ROWS = 15
MIB = 1 << 20


def open_client(path: str) -> ControlClient:
    """A control client for ``path``: a mountpoint, any path inside a mount, or the mount's
    control socket itself (reachable where the mount is not, e.g. from another container)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file or directory") from None
    if stat.S_ISSOCK(st.st_mode):
        return ControlClient(path)
    return ControlClient.for_mount(path)


def _delta(cur: dict[str, Any], prev: dict[str, Any] | None, key: str) -> float:
    now = float(cur.get(key, 0) or 0)
    before = float(prev.get(key, 0) or 0) if prev else 0.0
    return max(0.0, now - before)


def _window(prev: Snapshot | None, cur: Snapshot) -> float:
    if prev is None:
        return max(float(cur.get("uptime_s", 0.0)), 1e-9)
    return max(float(cur["time"]) - float(prev["time"]), 1e-9)


def _rate(n: float) -> str:
    if n == 0:
        return "0"
    if n < 10:
        return f"{n:.2f}"
    return f"{n:,.0f}"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fuse_table(prev: Snapshot | None, cur: Snapshot) -> Table:
    """One row per FUSE request type active in the window, busiest first."""
    dt = _window(prev, cur)
    before = (prev or {}).get("fuse", {})
    rows = []
    for op, figures in cur.get("fuse", {}).items():
        old = before.get(op)
        n = _delta(figures, old, "count")
        if n:
            seconds = _delta(figures, old, "seconds")
            rows.append((n, op, seconds / n, _delta(figures, old, "errors")))
    rows.sort(key=lambda r: (-r[0], r[1]))
    table = Table(title="FUSE requests", title_justify="left")
    table.add_column("op")
    table.add_column("ops/s", justify="right")
    table.add_column("mean latency", justify="right")
    table.add_column("errors/s", justify="right")
    for n, op, mean, errors in rows[:MAX_OP_ROWS]:
        table.add_row(
            op,
            _rate(n / dt),
            _latency(mean),
            Text(_rate(errors / dt), style="red") if errors else Text("0"),
        )
    if len(rows) > MAX_OP_ROWS:
        rest = sum(r[0] for r in rows[MAX_OP_ROWS:])
        table.add_row(f"({len(rows) - MAX_OP_ROWS} more)", _rate(rest / dt), "", "")
    if not rows:
        table.add_row(Text("idle", style="dim"), "0", "-", "0")
    return table


def object_table(prev: Snapshot | None, cur: Snapshot) -> Table:
    """Requests per second, mean latency and throughput of the object store."""
    dt = _window(prev, cur)
    obj, old_obj = cur.get("object", {}), (prev or {}).get("object", {})
    requests, old_requests = obj.get("requests", {}), old_obj.get("requests", {})
    moved, old_moved = obj.get("bytes", {}), old_obj.get("bytes", {})
    table = Table(title="Object store", title_justify="left")
    table.add_column("request")
    table.add_column("req/s", justify="right")
    table.add_column("mean latency", justify="right")
    table.add_column("MiB/s", justify="right")
    table.add_column("errors/s", justify="right")
    for method in sorted(requests, key=lambda m: (m not in ("get", "put"), m)):
        figures, old = requests[method], old_requests.get(method)
        n = _delta(figures, old, "count")
        errors = _delta(figures, old, "errors")
        mean = _delta(figures, old, "seconds") / n if n else None
        throughput = ""
        if method in moved:
            throughput = f"{_delta(moved, old_moved, method) / MIB / dt:.1f}"
        table.add_row(
            method.upper(),
            _rate(n / dt),
            _latency(mean),
            throughput,
            Text(_rate(errors / dt), style="red") if errors else Text("0"),
        )
    if not requests:
        table.add_row(Text("none yet", style="dim"), "0", "-", "", "0")
    return table


def _figure(key: str, value: float) -> str:
    if key.endswith("_bytes") or key in ("bytes", "capacity"):
        return format_size(value)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def source_table(name: str, prev: Snapshot | None, cur: Snapshot) -> Table:
    """The figures of one data-path source: growing counters as totals and rates, the hit
    ratio in the window when the source counts hits and misses, the rest as they are."""
    dt = _window(prev, cur)
    figures = cur.get("sources", {}).get(name, {})
    old = (prev or {}).get("sources", {}).get(name)
    table = Table(title=name.replace("_", " ").capitalize(), title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("per second", justify="right")
    if "hits" in figures and "misses" in figures:
        hits, misses = _delta(figures, old, "hits"), _delta(figures, old, "misses")
        ratio = f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "-"
        table.add_row("hit ratio", ratio, "")
    used, total = figures.get("used_bytes"), figures.get("total_bytes")
    if used is not None and total:
        table.add_row("used", f"{format_size(used)} of {format_size(total)}", "")
    for key in sorted(figures):
        if used is not None and total and key in ("used_bytes", "total_bytes"):
            continue
        value = figures[key]
        per_second = ""
        if is_counter_key(key):
            rate = _delta(figures, old, key) / dt
            per_second = f"{format_size(rate)}/s" if key.endswith("_bytes") else _rate(rate)
        table.add_row(key.replace("_", " "), _figure(key, value), per_second)
    return table


#: Sources shown first, in this order; any other source follows by name.
SOURCE_ORDER = ("mem_cache", "disk_cache", "buffer", "writeback")


def render_stats(prev: Snapshot | None, cur: Snapshot, where: str) -> RenderableType:
    """Everything ``loft stats`` shows for one sample."""
    info = cur.get("info", {})
    volume = info.get("volume")
    window = (
        "averages since the mount started"
        if prev is None
        else f"rates over the last {_window(prev, cur):.1f}s"
    )
    header = Text.assemble(
        ("loftfs ", "bold"),
        where,
        f" (volume {volume})" if volume else "",
        f"\nup {format_age(float(cur.get('uptime_s', 0.0)))}, {window}",
    )
    sources = cur.get("sources", {})
    names = [n for n in SOURCE_ORDER if n in sources]
    names += sorted(n for n in sources if n not in SOURCE_ORDER)
    # Side by side where the terminal is wide enough: the whole view should fit one screen.
    return Group(
        header,
        Columns([fuse_table(prev, cur), object_table(prev, cur)], padding=(0, 2)),
        Columns([source_table(name, prev, cur) for name in names], padding=(0, 2)),
    )


def stats_cmd(
    path: Annotated[
        str,
        typer.Argument(
            metavar="MOUNTPOINT",
            help="The mountpoint, a path inside the mount, or the mount's control socket",
        ),
    ],
    interval: Annotated[
        float, typer.Option("--interval", "-i", help="Seconds between refreshes")
    ] = 1.0,
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Stop after this many refreshes")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one snapshot as JSON (totals) and exit")
    ] = False,
) -> None:
    """Show what a mount is doing: requests, latency, throughput, caches, uploads."""
    if not interval > 0:
        raise ConfigError(f"--interval must be more than 0, not {interval}")
    if count is not None and count < 1:
        raise ConfigError(f"--count must be 1 or more, not {count}")
    with open_client(path) as client:
        if as_json:
            print_json(client.call("stats"))
            return
        where = str(path)
        console = stdout_console()
        prev: Snapshot | None = None
        shown = 0
        next_at = time.monotonic()
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        try:
            if live is not None:
                live.start()
            while count is None or shown < count:
                cur = client.call("stats")
                view = render_stats(prev, cur, where)
                if live is not None:
                    live.update(view, refresh=True)
                else:  # a pipe or a file: one block per sample, like vmstat
                    if shown:
                        console.print()
                    console.print(view)
                prev = cur
                shown += 1
                if count is not None and shown >= count:
                    break
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        except KeyboardInterrupt:
            pass  # the normal way to leave a running display
        finally:
            if live is not None:
                live.stop()
