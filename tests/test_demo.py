"""``ckptstore demo`` on a store that holds checkpoints it did not write: refused before
anything is loaded or written, with one line saying to use a fresh ``--url``."""

from __future__ import annotations

import json

import pytest
import torch

import ckptstore
from ckptstore.demo import TinyLM, run_demo
from tests.helpers import run_cli


def _names(url: str) -> list[str]:
    return [c.name for c in ckptstore.Store(url).list()]


def test_demo_refuses_a_store_of_other_checkpoints_and_writes_nothing(tmp_path):
    url = str(tmp_path / "run")
    ckptstore.save({"w": torch.randn(64, 64)}, url, step=2)
    before = _names(url)
    proc = run_cli("demo", "--url", url, "--checkpoints", "1", "--steps", "1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert "MismatchError" not in proc.stderr and "fresh --url" in proc.stderr
    assert "'step-000000000002'" in proc.stderr
    assert _names(url) == before
    assert len(json.loads(run_cli("ls", url, "--json").stdout)) == 1


def test_demo_refuses_a_checkpoint_of_its_model_without_the_optimizer(tmp_path):
    """The demo's weights imported back (an export keeps tensors only): the 13 optimizer
    values are missing, which load would report as a MismatchError of 13 keys."""
    url = str(tmp_path / "run")
    ckptstore.save({"model": TinyLM().state_dict()}, url, step=40)
    with pytest.raises(ValueError, match=r"fresh --url") as info:
        run_demo(url, checkpoints=1, steps=1)
    assert "'step-000000000040'" in str(info.value) and "optim." in str(info.value)
    assert not isinstance(info.value, ckptstore.MismatchError)
    assert _names(url) == ["step-000000000040"]
