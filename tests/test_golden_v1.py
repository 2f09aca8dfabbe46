"""The format v1 fixture, written by an earlier ckptstore, must decode exactly forever."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

import ckptstore
from tests.fixtures.v1_data import state
from tests.helpers import assert_same, template_like

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "store-v1"


@pytest.fixture
def fixture_copy(tmp_path) -> str:
    dst = tmp_path / "store-v1"
    shutil.copytree(FIXTURE, dst)  # reads never write, but keep the committed copy pristine
    return str(dst)


@pytest.mark.parametrize("step", [10, 20])
def test_load_full_decodes_golden(fixture_copy, step):
    assert_same(state(step), ckptstore.load_full(fixture_copy, step=step))


def test_load_in_place_decodes_golden(fixture_copy):
    expected = state(20)
    target = template_like(expected)
    target["extra"] = {"epoch": 0, "tag": "", "list": [0, 0.0, ""]}
    target["optim"]["lr"] = 0.0
    ckptstore.load(target, fixture_copy)  # latest = step 20
    assert_same(expected, target)


def test_golden_store_verifies_and_lists(fixture_copy):
    store = ckptstore.Store(fixture_copy)
    assert [c.step for c in store.list()] == [10, 20]
    report = store.verify()
    assert report.ok and report.chunks_checked > 10
    second = store.inspect(step=20)
    embed = next(t for t in second.tensors if t.fqn == "model.embed.weight")
    assert embed.shared_bytes == embed.stored_bytes > 0  # deduped against step 10
    assert store.repo.config["version"] == 1


def test_new_saves_still_dedup_against_golden(fixture_copy):
    info = ckptstore.save(
        state(20), fixture_copy, step=30, chunk_bytes=16 * 1024, inline_bytes=2048
    )
    assert info.new_chunks == 0, "format or chunking drifted: same state no longer dedups"
    assert torch.equal(
        ckptstore.load_full(fixture_copy)["model"]["layer.weight"],
        state(20)["model"]["layer.weight"],
    )
