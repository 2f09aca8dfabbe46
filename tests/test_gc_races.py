"""Races between gc, overwrite and DCP plan caching: gc must see a manifest
an overwrite replaced while gc held its lock, and a DCP-cached plan of an earlier save of the
same name must never hand a writer its stale parent chunks."""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner

import ckptstore
from ckptstore.store import gc_plan, gc_run
from ckptstore.store.repository import Repository


def test_gc_sees_a_manifest_overwritten_while_it_runs(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    a, n = {"w": torch.randn(2000, 700)}, {"w": torch.randn(2000, 700)}
    ckptstore.save(a, url, name="A")
    ckptstore.save(n, url, name="N")
    ckptstore.Store(url).delete("A")
    plan = gc_plan.plan(Repository.open(url), grace=0)
    assert plan.chunks_freed == 2  # A's chunks
    revalidated, committed = threading.Event(), threading.Event()
    replace, revalidate, sweep = Repository._replace_manifest, gc_run._revalidate, gc_run._sweep

    def slow_replace(self, m):  # the overwrite commits after gc re-read the checkpoints
        revalidated.wait(30)
        return replace(self, m)

    def marked_revalidate(*args, **kwargs):
        out = revalidate(*args, **kwargs)
        revalidated.set()
        return out

    def late_sweep(*args, **kwargs):  # ... and before gc decides which chunks go
        committed.wait(30)
        return sweep(*args, **kwargs)

    monkeypatch.setattr(Repository, "_replace_manifest", slow_replace)
    monkeypatch.setattr(gc_run, "_revalidate", marked_revalidate)
    monkeypatch.setattr(gc_run, "_sweep", late_sweep)

    def saver() -> None:  # N now holds A's content: A's chunks are put again, referenced
        ckptstore.save(a, url, name="N", overwrite=True)
        committed.set()

    t = threading.Thread(target=saver)
    t.start()
    time.sleep(1.0)
    report = gc_run.execute(Repository.open(url), plan)
    t.join()
    assert report.chunks_deleted == 0
    assert ckptstore.Store(url).verify("N").ok
    assert torch.equal(ckptstore.load_full(url, name="N")["w"], a["w"])


def test_a_cached_plan_of_the_same_name_brings_no_stale_parent(tmp_path):
    url = str(tmp_path / "s")
    torch.manual_seed(0)
    x, n = {"w": torch.randn(2000, 700)}, {"w": torch.randn(2000, 700)}

    def save(sd, name, overwrite=False):
        dcp.save(
            sd,
            storage_writer=ckptstore.Writer(url, name=name, overwrite=overwrite),
            planner=DefaultSavePlanner(enable_plan_caching=True),
            no_dist=True,
        )

    dcp.save(x, storage_writer=ckptstore.Writer(url, name="X"), no_dist=True)
    save(n, "N", True)  # its plan carries X's chunks as parent chunks, cached under "N"
    ckptstore.Store(url).delete("X")
    gc_run.execute(Repository.open(url), gc_plan.plan(Repository.open(url), grace=0))
    save(x, "N", True)  # X's content again: its chunks are gone and must be written
    assert ckptstore.Store(url).verify("N").ok
    assert torch.equal(ckptstore.load_full(url, name="N")["w"], x["w"])
