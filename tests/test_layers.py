"""Layers import downward only, and the core needs no torch.

The import-linter contracts in pyproject.toml ("[tool.importlinter]") check every package —
cli, testing, bench, demo, api, tensors, dcp, store, codecs, backend — statically, function-
level imports included; the runtime test checks that importing the torch-free entry points
really leaves torch out of ``sys.modules``."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "code",
    [
        "import ckptstore",
        "import ckptstore.store",
        "import ckptstore.codecs",
        "import ckptstore.backend",
        "import ckptstore.cli.main",
        "import ckptstore.transfer",  # its functions import torch, the module does not
        # the torch-free facade, used as a user would
        "import ckptstore, tempfile; ckptstore.Store",
    ],
)
def test_core_does_not_import_torch(code):
    full = f"import sys; {code}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True)
    assert proc.returncode == 0, f"{code!r} imported torch: {proc.stderr}"


def test_store_list_runs_without_torch(tmp_path):
    """``ckptstore.Store(url).list()`` on a real store, in a process that never imports
    torch (the store is written by a child that does)."""
    url = str(tmp_path / "s")
    write = f"import torch, ckptstore; ckptstore.save({{'w': torch.ones(4096)}}, {url!r}, step=3)"
    subprocess.run([sys.executable, "-c", write], check=True)
    read = (
        "import sys, ckptstore; "
        f"rows = ckptstore.Store({url!r}).list(); "
        "assert [r.step for r in rows] == [3], rows; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_import_contracts():
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
