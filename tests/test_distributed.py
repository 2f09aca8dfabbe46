"""Real multi-process saves and resharding loads (gloo on CPU, world sizes 1, 2, 3, 4).

One module-scoped fixture saves FSDP2 and DTensor state at world sizes 4, 2 and 1; each
test then loads at another world size in fresh processes and compares bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckptstore
from tests import dist_workers as w

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not available"
)


def _read(out: Path, tag: str, world: int) -> list[dict]:
    return [json.loads((out / f"{tag}-{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    url, out = str(root / "store"), root / "out"
    out.mkdir()
    for world in (4, 2, 1):
        w.spawn(w.save_worker, world, url, str(out))
    return url, out


def test_parallel_save_commits_one_manifest(saved):
    url, out = saved
    store = ckptstore.Store(url)
    names = {c.name for c in store.list()}
    assert {"step-000000000004", "step-000000000002", "step-000000000001"} <= names
    infos = [r["info"] for r in _read(out, "save4", 4)]
    assert all(i == infos[0] for i in infos[1:]), "every rank gets the same SaveInfo"
    m = store.repo.manifest("step-000000000004")
    # FSDP2 shards dim 0 over 4 ranks: the embedding is saved as 4 row shards
    emb = m.tensors["model.emb.weight"]
    assert emb.shape == [1000, 96] and [s.offsets[0] for s in emb.shards] == [0, 250, 500, 750]
    assert store.verify().ok


def test_replicas_are_written_once(saved):
    url, _ = saved
    m = ckptstore.Store(url).repo.manifest("dtensors-4")
    for fqn in ("rep", "ddp.w", "ddp.step"):
        assert len(m.tensors[fqn].shards) == 1, f"{fqn} replicated on 4 ranks, saved once"
    assert len(m.tensors["big"].shards) == 4 and len(m.tensors["col"].shards) == 4
    assert len(m.tensors["grid"].shards) == 4  # 2-D mesh, Shard(0) × Shard(1)
    new_keys = [c.key for _, b in m.blobs() for c in b.chunks if c.new]
    assert len(new_keys) == len(set(new_keys)), "a chunk is counted new once"


@pytest.mark.parametrize("world,sources", [(2, [4]), (3, [4]), (4, [2, 1, 4])])
def test_resharding_loads(saved, world, sources):
    """4→2, 4→3 (uneven), 2→4, 1→4 and 4→4 into FSDP2; DTensor Shard(0)→Shard(1) and
    2-D mesh → 1-D; values compared bit for bit inside the workers."""
    url, out = saved
    w.spawn(w.load_worker, world, url, str(out), sources)
    reports = _read(out, f"load{world}", world)

    store = ckptstore.Store(url)
    big = store.repo.manifest("dtensors-4").tensors["big"]
    stored = sum(s.blob.stored_bytes for s in big.shards)
    largest = max(c.stored for s in big.shards for c in s.blob.chunks)
    for r, rep in enumerate(reports):
        # shard-aware reads: a rank fetches its 1/W' share plus at most a chunk per edge
        got = rep["big_shard0"]["bytes"]
        assert got <= stored / world + 2 * largest, (r, got, stored / world)
        assert got < stored or world == 1
        # a column slice needs every row: whole chunks, but no more than the tensors hold
        assert rep["big_shard1"]["bytes"] >= stored
    # together the ranks read each FSDP checkpoint about once, not W' times
    for src in sources:
        total = sum(rep[f"fsdp-{src}"] for rep in reports)
        summary = next(c for c in store.list() if c.step == src)
        assert total <= 1.2 * summary.stored_bytes, (src, total, summary.stored_bytes)


def test_load_full_of_a_sharded_checkpoint(saved):
    """4→1: FSDP2 state into one process without a template, and in place via DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    url, out = saved
    ref = torch.load(out / "ref-4.pt", weights_only=True)
    full = ckptstore.load_full(url, step=4)
    w._assert_same(ref["model"], full["model"], "model")
    w._assert_same(ref["optim"]["state"], full["optim"]["state"], "optim.state")

    model = w.Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w.train(model, opt, 1, seed=5)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    ckptstore.load(state, url, step=4)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    w._assert_same(ref["model"], model.state_dict(), "in-place model")


def test_failures_name_the_rank_and_commit_nothing(tmp_path):
    url, out = str(tmp_path / "store"), tmp_path
    w.spawn(w.failure_worker, 2, url, str(out))
    for r, seen in enumerate(_read(out, "fail", 2)):
        assert "rank(s) [1]" in seen["raise"] and "rank 1 exploded" in seen["raise"], (r, seen)
        assert seen["failures"] == {"1": "RuntimeError"}, (r, seen)  # the rank's own error
        assert "rank(s) [1]" in seen["backend"] and "injected put failure" in seen["backend"]
        assert seen["after"] == "step-000000000004"
        assert "MismatchError" in seen["missing"] and "'nope'" in seen["missing"]
        assert "MismatchError" in seen["shape"] and "'w'" in seen["shape"]
        assert seen["names"] == ["step-000000000001", "step-000000000004"]


