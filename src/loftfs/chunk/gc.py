"""Block garbage collection: delete the blocks of slices nobody references any more, then drop
their records. Lazy and in the background, never in the write path (DESIGN 2.1)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loftfs.chunk.layout import block_keys
from loftfs.meta.interface import Meta
from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)

GROUP_KEYS = 1000  # block keys deleted in one delete_many call (one S3 DeleteObjects request)

# Pacing of the background rounds (not of ``loft gc``): before each group the mount's request
# rate is probed; above BUSY_OPS_PER_S the group waits, up to MAX_YIELD_S, for a quieter moment,
# then goes ahead with at most BUSY_GROUP_KEYS keys. A busy mount still deletes (about 20 keys
# a second), a quiet one at full speed.
BUSY_OPS_PER_S = 200  # FUSE requests per second above which the mount counts as busy
PROBE_S = 0.25
MAX_YIELD_S = 5.0
BUSY_GROUP_KEYS = 100


@dataclass
class GCStats:
    slices: int = 0  # slices whose blocks were deleted and records dropped
    blocks: int = 0
    bytes: int = 0
    failed: int = 0  # slices whose blocks could not all be deleted (they stay queued)


class BlockGC:
    """``run_once`` collects everything queued now; ``start`` repeats it every ``interval_s``
    seconds in a daemon thread until ``stop``.

    ``activity`` (the mount's count of FUSE requests served so far) lets the background rounds
    yield to foreground traffic: deleting objects costs the object store and the metadata
    engine work that would otherwise land in the middle of a training job's reads.
    """

    def __init__(
        self,
        meta: Meta,
        store: ObjectStore,
        volume_uuid: str,
        block_size: int,
        interval_s: float,
        batch: int = 1000,
        activity: Callable[[], int] | None = None,
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
        self.activity = activity
        self.busy_ops_per_s = BUSY_OPS_PER_S
        self.probe_s = PROBE_S
        self.max_yield_s = MAX_YIELD_S
        self.yielded_s = 0.0  # seconds background rounds waited for a quieter moment
        self.busy_groups = 0  # groups deleted (small) while the mount stayed busy

    def run_once(self) -> int:
        """Delete the blocks of every slice queued for deletion; returns how many slices were
        collected. A slice whose blocks could not all be deleted stays queued for next time."""
        return self.collect().slices

    def collect(self, paced: bool = False) -> GCStats:
        """``run_once`` with the full counts (for ``loft gc``). ``paced``: yield to foreground
        traffic before each group (``_pace``; the background rounds)."""
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
            limit = 0  # of the group being built; 0: not decided yet
            for slice_id, size in batch:
                if slice_id in external:
                    done.append(slice_id)
                    continue
                if not limit:
                    limit = self._pace() if paced else GROUP_KEYS
                    if not limit:
                        break  # stopping
                keys = block_keys(self.uuid, slice_id, size, self.block_size)
                group.append((slice_id, size, keys))
                grouped += len(keys)
                if grouped >= limit:
                    self._delete_group(group, done, failed, stats)
                    group, grouped, limit = [], 0, 0
            if group and not self._stop.is_set():
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

    def _pace(self) -> int:
        """The size limit of the next group of a background round, after waiting while the
        mount serves more than ``busy_ops_per_s`` requests a second, at most ``max_yield_s``:
        ``GROUP_KEYS`` once it is quiet, ``BUSY_GROUP_KEYS`` when it stayed busy (a short
        request now rather than none), 0 when the GC is stopping."""
        if self.activity is None:
            return GROUP_KEYS
        begin = time.monotonic()
        while True:
            start, before = time.monotonic(), self.activity()
            if self._stop.wait(self.probe_s):
                return 0
            now = time.monotonic()
            if self.activity() - before <= self.busy_ops_per_s * (now - start):
                self.yielded_s += start - begin
                return GROUP_KEYS
            if now - begin >= self.max_yield_s:
                self.yielded_s += now - begin
                self.busy_groups += 1
                return BUSY_GROUP_KEYS

    def figures(self) -> dict[str, int | float]:
        """For ``loft stats`` and Prometheus."""
        return {
            "deleted_slices_total": self.deleted_slices,
            "yielded_seconds_total": round(self.yielded_s, 3),
            "busy_groups_total": self.busy_groups,
        }

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
                self.collect(paced=True)
            except Exception as e:
                log.warning("gc round failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop.clear()  # a later manual ``run_once`` still works
