"""The bench package: ``ckptstore bench`` delegates to it, ``python -m ckptstore.bench SUITE``
dispatches, the JSON keys docs/benchmarks.md names are there, and no suite touches the
environment (settings are resolved once and passed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import ckptstore
from ckptstore.bench import SUITES, main
from ckptstore.cli.main import cli

METHOD_KEYS = ["torch.save", "dcp", "dcp+zstd", "ckptstore", "ckptstore-resave"]


def _check_compare(result: dict, fsync: bool) -> None:
    assert set(result) == {"machine", "settings", "datasets"}
    assert result["settings"]["fsync"] is fsync
    assert {"cpu_model", "ckptstore_threads", "chunk_bytes"} <= set(result["machine"])
    ds = result["datasets"]["synthetic"]
    assert {"description", "tensors", "logical_bytes", "methods", "codec"} <= set(ds)
    assert [m["method"] for m in ds["methods"]] == METHOD_KEYS
    for m in ds["methods"]:
        assert "error" not in m, m
        assert {"save_s", "save_vs_torch"} <= set(m)
        if m["method"] != "ckptstore-resave":
            assert m["exact"] is True and m["ratio"] > 0 and m["stored_bytes"] > 0
    ckpt = ds["methods"][3]
    assert {"new_bytes", "chunks", "manifest_bytes", "bytes_read"} <= set(ckpt)
    assert {"new_bytes", "disk_growth_bytes"} <= set(ds["methods"][4])
    assert ds["codec"]["ratio"] > 1 and ds["codec"]["checkpoint_ratio"] == ckpt["ratio"]


def test_cli_bench_delegates_to_the_package(tmp_path):
    out = tmp_path / "work"
    res = CliRunner().invoke(
        cli, ["bench", str(out), "--data", "synthetic", "--size-mb", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    _check_compare(result, fsync=False)
    assert result["settings"]["folder"] == str(out)
    rows = ckptstore.Store(str(out / "synthetic" / "ckptstore")).list()
    assert [r.step for r in rows] == [0, 1]  # the save and the same state again


def test_compare_takes_settings_and_leaves_the_environment_alone():
    from ckptstore.bench.compare import run_bench

    before = dict(os.environ)
    settings = ckptstore.Settings.resolve(threads=3)
    result = run_bench(
        None, ["synthetic"], size_mb=2, repeat=1, show=False, fsync=True, settings=settings
    )
    assert dict(os.environ) == before
    _check_compare(result, fsync=True)
    assert result["machine"]["ckptstore_threads"] == 3


def test_chunk_sweep_runs_from_compare_options(capsys):
    main(["compare", "--chunk-sweep", "--data", "synthetic", "--size-mb", "2", "--repeat", "1",
          "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"machine", "repeat", "fsync", "datasets"}
    rows = out["datasets"]["synthetic"]["rows"]
    assert [r["chunk_bytes"] for r in rows] == [1 << 18, 1 << 20, 4 << 20, 16 << 20]
    for r in rows:
        assert r["exact"] is True and r["ratio"] > 0 and r["codec_ratio"] > 1
    assert rows[0]["chunks"] >= rows[-1]["chunks"]


def test_suites_dispatch(capsys):
    main(["-h"])
    text = capsys.readouterr().out
    assert all(name in text for name in SUITES)
    main(["metadata-sim", "--world", "2", "--history", "2", "--layers", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["world"], r["history"]) for r in rows] == [(2, 2)]
    assert rows[0]["save"]["coordinator_requests"] > 0
    with pytest.raises(SystemExit):  # an unknown option goes to compare's parser
        main(["--no-such-option"])


def test_history_suite_small(tmp_path):
    from ckptstore.bench.history import run_one

    row = run_one(str(tmp_path / "s"), {}, 3, 1)
    assert row["checkpoints"] == 3
    for op in ("save", "load_latest", "ls", "inspect", "gc_dry_run"):
        assert {"seconds", "requests", "metadata_requests", "metadata_bytes"} <= set(row[op])


def test_package_import_needs_no_torch():
    """Importing the package (as ``ckptstore bench`` and ``python -m ckptstore.bench -h`` do
    first) needs no torch; its building blocks are imported from their own modules."""
    import ckptstore.bench

    assert set(ckptstore.bench.__all__) == {"SUITES", "main", "suite"}
    assert not hasattr(ckptstore.bench, "run_bench")
    code = "import sys, ckptstore.bench; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_delta_series_figures(tmp_path):
    """The delta bench's series on a small random walk: every figure docs/benchmarks.md
    quotes is there and consistent (deltas win on a walk; a longer bound never stores
    more; a delta checkpoint loads at its depth)."""
    import torch

    from ckptstore.bench.delta import series

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)

    def walk():
        nonlocal w
        for step in range(5):
            w = w + 1e-4 * torch.randn(256, 256, generator=g)
            yield step, {"model": {"w": w.clone()}, "optim": {"exp_avg_sq": w.square()}}

    settings = ckptstore.Settings(chunk_bytes=64 * 1024, fsync=False)
    out = series("walk", walk(), str(tmp_path), settings, 64, [0, 2, 4], log=lambda _: None)
    s = out["summary"]
    assert s["ratio_delta_all"] > s["ratio_plain_all"] > 1
    chain = s["ratio_by_chain"]
    assert chain[1] <= chain[2] <= chain[4] == s["ratio_delta_all"]
    assert s["ratio_by_chain_long_run"][1] < s["ratio_by_chain_long_run"][16]
    assert s["save_time_ratio"] > 0 and s["save_cpu_ratio"] > 0
    rows = out["checkpoints"]
    assert [r["max_chain"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["save_cpu_s_plain"] >= 0 and r["save_cpu_s_delta"] >= 0 for r in rows)
    assert [ld["depth"] for ld in out["loads"]] == [0, 2, 4]
