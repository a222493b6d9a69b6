"""Eager import: list a source prefix in parallel and write one file per object, metadata only.

How it runs (``Importer.run``):

1. **Partitions.** The prefix is listed one level deep (delimiter ``/``), and again one level
   below while there are fewer partitions than workers can use; each common prefix found is a
   partition listed flat (every key under it, in key order), and each prefix expanded also
   gets a "top" partition for the objects directly in it. A narrow tree (at most half as many
   partitions as wanted, e.g. a flat bucket of billions of keys) is cut further into key
   ranges by the first character after each prefix. The list of partitions is stored with the
   job, so a resumed import uses the same ones.
2. **Workers.** ``threads`` workers take partitions in turn, list them, turn each key into a
   path (skipping keys no file system path can spell: empty or ``.``/``..`` segments, names
   over 255 bytes), filter with ``--include``/``--exclude``, and write batches of ``batch``
   objects per metadata transaction (``Meta.import_batch``), each with the partition's
   checkpoint (the last key written), so a killed import resumes after the last committed
   batch and ends identical to an uninterrupted one.
3. **Sweep** (on a re-run, after a completed import of the same source prefix into the same
   directory): each directory of the destination is compared with a delimiter listing of its
   prefix; files imported from that prefix whose object is gone are reported as vanished,
   and unlinked with ``delete``.

The job record (setting ``import:<job>``, the job being the source, prefix and destination)
says whether the last pass completed; a run after a completed pass imports what is new or
changed (the metadata transaction compares each object's ETag and size with the recorded
ones) and sweeps. Memory stays bounded whatever the object count: listings are streamed, one
batch per worker is held, and the cache of known directories is capped.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loftfs.errors import ConfigError, FSError
from loftfs.meta.interface import Meta
from loftfs.meta.ops_import import BatchResult, ImportItem, ImportOwner
from loftfs.meta.types import KIND_EXTERNAL, ROOT_CTX, ROOT_INODE, FileType
from loftfs.object.interface import ObjectInfo, ObjectStore
from loftfs.sources import Source

log = logging.getLogger(__name__)

MAX_NAME = 255
DIR_CACHE_MAX = 100_000  # directories remembered across batches (cleared when full)
REPORT_MAX = 100  # paths kept for the report per kind (all are counted)
# A partition's checkpoint (a setting): JSON, so that any key can be stored (PostgreSQL text
# holds no NUL); ``{"after": key}`` while it runs, ``{"done": true}`` once finished.
_DONE = json.dumps({"done": True})


def _after(key: str) -> str:
    return json.dumps({"after": key})


JOB_FORMAT = 1


@dataclass
class ImportOptions:
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    threads: int = 8
    batch: int = 1000
    owner: ImportOwner = field(default_factory=ImportOwner)
    overwrite: bool = False
    delete: bool = False
    partitions_per_thread: int = 4  # split the listing until about this many per worker


@dataclass
class ImportStats:
    listed: int = 0  # objects seen in the listing (after filters)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    skipped: int = 0  # keys no path can spell, or filtered out
    vanished: int = 0
    deleted: int = 0
    bytes: int = 0  # size of the objects listed
    dirs: int = 0
    resumed: bool = False
    refresh: bool = False  # a re-run of a completed import
    seconds: float = 0.0
    conflict_paths: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    vanished_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Partition:
    prefix: str
    flat: bool  # every key under the prefix; else only the objects directly in it
    start: str = ""  # only keys >= start ("": from the prefix on)
    end: str = ""  # only keys < end ("": to the end of the prefix)

    def to_json(self) -> list[object]:
        return [self.prefix, self.flat, self.start, self.end]

    @classmethod
    def from_json(cls, rec: list[object]) -> Partition:
        prefix, flat, *bounds = rec
        start, end = (str(b) for b in bounds) if bounds else ("", "")
        return cls(str(prefix), bool(flat), start, end)


# Where a narrow tree (fewer prefixes than workers, e.g. a flat bucket) is cut into key ranges:
# by the first character after the prefix, over the characters keys start with most (digits,
# letters); keys outside fall in the first or the last range.
RANGE_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MAX_RANGES = 16  # ranges per prefix at most


def key_path(rel: str) -> tuple[tuple[bytes, ...], bytes] | None:
    """(directories, name) of a key relative to the import prefix, or None when no path can
    spell it."""
    parts = rel.split("/")
    out = []
    for part in parts:
        if part in ("", ".", ".."):
            return None
        try:
            raw = part.encode("utf-8")  # keys are stored as UTF-8: a local tree's file
        except UnicodeEncodeError:  # names that are not (surrogate-escaped) are skipped
            return None
        if len(raw) > MAX_NAME or b"\0" in raw:
            return None
        out.append(raw)
    return tuple(out[:-1]), out[-1]


def _decode(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


class Importer:
    """One import of ``prefix`` (full key prefix in the source's bucket, ``""`` or ending in
    ``/``) of ``source`` (read through ``store``) into the directory ``dest`` of the volume."""

    def __init__(
        self,
        meta: Meta,
        source: Source,
        store: ObjectStore,
        prefix: str,
        dest: str,
        opts: ImportOptions,
        progress: Callable[[ImportStats], None] | None = None,
    ) -> None:
        if opts.threads < 1 or opts.batch < 1:
            raise ConfigError("--threads and --batch must be at least 1")
        self.meta = meta
        self.source = source
        self.store = store
        self.prefix = prefix
        self.dest = "/" + dest.strip("/")
        self.opts = opts
        self.progress = progress
        self.stats = ImportStats()
        self._lock = threading.Lock()
        self._dirs: dict[tuple[bytes, ...], int] = {}
        self._stop = threading.Event()
        digest = hashlib.sha256(f"{source.id}\0{prefix}\0{self.dest}".encode()).hexdigest()
        self.job = f"import:{digest[:20]}"

    # --- entry point --------------------------------------------------------------------------

    def run(self) -> ImportStats:
        started = time.monotonic()
        dest = self._dest_dir()
        job = self._load_job()
        if job.get("state") == "running":
            self.stats.resumed = True
            parts = [Partition.from_json(rec) for rec in job["partitions"]]
            run_no = int(job["run"])
            self.stats.refresh = bool(job.get("refresh"))
        else:
            self.stats.refresh = job.get("state") == "complete"
            run_no = int(job.get("run", 0)) + 1
            parts = partitions(
                self.store, self.prefix, self.opts.threads * self.opts.partitions_per_thread
            )
            self._save_job(
                {
                    "state": "running",
                    "run": run_no,
                    "refresh": self.stats.refresh,
                    "partitions": [p.to_json() for p in parts],
                    "source": self.source.id,
                    "prefix": self.prefix,
                    "dest": self.dest,
                    "started_ns": time.time_ns(),
                }
            )
        names = [f"{self.job}:{run_no}:{i}" for i in range(len(parts))]
        with ThreadPoolExecutor(self.opts.threads, thread_name_prefix="loft-import") as pool:
            futures = [
                pool.submit(self._import_partition, dest, part, name)
                for part, name in zip(parts, names, strict=True)
            ]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                self._stop.set()
                raise
        if self.stats.refresh:
            self._sweep(dest)
        self._save_job(
            {
                "state": "complete",
                "run": run_no,
                "source": self.source.id,
                "prefix": self.prefix,
                "dest": self.dest,
                "finished_ns": time.time_ns(),
            }
        )
        for i in range(0, len(names), 500):  # the checkpoints: done with
            self.meta.delete_settings(names[i : i + 500])
        self.stats.seconds = time.monotonic() - started
        self._report()
        return self.stats

    def stop(self) -> None:
        """Ask the workers to stop after their current batch (Ctrl-C)."""
        self._stop.set()

    # --- job record ---------------------------------------------------------------------------

    def _load_job(self) -> dict[str, Any]:
        text = self.meta.get_setting(self.job)
        if not text:
            return {}
        try:
            doc = json.loads(text)
        except ValueError:
            raise ConfigError(f"the checkpoint of this import ({self.job}) is damaged") from None
        if not isinstance(doc, dict) or doc.get("format") != JOB_FORMAT:
            raise ConfigError(f"the checkpoint of this import ({self.job}) is of another format")
        return doc

    def _save_job(self, doc: dict[str, object]) -> None:
        self.meta.set_setting(self.job, json.dumps({"format": JOB_FORMAT, **doc}))

    # --- destination --------------------------------------------------------------------------

    def _dest_dir(self) -> int:
        return ensure_dir(self.meta, self.dest, self.opts.owner)

    # --- listing ------------------------------------------------------------------------------

    def _wanted(self, rel: str) -> bool:
        if self.opts.include and not any(fnmatch.fnmatchcase(rel, p) for p in self.opts.include):
            return False
        return not any(fnmatch.fnmatchcase(rel, p) for p in self.opts.exclude)

    # --- work ---------------------------------------------------------------------------------

    def _import_partition(self, dest: int, part: Partition, name: str) -> None:
        text = self.meta.get_setting(name)
        if text == _DONE:
            return
        try:
            after = str(json.loads(text)["after"]) if text else ""
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"the checkpoint {name} of this import is damaged") from None
        batch: list[ImportItem] = []
        listed = skipped = nbytes = 0
        skipped_keys: list[str] = []
        last = after
        cut = len(self.prefix)
        for info in list_partition(self.store, part, after):
            if self._stop.is_set():
                return
            last = info.key
            rel = info.key[cut:]
            if rel.endswith("/"):
                continue  # a "directory" marker object: not a file
            path = key_path(rel)
            if path is None or not self._wanted(rel):
                skipped += 1
                if path is None and len(skipped_keys) < REPORT_MAX:
                    skipped_keys.append(info.key)
                continue
            listed += 1
            nbytes += info.size
            batch.append(
                ImportItem(path[0], path[1], info.size, info.mtime_ns, info.key, info.etag)
            )
            if len(batch) >= self.opts.batch:
                self._commit(dest, batch, (name, _after(last)), listed, skipped, nbytes)
                self._note_skipped(skipped_keys)
                batch, listed, skipped, nbytes, skipped_keys = [], 0, 0, 0, []
        if not self._stop.is_set():
            self._commit(dest, batch, (name, _DONE), listed, skipped, nbytes)
            self._note_skipped(skipped_keys)

    def _note_skipped(self, keys: list[str]) -> None:
        if keys:
            with self._lock:
                room = REPORT_MAX - len(self.stats.skipped_keys)
                self.stats.skipped_keys.extend(keys[: max(0, room)])

    def _commit(
        self,
        dest: int,
        batch: list[ImportItem],
        checkpoint: tuple[str, str],
        listed: int,
        skipped: int,
        nbytes: int,
    ) -> None:
        with self._lock:
            known = dict(self._dirs)
        result: BatchResult = self.meta.import_batch(
            dest,
            batch,
            source=self.source.id,
            owner=self.opts.owner,
            dir_cache=known,
            overwrite=self.opts.overwrite,
            checkpoint=checkpoint,
        )
        with self._lock:
            if len(self._dirs) + len(result.new_dirs) > DIR_CACHE_MAX:
                self._dirs.clear()
            self._dirs.update(result.new_dirs)
            s = self.stats
            s.listed += listed
            s.skipped += skipped
            s.bytes += nbytes
            s.created += result.created
            s.updated += result.updated
            s.unchanged += result.unchanged
            s.conflicts += result.conflicts
            s.dirs += len(result.new_dirs)
            room = REPORT_MAX - len(s.conflict_paths)
            s.conflict_paths.extend(_decode(p) for p in result.conflict_paths[: max(0, room)])
        if self.progress is not None:
            self.progress(self.stats)

    # --- sweep --------------------------------------------------------------------------------

    def _sweep(self, dest: int) -> None:
        """Report (and with ``delete`` unlink) files imported from this prefix whose object is
        gone. One directory at a time: its entries against a delimiter listing of its prefix."""
        stack: list[tuple[int, str]] = [(dest, self.prefix)]
        while stack and not self._stop.is_set():
            inode, prefix = stack.pop()
            try:
                entries = self.meta.readdir(ROOT_CTX, inode)
            except FSError:
                continue
            present = set()
            for info in self.store.list(prefix, delimiter="/"):
                present.add(info.key[len(prefix) :].rstrip("/"))
            for e in entries:
                if e.attr.nlink == 0:
                    continue  # removed while listed
                name = _decode(e.name)
                if e.attr.type == FileType.DIR:
                    stack.append((e.attr.inode, f"{prefix}{name}/"))
                    continue
                if name in present or e.attr.type != FileType.FILE:
                    continue
                if not self._imported_here(e.attr.inode, prefix + name):
                    continue
                path = self.dest.rstrip("/") + "/" + (prefix + name)[len(self.prefix) :]
                self.stats.vanished += 1
                if len(self.stats.vanished_paths) < REPORT_MAX:
                    self.stats.vanished_paths.append(path)
                if self.opts.delete:
                    try:
                        self.meta.unlink(ROOT_CTX, inode, e.name)
                        self.stats.deleted += 1
                    except FSError as err:
                        log.warning("import: could not remove %s: %s", path, err)

    def _imported_here(self, inode: int, key: str) -> bool:
        """Whether the file's data starts with an external slice of ``key`` of this source."""
        slices = self.meta.read_chunk(inode, 0)
        if not slices or slices[0].kind != KIND_EXTERNAL:
            return False
        rec = self.meta.get_ext([slices[0].id]).get(slices[0].id)
        return rec is not None and rec.source == self.source.id and rec.key == key

    def _report(self) -> None:
        s = self.stats
        log.info(
            "import of %s%s into %s: %d objects listed, %d created, %d updated, %d unchanged, "
            "%d conflicts, %d skipped, %d vanished, %d deleted in %.1f s",
            self.source.name,
            "/" + self.prefix if self.prefix else "",
            self.dest,
            s.listed,
            s.created,
            s.updated,
            s.unchanged,
            s.conflicts,
            s.skipped,
            s.vanished,
            s.deleted,
            s.seconds,
        )


