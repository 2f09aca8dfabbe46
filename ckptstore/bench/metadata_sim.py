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

The coordinator's wall time and peak memory are split into DCP's own share (its global save
plan and Metadata, pickling that Metadata as its own writers do, unpickling it and its
global load plan) and ckptstore's (save: the parent's chunks per rank, the commit; load:
resolve, manifest read and decode, DCP's Metadata from it, records per rank).

Prints tables; ``--json`` for machine output. Results: docs/benchmarks.md, "Coordinator at
1,024 ranks".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import time
import tracemalloc
from collections.abc import Sequence

import fsspec
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
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
from torch.distributed.checkpoint.storage import WriteResult

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


def synthetic_manifest(state, world: int, name: str, step: int, key_base: int = 0) -> Manifest:
    """The manifest a W-rank save of ``state`` writes (fake chunk keys from ``key_base``
    on, real geometry)."""
    tensors = {}
    counter = key_base
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


class PeakMem:
    """Peak memory this process allocates during a phase, above its level at entry
    (tracemalloc, which numpy reports to): what the phase adds. Off (0) unless the pass is
    the memory pass — tracing slows Python code, so times come from a pass without it."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.peak = 0

    def __enter__(self) -> PeakMem:
        gc.collect()
        if self.on:
            tracemalloc.reset_peak()
            self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.peak = tracemalloc.get_traced_memory()[1] - self.base


def write_results(state, world: int, plans: list[SavePlan]) -> list[list[WriteResult]]:
    """What every rank's ``write_data`` returns for ``plans``: one blob per item, with the
    geometry a real save has (fresh fake chunk keys)."""
    m = synthetic_manifest(state, world, "results", 1, key_base=1 << 64)
    blobs = {(fqn, tuple(s.offsets)): s.blob for fqn, t in m.tensors.items() for s in t.shards}
    return [
        [
            WriteResult(
                item.index,
                0,
                blobs[(item.index.fqn, tuple(int(x) for x in item.index.offset))],
            )
            for item in plan.items
        ]
        for plan in plans
    ]


def _timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def simulate(
    world: int, history: int, layers: int, settings: Settings | None = None, memory: bool = False
) -> dict:
    """One W-rank save and load of the ``layers``-layer state over a store with a parent
    and ``history`` more checkpoints: what the coordinator reads, what each rank receives,
    and the coordinator's time and memory, split into DCP's own share and ours."""
    settings = Settings.resolve(settings)
    state = llama_shapes(layers)
    url = f"memory://sim-{world}-{history}-{os.getpid()}-{int(memory)}"
    repo = Repository.open(url, create=True, settings=settings)
    parent = synthetic_manifest(state, world, layout.step_name(0), 0)
    add_checkpoint(repo, parent)
    if history > 1:  # older checkpoints: their size does not matter, only their number
        older = synthetic_manifest({"w": (64, 64)}, 1, layout.step_name(10**9), 10**9)
        older.created = parent.created - 10
        add_checkpoint(repo, older)
        replicate(repo, older.name, history - 2, first_step=1)
    del parent
    backend = CountingBackend(open_backend(url, settings=settings))
    local = save_plans(state, world)
    results = write_results(state, world, local)
    gc.collect()

    # save. DCP's share: its global plan and Metadata, and pickling that Metadata (what its
    # own writers store); ours: the parent's chunks per rank, then the commit
    with PeakMem(memory) as dcp_save_mem:
        (plans, metadata), dcp_plan_s = _timed(
            lambda: DefaultSavePlanner(flatten_state_dict=False).create_global_plan(local)
        )
        pickled, dcp_pickle_s = _timed(lambda: pickle.dumps(metadata))
    writer = Writer(backend, step=10**6, settings=settings)
    writer.set_up_storage_writer(True, rank=0)
    with PeakMem(memory) as save_mem:
        writer.prepare_local_plan(plans[0])
        out, plan_s = _timed(lambda: writer.prepare_global_plan(plans))
        save = backend.summary()
        share = [len(pickle.dumps(p.storage_data)) for p in out]
        del out
        _, commit_s = _timed(lambda: writer.finish(metadata, results))
    new_manifest = repo.summary(writer.name).manifest_bytes
    plans = metadata = results = local = None  # type: ignore[assignment]  # freed

    # load of the latest (the new checkpoint). DCP's share: unpickling its Metadata (what
    # its own readers do) and its global plan; ours: resolve the checkpoint, read and
    # decode the manifest, build DCP's Metadata from it, hand each rank its records
    lplans = load_plans(state, world)
    with PeakMem(memory) as dcp_load_mem:
        _, dcp_unpickle_s = _timed(lambda: pickle.loads(pickled))
        _, dcp_lplan_s = _timed(lambda: DefaultLoadPlanner().create_global_plan(lplans))
    pickled = b""  # freed
    backend.reset()
    reader = Reader(backend, settings=settings)
    with PeakMem(memory) as load_mem:
        metadata, open_s = _timed(reader.open)
        lout, lplan_s = _timed(lambda: reader.prepare_global_plan(lplans))
    load = backend.summary()
    records = [len(pickle.dumps(p.storage_data)) for p in lout]
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
    dcp_save = dcp_plan_s + dcp_pickle_s
    dcp_load = dcp_unpickle_s + dcp_lplan_s
    ours_save = plan_s + commit_s
    ours_load = open_s + lplan_s
    return {
        "world": world,
        "history": history,
        "tensors": len(state),
        "shards": sum(len(dim0_boxes(shape, world)) for shape in state.values()),
        "manifest_bytes": new_manifest,
        "save": {
            "coordinator_requests": save["metadata_requests"],
            "coordinator_metadata_bytes": save["metadata_bytes"],
            "coordinator_keys_listed": sum(save["keys_listed"].values()),
            "per_rank_plan_bytes_max": max(share),
            "per_rank_plan_bytes_mean": sum(share) / world,
            "dcp_plan_seconds": round(dcp_plan_s, 3),
            "dcp_pickle_seconds": round(dcp_pickle_s, 3),
            "dcp_peak_bytes": dcp_save_mem.peak,
            "plan_seconds": round(plan_s, 3),
            "commit_seconds": round(commit_s, 3),
            "peak_bytes": save_mem.peak,
        },
        "load": {
            "coordinator_requests": load["metadata_requests"],
            "coordinator_metadata_bytes": load["metadata_bytes"],
            "dcp_metadata_bytes_per_rank": len(pickle.dumps(metadata)),
            "per_rank_plan_bytes_max": max(records),
            "per_rank_plan_bytes_mean": sum(records) / world,
            "dcp_unpickle_seconds": round(dcp_unpickle_s, 3),
            "dcp_plan_seconds": round(dcp_lplan_s, 3),
            "dcp_peak_bytes": dcp_load_mem.peak,
            "open_seconds": round(open_s, 3),
            "plan_seconds": round(lplan_s, 3),
            "peak_bytes": load_mem.peak,
        },
        "dcp_seconds": round(dcp_save + dcp_load, 3),
        "ckptstore_seconds": round(ours_save + ours_load, 3),
        "ratio": round((ours_save + ours_load) / (dcp_save + dcp_load), 3),
        "peak_over_manifest": round(max(save_mem.peak, load_mem.peak) / new_manifest, 2),
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
    ap.add_argument("--memory", action="store_true", help="a second pass per size for peak memory")
    args = ap.parse_args(argv)
    settings = Settings.resolve()
    rows = []
    for w in args.world:
        for h in args.history:
            row = simulate(w, h, args.layers, settings)
            if args.memory:  # a second pass under tracemalloc, for the peaks only
                tracemalloc.start()
                try:
                    mem = simulate(w, h, args.layers, settings, memory=True)
                finally:
                    tracemalloc.stop()
                for phase in ("save", "load"):
                    for k in ("dcp_peak_bytes", "peak_bytes"):
                        row[phase][k] = mem[phase][k]
                row["peak_over_manifest"] = mem["peak_over_manifest"]
            rows.append(row)
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

    print()
    print(
        f"{'W':>5} {'shards':>8} | DCP s: {'save':>7} {'load':>7} | ckptstore s: {'plan':>7} "
        f"{'commit':>7} {'open':>7} {'plan':>7} | {'ratio':>5} | peak MB: {'save':>7} "
        f"{'load':>7} {'/manifest':>9}"
    )
    for r in rows:
        s, ld = r["save"], r["load"]
        print(
            f"{r['world']:>5} {r['shards']:>8} |        "
            f"{s['dcp_plan_seconds'] + s['dcp_pickle_seconds']:>7.2f} "
            f"{ld['dcp_unpickle_seconds'] + ld['dcp_plan_seconds']:>7.2f} |              "
            f"{s['plan_seconds']:>7.2f} {s['commit_seconds']:>7.2f} {ld['open_seconds']:>7.2f} "
            f"{ld['plan_seconds']:>7.2f} | {r['ratio']:>5.2f} |          "
            f"{s['peak_bytes'] / 1e6:>7.0f} {ld['peak_bytes'] / 1e6:>7.0f} "
            f"{r['peak_over_manifest']:>9.2f}"
        )


if __name__ == "__main__":
    main()
