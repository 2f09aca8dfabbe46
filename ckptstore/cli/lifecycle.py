"""Looking after a store: ``gc``, ``rm``, ``du``, ``diff``. None of them imports torch."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ckptstore.cli.common import (
    EXIT_CORRUPT,
    handle_errors,
    json_option,
    open_store,
    storage_option,
)
from ckptstore.render import console, emit_json, err_console, human_bytes, progress, ratio, when


def _duration(_: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from ckptstore.store.retention import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _progress(as_json: bool) -> Progress:
    return progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        hide=as_json,
    )


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


# -- gc -------------------------------------------------------------------------------------------
@click.command("gc")
@click.argument("url")
@click.option("--keep-last", type=click.IntRange(min=1), default=None, help="Keep the last N.")
@click.option(
    "--keep-every",
    type=click.IntRange(min=1),
    default=None,
    help="Keep checkpoints whose step is a multiple of K.",
)
@click.option(
    "--keep",
    "keep",
    multiple=True,
    metavar="NAME",
    help="Keep this checkpoint (name, or a step number); repeatable.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; delete nothing.")
@click.option(
    "--grace",
    callback=_duration,
    default=None,
    metavar="DURATION",
    help="Keep unreferenced chunks younger than this (e.g. 0s, 30m, 2h). "
    "Default: $CKPTSTORE_GC_GRACE seconds, else 1h.",
)
@click.option(
    "--wait",
    callback=_duration,
    default="0s",
    show_default=True,
    metavar="DURATION",
    help="How long to wait for another gc to finish before giving up.",
)
@storage_option
@json_option
@handle_errors
def gc_cmd(
    url: str,
    keep_last: int | None,
    keep_every: int | None,
    keep: tuple[str, ...],
    dry_run: bool,
    grace: float | None,
    wait: float,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Drop the checkpoints the retention policy does not keep, then delete every chunk no
    kept checkpoint references. Safe beside running saves (docs/gc.md).

    With no --keep* option every checkpoint is kept and only garbage is collected (chunks
    of removed checkpoints and of failed saves). With any, the latest checkpoint is always
    kept. The plan is printed first; --dry-run stops there. Otherwise gc runs that plan: what
    changed in the store since it was made only makes it do less (docs/gc.md).
    """
    store = open_store(url, storage_options)
    with err_console.status("planning…") if not as_json else nullcontext():
        plan = store.plan_gc(keep_last=keep_last, keep_every=keep_every, keep=keep, grace=grace)
    if not as_json:
        _show_plan(plan, dry_run)
    if dry_run:
        _show_unreadable(plan.unreadable)
        if as_json:
            emit_json({"dry_run": True, "plan": plan.to_dict(), "result": None})
        if plan.unreadable:
            sys.exit(EXIT_CORRUPT)
        return
    with _progress(as_json) as progress:
        tasks: dict[str, Any] = {}

        def advance(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "dropping checkpoints" if phase == "drop" else "deleting chunks"
                tasks[phase] = progress.add_task(label, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        report = store.run_gc(plan, wait=wait, progress=advance)
    _show_unreadable(report.unreadable)
    if as_json:
        result = report.to_dict()
        del result["plan"]  # the same plan object: printed once, beside the result
        emit_json({"dry_run": False, "plan": plan.to_dict(), "result": result})
    else:
        console.print(
            f"gc done in {report.seconds:.2f}s: dropped {len(report.dropped)} checkpoint(s), "
            f"deleted {report.chunks_deleted} chunk(s), freed {human_bytes(report.bytes_deleted)}"
        )
        if report.temp_deleted:
            console.print(
                f"deleted {report.temp_deleted} stale temporary file(s) "
                f"({human_bytes(report.temp_bytes_deleted)}) left by puts that never finished"
            )
        if report.held.chunks:
            console.print(
                f"kept {report.held.chunks} unreferenced chunk(s) "
                f"({human_bytes(report.held.bytes)}) for now:"
            )
        _show_held(report.held, report.saves_in_flight, plan.grace)
        _show_temp_held(report, "kept")
        _show_blocked(report)
        _show_changes(report)
    if report.unreadable:
        sys.exit(EXIT_CORRUPT)


def _show_unreadable(unreadable: dict[str, str]) -> None:
    """One line per unreadable checkpoint on stderr, as ``ls`` prints them."""
    for name, why in unreadable.items():
        click.echo(f"ckptstore: error: checkpoint {name!r} unreadable: {why}", err=True)


def _at(t: float | None) -> str:
    return when(t) if t is not None else "?"


def _show_held(held: Any, saves_in_flight: int | list[str], grace: float) -> None:
    """Why gc holds unreferenced chunks back, and when a gc frees them (plan or report)."""
    if held.by_grace:
        first, last = _at(held.until), _at(held.all_until)
        span = f"from {first}" if first == last else f"from {first}, all by {last}"
        console.print(
            f"  {held.by_grace} ({human_bytes(held.bytes_by_grace)}) younger than the grace "
            f"period ({_duration_text(grace)}): a gc frees them {span} — or now with --grace 0s"
        )
    if held.by_saves:
        n = saves_in_flight if isinstance(saves_in_flight, int) else len(saves_in_flight)
        console.print(
            f"  {held.by_saves} ({human_bytes(held.bytes_by_saves)}) possibly needed by "
            f"{n} save(s) in flight: a gc after they have ended frees them"
        )


def _show_temp_held(x: Any, verb: str) -> None:
    if x.temp_held:
        console.print(
            f"{verb} {x.temp_held} temporary file(s) ({human_bytes(x.temp_bytes_held)}) too "
            f"young to be told from a put in progress, or of a save in flight: a gc frees them "
            f"from {_at(x.temp_held_until)}"
        )


def _show_blocked(x: Any) -> None:
    """Chunks an unreadable manifest keeps, and what a full storage left (plan or report)."""
    if x.chunks_blocked:
        console.print(
            f"[red]deleted no chunk[/red]: {len(x.unreadable)} checkpoint(s) unreadable "
            f"({', '.join(x.unreadable)}), so which chunks they need is unknown; "
            f"{x.chunks_blocked} chunk(s) ({human_bytes(x.bytes_blocked)}) would go otherwise. "
            "Remove them with `ckptstore rm --name NAME` (or restore them), then gc again"
        )
    elif x.unreadable:
        console.print(
            f"[red]deleted no chunk[/red]: {len(x.unreadable)} checkpoint(s) unreadable "
            f"({', '.join(x.unreadable)})"
        )
    if getattr(x, "chunks_deferred", 0):
        console.print(
            f"[yellow]storage full[/yellow]: {x.chunks_deferred} deletable chunk(s) left; "
            "run gc again"
        )


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _show_changes(report: Any) -> None:
    """What the run did not do of its plan, because the store changed since it was made."""
    for name, why in report.skipped.items():
        console.print(f"[yellow]not dropped[/yellow] {name}: {why}")
    if report.new_checkpoints:
        console.print(
            f"left alone {len(report.new_checkpoints)} checkpoint(s) committed after the plan "
            f"({', '.join(report.new_checkpoints)}); the next gc decides about them"
        )
    if report.chunks_skipped:
        console.print(
            f"not deleted: {report.chunks_skipped} planned chunk(s) referenced again, needed by "
            "a save in flight, or already gone"
        )
    if report.chunks_unplanned:
        console.print(
            f"left for the next gc: {report.chunks_unplanned} unreferenced chunk(s) the plan "
            "did not list"
        )


def _show_plan(plan: Any, dry_run: bool) -> None:
    table = Table(title=f"{plan.url} — gc plan")
    for col in ("checkpoint", "step", "created", "action", "why kept"):
        table.add_column(col, justify="right" if col == "step" else "left")
    for c in plan.checkpoints:
        table.add_row(
            c.name,
            "" if c.step is None else str(c.step),
            when(c.created),
            "keep" if c.keep else "[red]drop[/red]",
            ", ".join(c.reasons),
        )
    if plan.checkpoints:
        console.print(table)
    else:
        console.print(f"{plan.url}: no checkpoints")
    # what a run does now first, then what it holds back and when a gc frees that
    manifests = plan.manifest_bytes_freed
    console.print(
        f"drop now: {len(plan.dropped)} checkpoint(s) (keep {len(plan.kept)})\n"
        f"free now: {human_bytes(plan.bytes_freed + plan.temp_bytes)} — "
        f"{plan.chunks_freed} chunk(s) ({human_bytes(plan.bytes_freed - manifests)}) and "
        f"{len(plan.dropped)} manifest(s) ({human_bytes(manifests)})"
        + (
            f", {plan.temp_files} stale temporary file(s) ({human_bytes(plan.temp_bytes)})"
            if plan.temp_files
            else ""
        )
    )
    if plan.held.chunks:
        console.print(
            f"free later: {human_bytes(plan.held.bytes)} — {plan.held.chunks} unreferenced "
            "chunk(s) held back:"
        )
    _show_held(plan.held, plan.saves_in_flight, plan.grace)
    _show_temp_held(plan, "free later:")
    _show_blocked(plan)
    console.print(
        f"stored now: {plan.chunks_total} chunk object(s), {human_bytes(plan.bytes_total)}; "
        f"the kept checkpoints use {plan.chunks_kept} ({human_bytes(plan.bytes_kept)} with "
        "their manifests)"
    )
    if dry_run:
        console.print("dry run: nothing was deleted")


# -- rm -------------------------------------------------------------------------------------------
@click.command("rm")
@click.argument("url")
@click.option("--step", "steps", type=int, multiple=True, help="Checkpoint by step; repeatable.")
@click.option("--name", "names", multiple=True, help="Checkpoint by name; repeatable.")
@click.option(
    "--wait",
    callback=_duration,
    default="0s",
    show_default=True,
    metavar="DURATION",
    help="How long to wait for a running gc to finish before giving up.",
)
@storage_option
@json_option
@handle_errors
def rm_cmd(
    url: str,
    steps: tuple[int, ...],
    names: tuple[str, ...],
    wait: float,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Remove checkpoints. Their chunks are deleted by the next gc (those no other
    checkpoint references)."""
    if not steps and not names:
        raise click.UsageError("give --step N or --name NAME (repeatable)")
    store = open_store(url, storage_options)
    targets = [store.resolve(step=s) for s in steps] + [store.resolve(name=n) for n in names]
    report = store.delete_many(targets, wait=wait)
    if as_json:
        emit_json({"removed": report.dropped, "bytes_deleted": report.bytes_deleted})
        return
    for name in report.dropped:
        console.print(f"removed {name}")
    console.print("their chunks go at the next `ckptstore gc`")


# -- du -------------------------------------------------------------------------------------------
@click.command("du")
@click.argument("url")
@storage_option
@json_option
@handle_errors
def du_cmd(url: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Space: logical vs stored bytes, dedup and compression factors, and per checkpoint
    the bytes only it holds (what removing it would free)."""
    store = open_store(url, storage_options)
    with err_console.status("listing the store…") if not as_json else nullcontext():
        report = store.du()
    if as_json:
        emit_json(report.to_dict())
        return
    table = Table(title=f"{url} — {len(report.checkpoints)} checkpoint(s)")
    for col in ("checkpoint", "step", "logical", "stored", "ratio", "written", "only here"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for c in report.checkpoints:
        table.add_row(
            c.name,
            "" if c.step is None else str(c.step),
            human_bytes(c.logical_bytes),
            human_bytes(c.stored_bytes),
            ratio(c.logical_bytes, c.stored_bytes),
            human_bytes(c.new_bytes),
            human_bytes(c.unique_bytes),
        )
    if report.checkpoints:
        console.print(table)
    console.print(
        f"logical {human_bytes(report.logical_bytes)} → referenced "
        f"{human_bytes(report.referenced_bytes)} (compression {report.compression_factor:.3f}×)"
        f" → unique {human_bytes(report.unique_bytes)} in {report.unique_chunks} chunk(s) "
        f"(dedup {report.dedup_factor:.3f}×; overall {report.total_factor:.3f}×)\n"
        f"on storage: {human_bytes(report.physical_bytes)} in {report.chunk_objects} chunk "
        f"object(s); unreferenced {report.garbage_chunks} ({human_bytes(report.garbage_bytes)})"
        f"; trash {report.trash_entries} ({human_bytes(report.trash_bytes)}); "
        f"{report.lease_objects} lease object(s)"
    )
    if report.missing_chunks:
        console.print(
            f"[red]{report.missing_chunks} referenced chunk(s) missing: run ckptstore verify[/red]"
        )


# -- diff -----------------------------------------------------------------------------------------
@click.command("diff")
@click.argument("url")
@click.option("--from", "a", required=True, metavar="A", help="Checkpoint (name or step).")
@click.option("--to", "b", required=True, metavar="B", help="Checkpoint (name or step).")
@click.option("--all", "show_all", is_flag=True, help="List unchanged tensors too.")
@storage_option
@json_option
@handle_errors
def diff_cmd(
    url: str,
    a: str,
    b: str,
    show_all: bool,
    storage_options: tuple[str, ...],
    as_json: bool,
) -> None:
    """Tensors added, removed, changed and unchanged from checkpoint A to B; bytes B shares
    with A and bytes new in B. Reads the two manifests only."""
    report = open_store(url, storage_options).diff(a, b)
    if as_json:
        emit_json(report.to_dict())
        return
    console.print(
        f"{report.a} → {report.b}: {len(report.added)} added, {len(report.removed)} removed, "
        f"{len(report.changed)} changed, {len(report.unchanged)} unchanged"
    )
    if report.changed or report.added or report.removed or (show_all and report.unchanged):
        table = Table()
        for col in ("item", "change", "chunks new", "new bytes", "detail"):
            table.add_column(col, justify="right" if col in ("chunks new", "new bytes") else "left")
        for fqn in report.added:
            table.add_row(fqn, "[green]added[/green]", "", "", "")
        for fqn in report.removed:
            table.add_row(fqn, "[red]removed[/red]", "", "", "")
        for c in report.changed:
            table.add_row(
                c.fqn,
                "changed",
                f"{c.chunks_changed}/{c.chunks}",
                human_bytes(c.new_bytes),
                c.detail,
            )
        if show_all:
            for fqn in report.unchanged:
                table.add_row(fqn, "unchanged", "", "", "")
        console.print(table)
    console.print(
        f"{report.b}: {human_bytes(report.b_stored_bytes)} stored, of which "
        f"{human_bytes(report.shared_bytes)} shared with {report.a} "
        f"({_pct(report.shared_bytes, report.b_stored_bytes)}), "
        f"{human_bytes(report.new_bytes)} new"
    )


COMMANDS = (gc_cmd, rm_cmd, du_cmd, diff_cmd)
