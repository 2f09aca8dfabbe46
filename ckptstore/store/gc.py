"""Retention and garbage collection: plan, then execute that plan (as restic's prune does).

:func:`plan` is read-only: which checkpoints the retention policy keeps and drops, and
which chunk objects a gc run now would delete or hold back. ``gc --dry-run`` prints it and
stops. :func:`execute` runs *that* plan: it takes the store's gc lock, re-validates the plan
against the store as it is now, drops the planned checkpoints that are still there (their
manifests go to ``trash/``), then observes the store in a fixed order and deletes the planned
chunks that no kept checkpoint, no trash entry still needed and no running save may
reference — after publishing that list, so a save about to commit can check it. It never
drops a checkpoint or deletes a chunk the plan does not name; what changed since the plan
only makes it do less (docs/gc.md, "Plan, then execute"). :func:`collect` plans and executes
under one hold of the lock, for callers that show no plan (retention after a save).

The rules and why they are safe are in docs/format.md ("Leases and garbage collection");
docs/gc.md explains the commands. No torch here.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ckptstore.backend import Backend
from ckptstore.backend.base import ObjectInfo
from ckptstore.errors import (
    CheckpointNotFoundError,
    CkptStoreError,
    GcBusyError,
    ObjectNotFoundError,
)
from ckptstore.knobs import Settings
from ckptstore.store import layout, leases
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository, TrashEntry

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase is "drop" or "delete"."""

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|min|s|m|h|d|w)")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"0s"``, ``"90"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"7d"``, ``"1w"``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration must not be negative, got {text!r}")
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(
            f"invalid duration {text!r}: use e.g. 0s, 90s, 30m, 2h, 1h30m, 7d (or seconds)"
        )
    return total


def grace_of(repo: Repository, override: str | float | None = None) -> float:
    """The gc grace period: ``override`` (seconds or "2h"-style), else the settings'."""
    return parse_duration(override) if override is not None else float(repo.settings.gc_grace)


