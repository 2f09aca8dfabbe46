"""Workers for the two-tier multi-process tests (spawned; importable top level): each
rank's primary store is its own folder (a node-local disk), the mirror one S3 bucket."""

from __future__ import annotations

import torch

from tests.dist_workers import CHUNK, _dump, _finish, _init, global_tensors


def tier_state(world: int, step: int) -> dict:
    """Sharded state that changes at every step (step 0: zeros, a load template)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = expected(step)
    return {
        "big": distribute_tensor(g["big"], mesh, [Shard(0)]),
        "col": distribute_tensor(g["col"], mesh, [Shard(1)]),
        "rep": distribute_tensor(g["rep"], mesh, [Replicate()]),
    }


def expected(step: int) -> dict[str, torch.Tensor]:
    g = global_tensors()
    return {k: g[k] * step for k in ("big", "col", "rep")}


def save_worker(
    rank: int, world: int, port: int, root: str, mirror: str, options: dict, out: str
) -> None:
    import ckptstore

    _init(rank, world, port)
    tier = ckptstore.Mirror(mirror, storage_options=options)
    futures = []
    for step in (1, 2):  # the second save starts while the first may still be uploading
        info = ckptstore.save(
            tier_state(world, step), f"{root}/node{rank}", step=step, mirror=tier, chunk_bytes=CHUNK
        )
        futures.append(info.mirrored)
    reports = [f.result(timeout=120).to_dict() for f in futures]
    _dump(out, "save", rank, {"reports": reports})
    _finish()


def load_worker(
    rank: int, world: int, port: int, root: str, mirror: str, options: dict, out: str
) -> None:
    import ckptstore

    _init(rank, world, port)
    tier = ckptstore.Mirror(mirror, storage_options=options)
    state = tier_state(world, 0)
    info = ckptstore.load(state, f"{root}/node{rank}", mirror=tier)
    want = expected(2)
    same = {k: bool(torch.equal(v.full_tensor(), want[k])) for k, v in state.items()}
    _dump(
        out,
        f"load{world}",
        rank,
        {
            "name": info.name,
            "same": same,
            "objects_read": info.objects_read,
            "from_mirror": info.objects_from_mirror,
        },
    )
    _finish()


def killed_rank_worker(
    rank: int, world: int, port: int, root: str, mirror: str, options: dict, out: str
) -> None:
    """Both ranks save with the mirror's uploads paused; once both are past the save, rank 1
    resumes its upload and is killed (SIGKILL) after two chunk puts to the bucket. Rank 0
    (the coordinator) reports what its upload future says."""
    import os
    import signal

    import torch.distributed as dist

    import ckptstore
    from ckptstore.backend import FsspecBackend
    from ckptstore.store.mirror import uploader_for
    from ckptstore.store.repository import Repository

    _init(rank, world, port)
    tier = ckptstore.Mirror(mirror, storage_options=options, ranks_wait=8.0)
    url = f"{root}/node{rank}"
    up = uploader_for(Repository.open(url, create=True), tier)
    with up.paused():
        info = ckptstore.save(tier_state(world, 1), url, step=1, mirror=tier, chunk_bytes=CHUNK)
        dist.barrier()
        if rank == 1:
            original, count = FsspecBackend.put, [0]

            def put(backend, key, data, *, create_only=False):
                original(backend, key, data, create_only=create_only)
                if backend.url.startswith("s3://") and key.startswith("chunks/"):
                    count[0] += 1
                    if count[0] == 2:
                        os.kill(os.getpid(), signal.SIGKILL)

            FsspecBackend.put = put
    if rank == 1:
        info.mirrored.result(timeout=120)  # killed before this returns
    try:
        info.mirrored.result(timeout=120)
        outcome = "durable"
    except ckptstore.MirrorError as exc:
        outcome = str(exc)
    _dump(out, "killed", rank, {"outcome": outcome})
    os._exit(0)  # (no barrier: rank 1 is gone)
