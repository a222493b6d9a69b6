"""File data operations: chunk slice lists, slice reference counts, truncation, holes, copies,
compaction, the trash, and space accounting."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from loftfs.chunk.layout import chunk_ranges, overlay
from loftfs.errors import FSError
from loftfs.meta import perm
from loftfs.meta.core import (
    MAX_FILE_SIZE,
    NS_PER_DAY,
    Acct,
    MetaCore,
    now_ns,
    space_of,
    time_arg,
)
from loftfs.meta.txn import USED_INODES, USED_SPACE, Txn
from loftfs.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    W_OK,
    Attr,
    Ctx,
    ExtObject,
    FileType,
    Slice,
    SliceCommit,
    StatFS,
)

UNLIMITED_BYTES = 1 << 50  # statfs total of a volume without capacity quota (1 PiB)
UNLIMITED_INODES = 10_000_000_000


def _hole(pos: int, length: int) -> Slice:
    return Slice(pos=pos, id=0, size=0, off=0, len=length)


def _check_slice(index: int, s: Slice) -> None:
    if index < 0 or s.pos < 0 or s.len <= 0 or s.pos + s.len > CHUNK_SIZE:
        raise FSError(errno.EINVAL, f"slice out of chunk bounds: {s}")
    if s.id < 0 or (s.id and (s.off < 0 or s.off + s.len > s.size)):
        raise FSError(errno.EINVAL, f"slice range outside the stored slice: {s}")


class DataOps(MetaCore):
    """Slice lists and everything that changes a file's size or content references."""

    def read_chunk(self, inode: int, index: int) -> list[Slice]:
        return self._read(lambda tx: tx.get_chunk(inode, index))

    def write_slice(self, inode: int, index: int, slice: Slice, mtime_ns: int) -> SliceCommit:
        _check_slice(index, slice)
        end = index * CHUNK_SIZE + slice.pos + slice.len
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)

        def fn(tx: Txn, acct: Acct) -> SliceCommit:
            tx.prefetch(attrs=[inode], chunks=[(inode, index)], assume=True)
            attr = self._get_file(tx, inode)
            count = len(tx.get_chunk(inode, index))
            new = attr.copy()
            new.size = max(attr.size, end)
            delta = space_of(FileType.FILE, new.size) - space_of(FileType.FILE, attr.size)
            self._check_space(tx, delta)
            tx.append_slices(inode, index, [slice])
            if slice.id:
                tx.add_slice_refs({slice.id: (slice.size, 1)})
            now = now_ns()
            new.mtime_ns = time_arg(mtime_ns, now)
            new.ctime_ns = now
            tx.put_attr(new)
            acct.space += delta
            return SliceCommit(count + 1, new)

        return self._write(fn)

    # --- size changes -------------------------------------------------------------------------

    def _cut(self, tx: Txn, inode: int, length: int) -> None:
        """Forget the file's content from ``length`` on: drop whole chunks past the end and
        lay a hole over the rest of the chunk holding the new end, so that growing the file
        again reads zeros there."""
        first_dead = -(-length // CHUNK_SIZE)
        indexes = tx.chunk_indexes(inode)
        dead = [i for i in indexes if i >= first_dead]
        self._release_slices(tx, [tx.get_chunk(inode, i) for i in dead])
        for i in dead:
            tx.put_chunk(inode, i, [])
        index, pos = divmod(length, CHUNK_SIZE)
        if pos and index in indexes:
            tx.append_slices(inode, index, [_hole(pos, CHUNK_SIZE - pos)])

    def truncate(self, ctx: Ctx, inode: int, length: int, *, check_perm: bool = True) -> Attr:
        if length < 0:
            raise FSError(errno.EINVAL)
        if length > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)

        def fn(tx: Txn, acct: Acct) -> Attr:
            attr = self._get_file(tx, inode)
            if check_perm:
                perm.check(ctx, attr, W_OK)
            delta = space_of(FileType.FILE, length) - space_of(FileType.FILE, attr.size)
            self._check_space(tx, delta)
            if length < attr.size:
                self._cut(tx, inode, length)
            new = attr.copy()
            new.size = length
            new.mtime_ns = new.ctime_ns = now_ns()
            tx.put_attr(new)
            acct.space += delta
            return new

        return self._write(fn)

    def fallocate(self, ctx: Ctx, inode: int, mode: int, offset: int, length: int) -> Attr:
        """Preallocation only changes the size (space is charged by size, not reserved);
        PUNCH_HOLE and ZERO_RANGE lay hole slices over the range."""
        known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        zero = bool(mode & FALLOC_FL_ZERO_RANGE)
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        if mode & ~known or (punch and zero) or (punch and not keep):
            raise FSError(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise FSError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)

        def fn(tx: Txn, acct: Acct) -> Attr:
            attr = tx.get_attr(inode)
            if attr is None:
                raise FSError(errno.ENOENT)
            if attr.type == FileType.DIR:
                raise FSError(errno.EISDIR)
            if attr.type != FileType.FILE:
                raise FSError(errno.ENODEV)
            new = attr.copy()
            if not keep:
                new.size = max(attr.size, end)
            delta = space_of(FileType.FILE, new.size) - space_of(FileType.FILE, attr.size)
            self._check_space(tx, delta)
            changed = new.size != attr.size
            if punch or zero:
                # content past the size always reads as zeros: holes are needed only below it
                hole_end = min(end, attr.size)
                if hole_end > offset:
                    existing = set(tx.chunk_indexes(inode))
                    for index, pos, n in chunk_ranges(offset, hole_end - offset):
                        if index in existing:
                            tx.append_slices(inode, index, [_hole(pos, n)])
                changed = True
            if changed:
                new.mtime_ns = new.ctime_ns = now_ns()
                tx.put_attr(new)
            acct.space += delta
            return new

        return self._write(fn)

    # --- copies and compaction ----------------------------------------------------------------

    def copy_file_range(
        self, ctx: Ctx, src: int, src_off: int, dst: int, dst_off: int, length: int
    ) -> int:
        """The copied records are the source's visible segments cut to the range (holes
        included, so the destination's old content is covered); every copied occurrence adds
        one reference to its slice."""
        if src_off < 0 or dst_off < 0 or length < 0:
            raise FSError(errno.EINVAL)
        if src == dst and src_off < dst_off + length and dst_off < src_off + length:
            raise FSError(errno.EINVAL)

        def fn(tx: Txn, acct: Acct) -> int:
            sattr = self._get_file(tx, src)
            dattr = sattr if src == dst else self._get_file(tx, dst)
            n = max(0, min(length, sattr.size - src_off))
            if n == 0:
                return 0
            if dst_off + n > MAX_FILE_SIZE:
                raise FSError(errno.EFBIG)
            new = dattr.copy()
            new.size = max(dattr.size, dst_off + n)
            delta = space_of(FileType.FILE, new.size) - space_of(FileType.FILE, dattr.size)
            self._check_space(tx, delta)
            appends: dict[int, list[Slice]] = {}
            for sindex, spos, slen in chunk_ranges(src_off, n):
                for seg in overlay(tx.get_chunk(src, sindex), spos, spos + slen):
                    doff = dst_off + sindex * CHUNK_SIZE + seg.pos - src_off
                    soff = seg.off
                    left = seg.len
                    while left:
                        dindex, dpos = divmod(doff, CHUNK_SIZE)
                        k = min(left, CHUNK_SIZE - dpos)
                        rec = (
                            Slice(dpos, seg.id, seg.size, soff, k, seg.kind)
                            if seg.id
                            else _hole(dpos, k)
                        )
                        appends.setdefault(dindex, []).append(rec)
                        doff += k
                        soff += k
                        left -= k
            for dindex, recs in appends.items():
                tx.append_slices(dst, dindex, recs)
            self._release_slices(tx, appends.values(), sign=1)
            new.mtime_ns = new.ctime_ns = now_ns()
            tx.put_attr(new)
            acct.space += delta
            return n

        return self._write(fn)

    def replace_slices(self, inode: int, index: int, old: list[Slice], new: list[Slice]) -> bool:
        """On False the caller still owns the blocks of the new slices: they have no
        reference row, so the caller deletes them itself."""
        old, new = list(old), list(new)

        def fn(tx: Txn, acct: Acct) -> bool:
            current = tx.get_chunk(inode, index)
            if not old or current[: len(old)] != old:
                return False
            tx.put_chunk(inode, index, new + current[len(old) :])
            deltas: dict[int, tuple[int, int]] = {}
            for s, sign in [(s, -1) for s in old] + [(s, 1) for s in new]:
                if s.id:
                    size, n = deltas.get(s.id, (s.size, 0))
                    deltas[s.id] = (size, n + sign)
            deltas = {k: v for k, v in deltas.items() if v[1]}
            if deltas:
                tx.add_slice_refs(deltas)
            return True

        return self._write(fn)

    def deleted_slices(self, limit: int = 1000) -> list[tuple[int, int]]:
        return self._read(lambda tx: tx.deleted_slices(limit))

    def forget_deleted_slices(self, ids: list[int]) -> None:
        """The ext records go with the reference rows: an external slice's record is needed
        exactly as long as a chunk may name the slice (native slices have none, and deleting
        a missing record is no error)."""
        if not ids:
            return
        ids = list(ids)

        def fn(tx: Txn) -> None:
            tx.forget_slices(ids)
            tx.del_ext(ids)

        self._transaction(fn, True)

    # --- external objects ---------------------------------------------------------------------

    def get_ext(self, ids: Sequence[int]) -> dict[int, ExtObject]:
        if not ids:
            return {}
        wanted = list(ids)
        return self._read(lambda tx: tx.get_ext(wanted))

    def count_ext(self, source: int) -> int:
        return self._read(lambda tx: tx.count_ext(source))

    # --- trash --------------------------------------------------------------------------------

    def cleanup_trash(self, *, now: int | None = None, limit: int = 1000) -> int:
        """Purge files kept in the trash longer than the volume's ``trash_days`` (all of them
        when the trash is off): their slices lose their references and reach
        ``deleted_slices``. Run periodically by the data path's background GC, or by ``loft
        gc``. ``now`` (ns) overrides the clock. Returns how many files were purged."""
        days = self._settings().trash_days
        cutoff = (now if now is not None else now_ns()) - max(0, days) * NS_PER_DAY
        total = 0
        batch = 100
        while total < limit:
            want = min(batch, limit - total)

            def fn(tx: Txn, acct: Acct, want: int = want) -> int:
                inodes = tx.expired_trash(cutoff, want)
                for inode in inodes:
                    attr = tx.get_attr(inode)
                    tx.del_trash(inode)
                    if attr is not None and attr.nlink == 0 and not tx.open_sessions(inode):
                        self._purge(tx, acct, attr)
                return len(inodes)

            done = self._write(fn)
            total += done
            if done < want:
                break
        return total

    def trash_count(self) -> int:
        """Files waiting in the trash."""
        return self._read(lambda tx: tx.trash_count())

    # --- accounting ---------------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        space, inodes = self._read(
            lambda tx: (tx.get_counter(USED_SPACE), tx.get_counter(USED_INODES))
        )
        pspace, pinodes = self._pending_usage()
        return max(0, space + pspace), max(0, inodes + pinodes)

    def statfs(self, ctx: Ctx) -> StatFS:
        """Without quotas the volume reports 1 PiB and 10 billion inodes beyond what is used."""
        settings = self._settings()
        used, inodes = self.usage()
        if settings.capacity > 0:
            total = settings.capacity
            avail = max(0, total - used)
        else:
            total = used + UNLIMITED_BYTES
            avail = UNLIMITED_BYTES
        if settings.inodes > 0:
            avail_inodes = max(0, settings.inodes - inodes)
        else:
            avail_inodes = UNLIMITED_INODES
        return StatFS(
            total_bytes=total, avail_bytes=avail, used_inodes=inodes, avail_inodes=avail_inodes
        )
