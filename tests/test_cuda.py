"""CUDA tensors save and load to the device they belong on. Skipped cleanly without CUDA;
the host side of this path (bytes, chunks, codecs) is what every CPU test exercises."""

from __future__ import annotations

import pytest
import torch

import ckptstore

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_roundtrip_in_place(local_url, dtype):
    state = {"w": torch.randn(4096, 1024, device="cuda").to(dtype), "s": torch.tensor(3.0)}
    ckptstore.save(state, local_url, step=1)
    target = {"w": torch.zeros(4096, 1024, device="cuda", dtype=dtype), "s": torch.tensor(0.0)}
    ckptstore.load(target, local_url)
    assert target["w"].device.type == "cuda"
    assert torch.equal(target["w"], state["w"]) and target["s"].item() == 3.0
    full = ckptstore.load_full(local_url)
    assert full["w"].device.type == "cpu" and torch.equal(full["w"], state["w"].cpu())


@cuda
def test_cuda_async_save_snapshot(local_url):
    w = torch.randn(2048, 2048, device="cuda")
    expected = w.clone().cpu()
    fut = ckptstore.async_save({"w": w}, local_url, step=1)
    w.add_(1.0)
    fut.result(timeout=300)
    assert torch.equal(ckptstore.load_full(local_url)["w"], expected)
