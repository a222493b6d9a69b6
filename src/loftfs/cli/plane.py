"""``loft serve`` and ``loft plane bootstrap`` (the control plane itself), and the commands that
talk to it over its API: ``loft tenant``, ``volume``, ``token``, ``nodegroup`` and ``audit``.

Every client command takes ``--control URL`` (or ``LOFT_CONTROL_URL``), ``--token`` (or
``LOFT_TOKEN``, which no process list shows), ``--ca-file`` for a private CA and ``--json``.
Errors of the API arrive as the server's one sentence (``loft: error: tenant 'x' not found``).
Tokens are printed once, by ``token create`` and ``plane bootstrap``, and nowhere else.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loftfs.cli.common import (
    cell,
    confirm,
    kv_table,
    non_negative,
    plural,
    print_json,
    print_table,
    say,
    stderr_console,
    stdout_console,
)
from loftfs.errors import ConfigError, LoftError
from loftfs.plane import ENV_CONTROL_URL, ENV_TOKEN
from loftfs.plane.config import parse_duration
from loftfs.utils import format_size, parse_size

if TYPE_CHECKING:
    from loftfs.plane.client import PlaneClient

_CONTEXT = {"help_option_names": ["-h", "--help"]}

tenant_app = typer.Typer(
    help="Tenants of the control plane (operator).", no_args_is_help=True, context_settings=_CONTEXT
)
volume_app = typer.Typer(
    help="Volumes of a tenant, created end to end by the control plane.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)
token_app = typer.Typer(
    help="API tokens: operator, tenant-admin and mount tokens.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)
nodegroup_app = typer.Typer(
    help="Node groups: which nodes mount which volumes where (operator).",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)
plane_app = typer.Typer(
    help="Administration of the control plane's own database.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)

COMPRESSIONS = ("none", "lz4", "zstd")
TOKEN_KINDS = ("operator", "tenant-admin", "mount")
_PIPE_WIDTH = 4096  # listings written to a pipe or file: wide enough never to cut a cell

ControlOpt = Annotated[
    str | None,
    typer.Option(
        "--control",
        metavar="URL",
        help=f"Control plane URL, http(s)://HOST:PORT (default: ${ENV_CONTROL_URL})",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="TOKEN",
        help=f"API token (default: ${ENV_TOKEN}; prefer it, no process list shows it)",
    ),
]
CaFileOpt = Annotated[
    str | None,
    typer.Option("--ca-file", metavar="FILE", help="PEM CA that signed the server's certificate"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON")]
TenantArg = Annotated[str, typer.Argument(metavar="TENANT", help="Tenant name")]
VolumeRefArg = Annotated[
    str, typer.Argument(metavar="TENANT/NAME", help="The volume, as tenant/volume")
]
ConfigFileOpt = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE", help="Server configuration (TOML)"),
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database", metavar="URL", help="sqlite:///PATH or postgresql://USER:PW@HOST:PORT/DB"
    ),
]
StateDirOpt = Annotated[
    str | None,
    typer.Option("--state-dir", metavar="DIR", help="Directory of the plane's state"),
]


# --- helpers ---------------------------------------------------------------------------------


def _client(control: str | None, token: str | None, ca_file: str | None) -> PlaneClient:
    from loftfs.plane.client import connect  # httpx: imported by the commands that use it

    return connect(control, token, ca_file=ca_file)


def split_volume_ref(ref: str) -> tuple[str, str]:
    """``TENANT/NAME`` as its two parts; anything else is a ``ConfigError``."""
    tenant, sep, name = ref.strip().partition("/")
    if not sep or not tenant or not name or "/" in name:
        raise ConfigError(f"expected the volume as TENANT/NAME, not {ref!r}")
    return tenant, name


def _size_option(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        value = parse_size(text.strip())
    except ConfigError as e:
        raise ConfigError(f"{option}: {e}") from None
    return non_negative(value, option)


def _count_option(value: int | None, option: str) -> int | None:
    return None if value is None else non_negative(value, option)


def _when(value: Any) -> str:
    """An API timestamp for a table: ``2024-05-01 12:00:00`` (UTC), ``-`` for none."""
    if not value:
        return "-"
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if at.tzinfo is not None:
        at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S")


def _limit(value: int, fmt: Callable[[int], object] = str) -> str:
    return "unlimited" if not value else str(fmt(value))


def _table(title: str, *columns: str, whole: tuple[str, ...] = ()) -> Table:
    """A listing; the ``whole`` columns (ids, names) are never wrapped or cut: a narrow
    terminal wraps the others first."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column in whole)
    return table


