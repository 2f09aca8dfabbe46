"""``ckptstore`` CLI: ls, inspect, verify, demo, bench here; gc, rm, du, diff in
:mod:`ckptstore.cli.lifecycle`; export, import in :mod:`ckptstore.cli.transfer`; report in
:mod:`ckptstore.cli.report`.

Exit codes and error handling: :mod:`ckptstore.cli.common` (and docs/cli.md).
"""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ckptstore.cli import copy, lifecycle, report, transfer
from ckptstore.cli.common import (
    EXIT_CORRUPT,
    EXIT_DAMAGED,
    _options,
    handle_errors,
    json_option,
    name_option,
    open_store,
    step_option,
    storage_option,
)
from ckptstore.render import console, emit_json, human_bytes, ratio, when
from ckptstore.render import progress as progress_bar
from ckptstore.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptstore")
def cli() -> None:
    """A compressed, content-addressed checkpoint store for PyTorch."""


@cli.command("ls")
@click.argument("url")
@storage_option
@json_option
@handle_errors
def ls_cmd(url: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """List the committed checkpoints of the store at URL, oldest first."""
    rows, bad = open_store(url, storage_options).scan()
    for name, exc in bad.items():
        click.echo(f"ckptstore: error: checkpoint {name!r} unreadable: {exc}", err=True)
    if as_json:
        emit_json([r.to_dict() for r in rows])
        if bad:
            sys.exit(EXIT_CORRUPT)
        return
    table = Table(title=f"{url} — {len(rows)} checkpoint(s)")
    for col in ("name", "step", "created", "tensors", "logical", "stored", "ratio", "written"):
        table.add_column(col, justify="left" if col in ("name", "created") else "right")
    deltas = any(r.max_chain for r in rows)
    if deltas:  # only stores with delta saves show the columns
        table.add_column("delta", justify="right")
        table.add_column("chain", justify="right")
    for r in rows:
        delta_cells = []
        if deltas:
            share = 100 * r.delta_bytes / r.stored_bytes if r.stored_bytes else 0
            delta_cells = [f"{share:.0f}%", str(r.max_chain)]
        table.add_row(
            r.name,
            "" if r.step is None else str(r.step),
            when(r.created),
            str(r.tensors),
            human_bytes(r.logical_bytes),
            human_bytes(r.stored_bytes),
            ratio(r.logical_bytes, r.stored_bytes),
            human_bytes(r.new_bytes),
            *delta_cells,
        )
    console.print(table)
    if bad:
        sys.exit(EXIT_CORRUPT)


@cli.command("inspect")
@click.argument("url")
@step_option
@name_option
@storage_option
@json_option
@handle_errors
def inspect_cmd(
    url: str, step: int | None, name: str | None, storage_options: tuple[str, ...], as_json: bool
) -> None:
    """Per-tensor dtype, shape, codec, sizes and sharing of one checkpoint (latest by default)."""
    report = open_store(url, storage_options).inspect(step=step, name=name)
    if as_json:
        emit_json(report.to_dict())
        return
    c = report.checkpoint
    table = Table(
        title=f"{c.name} — {human_bytes(c.logical_bytes)} → {human_bytes(c.stored_bytes)} "
        f"({ratio(c.logical_bytes, c.stored_bytes)}), wrote {human_bytes(c.new_bytes)}"
    )
    for col in ("tensor", "dtype", "shape", "codec", "chunks", "logical", "stored", "ratio"):
        table.add_column(col, justify="left" if col in ("tensor", "codec") else "right")
    table.add_column("shared", justify="right")
    deltas = any(t.max_chain for t in report.tensors)
    if deltas:  # stored as deltas against earlier checkpoints: share and longest chain
        table.add_column("delta", justify="right")
        table.add_column("chain", justify="right")
    lossy = any(t.rel_l2_error is not None for t in report.tensors)
    if lossy:  # quantized tensors: the error they were stored with
        table.add_column("rel. L2 err", justify="right")
        table.add_column("max abs err", justify="right")
    for t in report.tensors:
        error_cells = []
        if lossy and t.rel_l2_error is not None:
            fb = f" ({t.fallback_chunks} fallback)" if t.fallback_chunks else ""
            error_cells = [f"{t.rel_l2_error:.2e}{fb}", f"{t.max_abs_error:.2e}"]
        elif lossy:
            error_cells = ["exact", "exact"]
        table.add_row(
            t.fqn,
            t.dtype,
            "×".join(map(str, t.shape)) or "()",
            t.codec,
            str(t.chunks) if t.chunks else "inline",
            human_bytes(t.logical_bytes),
            human_bytes(t.stored_bytes),
            ratio(t.logical_bytes, t.stored_bytes),
            f"{100 * t.shared_bytes / t.stored_bytes:.0f}%" if t.stored_bytes else "-",
            *(
                [
                    f"{100 * t.delta_bytes / t.stored_bytes:.0f}%" if t.stored_bytes else "-",
                    str(t.max_chain),
                ]
                if deltas
                else []
            ),
            *error_cells,
        )
    console.print(table)
    if report.objects:
        console.print(
            f"{len(report.objects)} non-tensor value(s), "
            f"{human_bytes(sum(report.objects.values()))} stored"
        )


@cli.command("verify")
@click.argument("url")
@step_option
@name_option
@storage_option
@json_option
@handle_errors
def verify_cmd(
    url: str, step: int | None, name: str | None, storage_options: tuple[str, ...], as_json: bool
) -> None:
    """Re-read and check every chunk of every checkpoint (or of one). Exit 1 on damage."""
    store = open_store(url, storage_options)
    with progress_bar(hide=as_json) as progress:
        task = progress.add_task("verifying chunks", total=None)
        report = store.verify(step=step, name=name, progress=lambda n: progress.advance(task, n))
    if as_json:
        emit_json(report.to_dict())
    elif report.ok:
        console.print(
            f"OK: {len(report.checkpoints)} checkpoint(s), {report.chunks_checked} chunk(s), "
            f"{human_bytes(report.bytes_checked)} checked"
        )
    else:
        for p in report.problems:
            click.echo(
                f"DAMAGED: checkpoint {p.checkpoint!r} item {p.item!r} chunk {p.chunk}: "
                f"{p.message}",
                err=True,
            )
    if not report.ok:
        sys.exit(EXIT_DAMAGED)


@cli.command("demo")
@click.option(
    "--url",
    default="./ckptstore-demo",
    show_default=True,
    help="Store to write (a local folder by default).",
)
@click.option("--checkpoints", default=4, show_default=True, help="Checkpoints to save.")
@click.option("--steps", default=10, show_default=True, help="Training steps between them.")
@storage_option
@handle_errors
def demo_cmd(url: str, checkpoints: int, steps: int, storage_options: tuple[str, ...]) -> None:
    """Train a small model, save checkpoints, show their sizes, load the last one back."""
    from ckptstore.demo import run_demo

    ok = run_demo(
        url, checkpoints=checkpoints, steps=steps, storage_options=_options(storage_options)
    )
    sys.exit(0 if ok else EXIT_DAMAGED)


@cli.command("bench")
@click.argument("url", required=False)
@click.option(
    "--data",
    "datasets",
    multiple=True,
    type=click.Choice(["minilm", "minilm-bf16", "synthetic"]),
    help="What to save (repeatable; default: all three).",
)
@click.option("--size-mb", default=500, show_default=True, help="Synthetic state size.")
@click.option("--repeat", default=1, show_default=True, help="Runs per method (best kept).")
@click.option("--fsync", is_flag=True, help="Every method makes its files durable (fsync).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="cuda: the GPU comparisons (sync save, async_save blocked time, load vs DCP).",
)
@click.option("--gb", default=2.0, show_default=True, help="--device cuda: GiB per dtype.")
@json_option
@handle_errors
def bench_cmd(
    url: str | None,
    datasets: tuple[str, ...],
    size_mb: int,
    repeat: int,
    fsync: bool,
    device: str,
    gb: float,
    as_json: bool,
) -> None:
    """Save/load seconds and sizes: ckptstore vs torch.save and plain DCP, in one run.

    URL is a local folder to work in (a temporary one by default). Other benchmarks:
    python -m ckptstore.bench -h.
    """
    if device == "cuda":
        _bench_cuda(url, gb, repeat, fsync, as_json)
        return
    from ckptstore.bench.compare import run_bench

    results = run_bench(
        url,
        list(datasets) or ["minilm", "minilm-bf16", "synthetic"],
        size_mb=size_mb,
        repeat=repeat,
        show=not as_json,
        fsync=fsync,
    )
    if as_json:
        emit_json(results)


def _bench_cuda(url: str | None, gb: float, repeat: int, fsync: bool, as_json: bool) -> None:
    import shutil
    import tempfile

    import torch

    from ckptstore.bench import gpu
    from ckptstore.knobs import Settings

    if not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device here")
    root = url or tempfile.mkdtemp(prefix="ckptstore-gpu-")
    try:
        results = gpu.run(gb, root, Settings.resolve(fsync=fsync), repeat, show=not as_json)
    finally:
        if url is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        emit_json(results)


for _command in (*lifecycle.COMMANDS, *transfer.COMMANDS, *copy.COMMANDS, *report.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="ckptstore")


if __name__ == "__main__":
    main()
