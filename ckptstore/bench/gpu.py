"""CUDA comparisons (issue 11): ckptstore against plain DCP on the same GPU, same run, every
load checked exactly. Needs a CUDA device; CI has none (its logic runs on CPU in the tests
through a fake device, tests/test_staging.py).

    python -m ckptstore.bench gpu [--gb 2] [--repeat 3] [--dir D] [--json out.json]
    ckptstore bench --device cuda [--gb 2] [--repeat 3] [--json]

Per dtype (bf16, then fp32), on about ``gb`` GiB of CUDA tensors:

- **sync save** wall: ``ckptstore.save`` vs ``dcp.save`` with ``FileSystemWriter(thread_count
  =8)``, each into a fresh folder (fsync as ``Settings.fsync`` says, for both);
- **async_save, time the caller is blocked**: ``ckptstore.async_save`` (pinned snapshot, and
  with ``device_snapshot``) vs a plain copy of every tensor into preallocated pinned memory
  (the floor) and vs ``dcp.async_save`` with its default stager; the first call (which
  allocates the pinned arena) is kept apart from the best of the later ones;
- **load** into CUDA tensors: ``ckptstore.load`` vs ``dcp.load`` (``FileSystemReader``), from
  the page cache;
- **stored bytes** of each;
- **byte grouping on the GPU vs the host encoder**: GB/s of the grouping transpose on the
  device, against the host codec chain on ``Settings.threads`` threads (what decides whether
  grouping before the copy would pay; docs/gpu.md).

Ratios are printed as ckptstore ÷ the other: below 1× is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ckptstore import async_save, load, save
from ckptstore.bench.datasets import cuda_state
from ckptstore.bench.methods import disk_usage, fresh_dir
from ckptstore.bench.report import write_json
from ckptstore.knobs import Settings


def _sync_timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device idle before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _blocked(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds until ``fn`` returns, seconds until the device is idle after, its result):
    what an async save costs the training thread on the host and on the device."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t0, out


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def _group_speed(state: dict[str, torch.Tensor], settings: Settings) -> dict[str, Any]:
    """GB/s of byte grouping on the device vs the host codec chain (threads)."""
    from ckptstore.bench.codec import dtype_name
    from ckptstore.codecs import default_pipeline

    t = next(iter(state.values()))
    w = t.element_size()
    flat = t.reshape(-1).view(torch.uint8)
    torch.cuda.synchronize()
    sec, _ = _sync_timed(lambda: flat.view(-1, w).t().contiguous())
    host = flat[: 64 * settings.chunk_bytes].cpu().numpy()
    pipeline = default_pipeline(dtype_name(t.dtype))
    pieces = [
        memoryview(host[i : i + settings.chunk_bytes])
        for i in range(0, host.size, settings.chunk_bytes)
    ]
    with ThreadPoolExecutor(settings.threads) as pool:
        list(pool.map(pipeline.encode, pieces[: settings.threads]))  # warm
        t0 = time.perf_counter()
        list(pool.map(pipeline.encode, pieces))
        host_s = time.perf_counter() - t0
    return {
        "device_bytegroup_gb_s": flat.numel() / sec / 1e9,
        "host_encode_gb_s": host.size / host_s / 1e9,
        "host_encode_threads": settings.threads,
        "pipeline": pipeline.short(),
    }


def run_one(
    state: dict[str, torch.Tensor], root: str, settings: Settings, repeat: int = 3
) -> dict[str, Any]:
    """Every comparison on one CUDA state; best of ``repeat`` (round-robin)."""
    dtype = next(iter(state.values())).dtype
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    r: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "bytes": nbytes}
    url, ddir = os.path.join(root, "store"), os.path.join(root, "dcp")
    runs: dict[str, list[float]] = {}

    def keep(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    pinned = {k: _pinned_like(v) for k, v in state.items()}

    def pinned_copy() -> None:
        for k, v in state.items():
            pinned[k].copy_(v, non_blocking=True)

    def dcp_writer() -> Any:
        return dcp.FileSystemWriter(ddir, thread_count=8, sync_files=settings.fsync)

    modes = (("async", settings), ("async_device", settings.replace(device_snapshot=True)))
    for _ in range(repeat):
        fresh_dir(url)
        keep("save_s", _sync_timed(lambda: save(state, url, step=0, settings=settings))[0])
        r["stored_bytes"] = disk_usage(url)[0]
        fresh_dir(ddir)
        keep("dcp_save_s", _sync_timed(lambda: dcp.save(state, storage_writer=dcp_writer()))[0])
        r["dcp_stored_bytes"] = disk_usage(ddir)[0]
        # loads: the files just written, from the page cache
        target = {k: torch.empty_like(v) for k, v in state.items()}
        keep("load_s", _sync_timed(lambda t=target: load(t, url, step=0, settings=settings))[0])
        r["exact"] = r.get("exact", True) and _exact(state, target)
        target2 = {k: torch.empty_like(v) for k, v in state.items()}
        keep(
            "dcp_load_s",
            _sync_timed(lambda t=target2: dcp.load(t, storage_reader=dcp.FileSystemReader(ddir)))[
                0
            ],
        )
        del target, target2
        # async: the time the caller is blocked
        keep("pinned_copy_s", _sync_timed(pinned_copy)[0])
        for label, s in modes:
            fresh_dir(url)
            blocked, device, fut = _blocked(lambda s=s: async_save(state, url, step=0, settings=s))
            total = blocked + _sync_timed(lambda f=fut: f.result())[0]
            if f"{label}_first_blocked_s" not in r:
                r[f"{label}_first_blocked_s"] = blocked
            keep(f"{label}_blocked_s", blocked)
            keep(f"{label}_blocked_device_s", device)
            keep(f"{label}_total_s", total)
        fresh_dir(ddir)
        blocked, device, started = _blocked(
            lambda: dcp.async_save(state, storage_writer=dcp_writer())
        )
        upload = getattr(started, "upload_completion", started)
        keep("dcp_async_blocked_s", blocked)
        keep("dcp_async_total_s", blocked + _sync_timed(lambda u=upload: u.result())[0])
    for name, values in runs.items():
        r[name] = min(values)
        r[f"{name}_all"] = values
    for a, b in (
        ("save_s", "dcp_save_s"),
        ("load_s", "dcp_load_s"),
        ("async_blocked_s", "pinned_copy_s"),
        ("async_blocked_s", "dcp_async_blocked_s"),
        ("async_device_blocked_s", "dcp_async_blocked_s"),
        ("async_total_s", "dcp_async_total_s"),
        ("stored_bytes", "dcp_stored_bytes"),
    ):
        if r.get(b):
            r[f"{a.removesuffix('_s')}_vs_{b.removesuffix('_s')}"] = r[a] / r[b]
    r["stored_ratio"] = nbytes / r["stored_bytes"] if r.get("stored_bytes") else None
    fresh_dir(url)
    r["int8_save_s"] = _sync_timed(
        lambda: save(state, url, step=0, quantize="int8", settings=settings)
    )[0]
    r["grouping"] = _group_speed(state, settings)
    return r


def _print(r: dict[str, Any]) -> None:
    gib = r["bytes"] / 2**30
    print(f"{r['dtype']}: {gib:.2f} GiB, exact={r['exact']}")
    rows = [
        ("sync save", "save_s", "dcp_save_s", "DCP FileSystemWriter 8 threads"),
        ("load", "load_s", "dcp_load_s", "DCP FileSystemReader"),
        ("async blocked", "async_blocked_s", "pinned_copy_s", "plain pinned copy"),
        ("async blocked", "async_blocked_s", "dcp_async_blocked_s", "DCP async_save default"),
        ("async blocked (device)", "async_device_blocked_s", "dcp_async_blocked_s", "DCP async"),
        ("async total", "async_total_s", "dcp_async_total_s", "DCP async_save total"),
    ]
    for what, mine, other, label in rows:
        a, b = r.get(mine), r.get(other)
        if a and b:
            print(f"  {what:24s} {a:8.3f} s vs {b:8.3f} s  {a / b:6.2f}x  ({label})")
    print(
        f"  stored                   {r['stored_bytes'] / 2**30:.3f} GiB vs "
        f"{r['dcp_stored_bytes'] / 2**30:.3f} GiB (ratio {r['stored_ratio']:.3f})"
    )
    g = r["grouping"]
    print(
        f"  byte grouping on the GPU {g['device_bytegroup_gb_s']:.0f} GB/s; host codec "
        f"{g['host_encode_gb_s']:.2f} GB/s on {g['host_encode_threads']} threads"
    )


def run(
    gb: float, root: str, settings: Settings | None = None, repeat: int = 3, show: bool = True
) -> dict[str, Any]:
    """bf16, then fp32: :func:`run_one` on about ``gb`` GiB of CUDA tensors each."""
    settings = Settings.resolve(settings)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "settings": {
            "threads": settings.threads,
            "chunk_bytes": settings.chunk_bytes,
            "pin_bytes": settings.pin_bytes,
            "fsync": settings.fsync,
        },
        "gb": gb,
        "repeat": repeat,
        "runs": [],
    }
    warm = {"w": torch.randn(1024, 1024, device="cuda")}  # CUDA context, pools, imports
    for fn in (
        lambda d: save(warm, d, step=0, settings=settings),
        lambda d: dcp.save(warm, storage_writer=dcp.FileSystemWriter(d)),
    ):
        d = tempfile.mkdtemp(dir=root)
        fn(d)
        shutil.rmtree(d, ignore_errors=True)
    for dtype in (torch.bfloat16, torch.float32):
        state = cuda_state(gb, dtype)
        r = run_one(state, os.path.join(root, str(dtype).replace("torch.", "")), settings, repeat)
        if show:
            _print(r)
        out["runs"].append(r)
        del state
        torch.cuda.empty_cache()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench gpu", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to measure")
    root = args.dir or tempfile.mkdtemp(prefix="ckptstore-gpu-")
    try:
        result = run(args.gb, root, Settings.resolve(), args.repeat)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    given = sys.argv[1:] if argv is None else list(argv)
    result["command"] = " ".join(["python -m ckptstore.bench gpu", *given])
    if args.json:
        write_json(args.json, result)
    else:
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
