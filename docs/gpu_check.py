"""One prepared GPU check (run where a CUDA device is available; CI has none):
save / async_save / load of a few GB of CUDA tensors (bf16 and fp32) with ckptstore, side by
side with plain DCP (FileSystemWriter/Reader) on the same machine, values checked exactly.

    python docs/gpu_check.py [--gb 2] [--dir /tmp/gpu-check] [--json out.json]

Prints one line per step; seconds are wall time including the device-to-host copies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

import ckptstore


def _state(gb: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    per = 64 * 2**20  # elements per tensor
    n = max(1, int(gb * 2**30 / (per * torch.tensor([], dtype=dtype).element_size())))
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        f"layer{i}.weight": (torch.randn(8192, per // 8192, device="cuda", generator=g) * 0.02).to(
            dtype
        )
        for i in range(n)
    }


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(gb: float, root: str) -> dict:
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for dtype in (torch.bfloat16, torch.float32):
        state = _state(gb, dtype)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        r = {"dtype": str(dtype), "bytes": nbytes}
        url, ddir = f"{root}/store-{dtype}", f"{root}/dcp-{dtype}"
        r["ckptstore_save_s"] = _timed(lambda: ckptstore.save(state, url, step=1))
        r["dcp_save_s"] = _timed(
            lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(ddir, thread_count=8))
        )
        fut = {}
        r["ckptstore_async_return_s"] = _timed(
            lambda: fut.update(f=ckptstore.async_save(state, url, step=2))
        )
        r["ckptstore_async_total_s"] = r["ckptstore_async_return_s"] + _timed(
            lambda: fut["f"].result()
        )
        r["ckptstore_int8_save_s"] = _timed(
            lambda: ckptstore.save(state, url, step=3, quantize="int8")
        )
        target = {k: torch.empty_like(v) for k, v in state.items()}
        r["ckptstore_load_s"] = _timed(lambda: ckptstore.load(target, url, step=1))
        r["ckptstore_exact"] = all(torch.equal(target[k], v) for k, v in state.items())
        r["load_device"] = str(next(iter(target.values())).device)
        target2 = {k: torch.empty_like(v) for k, v in state.items()}
        r["dcp_load_s"] = _timed(
            lambda: dcp.load(target2, storage_reader=dcp.FileSystemReader(ddir))
        )
        info = ckptstore.Store(url).list()[0]
        r["stored_ratio"] = info.logical_bytes / info.stored_bytes
        print(json.dumps(r))
        out["runs"].append(r)
        del state, target, target2
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    root = args.dir or tempfile.mkdtemp(prefix="ckptstore-gpu-")
    try:
        result = run(args.gb, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
