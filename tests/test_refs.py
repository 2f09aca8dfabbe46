"""``refs/latest/``: "latest" by one listing of about one key; the manifest stays the truth
(a pointer at a dropped checkpoint, or none at all, falls back to the catalog)."""

from __future__ import annotations

import torch

import ckptstore
from ckptstore.backend import open_backend
from ckptstore.store import Repository, layout, refs
from ckptstore.testing.counting import CountingBackend


def _save(url: str, step: int) -> None:
    ckptstore.save({"w": torch.full((4,), float(step))}, url, step=step)


def test_latest_is_one_listing_of_one_pointer(tmp_path):
    url = str(tmp_path / "s")
    for step in (1, 2, 3):
        _save(url, step)
    backend = CountingBackend(open_backend(url))
    assert backend.list(refs.PREFIX) == [refs.pointer_key(layout.step_name(3), *_created(url, 3))]
    backend.reset()
    repo = Repository.open(backend)
    backend.reset()
    assert repo.resolve() == layout.step_name(3)
    assert (
        backend.keys_listed.get("catalog", 0) == 0
        and backend.keys_listed.get("checkpoints", 0) == 0
    )
    assert backend.requests[("list", "refs")] == 1
    assert repo.latest().name == layout.step_name(3)
    got = ckptstore.load({"w": torch.zeros(4)}, url)
    assert got.name == layout.step_name(3)


def _created(url: str, step: int) -> tuple[float, int]:
    m = Repository.open(url).manifest(layout.step_name(step))
    return m.created, m.step


def test_a_pointer_at_a_dropped_checkpoint_falls_back_to_the_catalog(tmp_path):
    url = str(tmp_path / "s")
    for step in (1, 2):
        _save(url, step)
    store = ckptstore.Store(url)
    store.delete(step=2)
    assert Repository.open(url).resolve() == layout.step_name(1)
    target = {"w": torch.zeros(4)}
    ckptstore.load(target, url)
    assert torch.equal(target["w"], torch.full((4,), 1.0))
    _save(url, 5)  # the next save points anew and drops the stale pointer
    assert Repository.open(url).backend.list(refs.PREFIX) == [
        refs.pointer_key(layout.step_name(5), *_created(url, 5))
    ]


def test_a_store_without_pointers_resolves_by_the_catalog(tmp_path):
    url = str(tmp_path / "s")
    for step in (1, 2):
        _save(url, step)
    backend = open_backend(url)
    for key in backend.list(refs.PREFIX):
        backend.delete(key)
    assert Repository.open(url).resolve() == layout.step_name(2)
