"""Settings are resolved once, at the edge, and passed down: nothing below reads the
environment, and no chunk key depends on an environment variable."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import ckptstore
from ckptstore import Settings
from ckptstore.store import Repository


def _keys(url: str, name: str) -> set[bytes]:
    return Repository.open(url).manifest(name).chunk_keys()


def test_resolve_order_defaults_env_arguments():
    env = {"CKPTSTORE_CHUNK_BYTES": "1048576", "CKPTSTORE_FSYNC": "0", "CKPTSTORE_THREADS": ""}
    s = Settings.resolve(environ=env, threads=3)
    assert (s.chunk_bytes, s.fsync, s.threads) == (1 << 20, False, 3)
    assert Settings.resolve(s, environ={"CKPTSTORE_CHUNK_BYTES": "7"}).chunk_bytes == 1 << 20
    with pytest.raises(ValueError, match="CKPTSTORE_RETRIES"):
        Settings.resolve(environ={"CKPTSTORE_RETRIES": "many"})
    with pytest.raises(TypeError, match="unknown setting"):
        Settings().replace(chunk_size=1)
    with pytest.raises(TypeError, match="must be an int"):
        Settings().replace(threads="8")


def test_a_writer_keeps_the_settings_of_its_construction(tmp_path, monkeypatch):
    """A variable changed after the edge (here: mid-way, between DCP calls) changes nothing."""
    url = str(tmp_path / "s")
    monkeypatch.setenv("CKPTSTORE_CHUNK_BYTES", str(256 * 1024))
    writer = ckptstore.Writer(url, step=1)
    monkeypatch.setenv("CKPTSTORE_CHUNK_BYTES", str(4 * 1024 * 1024))
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.randn(1024, 1024)}, storage_writer=writer, no_dist=True)
    assert writer.save_info is not None and writer.save_info.chunks == 16  # 4 MiB / 256 KiB


def test_chunk_keys_do_not_depend_on_environment(tmp_path, monkeypatch):
    state = {"ids": torch.arange(200_000, dtype=torch.int64), "w": torch.randn(512, 256)}
    url = str(tmp_path / "s")
    ckptstore.save(state, url, step=1)
    monkeypatch.setenv("CKPTSTORE_ZSTD_LEVEL", "9")  # not a setting taken from the environment
    info = ckptstore.save(state, url, step=2)
    assert info.new_chunks == 0 and _keys(url, "step-000000000001") == _keys(
        url, "step-000000000002"
    )
    # chosen explicitly, the level is part of the codec config and so of the key
    info = ckptstore.save(state, url, step=3, settings=Settings(zstd_level=3))
    assert info.new_chunks > 0
    assert torch.equal(ckptstore.load_full(url, step=3)["ids"], state["ids"])


def test_nothing_below_the_edge_reads_the_environment():
    root = pathlib.Path(ckptstore.__file__).parent
    allowed = {
        "knobs.py",  # Settings.resolve: the one reader of CKPTSTORE_* variables
        "cli/common.py",  # CKPTSTORE_DEBUG: tracebacks in the CLI
        "testing/s3server.py",  # CKPTSTORE_WEED: where the test server binary is
        "bench/gc_suite.py",  # hands its environment to the `ckptstore gc` processes it times
    }
    offenders = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        text = f.read_text()
        if rel not in allowed and re.search(r"os\.environ|os\.getenv|knobs\.get\(", text):
            offenders.append(rel)
    assert offenders == []
