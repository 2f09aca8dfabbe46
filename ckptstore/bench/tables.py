"""The tables ``ckptstore bench`` prints: per-dataset method figures, the codec table, and
the chunk-size sweep's, on the CLI console (rich). Nothing here measures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from ckptstore.bench.report import PAGE_CACHE_NOTE
from ckptstore.bench.report import seconds as _s
from ckptstore.bench.report import times as _x
from ckptstore.render import console, human_bytes


def render_compare(results: Mapping[str, Any]) -> None:
    """Print the per-dataset tables and the codec table of a comparison
    (:func:`ckptstore.bench.compare.run_bench`'s result)."""
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


def render_sweep(out: Mapping[str, Any]) -> None:
    """Print one table per dataset of a chunk-size sweep
    (:func:`ckptstore.bench.chunk_sweep.chunk_sweep`'s result)."""
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
