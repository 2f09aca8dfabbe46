"""Costs that do not grow with history: a save, a load of the latest, ls, inspect and
``Store.list()`` in a store of 200 checkpoints make the same metadata requests and read the
same metadata bytes as in a store of 10 (counted by a wrapper backend), and dedup still finds
chunks of any live checkpoint, not only the parent's."""

from __future__ import annotations

import pytest
import torch

import ckptstore
from ckptstore.backend import open_backend
from ckptstore.store import Repository, layout
from ckptstore.testing.counting import CountingBackend
from ckptstore.testing.history import replicate


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(64, 256, generator=g) for i in range(12)}
    sd |= {f"layer{i}.bias": torch.randn(256, generator=g) for i in range(12)}
    sd["step"] = torch.tensor(seed)
    sd["meta"] = {"epoch": seed}
    return sd


def _costs(url: str, n: int) -> dict[str, dict]:
    sd = _state()
    ckptstore.save(sd, url, step=0, chunk_bytes=32 * 1024)
    replicate(Repository.open(url), layout.step_name(0), n - 1, first_step=1)
    backend = CountingBackend(open_backend(url))
    out = {}
    sd["layer3.weight"] += 1
    backend.reset()
    info = ckptstore.save(sd, backend, step=100_000, chunk_bytes=32 * 1024)
    out["save"] = backend.summary()
    out["save"]["new_chunks"] = info.new_chunks
    template = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    template["meta"] = {"epoch": -1}
    backend.reset()
    ckptstore.load(template, backend)
    assert torch.equal(template["layer3.weight"], sd["layer3.weight"])
    out["load"] = backend.summary()
    backend.reset()
    listed = ckptstore.Store(backend).list()
    assert len(listed) == n + 1 and listed[-1].name == layout.step_name(100_000)
    out["ls"] = backend.summary()
    backend.reset()
    ckptstore.Store(backend).inspect(step=100_000)
    out["inspect"] = backend.summary()
    return out


@pytest.mark.parametrize("op", ["save", "load", "ls", "inspect"])
def test_metadata_costs_do_not_grow_with_history(tmp_path_factory, op):
    few = _costs(str(tmp_path_factory.mktemp("few") / "s"), 10)[op]
    many = _costs(str(tmp_path_factory.mktemp("many") / "s"), 200)[op]
    assert many["metadata_requests"] == few["metadata_requests"], (few, many)

    # (store.json's length varies by a digit or two with its creation time)
    def meta(c):
        return c["metadata_bytes"] - c["bytes_read"].get("store.json", 0)

    assert meta(many) == meta(few), (few, many)
    assert many["requests"] == few["requests"], (few, many)
    if op in ("ls", "load", "save"):
        # ls, resolving the latest and finding the parent read no manifest beyond one
        assert many["requests"].get("get checkpoints", 0) <= 1
    if op == "save":
        assert many["new_chunks"] == few["new_chunks"] == 2  # the changed weight's chunks
        # the parent is the checkpoint this process saved last: one read, no listing
        assert "list catalog" not in many["requests"] and "list checkpoints" not in many["requests"]


def test_dedup_finds_chunks_of_any_live_checkpoint(tmp_path):
    """Saving an old checkpoint's weights again writes nothing new, though the parent (the
    latest checkpoint) holds none of them."""
    url = str(tmp_path / "s")
    old = _state(1)
    ckptstore.save(old, url, step=1, chunk_bytes=32 * 1024)
    for step in (2, 3, 4):
        ckptstore.save(_state(step), url, step=step, chunk_bytes=32 * 1024)
    again = ckptstore.save(old, url, step=5, chunk_bytes=32 * 1024)
    assert again.chunks > 0 and again.new_chunks == 0
    assert ckptstore.Store(url).verify().ok


def test_catalog_repairs_and_old_stores(tmp_path):
    """A checkpoint whose catalog entry is missing (a crash after the commit, or a store
    written before the catalog) is listed from its manifest, and gc's tidy writes it."""
    url = str(tmp_path / "s")
    for step in (1, 2):
        ckptstore.save(_state(step), url, step=step)
    repo = Repository.open(url)
    for key in repo.backend.list(layout.CATALOG):
        repo.backend.delete(key)
    backend = CountingBackend(open_backend(url))
    store = ckptstore.Store(backend)
    assert [c.step for c in store.list()] == [1, 2]
    assert backend.requests[("get", "checkpoints")] == 2
    assert store.latest() == layout.step_name(2)
    report = ckptstore.Store(url).gc()  # a gc writes the missing entries (C4)
    assert (report.catalog_removed, report.catalog_written) == (0, 2)
    assert repo.tidy_catalog() == (0, 0)
    backend.reset()
    assert [c.step for c in store.list()] == [1, 2]
    assert backend.requests[("get", "checkpoints")] == 0
    store.delete(step=1)
    assert repo.backend.list(layout.CATALOG + "/" + layout.step_name(1)) == []


def test_cached_plans_never_carry_another_saves_parent(tmp_path):
    """With DCP's plan caching a later save gets the plan (and our storage_data) of an earlier
    one: the writer must not trust that parent index, and dedup still works (by probing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    url = str(tmp_path / "s")
    planner = DefaultSavePlanner(enable_plan_caching=True)
    writer = ckptstore.Writer(url, step=1, chunk_bytes=32 * 1024)
    state = _state(1)
    dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    first = writer.save_info
    writer2 = ckptstore.Writer(url, step=2, chunk_bytes=32 * 1024)
    state["layer0.weight"] += 1
    dcp.save(state, storage_writer=writer2, planner=planner, no_dist=True)
    info = writer2.save_info
    assert first is not None and info is not None
    assert info.chunks == first.chunks and info.new_chunks == 2  # only the changed weight
    got = ckptstore.load_full(url, step=2)
    assert torch.equal(got["layer0.weight"], state["layer0.weight"])
    assert ckptstore.Store(url).verify().ok


def test_parent_falls_back_to_the_latest_when_this_process_last_save_is_gone(tmp_path):
    url = str(tmp_path / "s")
    state = _state(1)
    ckptstore.save(state, url, step=1, chunk_bytes=32 * 1024)
    ckptstore.save(_state(2), url, step=2, chunk_bytes=32 * 1024)
    ckptstore.Store(url).delete(step=2)  # the process's last save is gone: parent = step 1
    state["layer0.weight"] += 1
    info = ckptstore.save(state, url, step=3, chunk_bytes=32 * 1024)
    assert info.new_chunks == 2  # only the changed weight: deduped against step 1
    assert torch.equal(ckptstore.load_full(url)["layer0.weight"], state["layer0.weight"])
