"""Block garbage collection: delete the blocks of slices nobody references any more, then drop
their records. Lazy and in the background, never in the write path (DESIGN 2.1)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from loftfs.chunk.layout import block_keys
from loftfs.meta.interface import Meta
from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)

GROUP_KEYS = 1000  # block keys deleted in one delete_many call (one S3 DeleteObjects request)


@dataclass
class GCStats:
    slices: int = 0  # slices whose blocks were deleted and records dropped
    blocks: int = 0
    bytes: int = 0
    failed: int = 0  # slices whose blocks could not all be deleted (they stay queued)


class BlockGC:
    """``run_once`` collects everything queued now; ``start`` repeats it every ``interval_s``
    seconds in a daemon thread until ``stop``."""

    def __init__(
        self,
        meta: Meta,
        store: ObjectStore,
        volume_uuid: str,
        block_size: int,
        interval_s: float,
        batch: int = 1000,
    ) -> None:
        self.meta = meta
        self.store = store
        self.uuid = volume_uuid
        self.block_size = block_size
        self.interval_s = interval_s
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.deleted_slices = 0

    def run_once(self) -> int:
        """Delete the blocks of every slice queued for deletion; returns how many slices were
        collected. A slice whose blocks could not all be deleted stays queued for next time."""
        return self.collect().slices

    def collect(self) -> GCStats:
        """``run_once`` with the full counts (for ``loft gc``)."""
        self._purge_trash()
        stats = GCStats()
        failed: set[int] = set()
        while not self._stop.is_set():
            batch = [(i, n) for i, n in self.meta.deleted_slices(self.batch) if i not in failed]
            if not batch:
                break
            done: list[int] = []
            # external slices have no blocks of ours: forgetting them drops their records
            external = self.meta.get_ext([i for i, _ in batch])
            group: list[tuple[int, int, list[str]]] = []  # (slice, size, its block keys)
            grouped = 0  # block keys in the group
            for slice_id, size in batch:
                if slice_id in external:
                    done.append(slice_id)
                    continue
                keys = block_keys(self.uuid, slice_id, size, self.block_size)
                group.append((slice_id, size, keys))
                grouped += len(keys)
                if grouped >= GROUP_KEYS:
                    self._delete_group(group, done, failed, stats)
                    group, grouped = [], 0
            if group:
                self._delete_group(group, done, failed, stats)
            if done:
                self.meta.forget_deleted_slices(done)
                stats.slices += len(done)
            else:
                break  # everything left failed this round
        stats.failed = len(failed)
        self.deleted_slices += stats.slices
        if stats.slices:
            log.debug("gc: deleted the blocks of %d slices", stats.slices)
        return stats

    def _delete_group(
        self,
        group: list[tuple[int, int, list[str]]],
        done: list[int],
        failed: set[int],
        stats: GCStats,
    ) -> None:
        """Delete the blocks of the slices in ``group`` with one ``delete_many`` (a single
        ``DeleteObjects`` request on S3 for up to 1000 keys: deleting 10,000 small files costs
        10 requests, not 10,000). When it fails, slice by slice, so that only the slices whose
        blocks could not all be deleted stay queued."""
        try:
            self.store.delete_many([key for _, _, keys in group for key in keys])
            deleted = group
        except Exception:
            deleted = []
            for slice_id, size, keys in group:
                try:
                    self.store.delete_many(keys)
                except Exception as e:
                    log.warning("gc: could not delete blocks of slice %d: %s", slice_id, e)
                    failed.add(slice_id)
                    continue
                deleted.append((slice_id, size, keys))
        for slice_id, size, keys in deleted:
            done.append(slice_id)
            stats.blocks += len(keys)
            stats.bytes += size

    def _purge_trash(self) -> None:
        """Expired trash releases its slices into the deletion queue first."""
        try:
            self.meta.cleanup_trash()
        except Exception as e:
            log.warning("gc: trash cleanup failed: %s", e)

    def start(self) -> None:
        if self._thread is not None or self.interval_s <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loft-gc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as e:
                log.warning("gc round failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop.clear()  # a later manual ``run_once`` still works