# -- retention -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """Which checkpoints a gc keeps. With no rule given, every checkpoint is kept (gc then
    only collects garbage). With any rule, a checkpoint is kept if some rule keeps it, and
    the latest checkpoint is always kept."""

    keep_last: int | None = None
    """The last N checkpoints in commit order."""
    keep_every: int | None = None
    """Checkpoints whose step is a multiple of K."""
    keep: tuple[str, ...] = ()
    """Checkpoints by name (a bare number means that step)."""

    def __post_init__(self) -> None:
        for label, v in (("keep_last", self.keep_last), ("keep_every", self.keep_every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        object.__setattr__(self, "keep", tuple(str(k) for k in self.keep))

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None or bool(self.keep)

    def reasons(
        self, manifests: Sequence[Manifest], *, strict: bool = True
    ) -> dict[str, list[str]]:
        """Name → why it is kept ([] = dropped), for ``manifests`` oldest first.

        A ``keep`` entry that matches no checkpoint raises
        :class:`~ckptstore.errors.CheckpointNotFoundError` when ``strict`` (planning), and
        keeps nothing otherwise (re-checking a plan: see :func:`execute`)."""
        out: dict[str, list[str]] = {m.name: [] for m in manifests}
        if not self.active:
            return {name: ["all"] for name in out}
        if manifests:
            out[manifests[-1].name].append("latest")
        if self.keep_last is not None:
            for m in manifests[-self.keep_last :]:
                out[m.name].append(f"last {self.keep_last}")
        if self.keep_every is not None:
            for m in manifests:
                if m.step is not None and m.step % self.keep_every == 0:
                    out[m.name].append(f"every {self.keep_every}")
        for wanted in self.keep:
            hits = [m.name for m in manifests if m.name == wanted]
            if not hits and wanted.isdigit():
                step = int(wanted)
                hits = [m.name for m in manifests if m.step == step]
            if not hits and strict:
                raise CheckpointNotFoundError(
                    f"--keep {wanted!r}: no checkpoint by that name or step (nothing deleted)"
                )
            for name in hits:
                out[name].append("keep")
        return {name: list(dict.fromkeys(r)) for name, r in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"keep_last": self.keep_last, "keep_every": self.keep_every, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Retention:
        return cls(
            keep_last=d.get("keep_last"),
            keep_every=d.get("keep_every"),
            keep=tuple(d.get("keep", ())),
        )


# -- the decision shared by plan and execute ----------------------------------------------------
@dataclass
class _Decision:
    doomed: list[ObjectInfo]
    held_by_grace: list[ObjectInfo]
    held_by_saves: list[ObjectInfo]
    keep_trash: list[TrashEntry]
    purge_trash: list[TrashEntry]
    live_saves: list[leases.LeaseInfo]
    referenced: set[bytes]


def _decide(
    chunks: Iterable[ObjectInfo],
    lease_infos: Iterable[leases.LeaseInfo],
    manifests: Iterable[Manifest],
    trash: Iterable[TrashEntry],
    *,
    now: float,
    grace: float,
    skew: float,
) -> _Decision:
    """Which listed chunk objects may go. A chunk is deleted only if no committed manifest
    names it, no trash entry that a running save may have read names it, it is older than
    the grace period, and it is older than every running save's lease (minus the skew
    margin). Objects whose age is unknown are kept."""
    saves = [x for x in lease_infos if x.kind == "save" and x.live(now, skew)]
    oldest = min((x.created for x in saves), default=None)
    referenced: set[bytes] = set()
    for m in manifests:
        referenced |= m.chunk_keys()
    keep_trash, purge_trash = [], []
    for t in trash:
        needed = oldest is not None and t.deleted >= oldest - skew
        (keep_trash if needed else purge_trash).append(t)
    held: set[bytes] = set()
    for t in keep_trash:
        held |= t.manifest.chunk_keys()
    grace_cut = now - grace
    save_cut = oldest - skew if oldest is not None else None
    doomed, by_grace, by_saves = [], [], []
    for c in chunks:
        key = layout.chunk_digest(c.key)
        if key is None or key in referenced:
            continue
        if key in held or (save_cut is not None and (c.mtime is None or c.mtime >= save_cut)):
            by_saves.append(c)
        elif c.mtime is None or c.mtime >= grace_cut:
            by_grace.append(c)
        else:
            doomed.append(c)
    return _Decision(doomed, by_grace, by_saves, keep_trash, purge_trash, saves, referenced)


def _size(objs: Iterable[ObjectInfo]) -> int:
    return sum(o.size for o in objs)


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class CheckpointPlan:
    name: str
    step: int | None
    created: float
    """With ``name``, what identifies the checkpoint: one removed and saved again under the
    same name is another checkpoint, which the plan does not know."""
    keep: bool
    reasons: list[str]
    manifest_bytes: int


@dataclass
class GcPlan:
    """What a gc run would do now. ``--dry-run`` prints this and nothing else happens;
    :func:`execute` runs exactly this — or less, where the store changed since."""

    url: str
    retention: dict[str, Any]
    grace: float
    checkpoints: list[CheckpointPlan]
    chunks_total: int = 0
    """Chunk objects in the store now, and their bytes."""
    bytes_total: int = 0
    chunks_kept: int = 0
    """Chunk objects the kept checkpoints reference, and their bytes (+ kept manifests)."""
    bytes_kept: int = 0
    chunks_freed: int = 0
    """Chunk objects a run now deletes, and their bytes (+ dropped manifests)."""
    bytes_freed: int = 0
    chunks_held: int = 0
    """Unreferenced chunk objects a run now keeps: younger than the grace period, or
    possibly needed by a save in flight."""
    bytes_held: int = 0
    held_by_saves: int = 0
    saves_in_flight: list[str] = field(default_factory=list)
    trash_entries: int = 0
    skew: float = 0.0
    """The clock-skew margin the plan was made with; :func:`execute` runs with it too."""
    planned_at: float = 0.0
    """When the plan was made (Unix seconds, this machine's clock)."""
    chunk_keys: frozenset[bytes] = field(default_factory=frozenset, repr=False)
    """The 16-byte keys of the ``chunks_freed`` chunk objects: :func:`execute` deletes no
    chunk outside this set. (Not in :meth:`to_dict`.)"""

    @property
    def kept(self) -> list[str]:
        return [c.name for c in self.checkpoints if c.keep]

    @property
    def dropped(self) -> list[str]:
        return [c.name for c in self.checkpoints if not c.keep]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "chunk_keys"}
        d["retention"] = dict(self.retention)
        d["checkpoints"] = [asdict(c) for c in self.checkpoints]
        d["saves_in_flight"] = list(self.saves_in_flight)
        d["kept"] = self.kept
        d["dropped"] = self.dropped
        return d


