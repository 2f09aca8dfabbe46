"""``ckptstore report URL --output report.html``: the store pictured in one self-contained HTML page
(needs the ``report`` extra: plotly). Torch-free, like the other read-only verbs."""

from __future__ import annotations

import os
import sys

import click

from ckptstore.cli.common import (
    EXIT_USAGE,
    _options,
    handle_errors,
    json_option,
    storage_option,
)
from ckptstore.render import console, emit_json, human_bytes, progress


@click.command("report")
@click.argument("url")
@click.option(
    "--output",
    required=True,
    metavar="PATH",
    help="The HTML file to write (replaced if it exists). -o is a storage option, as in "
    "every command.",
)
@click.option(
    "--max-checkpoints",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Latest checkpoints whose manifests are read (quantization, changes); "
    "the size plots cover all.",
)
@click.option(
    "--max-tensors",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Largest tensors shown in the change heat map and the quantization plot.",
)
@click.option("--no-changes", is_flag=True, help="Skip the change heat map (decodes nothing).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Chunks decoded at once for the heat map (default: min(4, CKPTSTORE_THREADS)).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@storage_option
@json_option
@handle_errors
def report_cmd(
    url: str,
    output: str,
    max_checkpoints: int,
    max_tensors: int,
    no_changes: bool,
    threads: int | None,
    quiet: bool,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write a self-contained HTML page of plots of the store at URL: bytes per checkpoint,
    dedup and compression shares, quantization error per tensor, and a tensor × step heat map
    of how much each tensor changed between consecutive checkpoints."""
    try:
        from ckptstore.report import require_plotly, write_report

        require_plotly()
    except ImportError as exc:
        click.echo(f"ckptstore: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn

    with progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeRemainingColumn(),
        hide=quiet or as_json,
    ) as bar:
        task = bar.add_task("comparing checkpoints", total=None)
        data = write_report(
            url,
            output,
            storage_options=_options(storage_options),
            max_checkpoints=max_checkpoints,
            max_tensors=max_tensors,
            changes=not no_changes,
            threads=threads,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    size = os.path.getsize(output)
    summary = {
        "output": output,
        "bytes": size,
        "checkpoints": len(data.checkpoints),
        "window": data.window,
        "lossy_tensors": 0 if data.quant is None else len(data.quant.rows),
        "tensors_compared": 0 if data.changes is None else len(data.changes.tensors),
        "notes": data.notes,
    }
    if as_json:
        emit_json(summary)
    elif not quiet:
        console.print(
            f"wrote {output} ({human_bytes(size)}): {len(data.checkpoints)} checkpoint(s)"
            + (
                f", {len(data.changes.tensors)} tensor(s) compared over "
                f"{len(data.changes.checkpoints)} checkpoints"
                if data.changes is not None
                else ""
            ),
            highlight=False,
        )
        if not data.checkpoints:
            click.echo("ckptstore: note: the store holds no committed checkpoint", err=True)


COMMANDS = (report_cmd,)
