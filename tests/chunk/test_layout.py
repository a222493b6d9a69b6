"""Chunk/slice/block arithmetic against simple models."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from loftfs.chunk.layout import (
    block_key,
    block_keys,
    chunk_ranges,
    overlay,
    slice_blocks,
)
from loftfs.meta.types import CHUNK_SIZE, Slice

SPAN = 300  # positions used by the overlay model (bytes)


def content(slice_id: int, off: int) -> int:
    """The byte at ``off`` of stored slice ``slice_id`` (0 for holes)."""
    return 0 if slice_id == 0 else (slice_id * 31 + off) % 251 + 1


@st.composite
def slices(draw: st.DrawFn) -> list[Slice]:
    out = []
    for i in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, SPAN - 1))
        length = draw(st.integers(0, SPAN - pos))
        hole = draw(st.booleans()) and draw(st.booleans())  # holes ~1 in 4
        if hole:
            out.append(Slice(pos, 0, 0, 0, length))
            continue
        off = draw(st.integers(0, 50))
        size = off + length + draw(st.integers(0, 20))
        out.append(Slice(pos, i + 1, size, off, length, kind=draw(st.sampled_from([0, 0, 2]))))
    return out


@given(slices(), st.integers(0, SPAN + 20), st.integers(1, SPAN + 20))
def test_overlay_matches_byte_model(layers: list[Slice], a: int, n: int) -> None:
    # non-empty ranges: the data path never asks overlay for an empty one
    start, end = a, a + n
    model = bytearray(2 * SPAN + 40)
    for s in layers:  # oldest first: later slices overwrite earlier ones
        for i in range(s.len):
            model[s.pos + i] = content(s.id, s.off + i)
    segs = overlay(layers, start, end)
    got = bytearray()
    cur = start
    for seg in segs:
        assert seg.pos == cur and seg.len > 0
        cur += seg.len
        if seg.id:
            assert seg.off >= 0 and seg.off + seg.len <= seg.size
            src = next(s for s in layers if s.id == seg.id)
            assert seg.size == src.size and seg.kind == src.kind
        got += bytes(content(seg.id, seg.off + i) for i in range(seg.len))
    assert cur == end
    assert got == model[start:end]


@given(slices())
def test_overlay_whole_chunk(layers: list[Slice]) -> None:
    segs = overlay(layers)
    assert segs[0].pos == 0
    assert segs[-1].pos + segs[-1].len == CHUNK_SIZE
    assert sum(s.len for s in segs) == CHUNK_SIZE
    for x, y in itertools.pairwise(segs):
        assert x.pos + x.len == y.pos


def test_overlay_newest_on_top() -> None:
    old = Slice(0, 1, 100, 0, 100)
    new = Slice(10, 2, 20, 0, 20)
    segs = overlay([old, new], 0, 100)
    assert [(s.pos, s.id, s.off, s.len) for s in segs] == [
        (0, 1, 0, 10),
        (10, 2, 0, 20),
        (30, 1, 30, 70),
    ]


def test_block_key_layout() -> None:
    uuid = "0e9f6a1c-0000-4000-8000-000000000000"
    assert block_key(uuid, 1_234_567, 3, 4096) == f"{uuid}/chunks/1/1234/1234567_3_4096"
    assert block_key(uuid, 5, 0, 1) == f"{uuid}/chunks/0/0/5_0_1"


@given(st.integers(0, CHUNK_SIZE), st.sampled_from([4096, 65536, 4 << 20]))
def test_slice_blocks(size: int, block_size: int) -> None:
    blocks = slice_blocks(size, block_size)
    assert sum(blocks) == size
    assert all(0 < b <= block_size for b in blocks)
    assert all(b == block_size for b in blocks[:-1])
    keys = block_keys("u", 9, size, block_size)
    assert len(keys) == len(blocks)
    assert all(k.endswith(f"_{i}_{n}") for i, (k, n) in enumerate(zip(keys, blocks, strict=True)))


@given(st.integers(0, 3 * CHUNK_SIZE), st.integers(0, 2 * CHUNK_SIZE))
def test_chunk_ranges(offset: int, length: int) -> None:
    pieces = list(chunk_ranges(offset, length))
    assert sum(n for _, _, n in pieces) == length
    cur = offset
    for index, pos, n in pieces:
        assert index * CHUNK_SIZE + pos == cur
        assert pos >= 0 and n > 0 and pos + n <= CHUNK_SIZE
        cur += n
