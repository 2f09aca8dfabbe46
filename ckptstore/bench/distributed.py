"""Distributed figures: a 4-rank FSDP2 save and 4→2 / 4→1 loads of a ~500 MB state
(GPT-style model + AdamW), ckptstore against plain DCP (FileSystemWriter/Reader), in one run.

    python -m ckptstore.bench distributed [--size-mb 500] [--dir /tmp/bench-dist] [--json out.json]

gloo on CPU, processes spawned on 127.0.0.1. No method fsyncs (ckptstore's settings have
``fsync=False``, DCP ``sync_files=False``); loads read from the page cache. Seconds are the
slowest rank's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from ckptstore.bench.datasets import GPT, gpt_shape
from ckptstore.bench.report import write_json
from ckptstore.knobs import Settings


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )


def _model(world: int, size_mb: float, fsdp: bool) -> tuple[Any, Any]:
    torch.manual_seed(0)
    shape = gpt_shape(size_mb)
    model = GPT(**shape)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    tokens = torch.randint(0, shape["vocab"], (2, 33), generator=g)
    model(tokens[:, :-1]).float().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - t0)


def save_worker(
    rank: int, world: int, port: int, root: str, size_mb: float, settings: Settings
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ckptstore import save

    _init(rank, world, port)
    model, opt = _model(world, size_mb, fsdp=True)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    url = f"{root}/store"
    info = {}
    res = {
        "ckptstore_save_s": _timed(
            lambda: info.update(i=save(state, url, step=1, settings=settings))
        )
    }
    res["dcp_save_s"] = _timed(
        lambda: dcp.save(state, storage_writer=FileSystemWriter(f"{root}/dcp", sync_files=False))
    )
    again = {}
    res["ckptstore_resave_s"] = _timed(
        lambda: again.update(i=save(state, url, step=2, settings=settings))
    )
    if rank == 0:
        res.update(
            logical_bytes=info["i"].logical_bytes,
            stored_bytes=info["i"].stored_bytes,
            resave_new_bytes=again["i"].new_bytes,
        )
        Path(root, "save.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def load_worker(
    rank: int, world: int, port: int, root: str, size_mb: float, settings: Settings
) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ckptstore import load

    _init(rank, world, port)
    model, opt = _model(world, size_mb, fsdp=world > 1)
    msd, osd = get_state_dict(model, opt)
    ours = {"model": msd, "optim": osd}
    info = {}
    res = {
        "ckptstore_load_s": _timed(
            lambda: info.update(i=load(ours, f"{root}/store", step=1, settings=settings))
        )
    }
    model2, opt2 = _model(world, size_mb, fsdp=world > 1)
    msd2, osd2 = get_state_dict(model2, opt2)
    theirs = {"model": msd2, "optim": osd2}
    res["dcp_load_s"] = _timed(
        lambda: dcp.load(theirs, storage_reader=FileSystemReader(f"{root}/dcp"))
    )
    same = all(
        torch.equal(
            a.full_tensor() if hasattr(a, "full_tensor") else a,
            b.full_tensor() if hasattr(b, "full_tensor") else b,
        )
        for a, b in zip(_leaves(ours), _leaves(theirs), strict=True)
    )
    read = [None] * world
    dist.all_gather_object(read, info["i"].bytes_read)
    if rank == 0:
        res.update(bytes_read_per_rank=read, identical_to_dcp=bool(same))
        Path(root, f"load{world}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _leaves(obj):
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif isinstance(obj, torch.Tensor):
        yield obj


def run(size_mb: float, root: str, settings: Settings | None = None) -> dict[str, Any]:
    """The 4-rank save and the 2- and 1-rank loads under ``root`` (emptied first); no
    ckptstore call fsyncs."""
    settings = Settings.resolve(settings, fsync=False)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    spawn = dict(start_method="spawn")
    t0 = time.time()
    mp.start_processes(save_worker, args=(4, _port(), root, size_mb, settings), nprocs=4, **spawn)
    for world in (2, 1):
        mp.start_processes(
            load_worker, args=(world, _port(), root, size_mb, settings), nprocs=world, **spawn
        )
    save = json.loads(Path(root, "save.json").read_text())
    loads = {w: json.loads(Path(root, f"load{w}.json").read_text()) for w in (2, 1)}
    dcp_bytes = sum(f.stat().st_size for f in Path(root, "dcp").rglob("*") if f.is_file())
    return {
        "size_mb": size_mb,
        "save": save,
        "loads": loads,
        "dcp_stored_bytes": dcp_bytes,
        "wall_s": time.time() - t0,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench distributed",
        description=(__doc__ or "").split("\n\n")[0],
    )
    ap.add_argument("--size-mb", type=float, default=500)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="ckptstore-dist-")
    result = run(args.size_mb, root)
    save, loads, dcp_bytes = result["save"], result["loads"], result["dcp_stored_bytes"]
    mib = 2**20
    print(
        f"state {save['logical_bytes'] / mib:.1f} MiB; ckptstore stores "
        f"{save['stored_bytes'] / mib:.1f} MiB "
        f"({save['logical_bytes'] / save['stored_bytes']:.3f}×),"
        f" DCP {dcp_bytes / mib:.1f} MiB"
    )
    print(
        f"4-rank save: ckptstore {save['ckptstore_save_s']:.2f} s, DCP {save['dcp_save_s']:.2f} s;"
        f" re-save {save['ckptstore_resave_s']:.2f} s writing "
        f"{save['resave_new_bytes'] / mib:.2f} MiB"
    )
    for w, r in loads.items():
        per = ", ".join(f"{b / mib:.1f}" for b in r["bytes_read_per_rank"])
        print(
            f"4→{w} load: ckptstore {r['ckptstore_load_s']:.2f} s, DCP {r['dcp_load_s']:.2f} s;"
            f" MiB read per rank [{per}]; identical to DCP's load: {r['identical_to_dcp']}"
        )
    if args.json:
        write_json(args.json, result)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
