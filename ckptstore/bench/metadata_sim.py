"""Simulate what each rank of a W-rank save and load reads and receives of store metadata,
up to W = 1,024, without 1,024 processes: DCP's plans are synthetic (every tensor of a
7B-parameter Llama-style AdamW state sharded on dim 0 over W ranks, as FSDP2 does), and our
Writer/Reader are driven through the coordinator's steps of the DCP protocol in one process
over a counting in-memory store holding a parent checkpoint and a history of N more.

Per save, the coordinator reads the store (parent manifest, two listings, lease records);
every rank gets its share of the parent's chunk list inside its plan (pickled size shown).
Per load, the coordinator reads the manifest; every rank gets DCP's global Metadata (DCP
needs it on every rank to plan: its own design, shown apart) and the records of just its
reads inside its plan. Non-coordinator ranks read only ``store.json`` from the store
(tests/test_distributed.py checks that at W = 4 with real processes).

    python -m ckptstore.bench metadata-sim --world 8 64 1024 --history 10 1000 [--layers 32]

Prints a table; ``--json`` for machine output. Results: docs/design.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from ckptstore import Reader, Writer
from ckptstore.backend import open_backend
from ckptstore.bench.datasets import llama_shapes
from ckptstore.knobs import Settings
from ckptstore.store import Blob, ChunkRef, Manifest, Repository, Shard, TensorEntry, layout
from ckptstore.store.chunks import row_ranges
from ckptstore.testing.counting import CountingBackend
from ckptstore.testing.history import add_checkpoint, replicate

CHUNK = 4 * 1024 * 1024
INLINE = 16 * 1024

CODEC = [
    {"id": "bytegroup", "width": 4, "rotate": True},
    {"id": "zstd", "level": 1, "segments": 4, "entropy": True},
]


def dim0_boxes(shape: tuple[int, ...], world: int) -> list[tuple[list[int], list[int]]]:
    """FSDP2-style dim-0 shards (torch.chunk sizes); 0-d tensors are replicated (rank 0)."""
    if not shape:
        return [([], [])]
    per = -(-shape[0] // world)
    out = []
    for r in range(world):
        a, b = min(shape[0], r * per), min(shape[0], (r + 1) * per)
        if b > a:
            out.append(([a, *[0] * (len(shape) - 1)], [b - a, *shape[1:]]))
    return out


def synthetic_manifest(state, world: int, name: str, step: int) -> Manifest:
    """The manifest a W-rank save of ``state`` writes (fake chunk keys, real geometry)."""
    tensors = {}
    counter = 0
    for fqn, shape in state.items():
        shards = []
        for offsets, sizes in dim0_boxes(shape, world):
            numel = 1
            for s in sizes:
                numel *= s
            nbytes = numel * 4
            rows = sizes[0] if sizes else 1
            if nbytes <= INLINE:
                blob = Blob(CODEC, nbytes, rows, inline=b"\0" * (12 + nbytes * 9 // 10))
            else:
                chunks = []
                first = offsets[0] if offsets else 0
                for a, b in row_ranges(rows, nbytes // rows, CHUNK, first):
                    counter += 1
                    key = counter.to_bytes(16, "big")
                    stored = (b - a) * (nbytes // rows) * 5 // 6
                    chunks.append(ChunkRef(key, a, b, stored, True))
                blob = Blob(CODEC, nbytes, rows, chunks=chunks)
            shards.append(Shard(offsets, sizes, blob))
        tensors[fqn] = TensorEntry("float32", list(shape), shards)
    return Manifest(name, step, time.time(), tensors, {}, writer="sim")


def save_plans(state, world: int) -> list[SavePlan]:
    plans: list[list[WriteItem]] = [[] for _ in range(world)]
    for fqn, shape in state.items():
        props = TensorProperties(dtype=torch.float32)
        for r, (offsets, sizes) in enumerate(dim0_boxes(shape, world)):
            item = WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                    props,
                    torch.Size(shape),
                ),
            )
            plans[r].append(item)
    return [SavePlan(items) for items in plans]


def load_plans(state, world: int) -> list[LoadPlan]:
    plans: list[list[ReadItem]] = [[] for _ in range(world)]
    for fqn, shape in state.items():
        for r, (offsets, sizes) in enumerate(dim0_boxes(shape, world)):
            idx = MetadataIndex(fqn, torch.Size(offsets))
            zeros = torch.Size([0] * len(shape))
            plans[r].append(
                ReadItem(LoadItemType.TENSOR, idx, zeros, idx, zeros, torch.Size(sizes))
            )
    return [LoadPlan(items) for items in plans]


def simulate(world: int, history: int, layers: int, settings: Settings | None = None) -> dict:
    """One W-rank save and load of the ``layers``-layer state over a store with a parent
    and ``history`` more checkpoints: what the coordinator reads, what each rank receives."""
    settings = Settings.resolve(settings)
    state = llama_shapes(layers)
    url = f"memory://sim-{world}-{history}-{os.getpid()}"
    repo = Repository.open(url, create=True, settings=settings)
    parent = synthetic_manifest(state, world, layout.step_name(0), 0)
    add_checkpoint(repo, parent)
    if history > 1:  # older checkpoints: their size does not matter, only their number
        older = synthetic_manifest({"w": (64, 64)}, 1, layout.step_name(10**9), 10**9)
        older.created = parent.created - 10
        add_checkpoint(repo, older)
        replicate(repo, older.name, history - 2, first_step=1)
    backend = CountingBackend(open_backend(url, settings=settings))

    # save: the coordinator's steps, then what each rank receives in its plan
    writer = Writer(backend, step=10**6, settings=settings)
    writer.set_up_storage_writer(True, rank=0)
    plans = save_plans(state, world)
    t0 = time.perf_counter()
    writer.prepare_local_plan(plans[0])
    out = writer.prepare_global_plan(plans)
    save_s = time.perf_counter() - t0
    save = backend.summary()
    share = [len(pickle.dumps(p.storage_data)) for p in out]
    writer.release_lease()

    # load of the latest (the parent): the coordinator resolves it, reads the manifest and
    # hands out records
    backend.reset()
    reader = Reader(backend, settings=settings)
    t0 = time.perf_counter()
    metadata = reader.open()
    lout = reader.prepare_global_plan(load_plans(state, world))
    load_s = time.perf_counter() - t0
    load = backend.summary()
    records = [len(pickle.dumps(p.storage_data)) for p in lout]
    return {
        "world": world,
        "history": history,
        "tensors": len(state),
        "manifest_bytes": repo.summary(parent.name).manifest_bytes,
        "save": {
            "coordinator_requests": save["metadata_requests"],
            "coordinator_metadata_bytes": save["metadata_bytes"],
            "coordinator_keys_listed": sum(save["keys_listed"].values()),
            "per_rank_plan_bytes_max": max(share),
            "per_rank_plan_bytes_mean": sum(share) / world,
            "coordinator_seconds": round(save_s, 3),
        },
        "load": {
            "coordinator_requests": load["metadata_requests"],
            "coordinator_metadata_bytes": load["metadata_bytes"],
            "dcp_metadata_bytes_per_rank": len(pickle.dumps(metadata)),
            "per_rank_plan_bytes_max": max(records),
            "per_rank_plan_bytes_mean": sum(records) / world,
            "coordinator_seconds": round(load_s, 3),
        },
        "other_ranks_store_reads": "store.json only (1 GET, ~160 B)",
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.bench metadata-sim",
        description=(__doc__ or "").split("\n\n")[0],
    )
    ap.add_argument("--world", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--history", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    settings = Settings.resolve()
    rows = [simulate(w, h, args.layers, settings) for w in args.world for h in args.history]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'W':>5} {'N':>5} {'manifest':>10} | save: {'coord req':>9} {'coord B':>10} "
        f"{'rank plan B':>11} | load: {'coord req':>9} {'coord B':>10} {'rank plan B':>11} "
        f"{'DCP md B':>10}"
    )
    for r in rows:
        s, ld = r["save"], r["load"]
        print(
            f"{r['world']:>5} {r['history']:>5} {r['manifest_bytes']:>10} | "
            f"      {s['coordinator_requests']:>9} {s['coordinator_metadata_bytes']:>10} "
            f"{s['per_rank_plan_bytes_max']:>11} |       {ld['coordinator_requests']:>9} "
            f"{ld['coordinator_metadata_bytes']:>10} {ld['per_rank_plan_bytes_max']:>11} "
            f"{ld['dcp_metadata_bytes_per_rank']:>10}"
        )


if __name__ == "__main__":
    main()
