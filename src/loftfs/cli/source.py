"""``loft source add|ls|rm``: the buckets (or local trees) a volume may import from
(``loftfs.sources``), and ``loft import``: make a source prefix usable as a directory of the
volume without copying it (``loftfs.importer``)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from types import FrameType
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from loftfs.cli.common import (
    cell,
    kv_table,
    open_volume,
    plural,
    print_json,
    print_table,
    print_warning,
    say,
    stderr_console,
)
from loftfs.errors import ConfigError, FSError, LoftError, ObjectStoreError
from loftfs.meta.ops_import import ImportOwner
from loftfs.meta.types import VolumeSettings
from loftfs.object.encrypt import secret_from_sources
from loftfs.object.interface import ObjectStore
from loftfs.sources import (
    Source,
    check_source_name,
    load_sources,
    normalize_source_url,
    open_source,
    open_source_store,
    save_sources,
    seal_credentials,
    sealing_key,
)
from loftfs.utils import format_size

source_app = typer.Typer(
    help="The buckets (or local directories) this volume imports from.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ENV_SOURCE_SECRET = "LOFT_SOURCE_SECRET_KEY"

MetaArg = Annotated[
    str, typer.Argument(metavar="META_URL", help="Metadata engine URL of the volume")
]
PassphraseOpt = Annotated[
    str | None,
    typer.Option(
        "--encrypt-passphrase-file",
        metavar="FILE",
        help="Passphrase of an encrypted volume, in FILE (or set LOFT_ENCRYPT_PASSPHRASE)",
    ),
]
KeyFileOpt = Annotated[
    str | None,
    typer.Option("--encrypt-key-file", metavar="FILE", help="Key file of an encrypted volume"),
]


@contextmanager
def _volume_store(
    settings: VolumeSettings, passphrase_file: str | None, key_file: str | None
) -> Iterator[ObjectStore]:
    """The volume's own store (where the key sealing source credentials is kept)."""
    from loftfs.object import open_volume_storage

    secret = secret_from_sources(passphrase_file, key_file)
    store = open_volume_storage(settings, secret)
    try:
        yield store
    finally:
        store.close()


def _check_readable(source: Source, store: ObjectStore) -> None:
    """List one key of the source, so a wrong endpoint, bucket or credential is reported now."""
    if source.kind == "file":
        root = source.bucket_url.removeprefix("file://")
        if not os.path.isdir(root):
            raise ConfigError(f"source {source.name!r}: {root} is not a directory")
        if not os.access(root, os.R_OK | os.X_OK):
            raise ConfigError(f"source {source.name!r}: {root} cannot be read")
    try:
        next(iter(store.list(source.prefix, limit=1)), None)
    except ObjectStoreError as e:
        raise ConfigError(f"source {source.name!r} ({source.url}) cannot be listed: {e}") from e


