"""Layers import downward only: store, codecs, backend and the read-only CLI need no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["ckptstore", "ckptstore.store", "ckptstore.codecs", "ckptstore.backend", "ckptstore.cli.main"],
)
def test_core_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imported torch: {proc.stderr}"


def test_layers_import_only_downward():
    """No module of a lower layer imports a higher one (checked on the source text)."""
    import pathlib
    import re

    order = ["backend", "codecs", "store", "dcp", "api"]
    root = pathlib.Path(__file__).resolve().parents[1] / "ckptstore"
    for i, layer in enumerate(order[:-1]):
        files = list((root / layer).glob("*.py")) if (root / layer).is_dir() else []
        for f in files:
            text = f.read_text()
            for higher in order[i + 1 :]:
                pat = rf"^\s*(from|import) ckptstore\.{higher}\b"
                assert not re.search(pat, text, re.M), f"{f.name} ({layer}) imports {higher}"
