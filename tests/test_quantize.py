"""Opt-in lossy codecs: error bounds on real weights, adversarial values, policy, dedup,
error on record, and a distributed save with a policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.codecs import Cast, Int8Block, QuantizePolicy, quantized_pipeline
from tests import dist_workers as w


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm()) if a.norm() > 0 else float((a - b).norm())


# (codec, max per-tensor relative L2 error, min whole-model ratio vs fp32) on MiniLM
BOUNDS = [
    ("fp16", 3e-4, 2.3),
    ("bf16", 2.5e-3, 2.9),
    ("int8", 1e-2, 4.0),
    ("int8:256", 1.5e-2, 4.2),
]


@pytest.mark.parametrize("codec,max_err,min_ratio", BOUNDS)
def test_error_bounds_and_ratio_on_minilm(minilm, local_url, codec, max_err, min_ratio):
    info = ckptstore.save(minilm, local_url, step=1, quantize=codec)
    assert info.ratio >= min_ratio, info.ratio
    full = ckptstore.load_full(local_url)
    report = {t.fqn: t for t in ckptstore.Store(local_url).inspect().tensors}
    for k, v in minilm.items():
        got = full[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        t = report[k]
        if v.is_floating_point() and v.numel() * 4 >= 64 * 1024:
            err = rel_l2(v, got)
            assert err <= max_err, (k, err)
            # the error on record is the error of what load returns
            assert t.rel_l2_error == pytest.approx(err, rel=1e-3, abs=1e-9)
            assert t.max_abs_error == pytest.approx(float((v - got).abs().max()), rel=1e-3)
        else:  # ints, norms, biases: lossless
            assert torch.equal(got, v), k
            assert t.rel_l2_error is None
    assert ckptstore.Store(local_url).verify().ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_dtype_and_shape_restored(store_url, dtype, codec):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, 31, generator=g).to(dtype)
    ckptstore.save({"x": x}, store_url, step=1, quantize=codec, chunk_bytes=32 * 1024)
    out = {"x": torch.zeros_like(x)}
    ckptstore.load(out, store_url)
    full = ckptstore.load_full(store_url)["x"]
    for got in (out["x"], full):
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_l2(x, got) < 1e-2
    casts_narrower = codec in ("fp16", "bf16") and dtype in (torch.bfloat16, torch.float16)
    if casts_narrower:  # nothing to gain: stored lossless
        assert torch.equal(full, x)


def test_adversarial_values():
    # all zeros: exact, zero scales
    z = np.zeros(1000, np.float32)
    for codec in (Cast("float32", "float16"), Cast("float32", "bfloat16"), Int8Block("float32")):
        enc, stats = codec.quantize(z)
        assert np.array_equal(np.frombuffer(codec.decode(enc), np.float32), z)
        assert stats.sq_err == 0 and stats.max_abs == 0

    # one huge outlier in a block: it is exact-ish, its neighbours lose precision, bounded
    x = np.full(64, 1e-3, np.float32)
    x[5] = 1e4
    c = Int8Block("float32")
    enc, stats = c.quantize(x)
    back = np.frombuffer(c.decode(enc), np.float32)
    assert abs(back[5] - 1e4) <= 1e4 / 127
    assert np.abs(back - x).max() <= 1e4 / 127 / 2 * 1.01
    assert stats.max_abs == pytest.approx(float(np.abs(back - x).max()), rel=1e-6)

    # inf and nan: casts pass them through; int8 keeps such a chunk exact (a fallback)
    y = np.array([1.0, np.inf, -np.inf, np.nan, -2.5] * 20, np.float32)
    for codec in (Cast("float32", "float16"), Cast("float32", "bfloat16")):
        back = np.frombuffer(codec.decode(codec.quantize(y)[0]), np.float32)
        assert np.array_equal(np.isnan(back), np.isnan(y))
        assert np.array_equal(back[~np.isnan(y)], y[~np.isnan(y)])
    enc, stats = c.quantize(y)
    assert stats.fallback == 1
    assert np.array_equal(np.frombuffer(c.decode(enc), np.float32), y, equal_nan=True)


def test_fp16_out_of_range_values_are_kept_exactly():
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    x[10], x[20], x[30] = 1e6, -7e4, 1e-10  # overflow, overflow, underflow to 0
    c = Cast("float32", "float16")
    enc, stats = c.quantize(x)
    back = np.frombuffer(c.decode(enc), np.float32)
    assert back[10] == np.float32(1e6) and back[20] == np.float32(-7e4)
    assert back[30] == np.float32(1e-10)
    assert np.isfinite(back).all() and stats.fallback == 1
    assert np.abs(back - x).max() < 1e-3  # the rest is ordinary fp16 rounding
    # a chunk with none of these is plain fp16 (no fallback)
    assert c.quantize(np.linspace(-1, 1, 4096, dtype=np.float32))[1].fallback == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e-40, 7e4]),
        ),
        max_size=300,
    ),
    st.sampled_from(["fp16", "bf16", "int8", "int8:16"]),
)
def test_lossy_codecs_never_corrupt_silently(values, name):
    """Any input decodes to the same length; finite values stay within the codec's bound."""
    x = np.array(values, dtype=np.float32)
    pipe = quantized_pipeline(name, "float32")
    lossy, _ = pipe.split()
    _, stats = lossy.quantize(x)
    back = np.frombuffer(pipe.decode(pipe.encode(x)), np.float32)
    assert back.size == x.size
    finite = np.isfinite(x)
    assert np.array_equal(np.isnan(back[~finite]), np.isnan(x[~finite]))
    if finite.any():
        err = np.abs(back[finite].astype(np.float64) - x[finite])
        scale = np.abs(x[finite]).astype(np.float64)
        if name.startswith("int8"):
            assert err.max() <= scale.max() / 127 * 0.51 + 1e-30
        else:  # relative rounding of a 2-byte float, or exact patches
            assert (err <= scale * 2**-7 + 1e-38).all()
        assert stats.max_abs == pytest.approx(float(err.max()), rel=1e-5, abs=1e-30)


