"""The load path that decodes chunks straight into the destination tensors:
``Pipeline.decode_into``, ``BlobReader.fetch_chunk_into`` and the Reader's choice between
decoding in place and through its scratch buffer. No timing is asserted here; the speed is
measured by ``python -m ckptstore.bench compare`` (docs/benchmarks.md, "Load")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

import ckptstore
from ckptstore.codecs.bytegroup import ByteGroup
from ckptstore.codecs.pipeline import Pipeline, default_pipeline, quantized_pipeline
from ckptstore.codecs.zstd import Zstd
from ckptstore.dcp import reader as reader_mod
from ckptstore.errors import CodecError, CorruptChunkError
from ckptstore.knobs import Settings
from ckptstore.store import layout
from ckptstore.store.blobs import BlobReader
from ckptstore.store.repository import Repository
from tests.helpers import template_like

DTYPES = ["float32", "bfloat16", "float16", "float64", "int64", "int32", "uint8", "complex64"]


def _raw(nbytes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    raw[: nbytes // 3] = 0  # a compressible part, so some segments are zstd frames
    return raw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbytes", [0, 16, 48 * 1000, 48 * 70_001])
def test_decode_into_equals_decode(dtype, nbytes):
    p = default_pipeline(dtype)
    raw = _raw(nbytes)
    encoded = p.encode(memoryview(raw))
    out = np.full(nbytes, 0xA5, dtype=np.uint8)
    keyed = p.decode_into(encoded, out)
    assert np.array_equal(out, raw)
    assert bytes(memoryview(keyed)) == raw.tobytes()  # lossless: the key hashes the raw bytes
    assert bytes(memoryview(p.decode(encoded))) == raw.tobytes()


@pytest.mark.parametrize(
    "pipeline",
    [
        Pipeline([]),
        Pipeline([ByteGroup(3)]),
        Pipeline([ByteGroup(4, rotate=True), Zstd(segments=1)]),  # one segment, four planes
        Pipeline([ByteGroup(8, rotate=True), Zstd(segments=8, entropy=True)]),
        Pipeline([ByteGroup(2), Zstd(level=3, segments=2)]),
    ],
    ids=lambda p: p.short(),
)
def test_decode_into_other_chains(pipeline):
    raw = _raw(24 * 50_000, seed=1)
    out = np.zeros_like(raw)
    pipeline.decode_into(pipeline.encode(memoryview(raw)), out)
    assert np.array_equal(out, raw)


def test_decode_into_lossy_returns_what_the_key_hashes():
    x = torch.randn(300, 64)
    raw = x.reshape(-1).view(torch.uint8).numpy()
    p = quantized_pipeline("bf16", "float32")
    encoded = p.encode(memoryview(raw))
    out = np.zeros_like(raw)
    keyed = p.decode_into(encoded, out)
    want_keyed, want_raw = p.decode_parts(encoded, expected_size=raw.size)
    assert bytes(memoryview(keyed)) == bytes(memoryview(want_keyed))
    assert out.tobytes() == bytes(memoryview(want_raw))
    assert memoryview(keyed).nbytes < raw.size  # the cast's bf16 output, not the raw bytes


def test_decode_into_refuses_a_bomb_and_a_wrong_size():
    p = default_pipeline("float32")
    raw = np.zeros(4 * 1000, dtype=np.uint8)
    encoded = p.encode(memoryview(raw))
    with pytest.raises(CodecError):
        p.decode_into(encoded, np.empty(raw.size - 4, dtype=np.uint8))
    with pytest.raises(CodecError):
        p.decode_into(encoded, np.empty(raw.size + 4, dtype=np.uint8))
    # one zstd segment whose frame declares 1 GB: refused before anything is inflated
    frame = zstandard.ZstdCompressor().compress(b"\0" * (1 << 30))
    header = bytes([1]) + (1).to_bytes(1, "little") + len(frame).to_bytes(8, "little")
    with pytest.raises(CodecError, match="bomb"):
        Pipeline([Zstd()]).decode_into(header + frame, np.empty(1024, dtype=np.uint8))


def test_zstd_segments_join_to_decode():
    z = Zstd(segments=4, entropy=True)
    raw = _raw(4 * 10_000, seed=2).tobytes()
    encoded = z.encode(raw)
    parts = z.decode_segments(encoded, len(raw))
    assert len(parts) == 4
    assert b"".join(bytes(memoryview(p)) for p in parts) == raw == bytes(z.decode(encoded))


# -- the store's read path ----------------------------------------------------------------
def _save(url, state, **kw):
    return ckptstore.save(state, url, settings=Settings(fsync=False, chunk_bytes=64 * 1024), **kw)


def test_fetch_chunk_into_checks_the_key(local_url):
    a, b = torch.randn(400, 64), torch.randn(400, 64)
    _save(local_url, {"a": a, "b": b}, step=0)
    repo = Repository.open(local_url)
    m = repo.manifest(layout.step_name(0))
    ra, rb = m.tensors["a"].shards[0].blob, m.tensors["b"].shards[0].blob
    ref_a, ref_b = ra.chunks[0], rb.chunks[0]
    pipeline = Pipeline.from_config(ra.codec)
    row_bytes = ra.nbytes // ra.rows
    out = np.empty((ref_a.row_stop - ref_a.row_start) * row_bytes, dtype=np.uint8)
    reader = BlobReader(repo)
    reader.fetch_chunk_into(ref_a, pipeline, row_bytes, "a", out)
    got = torch.from_numpy(out).view(torch.float32).reshape(-1, 64)
    assert torch.equal(got, a[: len(got)])
    # a valid object of the same size under another key: only the key check sees it
    backend = repo.backend
    backend.put(layout.chunk_key(ref_a.key.hex()), backend.get(layout.chunk_key(ref_b.key.hex())))
    with pytest.raises(CorruptChunkError, match="does not hold the content"):
        reader.fetch_chunk_into(ref_a, pipeline, row_bytes, "a", out)
    template = {"a": torch.zeros(400, 64), "b": torch.zeros(400, 64)}
    with pytest.raises(CorruptChunkError, match="does not hold the content"):
        ckptstore.load(template, local_url, step=0)
    with pytest.raises(ValueError):
        reader.fetch_chunk_into(ref_b, pipeline, row_bytes, "b", out[:-1])


def _count_scratch(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = reader_mod._scratch

    def counting(nbytes: int) -> np.ndarray:
        calls.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(reader_mod, "_scratch", counting)
    return calls


def test_contiguous_templates_are_decoded_in_place(local_url, monkeypatch):
    state = {"w": torch.randn(1000, 64), "v": torch.randn(300, 33).to(torch.bfloat16)}
    _save(local_url, state, step=0)
    calls = _count_scratch(monkeypatch)
    template = template_like(state)
    ckptstore.load(template, local_url, step=0)
    assert torch.equal(template["w"], state["w"]) and torch.equal(template["v"], state["v"])
    assert calls == []  # every chunk went straight into the template's memory


def test_aliased_strided_and_cast_destinations_go_through_scratch(local_url, monkeypatch):
    emb = torch.randn(2000, 64)
    base = torch.randn(600, 128)
    state = {"embed": emb, "head": emb, "t": base.t().contiguous(), "cast": torch.randn(900, 64)}
    _save(local_url, state, step=0)
    calls = _count_scratch(monkeypatch)
    tied = torch.zeros(2000, 64)
    template = {
        "embed": tied,
        "head": tied,  # one tensor under two names: never rebuilt in place by two threads
        "t": torch.zeros(600, 128).t(),  # non-contiguous destination
        "cast": torch.zeros(900, 64, dtype=torch.bfloat16),  # fp32 saved, bf16 wanted
    }
    ckptstore.load(template, local_url, step=0)
    assert torch.equal(tied, emb)
    assert torch.equal(template["t"], state["t"])
    assert torch.equal(template["cast"], state["cast"].to(torch.bfloat16))
    assert len(calls) > 0


def test_repeated_content_at_several_row_ranges(local_url):
    w = torch.zeros(4096, 64)
    w[1000:1100] = torch.randn(100, 64)  # the rest: one all-zero chunk key at many rows
    _save(local_url, {"w": w}, step=0)
    template = {"w": torch.full((4096, 64), 7.0)}
    ckptstore.load(template, local_url, step=0)
    assert torch.equal(template["w"], w)


def test_in_place_only_where_the_box_is_whole_contiguous_rows():
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from ckptstore.store.manifest import Blob, Shard

    shard = Shard([0, 0], [100, 8], Blob([], 100 * 8 * 4, 100))

    def req(offsets, lengths):
        return ReadItem(
            LoadItemType.TENSOR,
            MetadataIndex("w", [0, 0]),
            torch.Size([0, 0]),
            MetadataIndex("w", [0, 0]),
            torch.Size(offsets),
            torch.Size(lengths),
        )

    target = torch.zeros(100, 8)
    view = reader_mod._in_place(10, 20, shard, req([0, 0], [100, 8]), target, torch.float32)
    assert view is not None and view.size == 10 * 8 * 4
    view[:] = 0xFF  # the target's own memory
    assert torch.isnan(target[10:20]).all() and not torch.isnan(target[:10]).any()
    box = target[50:]  # a box of rows 50..99 of the shard
    half = req([50, 0], [50, 8])
    assert reader_mod._in_place(60, 70, shard, half, box, torch.float32) is not None
    assert reader_mod._in_place(40, 60, shard, half, box, torch.float32) is None  # not inside
    cols = torch.zeros(100, 4)
    assert reader_mod._in_place(0, 10, shard, req([0, 4], [100, 4]), cols, torch.float32) is None
    assert reader_mod._in_place(0, 10, shard, req([0, 0], [100, 8]), target, torch.float64) is None
    strided = torch.zeros(8, 100).t()
    assert reader_mod._in_place(0, 10, shard, req([0, 0], [100, 8]), strided, torch.float32) is None


def test_overlapping_destinations_are_found():
    flat = torch.zeros(1000)
    a, b = flat[:400].view(20, 20), flat[400:].view(30, 20)  # one storage, disjoint
    tied = torch.zeros(10, 10)
    window = flat[390:410]  # overlaps both a and b
    assert reader_mod._overlapping([a, b, tied, tied]) == {id(tied)}
    assert reader_mod._overlapping([a, b]) == set()
    assert reader_mod._overlapping([a, b, window]) == {id(a), id(b), id(window)}