def _fresh(repo: Repository) -> Repository:
    """The same store, with no manifests cached. A :class:`Repository` caches manifests by
    name, but a name can be removed and saved again by another process: gc reads what is
    there now. (Under the gc lock nobody else removes a checkpoint, so what this instance
    caches from then on stays true while the lock is held.)"""
    return Repository.open(repo.backend, settings=repo.settings)


def _list_state(
    repo: Repository,
) -> tuple[list[ObjectInfo], list[leases.LeaseInfo], list[Manifest]]:
    """Chunks, then leases, then manifests — the order execute() relies on."""
    chunks = repo.backend.list_info(layout.CHUNKS)
    lease_infos = leases.read_leases(repo.backend)
    manifests = repo.manifests()  # an unreadable manifest raises: never guess its chunks
    return chunks, lease_infos, manifests


def plan(
    repo: Repository,
    retention: Retention | None = None,
    *,
    grace: str | float | None = None,
    skew: float | None = None,
) -> GcPlan:
    """Read-only: what a gc run with this policy would keep, drop, delete and hold back.
    Takes no lock and writes nothing; hand the result to :func:`execute` to run it."""
    return _plan(
        _fresh(repo),
        retention or Retention(),
        grace_of(repo, grace),
        leases.skew_of(repo.backend, skew),
    )


def _plan(repo: Repository, retention: Retention, grace_s: float, skew_s: float) -> GcPlan:
    chunks, lease_infos, manifests = _list_state(repo)
    trash = repo.trash_entries()
    reasons = retention.reasons(manifests)
    kept = [m for m in manifests if reasons[m.name]]
    dropped = [m for m in manifests if not reasons[m.name]]
    now = time.time()
    # as execute() would see it: the dropped manifests in the trash since now
    as_trash = [TrashEntry(f"(dropping {m.name})", m.name, now, m) for m in dropped]
    d = _decide(chunks, lease_infos, kept, [*trash, *as_trash], now=now, grace=grace_s, skew=skew_s)
    sizes = {layout.chunk_digest(c.key): c.size for c in chunks}
    kept_keys = d.referenced
    return GcPlan(
        url=repo.url,
        retention=retention.to_dict(),
        grace=grace_s,
        checkpoints=[
            CheckpointPlan(
                m.name, m.step, m.created, bool(reasons[m.name]), reasons[m.name], m.manifest_bytes
            )
            for m in manifests
        ],
        chunks_total=len(chunks),
        bytes_total=_size(chunks),
        chunks_kept=sum(1 for k in kept_keys if k in sizes),
        bytes_kept=sum(sizes[k] for k in kept_keys if k in sizes)
        + sum(m.manifest_bytes for m in kept),
        chunks_freed=len(d.doomed),
        bytes_freed=_size(d.doomed) + sum(m.manifest_bytes for m in dropped),
        chunks_held=len(d.held_by_grace) + len(d.held_by_saves),
        bytes_held=_size(d.held_by_grace) + _size(d.held_by_saves),
        held_by_saves=len(d.held_by_saves),
        saves_in_flight=[x.describe() for x in d.live_saves],
        trash_entries=len(trash),
        skew=skew_s,
        planned_at=now,
        chunk_keys=frozenset(k for c in d.doomed if (k := layout.chunk_digest(c.key)) is not None),
    )


