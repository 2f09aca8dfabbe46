"""Codec roundtrips (bit-exact for every dtype), configs, and ratios on real weights."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.codecs import (
    DTYPES,
    ByteGroup,
    Pipeline,
    Zstd,
    default_pipeline,
    get_codec,
    known_ids,
    quantized_pipeline,
)
from ckptstore.errors import CodecError, UnknownCodecError


@given(st.binary(max_size=4096), st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_bytegroup_roundtrip(data, width, rotate):
    data = data[: len(data) - len(data) % width]
    codec = ByteGroup(width, rotate=rotate and width > 1)
    assert bytes(codec.decode(codec.encode(data))) == data


def _planes_by_the_spec(data: bytes, width: int, rotate: bool) -> bytes:
    """docs/format.md's bytegroup, element by element in plain Python: the reference."""
    out = bytearray(len(data))
    n, bits = len(data) // width, 8 * width
    for e in range(n):
        v = int.from_bytes(data[e * width : (e + 1) * width], "little")
        if rotate:
            v = ((v << 1) | (v >> (bits - 1))) % (1 << bits)
        for j, b in enumerate(v.to_bytes(width, "little")):
            out[j * n + e] = b
    return bytes(out)


@pytest.mark.parametrize(
    ("width", "rotate"), [(2, True), (4, True), (8, True), (4, False), (3, False), (16, False)]
)
def test_bytegroup_kernels_match_the_spec_across_blocks(width, rotate):
    # sizes around the block boundaries of the word kernels, and an unaligned input
    from ckptstore.codecs import bytegroup
    from ckptstore.codecs.pipeline import Pipeline

    rng = np.random.default_rng(width)
    block = max(bytegroup._ENCODE_BLOCK, bytegroup._DECODE_BLOCK)
    for n in (1, 7, block - 1, block + 3):
        raw = rng.integers(0, 256, n * width + 1, dtype=np.uint8)[1:]  # offset by one byte
        codec = ByteGroup(width, rotate=rotate)
        planes = bytes(codec.encode(raw))
        if n < 100:
            assert planes == _planes_by_the_spec(raw.tobytes(), width, rotate)
        else:  # the reference on a sample of elements: each plane's bytes at those indices
            grid = raw.reshape(n, width)
            if rotate:
                u = grid.copy().view(bytegroup._UINT[width]).reshape(-1)
                u = (u << 1) | (u >> (8 * width - 1))
                grid = u.view(np.uint8).reshape(n, width)
            want = np.ascontiguousarray(grid.T).tobytes()
            assert planes == want
        assert bytes(codec.decode(planes)) == raw.tobytes()
        out = np.empty(raw.size, np.uint8)
        codec.decode_into([planes[i * n : (i + 1) * n] for i in range(width)], out)
        assert out.tobytes() == raw.tobytes()
        # the fused default chain writes the same planes as the codec alone
        chain = Pipeline([codec, Zstd(segments=width, entropy=True)])
        assert bytes(chain.codecs[1].decode(chain.encode(raw))) == planes


def test_large_frames_decode_into_place_and_refuse_trailing_bytes():
    from ckptstore.codecs.pipeline import default_pipeline

    rng = np.random.default_rng(3)
    raw = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)  # 1 MiB: 256 KiB planes
    chain = default_pipeline("float32")
    enc = bytes(chain.encode(raw))
    out = np.empty(raw.nbytes, np.uint8)
    chain.decode_into(enc, out)
    assert out.tobytes() == raw.tobytes()
    # the exponent plane is a frame; append bytes after it inside its segment
    zstd = chain.codecs[1]
    n = enc[0]
    entries = [struct.unpack_from("<BQ", enc, 1 + 9 * i) for i in range(n)]
    assert any(kind == 1 and length >= 1 for kind, length in entries)
    pos, pieces, header = 1 + 9 * n, [], bytearray([n])
    for kind, length in entries:
        piece = enc[pos : pos + length]
        pos += length
        if kind == 1 and zstandard.frame_content_size(piece) >= (1 << 16):
            piece += b"\0\0\0"
        header += struct.pack("<BQ", kind, len(piece))
        pieces.append(piece)
    bad = bytes(header) + b"".join(pieces)
    with pytest.raises(CodecError):
        chain.decode_into(bad, out)
    with pytest.raises(CodecError):
        zstd.decode_segments(bad)


def test_bytegroup_groups_planes():
    data = bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert bytes(ByteGroup(4).encode(data)) == bytes([1, 5, 2, 6, 3, 7, 4, 8])