def test_policy_matching():
    p = QuantizePolicy({"optim.*.exp_avg*": "bf16", "model.*.weight": "int8", "*": None})
    big = 1 << 20
    assert (
        p.pipeline_for("optim.state.l1.weight.exp_avg", "float32", big).short().startswith("bf16")
    )
    assert (
        p.pipeline_for("optim.state.l1.weight.exp_avg_sq", "float32", big)
        .short()
        .startswith("bf16")
    )
    assert p.pipeline_for("model.l1.weight", "float32", big).short().startswith("int8/64")
    assert p.pipeline_for("model.l1.bias", "float32", big).lossless  # "*": None
    assert p.pipeline_for("model.l1.weight", "int64", big).lossless  # never ints
    assert p.pipeline_for("model.l1.weight", "bool", big).lossless
    assert p.pipeline_for("model.l1.weight", "float32", 1000).lossless  # too small
    assert (
        QuantizePolicy("int8").pipeline_for("anything", "float32", big).short() == "int8/64>zstd1"
    )
    assert QuantizePolicy(None).pipeline_for("x", "float32", big).lossless
    with pytest.raises(ValueError, match="unknown quantizer"):
        QuantizePolicy({"*": "int4"})
    with pytest.raises(ValueError, match="unknown quantizer"):
        ckptstore.save({"x": torch.ones(3)}, "memory://bad", step=1, quantize="q4")


def test_policy_through_save_writer_and_async(store_url):
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(1)
    state = {
        "model": {"w": torch.randn(512, 256, generator=g), "b": torch.randn(256, generator=g)},
        "optim": {"exp_avg": torch.randn(512, 256, generator=g), "step": torch.tensor(7.0)},
        "ids": torch.arange(100_000),
    }
    policy = {"optim.*exp_avg*": "bf16", "model.w": "int8", "*": None}
    ckptstore.save(state, store_url, step=1, quantize=policy)
    dcp.save(state, storage_writer=ckptstore.Writer(store_url, step=2, quantize=policy))
    ckptstore.async_save(state, store_url, step=3, quantize=policy).result(timeout=60)
    for step in (1, 2, 3):
        codecs = {t.fqn: t.codec for t in ckptstore.Store(store_url).inspect(step=step).tensors}
        assert codecs["model.w"].startswith("int8/64")
        assert codecs["optim.exp_avg"].startswith("bf16")
        assert not codecs["model.b"].startswith(("int8", "bf16", "fp16"))
        assert codecs["ids"] == "group8>zstd1" and codecs["optim.step"] == "group4+rot>zstd-entropy"
        full = ckptstore.load_full(store_url, step=step)
        assert torch.equal(full["ids"], state["ids"]) and full["optim"]["step"].item() == 7.0
        assert torch.equal(full["model"]["b"], state["model"]["b"])
        assert rel_l2(state["model"]["w"], full["model"]["w"]) < 1e-2