# -- execute ------------------------------------------------------------------------------------
@dataclass
class GcReport:
    """What a gc run did."""

    url: str
    dropped: list[str]
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    """Chunk bytes deleted plus the bytes of the dropped manifests."""
    chunks_held: int = 0
    bytes_held: int = 0
    held_by_saves: int = 0
    saves_in_flight: int = 0
    trash_purged: int = 0
    trash_kept: int = 0
    leases_cleaned: int = 0
    seconds: float = 0.0
    plan_published: bool = False
    dry_run: bool = False
    plan: GcPlan | None = None
    """The plan this run executed (for a dry run: the plan it did not execute)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Checkpoints the plan drops that this run did not drop, and why: removed or replaced
    since the plan, or kept now by the policy (the checkpoints it kept changed)."""
    new_checkpoints: list[str] = field(default_factory=list)
    """Checkpoints committed since the plan (the plan does not know them): left alone."""
    chunks_skipped: int = 0
    """Chunks the plan deletes that this run did not: referenced again, possibly needed by
    a save in flight, or already gone."""
    chunks_unplanned: int = 0
    """Unreferenced chunks this run could have deleted but the plan does not name (garbage
    that appeared since the plan): left for the next gc."""
    catalog_removed: int = 0
    """Catalog entries of checkpoints that no longer exist, deleted (docs/format.md C4)."""
    catalog_written: int = 0
    """Catalog entries written for checkpoints that had none (a save that died between its
    commit and its entry, or a store written before the catalog existed)."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["dropped"] = list(self.dropped)
        d["skipped"] = dict(self.skipped)
        d["new_checkpoints"] = list(self.new_checkpoints)
        d["plan"] = self.plan.to_dict() if self.plan is not None else None
        return d


_BATCH = 256


def execute(
    repo: Repository,
    plan: GcPlan | Retention | None,
    *,
    wait: float = 0.0,
    ttl: float | None = None,
    progress: Progress | None = None,
    grace: str | float | None = None,
    skew: float | None = None,
) -> GcReport:
    """Run ``plan`` (made by :func:`plan`, typically shown to the user first) under the
    store's gc lock (:class:`~ckptstore.errors.GcBusyError` if another gc holds it for
    ``wait`` seconds). ``report.plan`` is ``plan``.

    Under the lock the plan is re-validated, and what changed since only makes the run do
    less — never drop a checkpoint or delete a chunk the plan does not name:

    - it drops each checkpoint the plan drops that still exists unchanged (same name and
      commit time) and that the plan's policy, applied to the checkpoints there are now,
      still drops; the others go to ``report.skipped`` with the reason;
    - it never drops a checkpoint the plan keeps, nor one committed since the plan
      (``report.new_checkpoints``; the next gc decides about those);
    - after the drops it observes the store again and deletes the chunks of the plan that
      the safety rules allow now (docs/format.md G3–G5). Planned chunks that are referenced
      again, possibly needed by a save in flight, or gone are skipped
      (``report.chunks_skipped``); garbage the plan does not name stays for the next gc
      (``report.chunks_unplanned``).

    Order (docs/format.md): lock → re-validate → drop manifests into trash → list chunks →
    read leases → read manifests and trash → decide → publish the chunk list → delete chunks
    → purge trash and dead leases → done. An error part-way leaves a valid store: nothing is
    deleted before the list is published, and only unreferenced chunks are ever in it.

    Older form: ``execute(repo, retention, grace=…)`` (a :class:`Retention` or None instead
    of a plan) plans under the lock and runs that, as :func:`collect` does. Deprecated."""
    if plan is None or isinstance(plan, Retention):
        warnings.warn(
            "gc.execute(repo, retention) is deprecated: run a plan, "
            "gc.execute(repo, gc.plan(repo, retention, grace=...)), or gc.collect(...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return collect(repo, plan, grace=grace, skew=skew, ttl=ttl, wait=wait, progress=progress)
    if not isinstance(plan, GcPlan):
        raise TypeError(f"execute() runs a GcPlan (from gc.plan), not {type(plan).__name__}")
    if grace is not None or skew is not None:
        raise TypeError("grace and skew are part of the plan: pass them to gc.plan()")
    if plan.url != repo.url:
        raise ValueError(f"this gc plan is for {plan.url}, not {repo.url}")
    t0 = time.monotonic()
    live = _fresh(repo)
    lock = leases.acquire_gc(live.backend, wait=wait, ttl=ttl, skew=plan.skew)
    return _run(repo, live, plan, lock, progress, t0)


def collect(
    repo: Repository,
    retention: Retention | None = None,
    *,
    grace: str | float | None = None,
    skew: float | None = None,
    ttl: float | None = None,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> GcReport:
    """Plan and execute under one hold of the gc lock, for callers that show no plan
    (``save(..., keep_last=N)``, scripts). ``report.plan`` is the plan it ran."""
    t0 = time.monotonic()
    retention = retention or Retention()
    grace_s = grace_of(repo, grace)
    live = _fresh(repo)
    lock = leases.acquire_gc(live.backend, wait=wait, ttl=ttl, skew=skew)
    try:
        made = _plan(live, retention, grace_s, lock.skew)
    except BaseException:
        lock.release()
        raise
    return _run(repo, live, made, lock, progress, t0)


def _run(
    repo: Repository,
    live: Repository,
    plan: GcPlan,
    lock: leases.Lease,
    progress: Progress | None,
    t0: float,
) -> GcReport:
    """Execute ``plan`` holding ``lock``; releases or finishes the lock. ``live`` observes
    the store (its cache filled under the lock); drops go through ``repo`` so that the
    caller's instance forgets the dropped manifests."""
    report = GcReport(url=repo.url, dropped=[], plan=plan)
    published = False
    try:
        # 1. which planned drops still stand (every manifest must be readable: we could not
        # know what an unreadable one needs), then drop them
        to_drop = _revalidate(live, plan, report)
        if to_drop:
            lock.update(dropped=to_drop)
        for i, name in enumerate(to_drop):
            lock.check("drop checkpoints")
            try:
                _, size = repo.trash(name)
            except CheckpointNotFoundError:  # only a writer ignoring the lock does this
                report.skipped[name] = "gone: removed while this gc ran"
                continue
            report.dropped.append(name)
            report.bytes_deleted += size
            if progress:
                progress("drop", i + 1, len(to_drop))
        published = _sweep(live, lock, report, plan, progress)
    except BaseException:
        if report.plan_published:  # saves must keep seeing the plan: mark it finished
            try:
                lock.update(state="done", finished=time.time())
            except Exception as exc:  # noqa: BLE001 - the record expires, which says the same
                log.warning("gc could not mark its record done: %s", exc)
            lock.stop()
        else:
            lock.release()
        raise
    finally:
        report.seconds = time.monotonic() - t0
    _finish(live, lock, published)
    report.seconds = time.monotonic() - t0
    return report


