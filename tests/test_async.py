"""async_save: returns after staging; later mutation does not leak into the checkpoint."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import ckptstore
from ckptstore import errors
from tests.helpers import assert_same, model_and_optimizer


def test_mutation_after_return_is_not_saved(store_url):
    model, opt = model_and_optimizer()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 1}
    expected = {
        "model": {k: v.clone() for k, v in state["model"].items()},
        "epoch": 1,
    }
    fut = ckptstore.async_save(state, store_url, step=1)
    with torch.no_grad():  # training goes on right away
        for p in model.parameters():
            p.add_(1.0)
    state["epoch"] = 2
    info = fut.result(timeout=120)
    assert info.name == "step-000000000001" and info.new_bytes > 0
    full = ckptstore.load_full(store_url, step=1)
    assert_same(expected["model"], full["model"])
    assert full["epoch"] == 1


def test_errors_surface_through_the_future(store_url):
    ckptstore.save({"w": torch.ones(4)}, store_url, step=1)
    with pytest.raises(errors.CheckpointExistsError):
        ckptstore.async_save({"w": torch.ones(4)}, store_url, step=1).result(timeout=60)


def test_backend_failure_surfaces_through_the_future(faults):
    url = "faulty://async"
    ckptstore.save({"w": torch.randn(1024, 512)}, url, step=1, chunk_bytes=1 << 18)
    faults.set_plan(fail_put_after=1, put_match="*/chunks/*")
    fut = ckptstore.async_save({"w": torch.randn(1024, 512)}, url, step=2, chunk_bytes=1 << 18)
    with pytest.raises(errors.BackendError, match="injected"):
        fut.result(timeout=60)
    faults.set_plan()
    assert [c.name for c in ckptstore.Store(url).list()] == ["step-000000000001"]


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_growth_over_async_saves(url: str) -> float:
    """Runs in a fresh process: the heap left by other tests must not blur the figure."""
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MiB
    for step in range(3):  # warm up allocator and thread pools
        ckptstore.async_save(state, url, step=step).result(timeout=120)
    gc.collect()
    base = _rss_mib()
    for step in range(3, 15):
        for t in state.values():
            t.add_(0.5)
        ckptstore.async_save(state, url, step=step).result(timeout=120)
    gc.collect()
    return _rss_mib() - base


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_repeated_async_saves_do_not_leak(local_url):
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        grown = pool.submit(_rss_growth_over_async_saves, local_url).result(timeout=300)
    # 12 saves staging 32 MiB each: a leak of one copy per save would add ~384 MiB
    assert grown < 64, f"RSS grew {grown:.0f} MiB over 12 async saves"
    assert len(ckptstore.Store(local_url).list()) == 15