def test_bytegroup_rotation_puts_exponent_in_top_byte():
    x = np.array([-1.5, 2.0], dtype=np.float32)
    planes = np.frombuffer(bytes(ByteGroup(4, rotate=True).encode(x.tobytes())), np.uint8)
    top = planes[6:8]  # plane 3 (little-endian top byte) after rotation
    exps = (x.view(np.uint32) >> 23) & 0xFF
    assert list(top) == list(exps.astype(np.uint8))


@settings(max_examples=60)
@given(st.binary(max_size=20000), st.integers(1, 8), st.booleans())
def test_zstd_roundtrip(data, segments, entropy):
    codec = Zstd(level=1, segments=segments, entropy=entropy)
    assert bytes(codec.decode(codec.encode(data))) == data


def test_zstd_stores_incompressible_raw():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    enc = Zstd().encode(data)
    assert len(enc) <= len(data) + 1 + 9  # header only, never expanded by zstd


def test_zstd_rejects_garbage():
    enc = bytearray(Zstd(segments=2).encode(b"a" * 1000))
    with pytest.raises(CodecError):
        Zstd().decode(bytes(enc[:-5]))
    enc[20] ^= 0xFF
    with pytest.raises(CodecError):
        Zstd().decode(bytes(enc))


ALL_DTYPES = [getattr(torch, n) for n in DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]


def _random_tensor(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (n * torch.tensor([], dtype=dtype).element_size(),), dtype=torch.uint8, generator=g
    )
    if dtype == torch.bool:
        return raw.bool()
    return raw.view(dtype)  # every bit pattern, NaNs and infs included


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**16))
def test_default_pipeline_bit_exact(dtype, n, seed):
    t = _random_tensor(dtype, n, seed)
    raw = t.view(torch.uint8).numpy().tobytes() if n else b""
    pipe = default_pipeline(str(dtype).removeprefix("torch."))
    assert bytes(pipe.decode(pipe.encode(raw))) == raw


def test_pipeline_config_rebuilds_same_spec():
    pipe = default_pipeline("bfloat16")
    again = Pipeline.from_config(pipe.config)
    assert again == pipe and again.spec == pipe.spec
    assert pipe.lossless


def test_unknown_codec_id_is_refused():
    with pytest.raises(UnknownCodecError) as info:
        get_codec({"id": "lz77-future"})
    assert "lz77-future" in str(info.value)
    assert set(known_ids()) >= {"bytegroup", "zstd"}