def _revalidate(live: Repository, plan: GcPlan, report: GcReport) -> list[str]:
    """Under the gc lock: the planned drops that still stand. Fills ``report.skipped`` and
    ``report.new_checkpoints``."""
    current = live.manifests()  # an unreadable manifest raises: never guess its chunks
    reasons = Retention.from_dict(plan.retention).reasons(current, strict=False)
    by_name = {m.name: m for m in current}
    known = {(c.name, c.created) for c in plan.checkpoints}
    report.new_checkpoints = [m.name for m in current if (m.name, m.created) not in known]
    to_drop = []
    for c in plan.checkpoints:
        if c.keep:
            continue
        m = by_name.get(c.name)
        if m is None:
            report.skipped[c.name] = "gone: removed since the plan"
        elif m.created != c.created:
            report.skipped[c.name] = "replaced: removed and saved again since the plan"
        elif reasons[c.name]:
            why = ", ".join(reasons[c.name])
            report.skipped[c.name] = f"now kept ({why}): the checkpoints changed since the plan"
        else:
            to_drop.append(c.name)
    return to_drop


def _sweep(
    repo: Repository,
    lock: leases.Lease,
    report: GcReport,
    plan: GcPlan,
    progress: Progress | None,
) -> bool:
    """Steps 2-4 of :func:`execute`. Returns whether a chunk list was published."""
    backend = repo.backend
    skew_s = lock.skew
    # 2. observe, in this order: chunks, leases, manifests, trash
    chunks, lease_infos, manifests = _list_state(repo)
    trash = repo.trash_entries()
    now = time.time()
    d = _decide(chunks, lease_infos, manifests, trash, now=now, grace=plan.grace, skew=skew_s)
    # the plan bounds what goes: never a chunk it does not name
    doomed = [c for c in d.doomed if layout.chunk_digest(c.key) in plan.chunk_keys]
    report.chunks_skipped = len(plan.chunk_keys) - len(doomed)
    report.chunks_unplanned = len(d.doomed) - len(doomed)
    report.chunks_held = len(d.held_by_grace) + len(d.held_by_saves)
    report.bytes_held = _size(d.held_by_grace) + _size(d.held_by_saves)
    report.held_by_saves = len(d.held_by_saves)
    report.saves_in_flight = len(d.live_saves)
    report.trash_kept = len(d.keep_trash)
    # 3. publish the list, then delete exactly that
    if doomed:
        lock.check("publish its plan")
        keys = [layout.chunk_digest(c.key) for c in doomed]
        backend.put(layout.gc_plan_key(lock.id), leases.encode_plan(k for k in keys if k))
        lock.update(
            state="planned",
            plan={
                "key": layout.gc_plan_key(lock.id),
                "chunks": len(doomed),
                "bytes": _size(doomed),
            },
        )
        report.plan_published = True  # from here on saves see what we delete
        for start in range(0, len(doomed), _BATCH):
            lock.check("delete chunks")
            batch = doomed[start : start + _BATCH]
            backend.map(lambda c: backend.delete(c.key), batch)
            report.chunks_deleted += len(batch)
            report.bytes_deleted += _size(batch)
            if progress:
                progress("delete", report.chunks_deleted, len(doomed))
    # 4. the trash entries no running save needs, and dead leases / old gc records
    lock.check("purge the trash")
    backend.map(lambda t: backend.delete(t.key), d.purge_trash)
    report.trash_purged = len(d.purge_trash)
    report.leases_cleaned = _clean_leases(repo, lease_infos, lock, now, skew_s)
    # 5. the catalog matches the checkpoints again (docs/format.md C4)
    report.catalog_removed, report.catalog_written = repo.tidy_catalog()
    return report.plan_published


