"""``loft config``: change the settings that can change safely (quotas, trash, the secret of an
encrypted volume).

What identifies the volume or decides how its data is laid out (name, uuid, storage, bucket,
block size, compression) is fixed at format time: changing it would orphan or misread every
object already written, so those options exist only to be refused with a clear reason.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loftfs.cli.common import (
    cell,
    non_negative,
    open_volume,
    print_json,
    print_warning,
    redact_url,
    say,
    stdout_console,
)
from loftfs.cli.status import settings_dict
from loftfs.errors import ConfigError
from loftfs.meta.types import VolumeSettings
from loftfs.object.encrypt import (
    describe_record,
    read_key_file,
    read_passphrase_file,
    rewrap_record,
    secret_from_sources,
)
from loftfs.utils import format_size, parse_size

_IMMUTABLE_REASON = {
    "--name": "the name identifies the volume",
    "--uuid": "the uuid names every object of the volume",
    "--storage": "existing objects live in the current storage",
    "--bucket": "existing objects live in the current bucket",
    "--block-size": "existing slices are stored in blocks of the current size",
    "--compress": "existing blocks are stored with the current compression",
}


def _show(value: Any, field: str) -> str:
    if field == "encryption":
        return describe_record(value)
    if field == "capacity":
        return format_size(value) if value else "unlimited"
    if field == "inodes":
        return str(value) if value else "unlimited"
    if field == "trash_days":
        return str(value) if value else "off"
    return str(value)


def config_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    capacity: Annotated[
        str | None, typer.Option("--capacity", help="Space quota, e.g. 10T (0: unlimited)")
    ] = None,
    inodes: Annotated[
        int | None, typer.Option("--inodes", help="Inode quota (0: unlimited)")
    ] = None,
    trash_days: Annotated[
        int | None, typer.Option("--trash-days", help="Keep deleted files N days (0: off)")
    ] = None,
    new_passphrase_file: Annotated[
        str | None,
        typer.Option(
            "--new-passphrase-file",
            metavar="FILE",
            help="Encrypted volume: protect its data key with the passphrase in FILE from now "
            "on (the current secret is needed too; no data is rewritten)",
        ),
    ] = None,
    new_key_file: Annotated[
        str | None,
        typer.Option(
            "--new-key-file",
            metavar="FILE",
            help="Encrypted volume: protect its data key with the key in FILE from now on",
        ),
    ] = None,
    encrypt_passphrase_file: Annotated[
        str | None,
        typer.Option(
            "--encrypt-passphrase-file",
            metavar="FILE",
            help="The current passphrase, in FILE (or LOFT_ENCRYPT_PASSPHRASE)",
        ),
    ] = None,
    encrypt_key_file: Annotated[
        str | None,
        typer.Option("--encrypt-key-file", metavar="FILE", help="The current key file"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as JSON")] = False,
    name: Annotated[str | None, typer.Option("--name", hidden=True)] = None,
    uuid: Annotated[str | None, typer.Option("--uuid", hidden=True)] = None,
    storage: Annotated[str | None, typer.Option("--storage", hidden=True)] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", hidden=True)] = None,
    block_size: Annotated[str | None, typer.Option("--block-size", hidden=True)] = None,
    compress: Annotated[str | None, typer.Option("--compress", hidden=True)] = None,
) -> None:
    """Show or change a volume's quotas and trash retention (other settings are fixed)."""
    immutable = {
        "--name": name,
        "--uuid": uuid,
        "--storage": storage,
        "--bucket": bucket,
        "--block-size": block_size,
        "--compress": compress,
    }
    for option, value in immutable.items():
        if value is not None:
            raise ConfigError(
                f"{option} cannot be changed after format ({_IMMUTABLE_REASON[option]})"
            )
    changes: dict[str, Any] = {}
    if capacity is not None:
        changes["capacity"] = non_negative(parse_size(capacity), "--capacity")
    if inodes is not None:
        changes["inodes"] = non_negative(inodes, "--inodes")
    if trash_days is not None:
        changes["trash_days"] = non_negative(trash_days, "--trash-days")
    if new_passphrase_file and new_key_file:
        raise ConfigError("give --new-passphrase-file or --new-key-file, not both")
    new_secret = None
    if new_passphrase_file:
        new_secret = read_passphrase_file(new_passphrase_file)
    elif new_key_file:
        new_secret = read_key_file(new_key_file)

    with open_volume(meta_url) as (meta, before):
        if new_secret is not None:
            if not before.encryption:
                raise ConfigError(
                    f"volume '{before.name}' is not encrypted: encryption is chosen at format "
                    "(its blocks are stored in the clear)"
                )
            old_secret = secret_from_sources(encrypt_passphrase_file, encrypt_key_file)
            if old_secret is None:
                raise ConfigError(
                    "changing the secret needs the current one too (--encrypt-passphrase-file, "
                    "LOFT_ENCRYPT_PASSPHRASE or --encrypt-key-file)"
                )
            changes["encryption"] = rewrap_record(
                before.encryption, old_secret, new_secret, before.uuid, before.name
            )
        after = dataclasses.replace(before, **changes)
        changed = [f for f in changes if getattr(before, f) != getattr(after, f)]
        if changed:
            meta.update_settings(after)
            used_bytes, used_inodes = meta.usage()
            if after.capacity and used_bytes > after.capacity:
                print_warning(
                    f"the volume already uses {format_size(used_bytes)}, more than the new "
                    "capacity: writes will fail until space is freed"
                )
            if after.inodes and used_inodes > after.inodes:
                print_warning(
                    f"the volume already has {used_inodes} inodes, more than the new quota: "
                    "file creation will fail until some are removed"
                )

    if as_json:
        print_json({"changed": changed, "settings": settings_dict(after)})
        return
    console = stdout_console()
    if not changes:
        console.print(_settings_table(before, meta_url))
    elif not changed:
        say("Nothing changed: the settings already have these values.")
    else:
        table = Table(title=escape(f"Volume {after.name}: settings changed"), title_justify="left")
        table.add_column("setting")
        table.add_column("before")
        table.add_column("after")
        for f in changed:
            table.add_row(f, cell(_show(getattr(before, f), f)), cell(_show(getattr(after, f), f)))
        console.print(table)


def _settings_table(s: VolumeSettings, meta_url: str) -> Table:
    table = Table(
        title=escape(f"Volume {s.name}"), title_justify="left", show_header=False, box=None
    )
    table.add_column("setting", style="bold")
    table.add_column("value")
    rows = [
        ("uuid", s.uuid),
        ("metadata", redact_url(meta_url)),
        ("storage", f"{s.storage} {redact_url(s.bucket)}"),
        ("block size", format_size(s.block_size)),
        ("compression", s.compress),
        ("encryption", describe_record(s.encryption)),
        ("capacity", _show(s.capacity, "capacity")),
        ("inodes", _show(s.inodes, "inodes")),
        ("trash days", _show(s.trash_days, "trash_days")),
    ]
    for key, value in rows:
        table.add_row(key, cell(value))
    return table
