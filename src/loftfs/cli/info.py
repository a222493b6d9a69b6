"""``loft info``: how a path inside a mount is stored (inode, chunks, slices, object keys).

The metadata URL comes from the mount record of the mount that holds the path, so the command
needs nothing but the path.
"""

from __future__ import annotations

import os
import stat
from typing import Annotated, Any

import typer
from rich.table import Table

from loftfs.chunk.layout import block_keys
from loftfs.cli.common import cell, kv_table, open_volume, plural, print_json, say, stdout_console
from loftfs.errors import ConfigError, FSError, LoftError
from loftfs.meta.interface import Meta
from loftfs.meta.types import CHUNK_SIZE, KIND_EXTERNAL, Ctx, ExtObject, FileType, VolumeSettings
from loftfs.object.encrypt import describe_record
from loftfs.sources import load_sources
from loftfs.utils import format_size


def describe_inode(meta: Meta, settings: VolumeSettings, inode: int, ctx: Ctx) -> dict[str, Any]:
    """Everything ``info`` shows about one inode, as plain data."""
    attr = meta.getattr(inode)
    out: dict[str, Any] = {
        "inode": attr.inode,
        "type": attr.type.name.lower(),
        "mode": f"{attr.mode:04o}",
        "permissions": stat.filemode(attr.st_mode),
        "uid": attr.uid,
        "gid": attr.gid,
        "size": attr.size,
        "nlink": attr.nlink,
    }
    if attr.type == FileType.FILE:
        chunks = []
        sources = {s.id: s.name for s in load_sources(meta).sources.values()}
        for index in range((attr.size + CHUNK_SIZE - 1) // CHUNK_SIZE):
            slices = meta.read_chunk(inode, index)
            if not slices:
                continue
            external = meta.get_ext([s.id for s in slices if s.kind == KIND_EXTERNAL])
            chunks.append(
                {
                    "index": index,
                    "slices": [
                        {
                            "pos": s.pos,
                            "id": s.id,
                            "size": s.size,
                            "off": s.off,
                            "len": s.len,
                            "kind": s.kind,
                            "blocks": (
                                block_keys(settings.uuid, s.id, s.size, settings.block_size)
                                if s.id and s.kind == 0
                                else []
                            ),
                            **(
                                {"source": _external(external[s.id], sources)}
                                if s.id in external
                                else {}
                            ),
                        }
                        for s in slices
                    ],
                }
            )
        out["chunks"] = chunks
    elif attr.type == FileType.DIR:
        out["entries"] = len(meta.readdir(ctx, inode))
    elif attr.type == FileType.SYMLINK:
        out["target"] = os.fsdecode(meta.readlink(inode))
    return out


def _external(rec: ExtObject, sources: dict[int, str]) -> dict[str, Any]:
    """Where an external slice's bytes are read from."""
    return {
        "source": sources.get(rec.source, f"#{rec.source} (removed)"),
        "key": rec.key,
        "etag": rec.etag,
        "offset": rec.offset,
        "length": rec.length,
    }


def _locate(path: str) -> tuple[str, str, int]:
    """(mountpoint, meta URL, inode) of a path inside a loftfs mount."""
    from loftfs.fuse.mount import find_mount_root, read_mount_record

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file or directory") from None
    root = find_mount_root(path)
    if root is None:
        raise ConfigError(f"{path} is not inside a loftfs mount")
    record = read_mount_record(root)
    if record is None:
        raise LoftError(f"no mount record for {root} (is its mount process still running?)")
    from loftfs.plane.mountspec import CONTROL_PREFIX

    if record.meta_url.startswith(CONTROL_PREFIX):
        raise LoftError(
            f"{root} is mounted through the control plane ({record.meta_url}): its metadata "
            "credentials stay inside the mount process, so 'loft info' cannot open the volume"
        )
    return root, record.meta_url, st.st_ino


def info_cmd(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="A file, directory or symlink inside a mount")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Show how a path is stored: inode, size, and for files the slices and object keys."""
    root, meta_url, inode = _locate(path)
    ctx = Ctx(uid=os.getuid(), gid=os.getgid(), gids=tuple(os.getgroups()))
    with open_volume(meta_url) as (meta, settings):
        try:
            data = describe_inode(meta, settings, inode, ctx)
        except FSError as e:
            raise LoftError(f"{path}: {e}") from e
    data["path"] = os.path.abspath(path)
    data["mountpoint"] = root
    data["volume"] = settings.name
    data["encryption"] = describe_record(settings.encryption)  # never key material
    if as_json:
        print_json(data)
        return
    console = stdout_console()
    rows: list[tuple[str, Any]] = [
        ("path", data["path"]),
        ("volume", f"{settings.name} (mounted at {root})"),
        ("encryption", data["encryption"]),
        ("inode", data["inode"]),
        ("type", data["type"]),
        ("mode", f"{data['mode']} ({data['permissions']})"),
        ("owner", f"{data['uid']}:{data['gid']}"),
        ("size", f"{data['size']} ({format_size(data['size'])})"),
        ("nlink", data["nlink"]),
    ]
    if "entries" in data:
        rows.append(("entries", data["entries"]))
    if "target" in data:
        rows.append(("target", data["target"]))
    console.print(kv_table("", rows))
    for chunk in data.get("chunks", []):
        console.print()
        console.print(_chunk_table(chunk))
        for s in chunk["slices"]:
            if s["blocks"]:
                say(f"objects of slice {s['id']}:")
                for key in s["blocks"]:
                    say(f"  {key}")
            ext = s.get("source")
            if ext:
                end = ext["offset"] + ext["length"]
                say(
                    f"slice {s['id']} reads bytes {ext['offset']}-{end} of {ext['key']!r} in "
                    f"source {ext['source']!r} (ETag {ext['etag']!r})"
                )


def _chunk_table(chunk: dict[str, Any]) -> Table:
    """One row per slice record, oldest first (later records lie on top)."""
    slices = chunk["slices"]
    table = Table(
        title=f"Chunk {chunk['index']}: {plural(len(slices), 'slice')}", title_justify="left"
    )
    for column in ("pos", "id", "size", "off", "len", "blocks"):
        table.add_column(column, justify="right")
    for s in slices:
        blocks = len(s["blocks"]) if s["id"] else "hole"
        if "source" in s:
            blocks = "external"
        table.add_row(
            *(cell(v) for v in (s["pos"], s["id"], s["size"], s["off"], s["len"], blocks))
        )
    return table