def _finish(repo: Repository, lock: leases.Lease, published: bool) -> None:
    """Mark the record done; delete it (and its plan) right away when no save is in flight,
    since then no save can ever need it."""
    if not published:
        lock.release()
        return
    lock.update(state="done", finished=time.time())
    lock.stop()
    now = time.time()
    try:
        busy = any(
            x.kind == "save" and x.live(now, lock.skew) for x in leases.read_leases(repo.backend)
        )
        if not busy:
            repo.backend.delete(lock.key)
            repo.backend.delete(layout.gc_plan_key(lock.id))
    except CkptStoreError as exc:
        log.warning("gc could not tidy its record: %s", exc)


def _clean_leases(
    repo: Repository,
    lease_infos: list[leases.LeaseInfo],
    lock: leases.Lease,
    now: float,
    skew: float,
) -> int:
    """Delete expired save leases, gc records no running save can need any more, and plan
    objects whose record is gone. Returns how many objects went."""
    backend = repo.backend
    saves = [x for x in lease_infos if x.kind == "save" and x.live(now, skew)]
    gone: list[str] = []
    for x in lease_infos:
        if x.kind == "save" and not x.live(now, skew):
            gone.append(x.key)
        elif x.kind == "gc" and x.id != lock.id:
            end = x.end(now, skew)
            if end == float("inf"):
                continue
            if not any(s.created <= end + skew for s in saves):
                gone.append(x.key)
                gone.append(layout.gc_plan_key(x.id))  # after its record: see format.md
    records = {x.id for x in lease_infos if x.kind == "gc"} | {lock.id}
    for key in backend.list(layout.LEASES):
        if key.endswith(".plan"):
            lid = key[len(layout.LEASES) + 4 : -5]  # leases/gc-<id>.plan
            if lid not in records and key not in gone:
                gone.append(key)
    n = 0
    for key in gone:
        try:
            backend.delete(key)
            n += 1
        except ObjectNotFoundError:
            pass
    return n


