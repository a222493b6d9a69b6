"""Write-back (``--writeback``): blocks are acknowledged once staged durably in the local disk
cache and uploaded to the object store by background threads.

What it guarantees: a block is committed to the metadata engine only after ``stage`` fsynced
it, so a crash or a reboot loses nothing that a write, flush or fsync acknowledged; the next
mount of the volume with the same cache directory finds the staged blocks and uploads them.
What it gives up: until a block is uploaded, only this machine can read it; another client
reading the file meanwhile gets EIO (the block is missing in the object store). See
docs/CACHE.md.

Uploads run ``threads`` at a time, in the order blocks were staged; a failed upload is retried
with exponential backoff (capped), forever, since dropping a staged block would lose data
that was acknowledged. A block whose file is deleted before its upload is never uploaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Protocol

from loftfs.chunk.layout import block_length
from loftfs.object.interface import ObjectStore

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


class StagingArea(Protocol):
    """What write-back needs from the disk cache (``chunk.cache_disk.DiskCache``)."""

    def stage(self, key: str, data: bytes) -> bool: ...
    def read_staged(self, key: str) -> bytes | None: ...
    def staged_keys(self) -> list[str]: ...
    def unstage(self, key: str) -> None: ...
    def drop_staged(self, key: str) -> None: ...


class WriteBack:
    def __init__(self, staging: StagingArea, store: ObjectStore, threads: int) -> None:
        self.staging = staging
        self.store = store
        self.threads = max(1, threads)
        self._cond = threading.Condition()
        self._queue: OrderedDict[str, int] = OrderedDict()  # staged, waiting: key -> length
        self._inflight: dict[str, int] = {}  # uploading now
        self._forgotten: set[str] = set()  # deleted while uploading: delete after the upload
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self.uploaded_blocks = 0
        self.uploaded_bytes = 0
        self.failed_uploads = 0  # attempts that failed (each is retried)
        self.lost_blocks = 0  # staged files that could not be read back
        self.recovered_blocks = 0  # found staged at start (left by an earlier mount)

    # --- staging ------------------------------------------------------------------------------

    def stage(self, key: str, data: bytes) -> bool:
        """Stage ``data`` durably and queue its upload; False when the disk cache cannot take
        it (full or failing disk): the caller then uploads synchronously."""
        if not self.staging.stage(key, data):
            return False
        with self._cond:
            self._queue[key] = len(data)
            self._cond.notify()
        return True

    def forget(self, keys: list[str]) -> None:
        """These blocks are no longer referenced (their file was deleted or their slice
        dropped): do not upload what is still waiting, delete after upload what is running."""
        drop = []
        with self._cond:
            for key in keys:
                if self._queue.pop(key, None) is not None:
                    drop.append(key)
                elif key in self._inflight:
                    self._forgotten.add(key)
            self._cond.notify_all()
        for key in drop:
            self.staging.drop_staged(key)

    def pending(self) -> tuple[int, int]:
        """(blocks, bytes) staged and not yet uploaded."""
        with self._cond:
            return (
                len(self._queue) + len(self._inflight),
                sum(self._queue.values()) + sum(self._inflight.values()),
            )

    def stats(self) -> dict[str, int]:
        blocks, nbytes = self.pending()
        return {
            "pending_blocks": blocks,
            "pending_bytes": nbytes,
            "uploaded_blocks": self.uploaded_blocks,
            "uploaded_bytes": self.uploaded_bytes,
            "failed_uploads": self.failed_uploads,
            "lost_blocks": self.lost_blocks,
            "recovered_blocks": self.recovered_blocks,
        }

    # --- workers ------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the blocks earlier mounts left staged, then start the upload threads."""
        left = self.staging.staged_keys()
        with self._cond:
            for key in left:
                if key not in self._queue and key not in self._inflight:
                    self._queue[key] = block_length(key)
                    self.recovered_blocks += 1
        if self.recovered_blocks:
            log.info(
                "write-back: %d blocks staged by an earlier mount will be uploaded",
                self.recovered_blocks,
            )
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"loft-writeback-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def _next(self) -> str | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            key, length = self._queue.popitem(last=False)
            self._inflight[key] = length
            return key

    def _run(self) -> None:
        while True:
            key = self._next()
            if key is None:
                return
            try:
                self._upload(key)
            finally:
                with self._cond:
                    self._inflight.pop(key, None)
                    self._cond.notify_all()

    def _upload(self, key: str) -> None:
        data = self.staging.read_staged(key)
        if data is None:
            self.lost_blocks += 1
            log.error(
                "write-back: staged block %s is missing or damaged in the disk cache; "
                "its data is lost",
                key,
            )
            return
        backoff = MIN_BACKOFF_S
        while True:
            try:
                self.store.put(key, data)
                self.store.sync()  # the staged copy goes next: this one must be durable
                break
            except Exception as e:
                self.failed_uploads += 1
                log.warning(
                    "write-back: upload of %s failed (%s); retrying in %.1fs", key, e, backoff
                )
            with self._cond:
                self._cond.wait(backoff)
                if self._stopping:
                    return  # still staged: the next mount uploads it
            if self._take_forgotten(key):  # deleted meanwhile: never upload it
                self.staging.drop_staged(key)
                return
            backoff = min(MAX_BACKOFF_S, backoff * 2)
        self.uploaded_blocks += 1
        self.uploaded_bytes += len(data)
        if self._take_forgotten(key):
            self.staging.drop_staged(key)
            try:
                self.store.delete(key)
            except Exception as e:
                log.warning("write-back: could not delete the unreferenced block %s: %s", key, e)
        else:
            self.staging.unstage(key)

    def _take_forgotten(self, key: str) -> bool:
        """Whether ``key`` was deleted while its upload ran (``forget``); clears the mark."""
        with self._cond:
            forgotten = key in self._forgotten
            self._forgotten.discard(key)
            return forgotten

    def drain(self, stall_timeout_s: float = 60.0) -> int:
        """Wait until every staged block is uploaded, or until no upload finished for
        ``stall_timeout_s`` seconds (the object store is down). Returns the blocks left."""
        last_progress = time.monotonic()
        last_count = -1
        while True:
            blocks, _ = self.pending()
            if blocks == 0:
                return 0
            if blocks != last_count:
                last_count, last_progress = blocks, time.monotonic()
                log.info("write-back: waiting for %d blocks to upload", blocks)
            elif time.monotonic() - last_progress >= stall_timeout_s:
                log.error(
                    "write-back: %d blocks not uploaded (no progress for %.0fs); they stay "
                    "staged in the disk cache and the next mount uploads them",
                    blocks,
                    stall_timeout_s,
                )
                return blocks
            with self._cond:
                self._cond.wait(0.5)

    def close(self) -> None:
        """Stop the upload threads (a running upload finishes or stays staged)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._workers:
            t.join(timeout=MAX_BACKOFF_S)
