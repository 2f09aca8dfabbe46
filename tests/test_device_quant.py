"""The torch (on-device) lossy stages produce exactly the numpy codecs' bytes; a save that
quantizes on the device stores what a host-side save stores. Runs on CPU tensors here; on a
CUDA machine the same code runs on the GPU (tests/test_cuda.py, docs/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.codecs import Cast, Int8Block
from ckptstore.dcp import device_quant

CODECS = [
    Cast("float32", "float16"),
    Cast("float32", "bfloat16"),
    Int8Block("float32", 64),
    Int8Block("float32", 16),
]

special = st.sampled_from(
    [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-8, 7e4, 3.4e38, -3.39e38]
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), special),
        min_size=1,
        max_size=400,
    ),
    st.sampled_from(range(len(CODECS))),
)
def test_torch_stage_is_byte_identical_to_numpy(values, which):
    codec = CODECS[which]
    x = np.array(values, dtype=np.float32)
    want, want_stats = codec.quantize(x)
    got, got_stats = device_quant.quantize(codec, torch.from_numpy(x.copy()))
    assert got == want
    assert got_stats.fallback == want_stats.fallback
    assert got_stats.max_abs == pytest.approx(want_stats.max_abs, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16])
def test_int8_from_half_sources_is_byte_identical(source):
    x = (torch.randn(5000) * 3).to(source)
    codec = Int8Block(str(source).removeprefix("torch."), 64)
    want, _ = codec.quantize(x.view(torch.uint8).numpy())
    got, _ = device_quant.quantize(codec, x)
    assert got == want


def test_save_quantizing_on_device_stores_the_same_chunks(tmp_path, monkeypatch):
    state = {"w": torch.randn(2048, 512), "e": torch.randn(4096, 128) * 1e-6}
    policy = {"w": "int8", "e": "fp16"}
    host = ckptstore.save(state, str(tmp_path / "host"), step=1, quantize=policy)
    monkeypatch.setenv("CKPTSTORE_DEVICE_QUANTIZE", "1")  # as if these were GPU tensors
    dev = ckptstore.save(state, str(tmp_path / "dev"), step=1, quantize=policy)
    keys = [
        ckptstore.Store(str(tmp_path / d)).repo.manifest("step-000000000001").chunk_keys()
        for d in ("host", "dev")
    ]
    assert keys[0] == keys[1] and dev.stored_bytes == host.stored_bytes
    a, b = (ckptstore.load_full(str(tmp_path / d)) for d in ("host", "dev"))
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["e"], b["e"])
    errs = [
        {t.fqn: t.rel_l2_error for t in ckptstore.Store(str(tmp_path / d)).inspect().tensors}
        for d in ("host", "dev")
    ]
    assert errs[0]["w"] == pytest.approx(errs[1]["w"], rel=1e-4)