def _codec_ratio(state: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    raw_total = enc_total = 0
    for t in state.values():
        t = t.to(dtype).contiguous()
        pipe = default_pipeline(str(dtype).removeprefix("torch."))
        raw = t.view(torch.uint8).numpy()
        for i in range(0, raw.size, 4 << 20):
            piece = raw[i : i + (4 << 20)]
            raw_total += piece.size
            enc_total += len(pipe.encode(piece))
    return raw_total / enc_total


def test_lossless_ratio_on_minilm_matches_zipnn(minilm):
    """Lossless ratio at least ZipNN's (1.22× fp32, 1.50× bf16)."""
    assert _codec_ratio(minilm, torch.float32) >= 1.215
    assert _codec_ratio(minilm, torch.bfloat16) >= 1.495


# -- bounded decoding: never more than the declared raw size -----------------------------


def _chains(dtype: str) -> list[Pipeline]:
    out = [default_pipeline(dtype)]
    if dtype in ("float32", "float64"):
        out += [quantized_pipeline(q, dtype) for q in ("fp16", "bf16", "int8", "int8:8")]
    if dtype in ("bfloat16", "float16"):
        out.append(quantized_pipeline("int8", dtype))
    return out


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float64", "bfloat16", "int64", "uint8", "complex64"]),
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**16),
)
def test_bounded_decode_matches_unbounded(dtype, n, seed):
    itemsize = DTYPES[dtype][0]
    rng = np.random.default_rng(seed)
    raw = (rng.standard_normal(n * itemsize // 4 + 1).astype(np.float32).tobytes() * 2)[
        : n * itemsize
    ]
    for pipe in _chains(dtype):
        lossy, tail = pipe.split()
        enc = pipe.encode(raw)
        keyed, out = pipe.decode_parts(enc, expected_size=len(raw))
        assert bytes(out) == bytes(pipe.decode(enc)) and len(out) == len(raw)
        assert bytes(pipe.decode(enc, expected_size=len(raw))) == bytes(out)
        if lossy is None:
            assert bytes(keyed) == raw == bytes(out)
        else:
            assert bytes(keyed) == lossy.quantize(raw)[0]
        # every stage's encoded size stays within what the stage before it allows
        size, data = len(raw), raw
        for codec in pipe.codecs:
            data = codec.encode(data)
            assert memoryview(data).nbytes <= codec.max_encoded_size(size)
            size = memoryview(data).nbytes


def _zstd_container(*frames: bytes) -> bytes:
    head = bytes([len(frames)]) + b"".join(struct.pack("<BQ", 1, len(f)) for f in frames)
    return head + b"".join(frames)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except CodecError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zstd_bomb_is_refused_before_inflating():
    bomb = zstandard.ZstdCompressor().compress(bytes(32 << 20))  # ~1 KiB → 32 MiB
    payload = _zstd_container(bomb)
    pipe = Pipeline([Zstd()])
    with pytest.raises(CodecError, match="declares 33554432 bytes, more than the 4096"):
        pipe.decode(payload, expected_size=4096)
    assert _peak(lambda: pipe.decode(payload, expected_size=4096)) < 1 << 20
    assert _peak(lambda: pipe.decode(payload)) >= 32 << 20  # tracemalloc sees zstd's output
    # two frames that each fit but together exceed the bound
    half = zstandard.ZstdCompressor().compress(bytes(3000))
    with pytest.raises(CodecError, match="declares 3000 bytes, more than the 1096 left"):
        Zstd(segments=2).decode_bounded(_zstd_container(half, half), 4096)
    # behind a bytegroup stage the bound is the same raw size
    with pytest.raises(CodecError, match="bomb"):
        default_pipeline("float32").decode(payload, expected_size=4096)


def test_zstd_frame_with_forged_content_size_is_refused():
    frame = bytearray(zstandard.ZstdCompressor().compress(b"x" * 100))
    params = zstandard.get_frame_parameters(bytes(frame))
    assert params.content_size == 100
    frame[5] = 200  # single-segment frames keep the content size in the byte after the header
    assert zstandard.frame_content_size(bytes(frame)) == 200
    with pytest.raises(CodecError):
        Zstd().decode_bounded(_zstd_container(bytes(frame)), 1 << 20)
    with pytest.raises(CodecError):
        Zstd().decode(_zstd_container(bytes(frame)))


def test_zstd_frame_without_content_size_or_with_trailing_data():
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 500)
    with pytest.raises(CodecError, match="without a content size"):
        Zstd().decode(_zstd_container(no_size))
    good = zstandard.ZstdCompressor().compress(b"y" * 500)
    with pytest.raises(CodecError, match="unused data"):
        Zstd().decode(_zstd_container(good + good))
    assert bytes(Zstd().decode_bounded(_zstd_container(good), 500)) == b"y" * 500


def test_expected_size_mismatch_is_corrupt():
    pipe = default_pipeline("float32")
    enc = pipe.encode(np.arange(64, dtype=np.float32).tobytes())
    with pytest.raises(CodecError, match="decoded to 256 bytes, expected 260"):
        pipe.decode(enc, expected_size=260)
    with pytest.raises(CodecError):
        pipe.decode(enc, expected_size=128)  # refused by the bound, before the join
    with pytest.raises(CodecError):  # codec ValueErrors become CodecError
        pipe.decode(b"\x01" + struct.pack("<BQ", 0, 3) + b"abc", expected_size=3)


def test_lossy_stages_bound_their_output():
    raw = np.linspace(-1, 1, 256, dtype=np.float32).tobytes()
    for name in ("fp16", "int8"):
        pipe = quantized_pipeline(name, "float32")
        lossy, tail = pipe.split()
        body = tail.decode(pipe.encode(raw))
        with pytest.raises(CodecError, match="over 512"):
            lossy.decode_bounded(body, 512)
    forged = struct.pack("<BxxxQ", 0, 2**40)  # int8 header declaring 2^40 elements
    with pytest.raises(CodecError):
        quantized_pipeline("int8", "float32").decode(Zstd().encode(forged), expected_size=1024)


def test_codec_configs_of_the_wrong_type_are_unknown_codecs():
    for config in ({"id": ["zstd"]}, {"id": None}, ["zstd"], {"id": "zstd", "level": float("inf")}):
        with pytest.raises(UnknownCodecError):
            get_codec(config)