def ensure_dir(meta: Meta, path: str, owner: ImportOwner) -> int:
    """The inode of directory ``path`` of the volume, made (with its parents, of ``owner``'s
    mode and owner) when missing. ``ConfigError`` when a part of it is not a directory."""
    inode = ROOT_INODE
    for part in path.strip("/").split("/"):
        if not part:
            continue
        name = part.encode("utf-8", "surrogateescape")
        try:
            attr = meta.lookup(ROOT_CTX, inode, name)
        except FSError as e:
            if e.errno != errno.ENOENT:
                raise
            attr = meta.mkdir(ROOT_CTX, inode, name, owner.dir_mode)
            if owner.uid or owner.gid:
                meta.setattr(ROOT_CTX, attr.inode, uid=owner.uid, gid=owner.gid)
        if attr.type != FileType.DIR:
            raise ConfigError(f"{path}: {part!r} is not a directory in the volume")
        inode = attr.inode
    return inode


def partitions(store: ObjectStore, prefix: str, want: int) -> list[Partition]:
    """Split the listing of ``prefix`` into about ``want`` partitions (at most three levels
    of delimiter listings; see the module docstring), in a stable order."""
    done: list[Partition] = []
    frontier = [prefix]
    for _depth in range(3):
        found: list[str] = []
        for p in frontier:
            done.append(Partition(p, False))
            found.extend(
                info.key
                for info in store.list(p, delimiter="/")
                if info.is_prefix and key_path(info.key[len(prefix) :].rstrip("/"))
            )
        frontier = found
        if not frontier or len(done) + len(frontier) >= want:
            break
    done.extend(Partition(p, True) for p in frontier)
    if len(done) * 2 <= want:
        # a narrow tree: cut every partition into key ranges, so that the workers share it
        each = min(MAX_RANGES, -(-want // len(done)))
        done = [
            Partition(p.prefix, p.flat, start, end)
            for p in done
            for start, end in key_ranges(p.prefix, each)
        ]
    return sorted(done, key=lambda p: (p.prefix, p.flat, p.start))


def key_ranges(prefix: str, n: int) -> list[tuple[str, str]]:
    """``n`` contiguous ranges [start, end) covering every key under ``prefix``."""
    if n <= 1:
        return [("", "")]
    cuts = [prefix + RANGE_ALPHABET[i * len(RANGE_ALPHABET) // n] for i in range(1, n)]
    edges = ["", *cuts, ""]
    return list(itertools.pairwise(edges))


def _just_below(key: str) -> str:
    """A string after every key that sorts before ``key`` and before ``key`` itself: a
    ``start_after`` that lists ``key`` and what follows."""
    return key[:-1] + chr(ord(key[-1]) - 1) + "\U0010ffff"


def list_partition(store: ObjectStore, part: Partition, after: str) -> Iterator[ObjectInfo]:
    """The objects of a partition after key ``after``, in key order."""
    delimiter = "" if part.flat else "/"
    if not after and part.start:
        after = _just_below(part.start)
    for info in store.list(part.prefix, start_after=after, delimiter=delimiter):
        if part.end and info.key >= part.end:
            return
        if not info.is_prefix:
            yield info


def bare_listing(store: ObjectStore, prefix: str, threads: int) -> tuple[int, float]:
    """(objects, seconds) of the same partitioned parallel listing an import does, writing
    nothing: the yardstick of the import benchmark."""
    started = time.monotonic()
    parts = partitions(store, prefix, threads * ImportOptions.partitions_per_thread)

    def count(part: Partition) -> int:
        return sum(1 for _ in list_partition(store, part, ""))

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(count, parts))
    return total, time.monotonic() - started