@source_app.command("add")
def source_add(
    meta_url: MetaArg,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name of the source in the volume")],
    url: Annotated[
        str,
        typer.Argument(
            metavar="URL",
            help="s3://bucket[/prefix], http(s)://host:port/bucket[/prefix] or file:///dir",
        ),
    ],
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="s3:// URLs: the S3 endpoint (default AWS)")
    ] = "",
    region: Annotated[str, typer.Option("--region", help="S3 region")] = "",
    access_key: Annotated[
        str, typer.Option("--access-key", help="Access key (stored sealed)")
    ] = "",
    secret_key: Annotated[
        str,
        typer.Option(
            "--secret-key",
            help=f"Secret key (stored sealed); prefer {ENV_SOURCE_SECRET}, which no process "
            "list shows",
        ),
    ] = "",
    session_token: Annotated[
        str, typer.Option("--session-token", help="Session token (stored sealed)")
    ] = "",
    replace: Annotated[
        bool, typer.Option("--replace", help="Describe an existing source again (same id)")
    ] = False,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Do not list the source before adding it")
    ] = False,
    encrypt_passphrase_file: PassphraseOpt = None,
    encrypt_key_file: KeyFileOpt = None,
) -> None:
    """Register a source; its credentials are sealed, never printed. No credentials: the
    reading process's AWS chain (environment, profile, instance role) is used."""
    check_source_name(name)
    url = normalize_source_url(url)
    kind = "file" if url.startswith("file://") else "s3"
    secret_key = secret_key or os.environ.get(ENV_SOURCE_SECRET, "")
    creds = {
        k: v.strip()
        for k, v in (
            ("access_key", access_key),
            ("secret_key", secret_key),
            ("session_token", session_token),
        )
        if v.strip()
    }
    if kind == "file" and (creds or endpoint or region):
        raise ConfigError("file:// sources take no credentials, --endpoint or --region")
    if bool(creds.get("access_key")) != bool(creds.get("secret_key")):
        raise ConfigError(
            f"give both --access-key and --secret-key (or {ENV_SOURCE_SECRET}), or neither"
        )
    if endpoint and not url.startswith("s3://"):
        raise ConfigError(f"{url} names its endpoint already; --endpoint goes with s3:// URLs")
    with open_volume(meta_url) as (meta, settings):
        base = meta
        table = load_sources(base)
        old = table.sources.get(name)
        if old is not None and not replace:
            raise ConfigError(
                f"volume '{settings.name}' has a source named {name!r} already "
                f"({old.url}); --replace describes it again"
            )
        source = Source(
            name=name,
            id=old.id if old is not None else table.next_id,
            url=url,
            endpoint=endpoint.strip(),
            region=region.strip(),
            added_ns=time.time_ns(),
        )
        if not no_check:
            store = open_source_store(source, creds)
            try:
                _check_readable(source, store)
            finally:
                store.close()
        if creds:
            with _volume_store(settings, encrypt_passphrase_file, encrypt_key_file) as vstore:
                key = sealing_key(vstore, settings.uuid, create=True)
                assert key is not None
                source.credentials = seal_credentials(key, settings.uuid, name, creds)
        table.sources[name] = source
        if old is None:
            table.next_id += 1
        save_sources(base, table)
    say(f"Source {name!r} ({url}) {'replaced' if old else 'added'} to volume '{settings.name}'")


@source_app.command("ls")
def source_ls(
    meta_url: MetaArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the volume's sources (credentials are never shown, only whether they are stored)."""
    with open_volume(meta_url) as (meta, settings):
        base = meta
        table = load_sources(base)
        rows = []
        for s in sorted(table.sources.values(), key=lambda s: s.id):
            rows.append(
                {
                    "name": s.name,
                    "id": s.id,
                    "url": s.url,
                    "endpoint": s.endpoint,
                    "region": s.region,
                    "credentials": "stored (sealed)" if s.credentials else "none",
                    "files": base.count_ext(s.id),
                    "added": datetime.fromtimestamp(s.added_ns / 1e9, UTC).isoformat(
                        timespec="seconds"
                    ),
                }
            )
    if as_json:
        print_json(rows)
        return
    if not rows:
        say(f"Volume '{settings.name}' has no sources")
        return
    columns = ("name", "id", "url", "endpoint", "credentials", "files", "added")
    table_out = Table(title=f"Sources of volume '{settings.name}'")
    for col in columns:
        table_out.add_column(col if col != "files" else "external slices")
    for r in rows:
        table_out.add_row(*(cell(r[c]) for c in columns))
    print_table(table_out)


@source_app.command("rm")
def source_rm(
    meta_url: MetaArg,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name of the source")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Remove it even though imported files still read from it (they "
            "then read as I/O errors)",
        ),
    ] = False,
) -> None:
    """Remove a source from the volume (the source itself is never touched)."""
    with open_volume(meta_url) as (meta, settings):
        base = meta
        table = load_sources(base)
        source = table.get(name)
        used = base.count_ext(source.id)
        if used and not force:
            raise ConfigError(
                f"{plural(used, 'external slice')} of volume '{settings.name}' still read from "
                f"source {name!r}: remove or `loft materialize` those files first, or --force"
            )
        del table.sources[name]
        save_sources(base, table)
    say(f"Source {name!r} removed from volume '{settings.name}'")


