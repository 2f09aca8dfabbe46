"""One prepared GPU check (run where a CUDA device is available; CI has none):
save / async_save / load of a few GB of CUDA tensors (bf16 and fp32) with ckptstore, side by
side with plain DCP (FileSystemWriter/Reader) on the same machine, values checked exactly.

    python -m ckptstore.bench gpu [--gb 2] [--dir /tmp/gpu-check] [--json out.json]

Prints one line per step; seconds are wall time including the device-to-host copies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ckptstore.api import async_save, load, save
from ckptstore.bench.datasets import cuda_state
from ckptstore.bench.report import write_json
from ckptstore.knobs import Settings
from ckptstore.store.facade import Store


def _timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_one(state: dict[str, torch.Tensor], root: str, settings: Settings) -> dict[str, Any]:
    """ckptstore save, DCP save, async_save, int8 save and both loads of one CUDA state."""
    dtype = next(iter(state.values())).dtype
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    r: dict[str, Any] = {"dtype": str(dtype), "bytes": nbytes}
    url, ddir = f"{root}/store-{dtype}", f"{root}/dcp-{dtype}"
    r["ckptstore_save_s"] = _timed(lambda: save(state, url, step=1, settings=settings))
    r["dcp_save_s"] = _timed(
        lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(ddir, thread_count=8))
    )
    fut: dict[str, Any] = {}
    r["ckptstore_async_return_s"] = _timed(
        lambda: fut.update(f=async_save(state, url, step=2, settings=settings))
    )
    r["ckptstore_async_total_s"] = r["ckptstore_async_return_s"] + _timed(lambda: fut["f"].result())
    r["ckptstore_int8_save_s"] = _timed(
        lambda: save(state, url, step=3, quantize="int8", settings=settings)
    )
    target = {k: torch.empty_like(v) for k, v in state.items()}
    r["ckptstore_load_s"] = _timed(lambda: load(target, url, step=1, settings=settings))
    r["ckptstore_exact"] = all(torch.equal(target[k], v) for k, v in state.items())
    r["load_device"] = str(next(iter(target.values())).device)
    target2 = {k: torch.empty_like(v) for k, v in state.items()}
    r["dcp_load_s"] = _timed(lambda: dcp.load(target2, storage_reader=dcp.FileSystemReader(ddir)))
    info = Store(url, settings=settings).list()[0]
    r["stored_ratio"] = info.logical_bytes / info.stored_bytes
    return r


def run(gb: float, root: str, settings: Settings | None = None) -> dict[str, Any]:
    """bf16, then fp32: :func:`run_one` on about ``gb`` GiB of CUDA tensors each."""
    settings = Settings.resolve(settings)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "runs": [],
    }
    for dtype in (torch.bfloat16, torch.float32):
        state = cuda_state(gb, dtype)
        r = run_one(state, root, settings)
        print(json.dumps(r))
        out["runs"].append(r)
        del state
        torch.cuda.empty_cache()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench gpu", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    root = args.dir or tempfile.mkdtemp(prefix="ckptstore-gpu-")
    try:
        result = run(args.gb, root, Settings.resolve())
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
