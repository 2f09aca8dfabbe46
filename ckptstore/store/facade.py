"""``ckptstore.Store``: a store as users see it — list, resolve, inspect, verify, gc, delete,
du and diff its checkpoints. Torch-free, so ``ckptstore.Store(url).list()`` and the CLI run
without importing torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptstore.backend import Backend
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.knobs import Settings
from ckptstore.store import copy, gc_plan, gc_run, removal, reports, usage
from ckptstore.store.blobs import BlobReader
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.manifest import Blob, Manifest
from ckptstore.store.options import Mirror
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention
from ckptstore.store.tiers import open_tiered

Ref = str | int


class Store:
    """A store at ``url`` (any fsspec URL, or a Backend object). With ``mirror`` (a URL or
    :class:`ckptstore.Mirror`): the two tiers read as one (docs/tiers.md) — listings of
    both, each object from ``url`` where it is there; write operations (gc, delete) are for
    one store at a time: open it without ``mirror``."""

    def __init__(
        self,
        url: str | Backend,
        storage_options: Mapping[str, Any] | None = None,
        *,
        settings: Settings | None = None,
        mirror: str | Mirror | None = None,
    ) -> None:
        tier = Mirror.of(mirror)
        if tier is not None:  # read both tiers: the newest in either, objects where they are
            self.repo = open_tiered(url, tier, storage_options, settings=settings)
        else:
            self.repo = Repository.open(url, storage_options, settings=settings)
        self.url = self.repo.url
        self.storage_options = dict(storage_options or {})
        self.settings: Settings = self.repo.settings
        """The settings this store was opened with (``threads``, retries, …)."""

    # -- naming checkpoints -----------------------------------------------------------------
    def resolve(
        self, which: Ref | None = None, *, step: int | None = None, name: str | None = None
    ) -> str:
        """The checkpoint name meant; the latest when nothing is given.

        The one rule for a reference typed by a user (``which``): an int is a step; a
        string is the name of a checkpoint if one has that name, else, if it is all digits,
        a step. ``step=``/``name=`` say which explicitly."""
        if which is None:
            return self.repo.resolve(step, name)
        if step is not None or name is not None:
            raise ValueError("give a checkpoint reference or step=/name=, not both")
        if isinstance(which, bool) or not isinstance(which, (int, str)):
            raise TypeError(f"a checkpoint is named by a str or a step int, not {which!r}")
        if isinstance(which, int):
            return self.repo.resolve(step=which)
        if which.isdigit() and not self.repo.exists(which):
            return self.repo.resolve(step=int(which))
        return self.repo.resolve(name=which)

    def latest(self) -> str:
        """Name of the newest committed checkpoint."""
        return self.repo.resolve()

    # -- reading ----------------------------------------------------------------------------
    def list(self) -> list[CheckpointSummary]:
        """Committed checkpoints, oldest first (listings only; see docs/format.md,
        "Catalog"). Raises the first error of an unreadable checkpoint that has no catalog
        entry; :meth:`scan` gives them apart."""
        found, bad = self.repo.summaries()
        if bad:
            raise next(iter(bad.values()))
        return found

    def scan(self) -> tuple[list[CheckpointSummary], dict[str, Exception]]:
        """Like :meth:`list`, with unreadable checkpoints reported, not raised."""
        found, bad = self.repo.summaries()
        return found, dict(bad)

    def summary(self, which: Ref | None = None) -> CheckpointSummary:
        return self.repo.summary(self.resolve(which))

    def inspect(
        self, which: Ref | None = None, *, step: int | None = None, name: str | None = None
    ) -> reports.InspectReport:
        """Per-tensor dtype, shape, codec, logical/stored/shared bytes of one checkpoint."""
        return reports.inspect(self.repo, self.resolve(which, step=step, name=name))

    def verify(
        self,
        which: Ref | None = None,
        *,
        step: int | None = None,
        name: str | None = None,
        progress: Any = None,
    ) -> reports.VerifyReport:
        """Re-read every chunk of one checkpoint (or of all, with no reference) and check
        it against its key."""
        everything = which is None and step is None and name is None
        target = None if everything else self.resolve(which, step=step, name=name)
        return reports.verify(self.repo, target, progress=progress)

    def du(self) -> usage.DuReport:
        """Logical vs stored bytes, dedup and compression, per-checkpoint unique bytes."""
        return usage.du(self.repo)

    def diff(self, a: Ref, b: Ref) -> usage.DiffReport:
        """What changed from checkpoint ``a`` to ``b``."""
        return usage.diff(self.repo, self.resolve(a), self.resolve(b))

    # -- what a checkpoint holds, down to its chunks (for tools: ckptstore.report) ----------
    def manifest(
        self, which: Ref | None = None, *, step: int | None = None, name: str | None = None
    ) -> Manifest:
        """What one checkpoint holds (its manifest, read once and cached): ``tensors`` (fqn →
        ``TensorEntry``: dtype, shape, shards, each a box and a ``Blob`` of chunks) and
        ``objects``, with the figures its save recorded. Treat it as read-only."""
        return self.repo.manifest(self.resolve(which, step=step, name=name))

    def read_rows(self, blob: Blob, start: int, stop: int, *, where: str = "") -> np.ndarray:
        """The raw bytes (a uint8 array) of rows [start, stop) of ``blob``, a blob of one of
        this store's manifests: reads only the chunks covering those rows (delta bases
        included), checks each against its checksum and decodes it. ``where`` names the blob
        in error messages. Safe to call from several threads."""
        return BlobReader(self.repo, threads=1).read_rows(blob, start, stop, where or "blob")

    @staticmethod
    def lossy_codec(blob: Blob) -> str | None:
        """Label of the lossy stage ``blob`` was stored with (``int8/64``, ``fp16``,
        ``bf16``), or None where it is stored losslessly."""
        lossy, _ = Pipeline.from_config(blob.codec).split()
        return None if lossy is None else lossy.short()

    # -- changing ---------------------------------------------------------------------------
    def plan_gc(
        self,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep: tuple[str, ...] | list[str] = (),
        grace: str | float | None = None,
    ) -> gc_plan.GcPlan:
        """What a gc with this policy would do (read-only, no lock): the plan that
        :meth:`run_gc` executes, and ``gc --dry-run`` prints."""
        retention = Retention(keep_last=keep_last, keep_every=keep_every, keep=tuple(keep))
        return gc_plan.plan(self.repo, retention, grace=grace)

    def run_gc(
        self, plan: gc_plan.GcPlan, *, wait: float = 0.0, progress: Any = None
    ) -> gc_run.GcReport:
        """Execute ``plan`` under the gc lock: it drops only what the plan drops and deletes
        only chunks it names (less where the store changed since; docs/gc.md)."""
        return gc_run.execute(self.repo, plan, wait=wait, progress=progress)

    def gc(
        self,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep: tuple[str, ...] | list[str] = (),
        grace: str | float | None = None,
        dry_run: bool = False,
        wait: float = 0.0,
    ) -> gc_run.GcReport:
        """Drop the checkpoints the policy does not keep, then delete the chunks nothing
        needs (see docs/gc.md). With no policy, only garbage is collected. ``grace``:
        seconds or "2h"-style; unreferenced chunks younger than it stay. The plan is in
        ``report.plan``; with ``dry_run`` nothing else happens."""
        plan = self.plan_gc(keep_last=keep_last, keep_every=keep_every, keep=keep, grace=grace)
        if dry_run:
            return gc_run.GcReport(url=self.repo.url, dropped=[], dry_run=True, plan=plan)
        return self.run_gc(plan, wait=wait)

    def delete(
        self,
        which: Ref | None = None,
        *,
        step: int | None = None,
        name: str | None = None,
        wait: float = 0.0,
    ) -> str:
        """Remove one checkpoint; its chunks go at the next gc. Returns its name."""
        if which is None and step is None and name is None:
            raise ValueError("give the name or step of the checkpoint to delete")
        target = self.resolve(which, step=step, name=name)
        removal.remove(self.repo, [target], wait=wait)
        return target

    def delete_many(self, refs: list[Ref], *, wait: float = 0.0) -> gc_run.GcReport:
        """Remove several checkpoints (each named by the rule of :meth:`resolve`) under one
        gc lock; all are resolved before any is removed."""
        targets = [self.resolve(r) for r in refs]
        return removal.remove(self.repo, targets, wait=wait)

    # -- copying ----------------------------------------------------------------------------
    def copy_to(
        self,
        dst: str | Backend | Store,
        which: Ref | list[Ref] | None = None,
        *,
        all: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        progress: copy.Progress | None = None,
    ) -> copy.CopyReport:
        """Copy checkpoints into the store ``dst`` (created if needed): the latest, the one
        ``which`` names (or each of a list), or ``all=True`` every one, oldest first.

        Sends only the chunks ``dst`` lacks, then each manifest with a create-only put, as
        a save commits: ``dst`` never holds half a checkpoint, and a copy killed part-way
        is finished by the next without re-sending what arrived. A checkpoint ``dst``
        holds already with the same manifest is counted in ``present``; with another
        manifest it is a ``CheckpointExistsError``. ``storage_options`` are ``dst``'s (its
        fsspec options; default this store's when both share a protocol)."""
        if all and which is not None:
            raise ValueError("give checkpoints to copy or all=True, not both")
        if isinstance(dst, Store):
            target = dst.repo
        else:
            if storage_options is None and _same_protocol(self.url, dst):
                storage_options = self.storage_options
            target = Repository.open(dst, storage_options, create=True, settings=self.settings)
        if all:
            names = [s.name for s in self.list()]
        elif isinstance(which, list):
            names = [self.resolve(w) for w in which]
        else:
            names = [self.resolve(which)]
        return copy.copy_checkpoints(
            self.repo, target, names, progress=progress, threads=self.settings.io_requests
        )

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def _same_protocol(a: str, b: str | Backend) -> bool:
    if isinstance(b, Backend):
        return False
    proto = lambda u: u.split("://", 1)[0] if "://" in u else "file"  # noqa: E731
    return proto(a) == proto(b)