def _print_listing(table: Table) -> None:
    """Print a listing. On a terminal the columns kept whole are as wide as their longest cell
    (others wrap first); into a pipe or file nothing is wrapped or cut, so ids can be grepped."""
    for column in table.columns:
        if column.no_wrap:
            widths = [len(str(c)) for c in column.cells] + [len(str(column.header))]
            column.min_width = max(widths)
    console = stdout_console()
    if not console.is_terminal:
        console = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=_PIPE_WIDTH)
    console.print(table)


def _result(as_json: bool, data: Any, message: str) -> None:
    """A command's outcome: ``data`` as JSON with ``--json``, else the one-line ``message``."""
    if as_json:
        print_json(data)
    else:
        say(message)


def _note(message: str) -> None:
    """A message for the person at the terminal (stderr): stdout stays the command's result."""
    stderr_console().print(message, markup=False, soft_wrap=True)


# --- tenants ---------------------------------------------------------------------------------


def _tenant_rows(tenant: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("name", tenant["name"]),
        ("display name", tenant.get("display_name") or "-"),
        ("id", tenant["id"]),
        ("state", tenant["state"]),
        ("volumes", tenant.get("volumes", 0)),
        ("created", _when(tenant.get("created_at"))),
    ]


def _show_tenant(tenant: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(tenant)
    else:
        print_table(kv_table(f"Tenant {tenant['name']}", _tenant_rows(tenant)))


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="3-63 of a-z, 0-9 and -")],
    display_name: Annotated[
        str | None, typer.Option("--display-name", metavar="TEXT", help="A longer name for people")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant."""
    with _client(control, token, ca_file) as client:
        tenant = client.create_tenant(name, display_name)
    _result(as_json, tenant, f"Tenant '{tenant['name']}' created")


@tenant_app.command("ls")
def tenant_ls(
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the tenants."""
    with _client(control, token, ca_file) as client:
        tenants = client.list_tenants()
    if as_json:
        print_json(tenants)
        return
    table = _table(
        f"Tenants ({len(tenants)})",
        "NAME",
        "DISPLAY NAME",
        "STATE",
        "VOLUMES",
        "CREATED",
        whole=("NAME",),
    )
    for t in tenants:
        table.add_row(
            cell(t["name"]),
            cell(t.get("display_name") or "-"),
            cell(t["state"]),
            cell(t.get("volumes", 0)),
            cell(_when(t.get("created_at"))),
        )
    _print_listing(table)


@tenant_app.command("show")
def tenant_show(
    name: TenantArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one tenant."""
    with _client(control, token, ca_file) as client:
        _show_tenant(client.get_tenant(name), as_json)


@tenant_app.command("suspend")
def tenant_suspend(
    name: TenantArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Suspend a tenant: its tokens are refused until it is resumed."""
    with _client(control, token, ca_file) as client:
        tenant = client.suspend_tenant(name)
    _result(
        as_json,
        tenant,
        f"Tenant '{tenant['name']}' suspended: its tokens are refused until it is resumed",
    )


@tenant_app.command("resume")
def tenant_resume(
    name: TenantArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume a suspended tenant."""
    with _client(control, token, ca_file) as client:
        tenant = client.resume_tenant(name)
    _result(as_json, tenant, f"Tenant '{tenant['name']}' resumed")


@tenant_app.command("rm")
def tenant_rm(
    name: TenantArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a tenant that has no volumes left (deleted ones still in their grace count)."""
    with _client(control, token, ca_file) as client:
        client.delete_tenant(name)
    _result(as_json, {"tenant": name, "deleted": True}, f"Tenant '{name}' deleted")


# --- volumes ---------------------------------------------------------------------------------


def _volume_rows(v: dict[str, Any]) -> list[tuple[str, Any]]:
    usage = v.get("usage") or {}
    rows: list[tuple[str, Any]] = [
        ("name", f"{v['tenant']}/{v['name']}"),
        ("id", v["id"]),
        ("uuid", v.get("uuid") or "-"),
        ("engine", v["engine"]),
        ("state", v["state"]),
    ]
    if v.get("delete_after"):
        rows.append(("destroyed after", _when(v["delete_after"])))
    rows += [
        ("capacity", _limit(v.get("capacity", 0), format_size)),
        ("inodes limit", _limit(v.get("inodes", 0))),
        ("block size", format_size(v.get("block_size", 0))),
        ("compress", v.get("compress", "none")),
        ("trash days", v.get("trash_days", 0)),
        ("created", _when(v.get("created_at"))),
        ("used", format_size(usage.get("bytes", 0))),
        ("inodes used", usage.get("inodes", 0)),
        ("objects", usage.get("objects", 0)),
        ("usage refreshed", _when(usage.get("refreshed_at"))),
    ]
    return rows


@volume_app.command("create")
def volume_create(
    ref: VolumeRefArg,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine", metavar="ENGINE", help="sqlite, redis or postgres (default: the server's)"
        ),
    ] = None,
    capacity: Annotated[
        str | None, typer.Option("--capacity", metavar="SIZE", help="Quota, e.g. 10G (0: none)")
    ] = None,
    inodes: Annotated[
        int | None, typer.Option("--inodes", metavar="N", help="Most files (0: no limit)")
    ] = None,
    block_size: Annotated[
        str | None, typer.Option("--block-size", metavar="SIZE", help="Block size, e.g. 4M")
    ] = None,
    compress: Annotated[
        str | None, typer.Option("--compress", metavar="ALGO", help="none, lz4 or zstd")
    ] = None,
    trash_days: Annotated[
        int | None, typer.Option("--trash-days", metavar="N", help="Days deleted files are kept")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a volume: storage, metadata namespace, credentials, key and format."""
    tenant, name = split_volume_ref(ref)
    if compress is not None and compress not in COMPRESSIONS:
        raise ConfigError(f"--compress must be one of {', '.join(COMPRESSIONS)}, not {compress!r}")
    capacity_bytes = _size_option(capacity, "--capacity")
    block_bytes = _size_option(block_size, "--block-size")
    inode_limit = _count_option(inodes, "--inodes")
    trash = _count_option(trash_days, "--trash-days")
    with _client(control, token, ca_file) as client:
        volume = client.create_volume(
            tenant,
            name,
            engine=engine,
            capacity=capacity_bytes,
            inodes=inode_limit,
            block_size=block_bytes,
            compress=compress,
            trash_days=trash,
        )
    if as_json:
        print_json(volume)
    else:
        say(
            f"Volume '{volume['tenant']}/{volume['name']}' created ({volume['engine']}, "
            f"uuid {volume.get('uuid') or '-'}, capacity "
            f"{_limit(volume.get('capacity', 0), format_size)})"
        )


@volume_app.command("ls")
def volume_ls(
    tenant: TenantArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the volumes of a tenant, deleted ones still in their grace included."""
    with _client(control, token, ca_file) as client:
        volumes = client.list_volumes(tenant)
    if as_json:
        print_json(volumes)
        return
    table = _table(
        f"Volumes of {tenant} ({len(volumes)})",
        "NAME",
        "ENGINE",
        "STATE",
        "CAPACITY",
        "USED",
        "INODES",
        "CREATED",
        whole=("NAME",),
    )
    for v in volumes:
        usage = v.get("usage") or {}
        state = v["state"]
        if v.get("delete_after"):
            state += f" (until {_when(v['delete_after'])})"
        table.add_row(
            cell(v["name"]),
            cell(v["engine"]),
            cell(state),
            cell(_limit(v.get("capacity", 0), format_size)),
            cell(format_size(usage.get("bytes", 0))),
            cell(f"{usage.get('inodes', 0)} / {_limit(v.get('inodes', 0))}"),
            cell(_when(v.get("created_at"))),
        )
    _print_listing(table)


@volume_app.command("show")
def volume_show(
    ref: VolumeRefArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one volume: settings, quotas, usage."""
    tenant, name = split_volume_ref(ref)
    with _client(control, token, ca_file) as client:
        volume = client.get_volume(tenant, name)
    if as_json:
        print_json(volume)
    else:
        print_table(kv_table(f"Volume {tenant}/{name}", _volume_rows(volume)))


@volume_app.command("set")
def volume_set(
    ref: VolumeRefArg,
    capacity: Annotated[
        str | None, typer.Option("--capacity", metavar="SIZE", help="Quota, e.g. 10G (0: none)")
    ] = None,
    inodes: Annotated[
        int | None, typer.Option("--inodes", metavar="N", help="Most files (0: no limit)")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the quotas of a volume; applied to the volume at once."""
    tenant, name = split_volume_ref(ref)
    new_capacity = _size_option(capacity, "--capacity")
    new_inodes = _count_option(inodes, "--inodes")
    if new_capacity is None and new_inodes is None:
        raise ConfigError("nothing to change: give --capacity and/or --inodes")
    with _client(control, token, ca_file) as client:
        volume = client.update_volume(tenant, name, capacity=new_capacity, inodes=new_inodes)
    if as_json:
        print_json(volume)
    else:
        say(
            f"Volume '{tenant}/{name}': capacity "
            f"{_limit(volume.get('capacity', 0), format_size)}, inodes "
            f"{_limit(volume.get('inodes', 0))}"
        )


@volume_app.command("rm")
def volume_rm(
    ref: VolumeRefArg,
    purge: Annotated[
        bool,
        typer.Option("--purge", help="Destroy data and metadata now, no grace (operators)"),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a volume. Its data is destroyed after the server's grace period; until then
    'loft volume restore' brings it back."""
    tenant, name = split_volume_ref(ref)
    with _client(control, token, ca_file) as client:
        when = "now, for good" if purge else "once the control plane's grace period has passed"
        if not yes and not confirm(
            f"Delete volume '{tenant}/{name}'? Its data and metadata are destroyed {when}."
        ):
            raise LoftError("aborted: nothing was deleted (--yes skips the question)")
        volume = client.delete_volume(tenant, name, purge=purge)
    if as_json:
        print_json(volume)
    elif purge:
        say(f"Volume '{tenant}/{name}' destroyed")
    elif volume.get("delete_after"):
        say(
            f"Volume '{tenant}/{name}' deleted: its data is destroyed after "
            f"{_when(volume['delete_after'])} UTC unless 'loft volume restore {tenant}/{name}' "
            "brings it back first"
        )
    else:
        say(f"Volume '{tenant}/{name}' deleted: its data is being destroyed")


@volume_app.command("restore")
def volume_restore(
    ref: VolumeRefArg,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Undo the deletion of a volume still in its grace period."""
    tenant, name = split_volume_ref(ref)
    with _client(control, token, ca_file) as client:
        volume = client.restore_volume(tenant, name)
    _result(as_json, volume, f"Volume '{tenant}/{name}' restored ({volume['state']})")


@volume_app.command("usage")
def volume_usage(
    tenant: TenantArg,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Measure now instead of showing the last figures")
    ] = False,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Space, files and objects used by each volume of a tenant."""
    with _client(control, token, ca_file) as client:
        usage = client.tenant_usage(tenant, refresh=refresh)
    if as_json:
        print_json(usage)
        return
    volumes = usage.get("volumes") or []
    table = _table(
        f"Usage of {usage.get('tenant', tenant)} ({plural(len(volumes), 'volume')})",
        "VOLUME",
        "USED",
        "INODES",
        "OBJECTS",
        "REFRESHED",
        whole=("VOLUME",),
    )
    for v in volumes:
        table.add_row(
            cell(v["name"]),
            cell(format_size(v.get("bytes", 0))),
            cell(v.get("inodes", 0)),
            cell(v.get("objects", 0)),
            cell(_when(v.get("refreshed_at"))),
        )
    table.add_section()
    table.add_row(
        cell("total"),
        cell(format_size(usage.get("bytes", 0))),
        cell(usage.get("inodes", 0)),
        cell(usage.get("objects", 0)),
        cell(""),
    )
    _print_listing(table)


# --- tokens ----------------------------------------------------------------------------------


def _token_scope(t: dict[str, Any]) -> str:
    if t.get("volume"):
        return f"{t.get('tenant')}/{t['volume']}"
    return str(t.get("tenant") or "-")


def _token_state(t: dict[str, Any], now: datetime) -> str:
    if t.get("revoked_at"):
        return "revoked"
    expires = t.get("expires_at")
    if expires:
        try:
            at = datetime.fromisoformat(str(expires))
        except ValueError:
            return "active"
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if at <= now:
            return "expired"
    return "active"


@token_app.command("create")
def token_create(
    kind: Annotated[
        str,
        typer.Option(
            "--kind", metavar="KIND", help="operator, tenant-admin or mount", show_default=False
        ),
    ],
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", metavar="TENANT", help="The tenant (tenant-admin, mount)"),
    ] = None,
    volume: Annotated[
        str | None,
        typer.Option(
            "--volume", metavar="VOLUME", help="The volume of a mount token (NAME or TENANT/NAME)"
        ),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="A mount token that mounts read-only")
    ] = False,
    expires: Annotated[
        str | None,
        typer.Option("--expires", metavar="DURATION", help="Lifetime, e.g. 12h or 30d"),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="A note for 'token ls'")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it. It is shown this once: the server keeps only its hash."""
    if kind not in TOKEN_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(TOKEN_KINDS)}, not {kind!r}")
    if volume is not None and "/" in volume:
        vol_tenant, volume = split_volume_ref(volume)
        if tenant is not None and tenant != vol_tenant:
            raise ConfigError(f"--tenant {tenant} and --volume {vol_tenant}/{volume} disagree")
        tenant = vol_tenant
    expires_in = None
    if expires is not None:
        try:
            seconds = parse_duration(expires)
        except ConfigError as e:
            raise ConfigError(f"--expires: {e}") from None
        if seconds <= 0:
            raise ConfigError(f"--expires must be a positive duration, not {expires!r}")
        expires_in = math.ceil(seconds)
    with _client(control, token, ca_file) as client:
        created = client.create_token(
            kind,
            tenant=tenant,
            volume=volume,
            read_only=read_only,
            expires_in=expires_in,
            name=name,
        )
    if as_json:
        print_json(created)
        return
    scope = _token_scope(created)
    parts = [created["kind"]] + ([scope] if scope != "-" else [])
    if created.get("read_only"):
        parts.append("read-only")
    parts.append(f"expires {_when(created['expires_at'])}" if created.get("expires_at") else "")
    _note(f"Token {created['id']} ({', '.join(p for p in parts if p)}):")
    sys.stdout.write(created["token"] + "\n")
    sys.stdout.flush()
    _note("It is not shown again: store it now.")


@token_app.command("ls")
def token_ls(
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant's")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""
    with _client(control, token, ca_file) as client:
        tokens = client.list_tokens(tenant)
    if as_json:
        print_json(tokens)
        return
    now = datetime.now(UTC)
    table = _table(
        f"Tokens ({len(tokens)})",
        "ID",
        "KIND",
        "SCOPE",
        "NAME",
        "STATE",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        whole=("ID", "SCOPE"),
    )
    for t in tokens:
        kind = t["kind"] + (" (ro)" if t.get("read_only") else "")
        table.add_row(
            cell(t["id"]),
            cell(kind),
            cell(_token_scope(t)),
            cell(t.get("name") or "-"),
            cell(_token_state(t, now)),
            cell(_when(t.get("created_at"))),
            cell(_when(t.get("expires_at")) if t.get("expires_at") else "never"),
            cell(_when(t.get("last_used_at"))),
        )
    _print_listing(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (see 'token ls')")],
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it is refused from now on."""
    with _client(control, token, ca_file) as client:
        client.revoke_token(token_id)
    _result(as_json, {"id": token_id, "revoked": True}, f"Token {token_id} revoked")


# --- node groups -----------------------------------------------------------------------------


def _read_spec(source: str) -> dict[str, Any]:
    """A node group spec from a JSON file, or stdin for ``-``."""
    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: the spec must be a JSON object with 'nodes' and 'mounts'")
    return spec


def _options_text(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "-"


@nodegroup_app.command("apply")
def nodegroup_apply(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Node group name")],
    file: Annotated[
        str,
        typer.Option(
            "--file", "-f", metavar="FILE", help="Spec as JSON ('-': stdin)", show_default=False
        ),
    ],
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or replace a node group from a JSON spec: {"nodes": [...], "mounts": [...]}."""
    spec = _read_spec(file)
    with _client(control, token, ca_file) as client:
        group = client.put_nodegroup(name, spec)
    if as_json:
        print_json(group)
    else:
        say(
            f"Node group '{group['name']}' applied (generation {group.get('generation')}: "
            f"{plural(len(group.get('nodes') or []), 'node')}, "
            f"{plural(len(group.get('mounts') or []), 'mount')})"
        )


@nodegroup_app.command("ls")
def nodegroup_ls(
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the node groups."""
    with _client(control, token, ca_file) as client:
        groups = client.list_nodegroups()
    if as_json:
        print_json(groups)
        return
    table = _table(
        f"Node groups ({len(groups)})",
        "NAME",
        "NODES",
        "MOUNTS",
        "GENERATION",
        "UPDATED",
        whole=("NAME",),
    )
    for g in groups:
        table.add_row(
            cell(g["name"]),
            cell(len(g.get("nodes") or [])),
            cell(len(g.get("mounts") or [])),
            cell(g.get("generation", "-")),
            cell(_when(g.get("updated_at"))),
        )
    _print_listing(table)


@nodegroup_app.command("show")
def nodegroup_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Node group name")],
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a node group: its nodes and what they mount."""
    with _client(control, token, ca_file) as client:
        group = client.get_nodegroup(name)
    if as_json:
        print_json(group)
        return
    nodes = group.get("nodes") or []
    print_table(
        kv_table(
            f"Node group {group['name']}",
            [
                ("generation", group.get("generation", "-")),
                ("nodes", ", ".join(nodes) or "-"),
                ("created", _when(group.get("created_at"))),
                ("updated", _when(group.get("updated_at"))),
            ],
        )
    )
    mounts = group.get("mounts") or []
    table = _table(
        f"Mounts ({len(mounts)})", "VOLUME", "MOUNTPOINT", "MODE", "OPTIONS", whole=("VOLUME",)
    )
    for m in mounts:
        table.add_row(
            cell(f"{m['tenant']}/{m['volume']}"),
            cell(m["mountpoint"]),
            cell("ro" if m.get("read_only") else "rw"),
            cell(_options_text(m.get("options") or {})),
        )
    _print_listing(table)


@nodegroup_app.command("rm")
def nodegroup_rm(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Node group name")],
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a node group (mounts already running are not touched)."""
    with _client(control, token, ca_file) as client:
        client.delete_nodegroup(name)
    _result(as_json, {"name": name, "deleted": True}, f"Node group '{name}' deleted")


# --- audit -----------------------------------------------------------------------------------


def _since(text: str) -> str:
    """``--since``: a duration back from now (``2h``, ``7d``) or an ISO 8601 time, as ISO UTC."""
    text = text.strip()
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        try:
            seconds = parse_duration(text)
        except ConfigError:
            raise ConfigError(
                f"--since takes a duration such as 2h or 7d, or an ISO time, not {text!r}"
            ) from None
        at = datetime.now(UTC) - timedelta(seconds=seconds)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat()


def audit_cmd(
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant's")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option("--action", metavar="ACTION", help="Only this action, e.g. volume.create"),
    ] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", metavar="TOKEN_ID", help="Only this token id's")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="WHEN", help="Duration back (2h, 7d) or ISO time"),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", help="At most N rows")
    ] = None,
    control: ControlOpt = None,
    token: TokenOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: every change made through the API, who made it and when (operator)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be 1 or more, not {limit}")
    with _client(control, token, ca_file) as client:
        rows = client.audit(
            tenant=tenant,
            action=action,
            actor=actor,
            since=_since(since) if since is not None else None,
            limit=limit,
        )
    if as_json:
        print_json(rows)
        return
    table = _table(
        f"Audit ({len(rows)})",
        "AT",
        "ACTOR",
        "TENANT",
        "ACTION",
        "TARGET",
        "STATUS",
        "DETAIL",
        whole=("ACTION",),
    )
    for r in rows:
        detail = r.get("detail")
        table.add_row(
            cell(_when(r.get("at"))),
            cell(f"{r.get('actor') or '-'} ({r.get('actor_kind') or '?'})"),
            cell(r.get("tenant") or "-"),
            cell(r.get("action", "")),
            cell(r.get("target") or "-"),
            cell(r.get("status", "")),
            cell(json.dumps(detail, sort_keys=True) if detail else "-"),
        )
    _print_listing(table)


# --- the server ------------------------------------------------------------------------------


def _overrides(**values: Any) -> dict[str, Any]:
    """Command-line values as ``server.*`` configuration overrides; options not given
    override nothing."""
    return {f"server.{key}": value for key, value in values.items() if value is not None}


def serve_cmd(
    config: ConfigFileOpt = None,
    listen: Annotated[
        str | None, typer.Option("--listen", metavar="HOST:PORT", help="Address to serve on")
    ] = None,
    database: DatabaseOpt = None,
    state_dir: StateDirOpt = None,
    master_key_file: Annotated[
        str | None,
        typer.Option("--master-key-file", metavar="FILE", help="Master key (created if missing)"),
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option("--tls-cert", metavar="FILE", help="PEM certificate (HTTPS)")
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option("--tls-key", metavar="FILE", help="PEM key of --tls-cert")
    ] = None,
) -> None:
    """Run the control plane: apply migrations, check the backends, serve the API."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    from loftfs.plane.config import load_config
    from loftfs.plane.server import serve

    overrides = _overrides(
        listen=listen,
        database=database,
        state_dir=state_dir,
        master_key_file=master_key_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    serve(load_config(str(config) if config else None, overrides))


@plane_app.command("bootstrap")
def plane_bootstrap(
    config: ConfigFileOpt = None,
    database: DatabaseOpt = None,
    state_dir: StateDirOpt = None,
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="A note on the token, shown by 'token ls'")
    ] = "bootstrap",
) -> None:
    """Create an operator token directly in the database (for the first operator); printed
    this once."""
    from loftfs.plane.config import load_config
    from loftfs.plane.server import bootstrap_token

    overrides = _overrides(database=database, state_dir=state_dir)
    secret = bootstrap_token(load_config(str(config) if config else None, overrides), name)
    _note(f"Operator token '{name}':")
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    _note(f"It is not shown again: store it now (e.g. in ${ENV_TOKEN}).")
