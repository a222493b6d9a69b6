"""Chunk/slice/block arithmetic and object naming (DESIGN 2.1). Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from loftfs.meta.types import CHUNK_SIZE, Slice


def block_key(volume_uuid: str, slice_id: int, index: int, length: int) -> str:
    """Object key of block ``index`` (``length`` bytes) of slice ``slice_id``."""
    return (
        f"{volume_uuid}/chunks/{slice_id // 1_000_000}/{slice_id // 1_000}/"
        f"{slice_id}_{index}_{length}"
    )


def block_length(key: str) -> int:
    """The length a block key (``block_key``) names; 0 when ``key`` is not a block key."""
    try:
        return int(key.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return 0


def slice_blocks(slice_size: int, block_size: int) -> list[int]:
    """Lengths of the blocks of a stored slice of ``slice_size`` bytes."""
    full, rest = divmod(slice_size, block_size)
    return [block_size] * full + ([rest] if rest else [])


def block_keys(volume_uuid: str, slice_id: int, slice_size: int, block_size: int) -> list[str]:
    return [
        block_key(volume_uuid, slice_id, i, n)
        for i, n in enumerate(slice_blocks(slice_size, block_size))
    ]


def chunk_ranges(offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """Split a file byte range into (chunk index, offset in chunk, length) pieces."""
    end = offset + length
    while offset < end:
        index, pos = divmod(offset, CHUNK_SIZE)
        n = min(CHUNK_SIZE - pos, end - offset)
        yield index, pos, n
        offset += n


@dataclass(frozen=True, slots=True)
class Segment:
    """A visible piece of a chunk: ``len`` bytes at chunk offset ``pos`` come from slice ``id``
    at ``off`` within the stored slice (``id == 0``: zeros)."""

    pos: int
    id: int
    size: int
    off: int
    len: int
    kind: int = 0


def overlay(slices: list[Slice], start: int = 0, end: int = CHUNK_SIZE) -> list[Segment]:
    """Lay ``slices`` (oldest first) over each other, newest on top, and return the visible
    segments covering ``[start, end)`` in order; gaps are zero segments (``id == 0``)."""
    if start >= end:
        return []
    # Interval list of (pos, end, slice) kept sorted and non-overlapping; each newer slice cuts
    # what it covers out of the older ones. O(n^2) worst case, n is small (compaction bounds it).
    visible: list[tuple[int, int, Slice]] = []
    for s in slices:
        if s.len <= 0:
            continue
        a, b = s.pos, s.pos + s.len
        out: list[tuple[int, int, Slice]] = []
        for p, e, o in visible:
            if e <= a or p >= b:
                out.append((p, e, o))
                continue
            if p < a:
                out.append((p, a, o))
            if e > b:
                out.append((b, e, o))
        out.append((a, b, s))
        out.sort(key=lambda t: t[0])
        visible = out
    segs: list[Segment] = []
    cur = start
    for p, e, s in visible:
        if e <= start or p >= end:
            continue
        p2, e2 = max(p, start), min(e, end)
        if p2 > cur:
            segs.append(Segment(cur, 0, 0, 0, p2 - cur))
        segs.append(Segment(p2, s.id, s.size, s.off + (p2 - s.pos), e2 - p2, s.kind))
        cur = e2
    if cur < end:
        segs.append(Segment(cur, 0, 0, 0, end - cur))
    return segs
