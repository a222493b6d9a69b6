"""``loft destroy``: delete a volume's data objects and then its metadata.

The uuid must be typed out, live clients block it (unless ``--force``), and it asks before doing
anything unless ``--yes``. Data goes first and the bucket marker last, so an interrupted destroy
can simply be run again.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from loftfs.cli.common import (
    confirm,
    open_volume,
    plural,
    redact_url,
    say,
    session_is_stale,
    stderr_console,
)
from loftfs.cli.format import marker_key
from loftfs.errors import ConfigError, LoftError, ObjectStoreError
from loftfs.object.interface import ObjectStore

_BATCH = 1000


def delete_volume_objects(store: ObjectStore, volume_uuid: str, *, show_progress: bool) -> int:
    """Delete every object under ``<uuid>/`` except the volume marker; returns the count."""
    marker = marker_key(volume_uuid)
    deleted = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("deleting objects"),
        BarColumn(),
        TextColumn("{task.completed} deleted"),
        TimeElapsedColumn(),
        console=stderr_console(),
        disable=not show_progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("delete", total=None)
        batch: list[str] = []
        for entry in store.list(prefix=f"{volume_uuid}/"):
            if entry.is_prefix or entry.key == marker:
                continue
            batch.append(entry.key)
            if len(batch) >= _BATCH:
                store.delete_many(batch)
                deleted += len(batch)
                progress.update(task, completed=deleted)
                batch = []
        if batch:
            store.delete_many(batch)
            deleted += len(batch)
        progress.update(task, completed=deleted, total=deleted)
    return deleted


def destroy_cmd(
    meta_url: Annotated[
        str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
    ],
    volume_uuid: Annotated[
        str, typer.Argument(metavar="UUID", help="The volume's uuid (see 'loft status')")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Destroy even while clients have it mounted")
    ] = False,
) -> None:
    """Delete a volume: all its data objects, then all its metadata. This cannot be undone."""
    from loftfs.object import open_volume_storage

    with open_volume(meta_url) as (meta, settings):
        if volume_uuid != settings.uuid:
            raise ConfigError(
                f"uuid {volume_uuid!r} does not match the volume at {redact_url(meta_url)} "
                f"('{settings.name}'); nothing was deleted"
            )
        now = time.time_ns()
        live = [s for s in meta.list_sessions() if not session_is_stale(s, now)]
        if live and not force:
            where = ", ".join(
                f"{s.info.get('host', '?')}:{s.info.get('mountpoint', '?')}" for s in live[:5]
            )
            raise LoftError(
                f"volume '{settings.name}' has {len(live)} live session(s) ({where}); "
                "unmount it everywhere first, or pass --force"
            )
        if not yes and not confirm(
            f"Destroy volume '{settings.name}' ({settings.uuid}) and delete all of its "
            f"data in {settings.storage} {redact_url(settings.bucket)}?"
        ):
            raise LoftError("aborted: nothing was deleted (--yes skips the question)")
        store = open_volume_storage(settings, need_data=False)  # deletes only: no key needed
        try:
            try:
                deleted = delete_volume_objects(
                    store, settings.uuid, show_progress=stderr_console().is_terminal
                )
            except (ObjectStoreError, OSError) as e:
                raise LoftError(
                    f"deleting objects of '{settings.name}' failed: {e}; the metadata was kept, "
                    "run 'loft destroy' again"
                ) from e
            meta.destroy_volume()
            store.delete(marker_key(settings.uuid))
        finally:
            store.close()
    say(f"Destroyed volume {settings.name} ({settings.uuid}): {plural(deleted, 'object')} deleted")
