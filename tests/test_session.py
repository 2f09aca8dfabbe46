"""The save session's parent lookup: the chunks of the parent that overlap a rank's box,
found by bisection, equal a brute-force scan on slab and grid shardings."""

from __future__ import annotations

import random

import pytest

from ckptstore.store.manifest import Blob, ChunkRef, Manifest, Shard, TensorEntry
from ckptstore.store.session import ParentLookup

CODEC = [{"id": "zstd", "level": 1, "segments": 1, "entropy": False}]


def _grid(rows: int, cols: int, row_cuts: list[int], col_cuts: list[int], per: int) -> list:
    shards, n = [], 0
    rb = [0, *row_cuts, rows]
    cb = [0, *col_cuts, cols]
    for r0, r1 in zip(rb, rb[1:], strict=False):
        for c0, c1 in zip(cb, cb[1:], strict=False):
            chunks, a = [], 0
            while a < r1 - r0:
                b = min(r1 - r0, a + per - (r0 + a) % per)
                n += 1
                chunks.append(ChunkRef(n.to_bytes(16, "big"), a, b, 10, True))
                a = b
            blob = Blob(CODEC, (r1 - r0) * (c1 - c0) * 4, r1 - r0, chunks=chunks)
            shards.append(Shard([r0, c0], [r1 - r0, c1 - c0], blob))
    return shards


def _brute(shards, lo, hi, c0, c1) -> set[bytes]:
    out = set()
    for s in shards:
        if s.offsets[1] + s.sizes[1] <= c0 or c1 <= s.offsets[1]:
            continue
        for c in s.blob.chunks:
            a, b = s.offsets[0] + c.row_start, s.offsets[0] + c.row_stop
            if a < hi and b > lo:
                out.add(c.key)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_lookup_equals_brute_force(seed):
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 300), rng.randint(1, 40)
    row_cuts = sorted(rng.sample(range(1, rows), min(rows - 1, rng.randint(0, 12))))
    col_cuts = sorted(rng.sample(range(1, cols), min(cols - 1, rng.randint(0, 3))))
    shards = _grid(rows, cols, row_cuts, col_cuts, per=rng.randint(1, 64))
    m = Manifest("p", 1, 0.0, {"w": TensorEntry("float32", [rows, cols], shards)}, {})
    lookup = ParentLookup(m)
    for _ in range(20):
        lo = rng.randrange(rows)
        hi = rng.randint(lo + 1, rows)
        c0 = rng.randrange(cols)
        c1 = rng.randint(c0 + 1, cols)
        got = {c.key for c in lookup.chunks("w", [lo, c0], [hi - lo, c1 - c0])}
        assert got == _brute(shards, lo, hi, c0, c1)
    assert lookup.chunks("absent", [0, 0], [1, 1]) == []
    assert ParentLookup(None).chunks("w", [0, 0], [1, 1]) == []
