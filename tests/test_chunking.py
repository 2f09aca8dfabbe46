"""Row-aligned chunking: exact cover, bounded size, global grid alignment; chunk frames."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.errors import CorruptChunkError
from ckptstore.store.chunks import frame, row_ranges, unframe


@given(
    rows=st.integers(0, 5000),
    row_bytes=st.integers(1, 100_000),
    chunk_bytes=st.integers(1, 1 << 22),
    first_row=st.integers(0, 10_000),
)
def test_row_ranges_cover_exactly_and_align(rows, row_bytes, chunk_bytes, first_row):
    ranges = row_ranges(rows, row_bytes, chunk_bytes, first_row)
    per = max(1, chunk_bytes // row_bytes)
    if rows == 0:
        assert ranges == []
        return
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]
    assert (ranges[-1][1] if ranges else 0) == rows
    for a, b in ranges:
        assert 0 < b - a <= per
        if a > 0:
            assert (first_row + a) % per == 0  # interior boundaries on the global grid


@given(st.binary(max_size=5000))
def test_frame_roundtrip_and_any_flip_is_caught(payload):
    stored = frame(payload)
    assert bytes(unframe(stored, "x")) == payload
    for i in range(0, len(stored), max(1, len(stored) // 16)):
        bad = bytearray(stored)
        bad[i] ^= 0x01
        with pytest.raises(CorruptChunkError):
            unframe(bytes(bad), "x")


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 400),
    cols=st.integers(1, 300),
    chunk_kib=st.integers(1, 64),
    lo=st.integers(0, 399),
    seed=st.integers(0, 1000),
)
def test_chunked_tensor_row_ranges_read_back(rows, cols, chunk_kib, lo, seed):
    """Any row range of a chunked tensor reads back exactly through the store."""
    import uuid

    from ckptstore.codecs import default_pipeline
    from ckptstore.store import BlobReader, BlobWriter, Repository
    from ckptstore.store.blobs import ChunkIndex

    lo = lo % rows
    hi = rows if lo == rows - 1 else lo + 1 + (seed % (rows - lo))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g)
    repo = Repository.open(f"memory://rows-{uuid.uuid4().hex[:8]}", create=True)
    with BlobWriter(repo, ChunkIndex(repo), chunk_bytes=chunk_kib * 1024, inline_bytes=0) as w:
        blob = w.submit(t.numpy(), default_pipeline("float32"), rows=rows).result()
    reader = BlobReader(repo)
    got = reader.read_rows(blob, lo, hi, "t").view("float32").reshape(hi - lo, cols)
    assert torch.equal(torch.from_numpy(got.copy()), t[lo:hi])
    # only the chunks overlapping [lo, hi) were fetched
    need = sum(1 for c in blob.chunks if c.row_start < hi and c.row_stop > lo)
    assert reader.objects_fetched == need


def test_wide_rows_get_their_own_chunks(store_url):
    """A row larger than the chunk size is one chunk per row, never split mid-row."""
    t = torch.randn(3, 100_000)  # 400 KB rows
    info = ckptstore.save({"t": t}, store_url, step=1, chunk_bytes=64 * 1024)
    assert info.chunks == 3
    assert torch.equal(ckptstore.load_full(store_url)["t"], t)
