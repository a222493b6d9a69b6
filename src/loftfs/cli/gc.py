"""``loft gc``: delete the blocks of slices nothing references any more, now.

Mounts do this in the background; the command serves operators who want the space back at once
or whose volume is not mounted anywhere. Deleting a block twice is harmless, so it may run while
the volume is mounted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from loftfs.chunk.layout import block_keys
from loftfs.cli.common import open_volume, plural, print_json, say
from loftfs.errors import LoftError, ObjectStoreError
from loftfs.meta.interface import Meta
from loftfs.meta.types import VolumeSettings
from loftfs.object.interface import ObjectStore
from loftfs.utils import format_size

_BATCH = 1000


@dataclass
class GCResult:
    slices: int = 0
    blocks: int = 0
    bytes: int = 0


def collect_garbage(meta: Meta, store: ObjectStore, settings: VolumeSettings) -> GCResult:
    """Delete blocks of unreferenced slices batch by batch; a slice's record is dropped only
    after all of its blocks are gone, so an interruption never leaks objects."""
    result = GCResult()
    while True:
        batch = meta.deleted_slices(_BATCH)
        if not batch:
            return result
        keys: list[str] = []
        for slice_id, size in batch:
            keys.extend(block_keys(settings.uuid, slice_id, size, settings.block_size))
            result.bytes += size
        store.delete_many(keys)
        meta.forget_deleted_slices([slice_id for slice_id, _ in batch])
        result.slices += len(batch)
        result.blocks += len(keys)


def gc_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON")] = False,
) -> None:
    """Delete the data blocks of deleted files now (mounts also do it in the background)."""
    from loftfs.object import open_volume_storage

    with open_volume(meta_url) as (meta, settings):
        store = open_volume_storage(settings)
        try:
            result = collect_garbage(meta, store, settings)
        except (ObjectStoreError, OSError) as e:
            raise LoftError(f"gc of '{settings.name}' stopped: {e}") from e
        finally:
            store.close()
    if as_json:
        print_json({"slices": result.slices, "blocks": result.blocks, "bytes": result.bytes})
        return
    say(
        f"Deleted {plural(result.blocks, 'block')} of "
        f"{plural(result.slices, 'unreferenced slice')} ({format_size(result.bytes)})"
    )