# -- rm -----------------------------------------------------------------------------------------
def remove(
    repo: Repository,
    names: Sequence[str],
    *,
    wait: float = 0.0,
    ttl: float | None = None,
    skew: float | None = None,
) -> GcReport:
    """Drop the named checkpoints under the gc lock; their chunks go at the next gc. All
    must exist (:class:`~ckptstore.errors.CheckpointNotFoundError` otherwise, and nothing is
    removed). An unreadable manifest is deleted outright (docs/format.md G2)."""
    if not names:
        raise ValueError("name at least one checkpoint to remove")
    names = list(dict.fromkeys(names))
    t0 = time.monotonic()
    lock = leases.acquire_gc(repo.backend, wait=wait, ttl=ttl, skew=skew)
    report = GcReport(url=repo.url, dropped=[])
    try:
        present = set(repo.names())
        missing = [n for n in names if n not in present]
        if missing:
            raise CheckpointNotFoundError(
                f"checkpoint(s) {missing} not found in {repo.url} (nothing deleted)"
            )
        lock.update(dropped=names)
        for name in names:
            lock.check("drop checkpoints")
            _, size = repo.trash(name)
            report.dropped.append(name)
            report.bytes_deleted += size
    finally:
        lock.release()  # rm publishes no chunk list: no save can need its record
        report.seconds = time.monotonic() - t0
    return report


# -- retention after a save (ckptstore.save(..., keep_last=N)) ---------------------------------
_background: dict[str, threading.Thread] = {}
_background_lock = threading.Lock()


def _finish_background() -> None:
    """At interpreter exit, let retention gcs finish while thread pools still take work.

    Registered with ``threading._register_atexit``: those hooks run, last registered first,
    before the interpreter joins non-daemon threads — and before concurrent.futures' own
    hook (registered when it was imported, earlier) stops every executor, after which a gc
    could not start a thread pool ("cannot schedule new futures after interpreter
    shutdown")."""
    with _background_lock:
        threads = list(_background.values())
    for t in threads:
        t.join()


def _register_exit_hook() -> None:
    import concurrent.futures.thread  # noqa: F401 - its hook must be registered before ours

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(_finish_background)
    else:  # pragma: no cover - CPython < 3.9
        import atexit

        atexit.register(_finish_background)


_register_exit_hook()


def retain_in_background(
    url: str | Backend,
    retention: Retention,
    *,
    storage_options: Mapping[str, Any] | None = None,
    grace: str | float | None = None,
    settings: Settings | None = None,
) -> Future[GcReport | None]:
    """Run a gc with ``retention`` on a background thread and return its future.

    At most one such gc runs per store in this process: while one runs, the future of a
    new request resolves to None at once (the running gc, or the next save's, does the
    work). So does a gc that finds another gc holding the lock. Other errors are logged
    and set on the future; the checkpoint just saved is never affected. The thread is not
    a daemon, and an exit hook lets it finish before thread pools shut down: a script whose
    last call is ``save(..., keep_last=N)`` still applies its retention."""
    out: Future[GcReport | None] = Future()
    key = url.url if isinstance(url, Backend) else str(url)
    with _background_lock:
        running = _background.get(key)
        if running is not None and running.is_alive():
            out.set_result(None)
            return out

        def run() -> None:
            try:
                repo = Repository.open(url, storage_options, settings=settings)
                out.set_result(collect(repo, retention, grace=grace))
            except GcBusyError as exc:
                log.info("retention gc skipped: %s", exc)
                out.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - reported, never raised in training
                log.warning("retention gc of %s failed: %s", url, exc)
                out.set_exception(exc)

        thread = threading.Thread(target=run, name="ckptstore-retention", daemon=False)
        _background[key] = thread
        thread.start()
    return out
