"""A save that fails part-way leaves no checkpoint load or ls would pick; the previous one
still loads intact, and a later save succeeds."""

from __future__ import annotations

import pytest
import torch

import ckptstore
from ckptstore import errors
from tests.helpers import assert_same

URL = "faulty://crash"


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(1024, 512, generator=g),
        "w2": torch.randn(2048, 256, generator=g),
        "b": torch.randn(64, generator=g),
        "step": seed,
    }


@pytest.mark.parametrize("fail_after", [0, 1, 3, 5])
def test_failed_chunk_put_commits_nothing(faults, fail_after):
    good = _state(1)
    ckptstore.save(good, URL, step=1, chunk_bytes=512 * 1024)
    faults.set_plan(fail_put_after=fail_after, put_match="*/chunks/*")
    with pytest.raises(errors.BackendError, match="injected put failure"):
        ckptstore.save(_state(2), URL, step=2, chunk_bytes=512 * 1024)
    faults.set_plan()

    store = ckptstore.Store(URL)
    assert [c.name for c in store.list()] == ["step-000000000001"]
    assert store.latest() == "step-000000000001"
    assert_same(good, ckptstore.load_full(URL))
    assert store.verify().ok

    third = _state(3)
    info = ckptstore.save(third, URL, step=2, chunk_bytes=512 * 1024)  # the same name works now
    assert info.name == "step-000000000002"
    assert_same(third, ckptstore.load_full(URL))
    assert ckptstore.Store(URL).verify().ok


def test_failed_commit_leaves_previous_latest(faults):
    good = _state(1)
    ckptstore.save(good, URL, step=1)
    faults.set_plan(fail_put_after=0, put_match="*/checkpoints/*")
    with pytest.raises(errors.BackendError):
        ckptstore.save(_state(2), URL, step=2)
    faults.set_plan()
    assert [c.name for c in ckptstore.Store(URL).list()] == ["step-000000000001"]
    assert_same(good, ckptstore.load_full(URL))


def test_exception_in_state_dict_resolution_commits_nothing(faults):
    ckptstore.save(_state(1), URL, step=1)

    from torch.distributed.checkpoint import DefaultSavePlanner

    class FailingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.index.fqn == "w2":
                raise RuntimeError("boom while staging w2")
            return super().resolve_data(write_item)

    with pytest.raises(RuntimeError, match="boom while staging w2"):
        ckptstore.save(_state(2), URL, step=2, planner=FailingPlanner())
    assert [c.name for c in ckptstore.Store(URL).list()] == ["step-000000000001"]


def test_corrupt_read_is_detected(faults):
    ckptstore.save(_state(1), URL, step=1)
    faults.set_plan(corrupt_get_match="*/chunks/*")
    with pytest.raises(errors.CorruptChunkError, match="checksum"):
        ckptstore.load_full(URL)
    report = ckptstore.Store(URL).verify()
    assert not report.ok and all("checksum" in p.message for p in report.problems)
    assert {p.item for p in report.problems} == {"w1", "w2"}


def test_truncated_read_is_detected(faults):
    ckptstore.save(_state(1), URL, step=1)
    faults.set_plan(truncate_get_match="*/checkpoints/*")
    with pytest.raises(errors.ManifestError, match="truncated"):
        ckptstore.load_full(URL)
