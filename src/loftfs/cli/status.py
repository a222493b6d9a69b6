"""``loft status``: a volume's settings (without secrets), its client sessions and its usage."""

from __future__ import annotations

import socket
import time
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from loftfs.cli.common import (
    STALE_AFTER_S,
    cell,
    format_age,
    kv_table,
    open_volume,
    print_json,
    public_extra,
    redact_url,
    session_age_s,
    stdout_console,
)
from loftfs.meta.types import SessionInfo, VolumeSettings
from loftfs.object.encrypt import describe_record, public_record
from loftfs.utils import format_size


def settings_dict(settings: VolumeSettings) -> dict[str, Any]:
    """Settings safe to print: secrets in ``extra`` are masked, URLs lose their passwords."""
    return {
        "name": settings.name,
        "uuid": settings.uuid,
        "storage": settings.storage,
        "bucket": redact_url(settings.bucket),
        "storage_options": public_extra(settings.storage_options),  # keys masked
        "block_size": settings.block_size,
        "compress": settings.compress,
        "encryption": public_record(settings.encryption),  # no salt, no wrapped key
        "capacity": settings.capacity,
        "inodes": settings.inodes,
        "trash_days": settings.trash_days,
        "created_ns": settings.created_ns,
        "version": settings.version,
        "extra": public_extra(settings.extra),
    }


def local_pending_uploads(session: SessionInfo) -> int | None:
    """Write-back blocks a mount on this machine has not uploaded yet, asked over its control
    socket; None for mounts elsewhere or not answering."""
    from loftfs.control import ask_pending_uploads

    mountpoint = session.info.get("mountpoint")
    if not mountpoint or session.info.get("host") != socket.gethostname():
        return None
    pending = ask_pending_uploads(str(mountpoint))
    return None if pending is None else pending[0]


def session_dict(session: SessionInfo, now_ns: int) -> dict[str, Any]:
    age = session_age_s(session, now_ns)
    return {
        "sid": session.sid,
        "host": session.info.get("host") or session.info.get("hostname") or "",
        "pid": session.info.get("pid"),
        "mountpoint": session.info.get("mountpoint") or "",
        "heartbeat_ns": session.heartbeat_ns,
        "heartbeat_age_s": round(age, 3),
        "stale": age > STALE_AFTER_S,
        "pending_uploads": None if age > STALE_AFTER_S else local_pending_uploads(session),
        "info": public_extra(session.info),
    }


def status_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Show a volume's settings, client sessions and usage."""
    with open_volume(meta_url) as (meta, settings):
        sessions = meta.list_sessions()
        used_bytes, used_inodes = meta.usage()
    now = time.time_ns()
    data: dict[str, Any] = {
        "meta": redact_url(meta_url),
        "settings": settings_dict(settings),
        "sessions": [session_dict(s, now) for s in sessions],
        "usage": {
            "bytes": used_bytes,
            "inodes": used_inodes,
            "capacity": settings.capacity,
            "inode_quota": settings.inodes,
        },
    }
    if as_json:
        print_json(data)
        return
    console = stdout_console()
    s = settings
    console.print(
        kv_table(
            "Volume",
            [
                ("name", s.name),
                ("uuid", s.uuid),
                ("metadata", redact_url(meta_url)),
                ("storage", f"{s.storage} {redact_url(s.bucket)}"),
                *[(f"storage.{k}", v) for k, v in public_extra(s.storage_options).items()],
                ("block size", format_size(s.block_size)),
                ("compression", s.compress),
                ("encryption", describe_record(s.encryption)),
                ("trash days", s.trash_days or "off"),
                *[(f"extra.{k}", v) for k, v in public_extra(s.extra).items()],
            ],
        )
    )
    console.print()
    console.print(
        kv_table(
            "Usage",
            [
                ("space", _with_quota(format_size(used_bytes), used_bytes, s.capacity, True)),
                ("inodes", _with_quota(str(used_inodes), used_inodes, s.inodes, False)),
            ],
        )
    )
    console.print()
    console.print(_sessions_table(data["sessions"]))


def _with_quota(shown: str, used: int, quota: int, is_size: bool) -> str:
    if not quota:
        return f"{shown} (no quota)"
    limit = format_size(quota) if is_size else str(quota)
    return f"{shown} of {limit} ({100.0 * used / quota:.1f}%)"


def _sessions_table(sessions: list[dict[str, Any]]) -> Table:
    table = Table(title=f"Sessions ({len(sessions)})", title_justify="left")
    for column in ("sid", "host", "pid", "mountpoint", "heartbeat", "state", "pending uploads"):
        table.add_column(column)
    for s in sessions:
        table.add_row(
            cell(s["sid"]),
            cell(s["host"]),
            cell("" if s["pid"] is None else s["pid"]),
            cell(s["mountpoint"]),
            cell(f"{format_age(s['heartbeat_age_s'])} ago"),
            Text("stale", style="red") if s["stale"] else Text("live"),
            cell("" if s["pending_uploads"] is None else f"{s['pending_uploads']} blocks"),
        )
    return table