def test_store_metadata_is_read_once_not_once_per_rank(tmp_path):
    """W = 4 in a store of 32 checkpoints: the coordinator reads one manifest per save (the
    parent) and per load (the checkpoint); every other rank reads no manifest and no
    catalog — its share of the parent's chunks and its load records come with its plan."""
    url, out = str(tmp_path / "store"), tmp_path
    w.spawn(w.metadata_worker, 4, url, str(out))
    reports = _read(out, "meta", 4)
    store = ckptstore.Store(url)
    manifest_bytes = {c.step: c.manifest_bytes for c in store.list()}
    for r, rep in enumerate(reports):
        for op, one in (("save", manifest_bytes[1]), ("load", manifest_bytes[100])):
            got = rep[op]["bytes_read"].get("checkpoints", 0)
            listed = rep[op]["keys_listed"]
            if r == 0:
                assert got == one, (op, rep[op])
            else:
                assert got == 0 and not listed.get("catalog") and not listed.get("checkpoints"), (
                    r,
                    op,
                    rep[op],
                )
                assert rep[op]["metadata_requests"] <= 2, (r, op, rep[op])  # store.json (+ head)


def test_no_dist_saves_and_loads_from_one_rank_of_a_job(tmp_path):
    """``no_dist=True``: rank 0 of a 2-rank gloo job saves alone (sync and async, with
    retention) while rank 1 does not call; each rank then loads alone — nothing hangs and
    both read rank 0's values."""
    url, out = str(tmp_path / "store"), str(tmp_path)
    w.spawn(w.no_dist_worker, 2, url, out)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"no-dist-{rank}.json").read_text())
        assert got == {"name": "step-000000000002", "w0": 1.0, "step": 7}
    assert [s.name for s in ckptstore.Store(url).list()] == ["step-000000000002"]


def test_eight_ranks_save_shard_tables_and_three_load_them(tmp_path):
    """8 ranks save dim-0 shards (a format-2 manifest: one table of columns per tensor),
    3 ranks load them resharded, bit for bit (checked in the workers). Requests per rank:
    rank 0 alone reads the manifest, once; every rank reads exactly the chunks that overlap
    its rows and writes exactly the chunks of its own shards."""
    import msgpack

    from ckptstore.store import layout

    url, out = str(tmp_path / "store"), tmp_path
    w.spawn(w.table_worker, 8, url, str(out), "save")
    w.spawn(w.table_worker, 3, url, str(out), "load")
    repo = ckptstore.Store(url).repo
    name = layout.step_name(1)
    raw = repo.backend.get(layout.manifest_key(name))
    assert msgpack.unpackb(raw[12:], raw=False)["format"] == 2
    m = repo.manifest(name)
    assert [len(m.tensors[k].shards) for k in ("a", "b", "n")] == [8, 8, 8]

    def chunk_rows(fqn: str) -> list[tuple[int, int]]:
        return [
            (s.offsets[0] + c.row_start, s.offsets[0] + c.row_stop)
            for s in m.tensors[fqn].shards
            for c in s.blob.chunks
        ]

    def rows_of(n: int, world: int, r: int) -> tuple[int, int]:
        per = -(-n // world)  # torch.chunk, as Shard(0) splits
        return min(n, r * per), min(n, (r + 1) * per)

    saves, loads = _read(out, "table-save", 8), _read(out, "table-load", 3)
    for r, rep in enumerate(saves):
        mine = sum(
            1
            for fqn in ("a", "b", "n")
            for a, b in chunk_rows(fqn)
            if rows_of(m.tensors[fqn].shape[0], 8, r)[0]
            <= a
            < rows_of(m.tensors[fqn].shape[0], 8, r)[1]
        )
        assert rep["requests"].get("put chunks", 0) == mine > 0, (r, rep)
        assert rep["bytes_read"].get("checkpoints", 0) == 0, (r, rep)
    for r, rep in enumerate(loads):
        want = sum(
            1
            for fqn in ("a", "b", "n")
            for a, b in chunk_rows(fqn)
            if a < rows_of(m.tensors[fqn].shape[0], 3, r)[1]
            and b > rows_of(m.tensors[fqn].shape[0], 3, r)[0]
        )
        assert rep["requests"].get("get chunks", 0) == want > 0, (r, rep)
        got = rep["bytes_read"].get("checkpoints", 0)
        assert got == (m.manifest_bytes if r == 0 else 0), (r, rep)
