"""``ckptstore cp``: copy checkpoints between two stores (any URLs), only the chunks the
destination lacks, manifest last (:meth:`ckptstore.Store.copy_to`)."""

from __future__ import annotations

import click

from ckptstore.cli.common import _options, handle_errors, json_option, name_option, step_option
from ckptstore.render import console, emit_json, human_bytes
from ckptstore.render import progress as progress_bar


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@step_option
@name_option
@click.option("--all", "copy_all", is_flag=True, help="Copy every checkpoint, oldest first.")
@click.option(
    "-o",
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for SRC (repeatable); also DST's when --dst-option is not given "
    "and both have one protocol.",
)
@click.option(
    "--dst-option",
    "dst_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for DST (repeatable).",
)
@json_option
@handle_errors
def cp_cmd(
    src: str,
    dst: str,
    step: int | None,
    name: str | None,
    copy_all: bool,
    storage_options: tuple[str, ...],
    dst_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Copy checkpoints from the store at SRC to the store at DST (created if needed): the
    latest by default, --step N / --name X for one, --all for every one. Only chunks DST
    lacks are sent; each manifest goes last, so DST never holds half a checkpoint, and a
    copy that was interrupted is finished by running it again."""
    from ckptstore.store.facade import Store

    if copy_all and (step is not None or name is not None):
        raise click.UsageError("give --all or --step/--name, not both")
    store = Store(src, _options(storage_options))
    which = None if copy_all else store.resolve(step=step, name=name)
    with progress_bar(hide=as_json) as progress:
        task = progress.add_task(f"copying to {dst}", total=None)
        report = store.copy_to(
            dst,
            which,
            all=copy_all,
            storage_options=_options(dst_options) if dst_options else None,
            progress=lambda n: progress.advance(task, n),
        )
    if as_json:
        emit_json(report.to_dict())
        return
    done = ", ".join(report.copied) or "nothing new"
    console.print(
        f"copied {done} to {dst}: sent {report.objects_sent} object(s), "
        f"{human_bytes(report.bytes_sent)}; skipped {report.objects_skipped} chunk(s) "
        f"({human_bytes(report.bytes_skipped)}) already there"
        + (f"; already present: {', '.join(report.present)}" if report.present else "")
    )


COMMANDS = (cp_cmd,)
