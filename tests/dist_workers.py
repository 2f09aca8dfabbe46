"""Worker functions for the multi-process tests (spawned; must be importable top level).

Every worker joins a gloo process group on 127.0.0.1, does its part, and writes what the
parent asserts on into ``out/<tag>-<rank>.json`` (and reference tensors with torch.save).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CHUNK = 16 * 1024  # small chunks so small test tensors span many of them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args: Any) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes; re-raise failures."""
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, start_method="spawn")


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["CKPTSTORE_THREADS"] = "2"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )


def _finish() -> None:
    """End a worker once every rank is done. Process-group and thread teardown at exit
    aborted a rank now and then under gloo ("terminate called without an active
    exception"); everything the parent checks is on disk by now, so leave at once."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _dump(out: str, tag: str, rank: int, data: dict) -> None:
    Path(out, f"{tag}-{rank}.json").write_text(json.dumps(data))


# -- models and state -------------------------------------------------------------------
class Net(torch.nn.Module):
    """Dims chosen to shard unevenly at 3 ranks (1000 rows, 520 hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 96)
        self.l1 = torch.nn.Linear(96, 520)
        self.l2 = torch.nn.Linear(520, 96)
        self.norm = torch.nn.LayerNorm(96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.norm(h + self.l2(torch.relu(self.l1(h))))


def fsdp_model(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.l1, model.l2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 1000, (4, 8), generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def full_reference(model, opt) -> dict:
    """Whole (unsharded) model and optimizer state, on every rank, for comparisons."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, opt, options=opts),
    }


def global_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(2048, 64, generator=g),  # 512 KiB, 32 chunks of 64 rows
        "col": torch.randn(256, 120, generator=g),
        "rep": torch.randn(300, 40, generator=g),
        "grid": torch.randn(512, 96, generator=g),
    }


def dtensor_state(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = global_tensors()
    state = {
        "big": distribute_tensor(g["big"], mesh, [Shard(0)]),
        "col": distribute_tensor(g["col"], mesh, [Shard(1)]),
        "rep": distribute_tensor(g["rep"], mesh, [Replicate()]),
        "ddp": {"w": g["rep"] * 2, "step": torch.tensor(5)},  # plain tensors, same on all ranks
    }
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        state["grid"] = distribute_tensor(g["grid"], mesh2, [Shard(0), Shard(1)])
    return state


# -- workers ----------------------------------------------------------------------------
def save_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    """FSDP2 model+optimizer (step=world) and DTensor/replicated state (name dtensors-W)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ckptstore

    _init(rank, world, port)
    model, opt = fsdp_model(world)
    train(model, opt, 2, seed=1)
    msd, osd = get_state_dict(model, opt)
    info = ckptstore.save({"model": msd, "optim": osd}, url, step=world, chunk_bytes=CHUNK)
    ref = full_reference(model, opt)
    if rank == 0:
        torch.save(ref, Path(out, f"ref-{world}.pt"))
    dinfo = ckptstore.save(dtensor_state(world), url, name=f"dtensors-{world}", chunk_bytes=CHUNK)
    _dump(out, f"save{world}", rank, {"info": info.__dict__, "dtensors": dinfo.__dict__})
    _finish()


def metadata_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    """Save and load with a counting backend on every rank, in a store with a history:
    what each rank reads of store metadata (manifests, catalog)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ckptstore
    from ckptstore.backend import open_backend
    from ckptstore.store import Repository, layout
    from ckptstore.testing.counting import CountingBackend
    from ckptstore.testing.history import replicate

    _init(rank, world, port)
    model, opt = fsdp_model(world)
    train(model, opt, 1, seed=1)
    msd, osd = get_state_dict(model, opt)
    backend = CountingBackend(open_backend(url))
    ckptstore.save({"model": msd, "optim": osd}, backend, step=1, chunk_bytes=CHUNK)
    dist.barrier()
    if rank == 0:  # a history of 30 more checkpoints, older than step 1
        replicate(Repository.open(url), layout.step_name(1), 30, first_step=2)
    dist.barrier()
    train(model, opt, 1, seed=2)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    backend.reset()
    ckptstore.save(state, backend, step=100, chunk_bytes=CHUNK)
    report = {"save": backend.summary()}
    backend.reset()
    ckptstore.load(state, backend)
    report["load"] = backend.summary()
    _dump(out, "meta", rank, report)
    _finish()


def load_worker(rank: int, world: int, port: int, url: str, out: str, sources: list) -> None:
    """Load each source checkpoint into an FSDP2 model at this world size; check values;
    reload DTensors with other placements; record per-rank bytes read."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckptstore

    _init(rank, world, port)
    report: dict[str, Any] = {}
    for src in sources:
        model, opt = fsdp_model(world)
        train(model, opt, 1, seed=99)  # different values, so a skipped load shows
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        info = ckptstore.load(state, url, step=src)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        got = full_reference(model, opt)
        want = torch.load(Path(out, f"ref-{src}.pt"), weights_only=True)
        _assert_same(want, got, f"{src}->{world}")
        report[f"fsdp-{src}"] = info.bytes_read

    mesh = init_device_mesh("cpu", (world,))
    g = global_tensors()
    # the same DTensor checkpoint, loaded with each row range apart (Shard(0)) ...
    big = distribute_tensor(torch.zeros_like(g["big"]), mesh, [Shard(0)])
    info = ckptstore.load({"big": big}, url, name="dtensors-4")
    assert torch.equal(big.full_tensor(), g["big"]), "big Shard(0) values"
    report["big_shard0"] = {"bytes": info.bytes_read, "objects": info.objects_read}
    # ... and with other placements: column slices of row-sharded data
    cols = {k: distribute_tensor(torch.zeros_like(g[k]), mesh, [Shard(1)]) for k in ("big", "rep")}
    info = ckptstore.load(cols, url, name="dtensors-4")
    for k, t in cols.items():
        assert torch.equal(t.full_tensor(), g[k]), f"{k} Shard(1) values"
    report["big_shard1"] = {"bytes": info.bytes_read, "objects": info.objects_read}
    grid = distribute_tensor(torch.zeros_like(g["grid"]), mesh, [Shard(0)])
    ckptstore.load(
        {"grid": grid, "ddp": {"w": torch.zeros(300, 40), "step": torch.tensor(0)}},
        url,
        name="dtensors-4",
    )
    assert torch.equal(grid.full_tensor(), g["grid"]), "2-D mesh → 1-D Shard(0)"
    _dump(out, f"load{world}", rank, report)
    _finish()


def failure_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    """A rank that raises mid-save, a rank whose backend fails, bad loads: every rank must
    get a clear error naming the failing rank or tensor, and nothing may be committed."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    import ckptstore
    from ckptstore.testing.faulty import failing_puts

    _init(rank, world, port)
    seen: dict[str, str] = {}
    state = {"w": torch.randn(512, 64) + rank, "b": torch.ones(8)}
    ckptstore.save({"w": state["w"], "b": state["b"]}, url, step=1, chunk_bytes=CHUNK)

    class FailOnRank1(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if dist.get_rank() == 1:
                raise RuntimeError("rank 1 exploded while staging")
            return super().resolve_data(write_item)

    per_rank = {f"r{rank}": torch.randn(4096, 16)}  # each rank writes its own tensor
    try:
        ckptstore.save(per_rank, url, step=2, planner=FailOnRank1(), chunk_bytes=CHUNK)
    except ckptstore.CkptStoreError as exc:
        seen["raise"] = str(exc)
        seen["failures"] = {str(r): type(e).__name__ for r, e in exc.failures.items()}
    with failing_puts(after=1, match="chunks/") if rank == 1 else _nothing():
        try:
            ckptstore.save(per_rank, url, step=3, chunk_bytes=CHUNK)
        except ckptstore.CkptStoreError as exc:
            seen["backend"] = f"{type(exc).__name__}: {exc}"
    info = ckptstore.save(per_rank, url, step=4, chunk_bytes=CHUNK)  # works again
    seen["after"] = info.name
    for label, template in (
        ("missing", {"w": torch.zeros(512, 64), "nope": torch.zeros(3)}),
        ("shape", {"w": torch.zeros(500, 64)}),
    ):
        try:
            ckptstore.load(template, url, step=1)
        except ckptstore.CkptStoreError as exc:
            seen[label] = f"{type(exc).__name__}: {exc}"
    seen["names"] = [c.name for c in ckptstore.Store(url).list()]
    _dump(out, "fail", rank, seen)
    _finish()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _assert_same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def quant_worker(rank: int, world: int, port: int, url: str) -> None:
    """Save DTensor shards and replicated tensors with a quantization policy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckptstore

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    g = global_tensors()
    state = {
        "model": {
            "big": distribute_tensor(g["big"], mesh, [Shard(0)]),
            "col": distribute_tensor(g["col"], mesh, [Shard(1)]),
        },
        "optim": {"exp_avg": g["grid"], "step": torch.tensor(3.0)},
    }
    policy = {"optim.*exp_avg*": "bf16", "model.*": "int8", "*": None}
    ckptstore.save(state, url, step=1, quantize=policy, chunk_bytes=CHUNK)
    _finish()


def delta_state(world: int, step: int) -> dict:
    """DTensor state that changes a little at every step (for delta saves)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = global_tensors()
    big = g["big"] * (1 + 1e-3 * step)
    col = g["col"] + 1e-4 * step
    return {
        "big": distribute_tensor(big, mesh, [Shard(0)]),
        "col": distribute_tensor(col, mesh, [Shard(1)]),
    }


def delta_worker(rank: int, world: int, port: int, url: str, steps: list) -> None:
    """Delta saves of :func:`delta_state` at each of ``steps``."""
    import ckptstore

    _init(rank, world, port)
    for step in steps:
        ckptstore.save(delta_state(world, step), url, step=step, chunk_bytes=CHUNK, delta=True)
    _finish()


def no_dist_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    """Rank 0 saves and async-saves alone (``no_dist=True``) while rank 1 waits at a
    barrier, as a trainer plug-in does; then each rank loads alone."""
    import ckptstore

    _init(rank, world, port)
    state = {"w": torch.arange(5000, dtype=torch.float32) * (rank + 1), "step": 7}
    if rank == 0:
        ckptstore.save(state, url, step=1, no_dist=True, chunk_bytes=CHUNK)
        info = ckptstore.async_save(state, url, step=2, no_dist=True, keep_last=1).result()
        info.retention.result()  # (the worker leaves with os._exit)
    dist.barrier()
    got = {"w": torch.zeros(5000), "step": 0}
    info = ckptstore.load(got, url, no_dist=True)
    _dump(out, "no-dist", rank, {"name": info.name, "w0": got["w"][1].item(), "step": got["step"]})
    _finish()


def table_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(200, 24, generator=g),  # 25 rows a rank at 8, 67/67/66 at 3
        "b": torch.randn(50, 8, dtype=torch.float64, generator=g),  # uneven: 7 a rank, 1 last
        "n": torch.randn(40, generator=g).to(torch.bfloat16),
    }


def table_worker(rank: int, world: int, port: int, url: str, out: str, mode: str) -> None:
    """Dim-0 sharded DTensors saved at this world size (mode "save") or loaded at it (mode
    "load", compared bit for bit), every rank through a counting backend."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckptstore
    from ckptstore.backend import open_backend
    from ckptstore.testing.counting import CountingBackend

    _init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    g = table_tensors()
    backend = CountingBackend(open_backend(url))
    if mode == "save":
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in g.items()}
        ckptstore.save(state, backend, step=1, chunk_bytes=512, inline_bytes=64)
    else:
        state = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in g.items()}
        ckptstore.load(state, backend)
        for k, v in g.items():
            assert torch.equal(state[k].full_tensor(), v), f"{k}: values differ after 8 → {world}"
    _dump(out, f"table-{mode}", rank, backend.summary())
    _finish()
