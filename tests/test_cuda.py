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


# -- the staged paths (ckptstore/dcp/staging.py; their ordering logic is also tested on CPU
# with a fake device in tests/test_staging.py) ----------------------------------------------
def _staging_settings(**kw):
    from ckptstore.knobs import Settings

    mib = 1 << 20
    return Settings(fsync=False, chunk_bytes=mib, pin_bytes=4 * (mib + 16 * 1024), **kw)


def _cuda_state():
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "w": torch.randn(4096, 1000, device="cuda", generator=g),
        "b16": torch.randn(3001, 777, device="cuda", generator=g).to(torch.bfloat16),
        "t": torch.randn(1000, 3000, device="cuda", generator=g).t(),  # non-contiguous
        "ids": torch.arange(300_000, device="cuda"),
        "tail": torch.randn(262_144 + 3, device="cuda", generator=g),  # a 12-byte tail
        "small": torch.randn(7, device="cuda", generator=g),  # inline
    }


def _pool():
    from ckptstore.dcp import staging

    return staging._POOLS[("cuda", torch.cuda.current_device())]


@cuda
def test_cuda_staged_save_pinned_bounded_and_equal_to_a_host_save(local_url):
    from ckptstore.dcp import staging

    staging.release_pinned()
    state = _cuda_state()
    settings = _staging_settings()
    info = ckptstore.save(state, local_url, step=0, settings=settings)
    pool = _pool()
    assert 0 < pool.allocated <= pool.count and pool.in_use == 0
    assert all(b.is_pinned() for b in pool._free)
    full = ckptstore.load_full(local_url, step=0)
    for k, v in state.items():
        assert torch.equal(full[k], v.cpu()), k
    again = ckptstore.save(
        {k: v.cpu() for k, v in state.items()}, local_url, step=1, settings=settings
    )
    assert again.new_chunks == 0 and again.chunks == info.chunks  # same chunks, same keys


@cuda
def test_cuda_save_waits_for_work_queued_on_the_callers_stream(local_url):
    s = torch.cuda.Stream()
    w = torch.zeros(8192, 1024, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # the stream stays busy a while
        w.fill_(3.0)  # still queued when the save starts copying
        ckptstore.save({"w": w}, local_url, step=0, settings=_staging_settings())
    assert bool((ckptstore.load_full(local_url, step=0)["w"] == 3.0).all())


@cuda
@pytest.mark.parametrize("device_snapshot", [False, True])
def test_cuda_async_snapshot_on_a_user_stream(local_url, device_snapshot):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        w = torch.randn(4096, 2048, device="cuda")
        expected = w.cpu()
        torch.cuda._sleep(100_000_000)
        w.add_(0.0)  # pending on s when async_save is called
        fut = ckptstore.async_save(
            {"w": w}, local_url, step=0, settings=_staging_settings(device_snapshot=device_snapshot)
        )
        w.mul_(-1.0)  # training goes on, on the same stream
    fut.result(timeout=300)
    assert torch.equal(ckptstore.load_full(local_url, step=0)["w"], expected)
    assert _pool().in_use == 0


@cuda
def test_cuda_load_through_pinned_buffers_after_pending_work(local_url):
    state = _cuda_state()
    settings = _staging_settings()
    ckptstore.save(state, local_url, step=0, settings=settings)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        target = {k: torch.empty_like(v) for k, v in state.items()}
        torch.cuda._sleep(200_000_000)
        for v in target.values():
            v.fill_(7)  # queued before the load: the load's copies must land after it
        ckptstore.load(target, local_url, step=0, settings=settings)
    torch.cuda.synchronize()
    for k, v in state.items():
        assert target[k].device.type == "cuda" and torch.equal(target[k], v), k
    assert _pool().in_use == 0


@cuda
def test_cuda_load_casts_and_partial_templates(local_url):
    w = torch.randn(4096, 1000, device="cuda")
    ckptstore.save({"w": w}, local_url, step=0, settings=_staging_settings())
    bf = {"w": torch.zeros(4096, 1000, device="cuda", dtype=torch.bfloat16)}
    ckptstore.load(bf, local_url, step=0, settings=_staging_settings())
    assert torch.equal(bf["w"], w.to(torch.bfloat16))
    cols = {"w": torch.zeros(1000, 4096, device="cuda").t()}  # non-contiguous destination
    ckptstore.load(cols, local_url, step=0, settings=_staging_settings())
    assert torch.equal(cols["w"], w)