# --- import -----------------------------------------------------------------------------------


def _split_source_arg(text: str) -> tuple[str, str]:
    """``NAME[/subprefix]`` -> (name, subprefix)."""
    name, _, sub = text.partition("/")
    return check_source_name(name), sub.strip("/")


class _Progress:
    """A live line on a terminal: objects, bytes and the rate (nothing when stderr is not a
    terminal: scripts get the summary)."""

    def __init__(self) -> None:
        console = stderr_console()
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("listing", total=None)
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def live(self) -> AbstractContextManager[Any]:
        return self.progress if self.progress is not None else nullcontext()

    def update(self, stats: Any) -> None:
        if self.progress is None:
            return
        with self._lock:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            done = stats.created + stats.updated + stats.unchanged + stats.conflicts
            self.progress.update(
                self.task,
                description=(
                    f"{done:,} objects ({format_size(stats.bytes)}), "
                    f"{done / elapsed:,.0f} objects/s, {stats.created:,} new, "
                    f"{stats.conflicts:,} conflicts"
                ),
            )


@contextmanager
def _stop_on_signals(stop: Any) -> Iterator[None]:
    """Ctrl-C / SIGTERM: ask the import to stop after its current batches (it resumes)."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop()
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for number, h in previous.items():
            signal.signal(number, h)


def import_cmd(
    meta_url: MetaArg,
    source_arg: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE[/SUBPREFIX]", help="A source of the volume, optionally a prefix in it"
        ),
    ],
    dest: Annotated[
        str, typer.Argument(metavar="DEST_DIR", help="Directory of the volume, e.g. /datasets/x")
    ],
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Import only keys matching this glob (repeatable)"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Skip keys matching this glob (repeatable)"),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            "-t",
            help="Parallel listings (default: 16 for buckets, 2 for local trees, where listing "
            "is CPU-bound)",
            show_default=False,
        ),
    ] = 0,
    batch: Annotated[int, typer.Option("--batch", help="Objects per metadata transaction")] = 1000,
    file_mode: Annotated[str, typer.Option("--mode", help="Mode of imported files")] = "0644",
    dir_mode: Annotated[str, typer.Option("--dir-mode", help="Mode of directories")] = "0755",
    uid: Annotated[int, typer.Option("--uid", help="Owner of what is imported")] = 0,
    gid: Annotated[int, typer.Option("--gid", help="Group of what is imported")] = 0,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the data of files in the way (not dirs)"),
    ] = False,
    delete: Annotated[
        bool,
        typer.Option("--delete", help="On a re-run, remove files whose object vanished"),
    ] = False,
    lazy: Annotated[
        bool,
        typer.Option(
            "--lazy",
            help="List nothing now: each directory is listed from the source when first used",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    encrypt_passphrase_file: PassphraseOpt = None,
    encrypt_key_file: KeyFileOpt = None,
) -> None:
    """Import a source prefix into a directory of the volume: metadata only, the data is read
    in place. Interrupted imports resume; re-runs import what is new or changed."""
    from loftfs.importer import Importer, ImportOptions, ensure_dir

    name, sub = _split_source_arg(source_arg)
    if not dest.startswith("/"):
        raise ConfigError(f"DEST_DIR must be an absolute path in the volume, not {dest!r}")
    try:
        owner = ImportOwner(int(file_mode, 8), int(dir_mode, 8), uid, gid)
    except ValueError:
        raise ConfigError("--mode and --dir-mode are octal, e.g. 0644") from None
    if threads < 0 or batch < 1 or batch > 100_000:
        raise ConfigError("--threads must be at least 1 and --batch 1-100000")
    if lazy and (include or exclude or delete or overwrite):
        raise ConfigError("--lazy takes no --include, --exclude, --delete or --overwrite")
    with open_volume(meta_url) as (meta, settings):
        base = meta
        source = load_sources(base).get(name)
        if lazy:
            prefix = source.prefix + (sub + "/" if sub else "")
            inode = ensure_dir(base, dest, owner)
            base.bind_lazy(inode, source.id, prefix)
            if as_json:
                print_json({"source": source.name, "prefix": prefix, "dest": dest, "lazy": True})
            else:
                say(
                    f"{dest} is bound to {source.name}/{prefix[len(source.prefix) :]}: each "
                    "directory is listed from the source when first used"
                )
            return
        store = open_source(
            source,
            settings.uuid,
            lambda: _volume_store(settings, encrypt_passphrase_file, encrypt_key_file),
        )
        prefix = source.prefix + (sub + "/" if sub else "")
        threads = threads or (2 if source.kind == "file" else 16)
        opts = ImportOptions(
            include=list(include or []),
            exclude=list(exclude or []),
            threads=threads,
            batch=batch,
            owner=owner,
            overwrite=overwrite,
            delete=delete,
        )
        bar = _Progress()
        importer = Importer(base, source, store, prefix, dest, opts, bar.update)
        try:
            with bar.live(), _stop_on_signals(importer.stop):
                stats = importer.run()
        except KeyboardInterrupt:
            raise LoftError(
                "import interrupted: what was written is kept; run the same command again to resume"
            ) from None
        except ObjectStoreError as e:
            raise LoftError(f"import stopped: {e} (run the same command again to resume)") from e
        except FSError as e:
            done = importer.stats.created + importer.stats.updated
            if e.errno == errno.ENOSPC:
                raise LoftError(
                    f"import stopped after {plural(done, 'file')}: the volume's capacity or inode "
                    "quota "
                    "is reached (raise it with `loft config`, then run the same command again "
                    "to resume)"
                ) from e
            raise LoftError(
                f"import stopped after {plural(done, 'file')}: {e} (run the same command again "
                "to resume)"
            ) from e
        finally:
            store.close()
    summary = {
        "source": source.name,
        "prefix": prefix,
        "dest": dest,
        "objects": stats.listed,
        "bytes": stats.bytes,
        "created": stats.created,
        "updated": stats.updated,
        "unchanged": stats.unchanged,
        "conflicts": stats.conflicts,
        "skipped": stats.skipped,
        "vanished": stats.vanished,
        "deleted": stats.deleted,
        "directories": stats.dirs,
        "seconds": round(stats.seconds, 3),
        "objects_per_s": round(stats.listed / stats.seconds, 1) if stats.seconds else 0,
        "resumed": stats.resumed,
        "conflict_paths": stats.conflict_paths,
        "skipped_keys": stats.skipped_keys,
        "vanished_paths": stats.vanished_paths,
    }
    if as_json:
        print_json(summary)
    else:
        rows = [
            (k, v)
            for k, v in summary.items()
            if not isinstance(v, list) and k not in ("source", "prefix", "dest")
        ]
        rows[1] = ("bytes", format_size(stats.bytes))
        print_table(
            kv_table(f"Import of {source.name}/{prefix[len(source.prefix) :]} into {dest}", rows)
        )
        for what, paths in (
            ("conflicts (left alone; --overwrite replaces files)", stats.conflict_paths),
            ("skipped keys (no path can spell them)", stats.skipped_keys),
            ("vanished from the source" + (" (removed)" if delete else ""), stats.vanished_paths),
        ):
            if paths:
                print_warning(
                    f"{what}: " + ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
                )
    if stats.conflicts and not overwrite:
        raise typer.Exit(2)
