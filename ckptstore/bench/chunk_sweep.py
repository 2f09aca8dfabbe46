"""The chunk-size sweep (``python -m ckptstore.bench compare --chunk-sweep``): for each chunk
size, the codec micro-benchmark's ratio and speed and one ckptstore save + load, best of
``repeat`` round-robin runs (docs/benchmarks.md, "Chunk size")."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

from ckptstore import load, save
from ckptstore.bench.codec import codec_bench
from ckptstore.bench.datasets import StateDict, dataset, first_difference, template
from ckptstore.bench.methods import disk_usage, fresh_dir, timed, warm_up, work_root
from ckptstore.bench.report import machine, progress
from ckptstore.bench.tables import render_sweep
from ckptstore.knobs import Settings

CHUNK_SIZES = (1 << 18, 1 << 20, 4 << 20, 16 << 20)


def _sweep_one(
    state: StateDict, folder: str, chunk_bytes: int, settings: Settings
) -> dict[str, Any]:
    """One codec pass and one ckptstore save + load at ``chunk_bytes``."""
    codec = codec_bench(state, chunk_bytes)
    fresh_dir(folder)
    save_s, info = timed(
        lambda: save(state, folder, step=0, chunk_bytes=chunk_bytes, settings=settings)
    )
    tpl = template(state)
    load_s, _ = timed(lambda: load(tpl, folder, step=0, settings=settings))
    stored, files = disk_usage(folder)
    return {
        "chunk_bytes": chunk_bytes,
        "codec_ratio": codec["ratio"],
        "encode_mb_s": codec["encode_mb_s"],
        "decode_mb_s": codec["decode_mb_s"],
        "chunks": info.chunks,
        "files": files,
        "stored_bytes": stored,
        "save_s": save_s,
        "load_s": load_s,
        "exact": first_difference(state, tpl) is None,
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(rows[0])
    for key in ("save_s", "load_s"):
        best[key] = min(r[key] for r in rows)
    for key in ("encode_mb_s", "decode_mb_s"):
        best[key] = max(r[key] for r in rows)
    best["exact"] = all(r["exact"] for r in rows)
    return best


def chunk_sweep(
    url: str | None = None,
    datasets: Sequence[str] = ("minilm",),
    *,
    chunk_sizes: Sequence[int] = CHUNK_SIZES,
    size_mb: int = 100,
    repeat: int = 3,
    show: bool = True,
    fsync: bool = False,
    settings: Settings | None = None,
) -> dict:
    """Codec ratio/speed and ckptstore save/load seconds for each chunk size (``url``,
    ``settings`` and ``fsync`` as for :func:`ckptstore.bench.compare.run_bench`)."""
    run = Settings.resolve(settings, fsync=fsync)
    root, temporary = work_root(url)
    out: dict[str, Any] = {
        "machine": machine(run),
        "repeat": repeat,
        "fsync": fsync,
        "datasets": {},
    }
    with contextlib.ExitStack() as stack:
        if temporary:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            warm_up(root, run)
        for name in datasets:
            state, about = dataset(name, size_mb)
            if state is None:
                out["datasets"][name] = about
                continue
            runs: dict[int, list[dict[str, Any]]] = {cs: [] for cs in chunk_sizes}
            for i in range(repeat):  # round-robin, so machine load hits every size alike
                for cs in chunk_sizes:
                    progress(show, f"{name}: chunk {cs >> 10} KiB, run {i + 1}/{repeat}")
                    folder = os.path.join(root, name, f"chunk-{cs}")
                    runs[cs].append(_sweep_one(state, folder, cs, run))
                    if temporary:
                        shutil.rmtree(folder, ignore_errors=True)
            rows = [_best(runs[cs]) for cs in chunk_sizes]
            for row in rows:
                row["ratio"] = about["logical_bytes"] / row["stored_bytes"]
            out["datasets"][name] = {**about, "rows": rows}
    if show:
        render_sweep(out)
    return out
