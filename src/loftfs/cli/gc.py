"""``loft gc``: delete the blocks of slices nothing references any more, now.

Mounts do this in the background; the command serves operators who want the space back at once
or whose volume is not mounted anywhere. Deleting a block twice is harmless, so it may run while
the volume is mounted.
"""

from __future__ import annotations

from typing import Annotated

import typer

from loftfs.chunk.gc import BlockGC
from loftfs.cli.common import open_volume, plural, print_json, say
from loftfs.errors import LoftError, ObjectStoreError
from loftfs.utils import format_size


def gc_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON")] = False,
) -> None:
    """Delete the data blocks of deleted files now (mounts also do it in the background)."""
    from loftfs.object import open_volume_storage

    with open_volume(meta_url) as (meta, settings):
        store = open_volume_storage(settings, need_data=False)  # deletes only: no key needed
        try:
            result = BlockGC(meta, store, settings.uuid, settings.block_size, 0).collect()
        except (ObjectStoreError, OSError) as e:
            raise LoftError(f"gc of '{settings.name}' stopped: {e}") from e
        finally:
            store.close()
    if result.failed:
        raise LoftError(
            f"gc of '{settings.name}': the blocks of {plural(result.failed, 'slice')} could "
            "not be deleted (they stay queued; see the log)"
        )
    if as_json:
        print_json({"slices": result.slices, "blocks": result.blocks, "bytes": result.bytes})
        return
    say(
        f"Deleted {plural(result.blocks, 'block')} of "
        f"{plural(result.slices, 'unreferenced slice')} ({format_size(result.bytes)})"
    )