def test_quantized_chunks_dedup_and_never_collide_with_lossless(store_url):
    w = torch.randn(2048, 512)
    a = ckptstore.save({"w": w}, store_url, step=1, quantize="int8", chunk_bytes=1 << 20)
    b = ckptstore.save({"w": w}, store_url, step=2, quantize="int8", chunk_bytes=1 << 20)
    c = ckptstore.save({"w": w}, store_url, step=3, chunk_bytes=1 << 20)
    d = ckptstore.save({"w": w}, store_url, step=4, quantize="bf16", chunk_bytes=1 << 20)
    assert a.new_chunks == a.chunks == 4 and b.new_chunks == 0  # same bytes, same codec
    assert c.new_chunks == 4 and d.new_chunks == 4  # other codecs: other objects
    m = ckptstore.Store(store_url).repo
    keys = [m.manifest(f"step-{s:012d}").chunk_keys() for s in (1, 3, 4)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert torch.equal(ckptstore.load_full(store_url, step=3)["w"], w)
    # the dedup'd int8 save still records the error of its (reused) chunks
    e1 = ckptstore.Store(store_url).inspect(step=1).tensors[0].rel_l2_error
    e2 = ckptstore.Store(store_url).inspect(step=2).tensors[0].rel_l2_error
    assert e1 == e2 and 0 < e1 < 1e-2


def test_corrupt_quantized_chunk_is_caught(local_url):
    from ckptstore.store import Repository, layout

    ckptstore.save({"w": torch.randn(1024, 256)}, local_url, step=1, quantize="int8")
    repo = Repository.open(local_url)
    path = repo.backend.path(repo.backend.list(layout.CHUNKS)[0])
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x20
    open(path, "wb").write(bytes(data))
    with pytest.raises(ckptstore.CorruptChunkError, match="'w'"):
        ckptstore.load_full(local_url)
    assert not ckptstore.Store(local_url).verify().ok


def test_distributed_save_with_policy(tmp_path):
    url = str(tmp_path / "store")
    w.spawn(w.quant_worker, 2, url)
    g = w.global_tensors()
    full = ckptstore.load_full(url)
    assert rel_l2(g["big"], full["model"]["big"]) < 1e-2
    assert rel_l2(g["col"], full["model"]["col"]) < 1e-2
    assert rel_l2(g["grid"], full["optim"]["exp_avg"]) < 3e-3
    assert full["optim"]["step"].item() == 3.0
    report = {t.fqn: t for t in ckptstore.Store(url).inspect().tensors}
    assert report["model.big"].shards == 2 and report["model.big"].codec.startswith("int8")
    want = rel_l2(g["big"], full["model"]["big"])
    assert report["model.big"].rel_l2_error == pytest.approx(want, rel=1e-3)
    assert report["optim.exp_avg"].codec.startswith("bf16")
    assert math.isclose(report["optim.step"].logical_bytes, 4)


def test_fp16_chunk_of_tiny_values_falls_back_to_bf16():
    """exp_avg_sq-like values sit below fp16's normal range: the chunk is stored as bf16
    (relative error ~2^-9), not as fp16 subnormals (which would lose most of the bits)."""
    x = (np.random.default_rng(0).random(8192, dtype=np.float32) * 1e-7).astype(np.float32)
    c = Cast("float32", "float16")
    enc, stats = c.quantize(x)
    back = np.frombuffer(c.decode(enc), np.float32)
    assert stats.fallback == 1
    assert np.abs(back - x).max() <= np.abs(x).max() * 2**-8
    assert stats.rel_l2 < 3e-3


@pytest.mark.parametrize("target", ["float16", "bfloat16"])
@pytest.mark.parametrize("source", ["float32", "float64"])
def test_casts_never_turn_finite_values_into_inf_or_zero(source, target):
    """Near the top of float32's range bf16 rounds to inf; float64 goes beyond float32;
    tiny values round to 0. Such elements are kept exactly (patched)."""
    dt = np.float64 if source == "float64" else np.float32
    x = np.linspace(-1, 1, 1024).astype(dt)
    x[1], x[2] = np.finfo(np.float32).max * 0.999, -np.finfo(np.float32).max
    x[3] = 1e-44 if source == "float32" else 1e-300
    if source == "float64":
        x[4] = 1e300
    c = Cast(source, target)
    enc, stats = c.quantize(x)
    back = np.frombuffer(c.decode(enc), dt)
    assert np.isfinite(back).all()
    bad = [1, 2, 3] + ([4] if source == "float64" else [])
    assert np.array_equal(back[bad], x[bad]) and stats.fallback == 1
