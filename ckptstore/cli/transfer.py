"""``ckptstore export`` and ``ckptstore import``: parse the arguments, call
:mod:`ckptstore.transfer` (:func:`~ckptstore.transfer.export_checkpoint`,
:func:`~ckptstore.transfer.import_weights`), render. torch is imported inside the commands
only (``ckptstore.transfer`` imports it in its functions).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import click

from ckptstore.cli.common import (
    _options,
    handle_errors,
    json_option,
    name_option,
    step_option,
    storage_option,
)
from ckptstore.render import console, emit_json, err_console, human_bytes
from ckptstore.render import progress as progress_bar
from ckptstore.transfer import CASTS, FORMATS


@click.command("export")
@click.argument("url")
@click.argument("out", type=click.Path())  # checked by export_checkpoint: one line
@step_option
@name_option
@click.option(
    "--dtype",
    "cast",
    type=click.Choice(sorted(CASTS)),
    default=None,
    help="Cast floating-point tensors (others stay as they are).",
)
@click.option(
    "--prefix",
    default=None,
    help="Export only tensors whose name starts with this, without it (e.g. 'model.').",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Default: from OUT's suffix (.safetensors; .pt/.pth/.bin = torch.save).",
)
@storage_option
@json_option
@handle_errors
def export_cmd(
    url: str,
    out: str,
    step: int | None,
    name: str | None,
    cast: str | None,
    prefix: str | None,
    fmt: str | None,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write one checkpoint (the latest by default) to OUT as whole tensors: .safetensors
    (Hugging Face convention) or a torch.save file. Quantized tensors are dequantized;
    non-tensor values are left out."""
    from ckptstore.transfer import export_checkpoint

    with progress_bar(hide=as_json) as progress:
        task = progress.add_task(f"exporting to {out}", total=None)
        info = export_checkpoint(
            url,
            out,
            step=step,
            name=name,
            fmt=fmt,
            dtype=cast,
            prefix=prefix,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            storage_options=_options(storage_options),
        )
    if as_json:
        emit_json(info.to_dict())
        return
    console.print(
        f"wrote {out}: {info.tensors} tensor(s), "
        f"{human_bytes(info.tensor_bytes)} from {info.checkpoint}"
        + (f"; left out {info.skipped_objects} non-tensor value(s)" if info.skipped_objects else "")
    )


def _quantize_spec(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--quantize") from None
        if not isinstance(spec, dict):
            raise click.BadParameter("expected a JSON object", param_hint="--quantize")
        return spec
    return text


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("url")
@step_option
@name_option
@click.option(
    "--quantize",
    default=None,
    metavar="SPEC",
    help='Store lossy: a codec name ("int8", "bf16", "fp16") for every eligible tensor, or '
    'a JSON object of fqn globs to names, e.g. \'{"*.weight": "int8"}\'.',
)
@click.option("--prefix", default=None, help="Prepend this to every tensor name (e.g. 'model.').")
@click.option(
    "--delta",
    is_flag=True,
    help="Store changed lossless chunks as deltas against the parent checkpoint's chunks "
    "of the same rows when smaller (a series of fine-tuned weights).",
)
@click.option("--parent", default=None, help="Checkpoint to dedup and delta against.")
@storage_option
@json_option
@handle_errors
def import_cmd(
    file: str,
    url: str,
    step: int | None,
    name: str | None,
    quantize: str | None,
    prefix: str | None,
    delta: bool,
    parent: str | None,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Save the tensors of FILE (.safetensors, .pt, .pth, .bin; weights only) as a new
    checkpoint of the store at URL (created if needed)."""
    from ckptstore.transfer import import_weights

    if step is None and name is None:
        raise click.UsageError("give --step N or --name NAME for the new checkpoint")
    spec = _quantize_spec(quantize)
    with err_console.status(f"importing {file} into {url}…") if not as_json else nullcontext():
        info = import_weights(
            file,
            url,
            step=step,
            name=name,
            quantize=spec,
            prefix=prefix,
            storage_options=_options(storage_options),
            delta=delta or None,
            parent=parent,
        )
    if as_json:
        emit_json(info.to_dict())
        return
    console.print(
        f"imported {file} as {info.name}: {human_bytes(info.logical_bytes)} → "
        f"{human_bytes(info.stored_bytes)} stored, {human_bytes(info.new_bytes)} written "
        f"in {info.seconds:.2f}s"
        + (f"; left out {info.skipped_objects} non-tensor value(s)" if info.skipped_objects else "")
    )


COMMANDS = (export_cmd, import_cmd)
