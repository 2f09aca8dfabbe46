"""The GPU staging paths (ckptstore/dcp/staging.py) driven on CPU by a fake device.

The fake's copies happen only when their event is waited for, and its pinned buffers start
filled with 0xEE: an encoder that read a buffer before its copy completed, a buffer reused
while its copy was in flight, or an async snapshot that returned before its copies finished
would all save wrong values, which the loads below compare bit for bit. No timing is
asserted; the real CUDA paths are in tests/test_cuda.py (skipped without a device)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.dcp import staging
from ckptstore.knobs import Settings
from ckptstore.store import blobs
from ckptstore.store.chunks import row_ranges
from tests.helpers import assert_same

CHUNK = 64 * 1024
INLINE = 4 * 1024


class FakeDevice(staging.DeviceOps):
    """A device whose tensors are CPU tensors it was told about."""

    key = ("fake", 0)

    def __init__(self) -> None:
        self.storages: set[int] = set()
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.unready: dict[int, int] = {}  # host buffer address → copies into it in flight
        self.allocs = 0
        self.to_host_calls = 0
        self.to_device_calls = 0
        self.ordered = 0
        self.snapshots = 0
        self.fail_to_host_at: int | None = None
        self._next = 0
        self._lock = threading.Lock()

    def put(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.storages.add(t.untyped_storage().data_ptr())

    def owns(self, t: torch.Tensor) -> bool:
        return t.numel() > 0 and t.untyped_storage().data_ptr() in self.storages

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self.allocs += 1
        return torch.full((nbytes,), 0xEE, dtype=torch.uint8)

    def _start(self, dst: torch.Tensor, src: torch.Tensor, host: torch.Tensor) -> int:
        with self._lock:
            self._next += 1
            event = self._next
            self.pending[event] = (dst, src)
            addr = host.data_ptr()
            self.unready[addr] = self.unready.get(addr, 0) + 1
        return event

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        with self._lock:
            self.to_host_calls += 1
            if self.fail_to_host_at is not None and self.to_host_calls >= self.fail_to_host_at:
                raise RuntimeError("injected copy failure")
        return self._start(dst, src, dst)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        with self._lock:
            self.to_device_calls += 1
        return self._start(dst, src, src)

    def order_after_producer(self) -> None:
        self.ordered += 1

    def wait(self, event: int) -> None:
        with self._lock:
            dst, src = self.pending.pop(event)
            addr = (src if self.owns(dst) else dst).data_ptr()
            self.unready[addr] -= 1
            if not self.unready[addr]:
                del self.unready[addr]
        dst.copy_(src)  # the copy happens now, reading the source as it is now

    def snapshot(self, t: torch.Tensor) -> torch.Tensor:
        self.snapshots += 1
        copy = t.detach().clone()
        self.put(copy)
        return copy


@pytest.fixture
def device(monkeypatch):
    fake = FakeDevice()
    monkeypatch.setattr(staging, "ops_for", lambda t: fake if fake.owns(t) else None)
    staging.release_pinned()
    yield fake
    staging.release_pinned()


@pytest.fixture
def checked_submit(monkeypatch, device):
    """BlobWriter.submit, refusing a buffer whose copy has not completed."""
    real = blobs.BlobWriter.submit
    seen: list[int] = []

    def submit(self, raw, *args, **kwargs):
        if isinstance(raw, np.ndarray):
            addr = raw.__array_interface__["data"][0]
            assert addr not in device.unready, "the encoder got a buffer before its copy"
            seen.append(addr)
        return real(self, raw, *args, **kwargs)

    monkeypatch.setattr(blobs.BlobWriter, "submit", submit)
    return seen


def _settings(buffers: int = 3, **kw) -> Settings:
    return Settings(
        fsync=False,
        chunk_bytes=CHUNK,
        inline_bytes=INLINE,
        pin_bytes=buffers * (CHUNK + INLINE),
        threads=2,
        **kw,
    )


def _state(device: FakeDevice) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(1000, 96, generator=g),  # 375 KiB: 6 chunks, a short last one
        "b16": torch.randn(777, 130, generator=g).to(torch.bfloat16),
        "flat": torch.randn(70_001, generator=g),  # 1-D: rows are elements
        "tail": torch.randn(16 * 1024 + 10, 1, generator=g),  # a tail of 40 bytes
        "ids": torch.arange(50_000, dtype=torch.int64),
        "small": torch.randn(10, generator=g),  # inline: the whole-copy path
        "t": torch.randn(96, 500, generator=g).t(),  # non-contiguous on the device
    }
    device.put(*state.values())
    return state


def _pool(settings: Settings) -> staging.PinnedPool:
    pool = staging._POOLS[FakeDevice.key]
    assert (pool.buffer_bytes, pool.count) == staging.pool_size(settings)
    return pool


def test_segments_follow_the_chunk_grid():
    assert staging.segments(100, 1000, 10_000, 500, 0, 20_000) == row_ranges(100, 1000, 10_000)
    # a short head and a short tail are merged into their neighbours (never inline pieces)
    got = staging.segments(22, 1000, 10_000, 2_000, 9, 20_000)
    assert got == [(0, 11), (11, 22)]  # grid: (0,1) (1,11) (11,21) (21,22)
    assert staging.segments(3, 50_000, 10_000, 500, 0, 20_000) is None  # a row > a buffer


def test_pool_is_bounded_and_reuses():
    made = []
    pool = staging.PinnedPool(16, 2, lambda n: made.append(n) or torch.empty(n, dtype=torch.uint8))
    a, b = pool.acquire(), pool.acquire()
    assert not pool.available()
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # blocked: both buffers are taken
    pool.release(a)
    waiter.join(10)
    assert got and got[0] is a and len(made) == 2 and pool.peak_in_use == 2
    pool.release(b)
    pool.release(got[0])
    assert pool.in_use == 0 and pool.available()


def test_staged_save_equals_host_save_bounded_and_reusing(tmp_path, device, checked_submit):
    state = _state(device)
    settings = _settings(buffers=3)
    url = str(tmp_path / "store")
    info = ckptstore.save(state, url, step=0, settings=settings)
    pool = _pool(settings)
    assert device.to_host_calls > pool.count  # more chunks than buffers...
    assert device.allocs == pool.allocated <= pool.count  # ...with no allocation per chunk
    assert pool.peak_in_use <= pool.count and pool.in_use == 0
    assert not device.unready and not device.pending  # every copy was waited for
    assert len(checked_submit) == device.to_host_calls  # each segment went to the encoder
    assert_same(ckptstore.load_full(url, step=0), {k: v.contiguous() for k, v in state.items()})
    # the staged path cuts and keys chunks exactly as the host path: a host save of the
    # same values writes no new chunk
    host = {k: v.clone() for k, v in state.items()}
    again = ckptstore.save(host, url, step=1, settings=settings)
    assert again.new_chunks == 0 and info.chunks == again.chunks


def test_staged_load_to_the_device(tmp_path, device):
    state = _state(device)
    settings = _settings(buffers=2)
    url = str(tmp_path / "store")
    ckptstore.save({k: v.clone() for k, v in state.items()}, url, step=0, settings=settings)
    assert device.to_host_calls == 0  # (saved from host copies)
    target = {k: torch.full_like(v, 7) for k, v in state.items()}
    device.put(*target.values())
    ckptstore.load(target, url, step=0, settings=settings)
    assert_same(target, state)
    assert device.to_device_calls > 0 and device.ordered == 1
    assert not device.unready and not device.pending
    pool = _pool(settings)
    assert pool.in_use == 0 and pool.allocated <= pool.count


@pytest.mark.parametrize("fail_at", [1, 4])
def test_a_failed_copy_releases_every_buffer(tmp_path, device, fail_at):
    state = _state(device)
    settings = _settings(buffers=3)
    device.fail_to_host_at = fail_at
    with pytest.raises(RuntimeError, match="injected copy failure"):
        ckptstore.save(state, str(tmp_path / "store"), step=0, settings=settings)
    pool = _pool(settings)
    assert pool.in_use == 0 and not device.unready and not device.pending
    assert ckptstore.Store(str(tmp_path / "store")).list() == []


def test_a_failed_upload_releases_every_buffer(tmp_path, device):
    from ckptstore.errors import BackendError
    from ckptstore.testing.faulty import failing_puts

    state = _state(device)
    settings = _settings(buffers=3)
    with failing_puts(after=3, match="chunks/"), pytest.raises(BackendError):
        ckptstore.save(state, str(tmp_path / "store"), step=0, settings=settings)
    pool = _pool(settings)
    assert pool.in_use == 0 and not device.unready and not device.pending


def test_async_save_holds_the_values_at_the_call(tmp_path, device):
    state = _state(device)
    expected = {k: v.clone() for k, v in state.items()}
    url = str(tmp_path / "store")
    fut = ckptstore.async_save(state, url, step=0, settings=_settings())
    # returned: every device-to-host copy of the snapshot is complete...
    assert device.to_host_calls >= 6 and not device.unready and not device.pending
    for v in state.values():  # ...so training may change the tensors now
        v.add_(1)
    fut.result(timeout=120)
    assert_same(ckptstore.load_full(url, step=0), {k: v.contiguous() for k, v in expected.items()})
    assert device.snapshots == 0


def test_async_save_device_snapshot(tmp_path, device):
    state = _state(device)
    expected = {k: v.clone() for k, v in state.items()}
    url = str(tmp_path / "store")
    settings = _settings(device_snapshot=True)
    fut = ckptstore.async_save(state, url, step=0, settings=settings)
    assert device.snapshots == len(state)  # cloned on the device; no copy waited for yet
    for v in state.values():
        v.mul_(-1)
    fut.result(timeout=120)
    assert_same(ckptstore.load_full(url, step=0), {k: v.contiguous() for k, v in expected.items()})
    # the background save copied the clones chunk by chunk through the pool
    assert device.to_host_calls > 0 and _pool(settings).in_use == 0


def test_host_tensors_never_take_the_staging_path(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a host tensor went through the device path")

    monkeypatch.setattr(staging.DeviceToHost, "add", refuse)
    monkeypatch.setattr(staging, "pool_for", refuse)
    state = {"w": torch.randn(1000, 96), "t": torch.randn(96, 500).t()}
    url = str(tmp_path / "store")
    ckptstore.save(state, url, step=0, settings=_settings())
    ckptstore.async_save(state, url, step=1, settings=_settings()).result(timeout=120)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ckptstore.load(target, url, step=1, settings=_settings())
    assert_same(target, state)


def test_gpu_bench_logic_runs_on_the_fake_device(tmp_path, device, monkeypatch):
    """The CUDA comparisons' bookkeeping (python -m ckptstore.bench gpu), on CPU tensors
    posing as GPU ones: every figure and ratio is there and the loads are exact."""
    from ckptstore.bench import gpu

    monkeypatch.setattr(gpu.torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(gpu, "_pinned_like", lambda t: torch.empty_like(t))
    real_empty_like = torch.empty_like

    def empty_like(t, *a, **k):  # load templates: on the fake device too
        out = real_empty_like(t, *a, **k)
        if device.owns(t):
            device.put(out)
        return out

    monkeypatch.setattr(gpu.torch, "empty_like", empty_like)
    state = {f"l{i}": torch.randn(512, 300) for i in range(3)}
    device.put(*state.values())
    r = gpu.run_one(state, str(tmp_path), _settings(buffers=4), repeat=2)
    assert r["exact"] is True
    for key in (
        "save_vs_dcp_save",
        "load_vs_dcp_load",
        "async_blocked_vs_pinned_copy",
        "async_blocked_vs_dcp_async_blocked",
        "async_device_blocked_vs_dcp_async_blocked",
        "async_total_vs_dcp_async_total",
        "stored_bytes_vs_dcp_stored_bytes",
    ):
        assert r[key] > 0, key
    assert len(r["save_s_all"]) == 2 and r["async_first_blocked_s"] > 0
    assert device.to_host_calls > 0 and device.to_device_calls > 0 and device.snapshots > 0
    gpu._print(r)  # the table it prints


def test_staged_lossy_save_equals_the_host_one(tmp_path, device):
    """A lossy chain with no device implementation (fp16 from float64) goes through the
    staged copies too: same chunks and the same error figures as from the host."""
    x = torch.randn(3000, 40, dtype=torch.float64)
    device.put(x)
    settings = _settings(buffers=3, quantize_min_bytes=0)
    url = str(tmp_path / "store")
    a = ckptstore.save({"x": x}, url, step=0, quantize="fp16", settings=settings)
    assert device.to_host_calls > 1
    b = ckptstore.save({"x": x.clone()}, url, step=1, quantize="fp16", settings=settings)
    assert b.new_chunks == 0 and a.chunks == b.chunks
    staged, host = ckptstore.load_full(url, step=0)["x"], ckptstore.load_full(url, step=1)["x"]
    assert torch.equal(staged, host) and not torch.equal(staged, x)  # lossy, and the same
    assert (staged - x).abs().max() < 1e-2 * x.abs().max()


def test_staged_delta_save_equals_the_host_one(tmp_path, device):
    """``delta=True`` from device tensors: the staged chunks find their parent rows and store
    the same delta chunks, under the same keys and chains, as a host save of the values."""
    from ckptstore.store import Repository, layout

    g = torch.Generator().manual_seed(1)
    first = {
        "w": torch.randn(1000, 96, generator=g),
        "b16": torch.randn(777, 130, generator=g).to(torch.bfloat16),
    }
    second = {k: (v.float() * 1.001).to(v.dtype) for k, v in first.items()}
    settings = _settings(buffers=3)
    keys = []
    for where in ("device", "host"):
        url = str(tmp_path / where)
        ckptstore.save(first, url, step=0, delta=True, settings=settings)
        state = {k: v.clone() for k, v in second.items()}
        if where == "device":
            device.put(*state.values())
        info = ckptstore.save(state, url, step=1, delta=True, settings=settings)
        assert info.delta_bytes > 0 and info.max_chain == 1
        assert_same(ckptstore.load_full(url, step=1), second)
        m = Repository.open(url).manifest(layout.step_name(1), cached=False)
        keys.append({f: [(c.key, c.base) for s in t.shards for c in s.blob.chunks]
                     for f, t in m.tensors.items()})  # fmt: skip
    assert device.to_host_calls > 0 and keys[0] == keys[1]
