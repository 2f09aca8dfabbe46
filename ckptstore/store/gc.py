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
    CheckpointBusyError,
    CheckpointNotFoundError,
    CkptStoreError,
    GcBusyError,
    ObjectNotFoundError,
    StorageFullError,
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
        self,
        manifests: Sequence[Manifest],
        *,
        strict: bool = True,
        unreadable: Iterable[str] = (),
    ) -> dict[str, list[str]]:
        """Name → why it is kept ([] = dropped), for ``manifests`` oldest first.

        A ``keep`` entry that matches no checkpoint raises
        :class:`~ckptstore.errors.CheckpointNotFoundError` when ``strict`` (planning), and
        keeps nothing otherwise (re-checking a plan: see :func:`execute`). Checkpoints whose
        manifest cannot be read (``unreadable``) are not in the result — gc never drops
        them — but a ``keep`` entry naming one is no error."""
        unreadable = set(unreadable)
        unreadable_steps = {layout.step_of_name(n) for n in unreadable} - {None}
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
            matches_unreadable = wanted in unreadable or (
                wanted.isdigit() and int(wanted) in unreadable_steps
            )
            if not hits and strict and not matches_unreadable:
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
    grace: float = 0.0

    def held_until(self) -> tuple[float | None, float | None]:
        """When a gc frees the first, and the last, chunk the grace period holds now: the
        oldest and the youngest such chunk's mtime + the grace (None: none with a known
        age). Chunks held for saves in flight go once those saves have ended."""
        ages = [c.mtime for c in self.held_by_grace if c.mtime is not None]
        if not ages:
            return None, None
        return min(ages) + self.grace, max(ages) + self.grace


@dataclass
class _TempDecision:
    """Which stale temporary files go (docs/format.md, "Temporary files")."""

    doomed: list[ObjectInfo]
    held: list[ObjectInfo]
    held_until: float | None


def _decide_temp(
    temps: Iterable[ObjectInfo],
    lease_infos: Iterable[leases.LeaseInfo],
    *,
    now: float,
    grace: float,
    skew: float,
) -> _TempDecision:
    """A temporary file may go once it is older than the grace period and than the clock
    margin (so a put in progress on any machine is never mistaken for a leftover), and older
    than every running save's lease (every put of a save starts after its lease)."""
    oldest = min(
        (x.created for x in lease_infos if x.kind == "save" and x.live(now, skew)), default=None
    )
    age = max(grace, skew)
    save_cut = oldest - skew if oldest is not None else None
    doomed, held, until = [], [], []
    for t in temps:
        if t.mtime is not None and save_cut is not None and t.mtime >= save_cut:
            held.append(t)  # goes once the saves in flight have ended
        elif t.mtime is None or t.mtime >= now - age:
            held.append(t)
            if t.mtime is not None:
                until.append(t.mtime + age)
        else:
            doomed.append(t)
    return _TempDecision(doomed, held, min(until, default=None))


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
    return _Decision(doomed, by_grace, by_saves, keep_trash, purge_trash, saves, referenced, grace)


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
    """Of ``chunks_held``: possibly needed by a save in flight (they go once it ended)."""
    bytes_held_by_saves: int = 0
    held_by_grace: int = 0
    """Of ``chunks_held``: younger than the grace period."""
    bytes_held_by_grace: int = 0
    held_until: float | None = None
    """When a gc frees the first chunk the grace period holds (Unix seconds): the oldest
    one's modification time + the grace. None: the grace holds none."""
    held_all_until: float | None = None
    """When a gc frees the last of them (the youngest one's mtime + the grace)."""
    saves_in_flight: list[str] = field(default_factory=list)
    trash_entries: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    """Checkpoints whose manifest cannot be read, with the error. While there is one, no
    chunk is deleted (its chunks are unknown); the policy neither keeps nor drops them."""
    chunks_blocked: int = 0
    """Chunk objects that no readable manifest references and that would go now, kept
    because a manifest is unreadable (and their bytes)."""
    bytes_blocked: int = 0
    temp_files: int = 0
    """Stale temporary files (``.tmp-*``) a run deletes, and their bytes."""
    temp_bytes: int = 0
    temp_held: int = 0
    """Temporary files too young to be told from a put in progress (or of a save in
    flight), and their bytes; ``temp_held_until``: when the first of them becomes stale."""
    temp_bytes_held: int = 0
    temp_held_until: float | None = None
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
        d["unreadable"] = dict(self.unreadable)
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
) -> tuple[list[ObjectInfo], list[leases.LeaseInfo], list[Manifest], dict[str, str]]:
    """Chunks, then leases, then manifests — the order execute() relies on. The last item:
    the checkpoints whose manifest cannot be read, with the error (their chunks are unknown,
    so no chunk may go while there is one)."""
    chunks = repo.backend.list_info(layout.CHUNKS)
    lease_infos = leases.read_leases(repo.backend)
    manifests, bad = repo.scan()
    return chunks, lease_infos, manifests, _errors(bad)


def _errors(bad: Mapping[str, BaseException]) -> dict[str, str]:
    return {name: f"{type(exc).__name__}: {exc}" for name, exc in bad.items()}


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
    temps = repo.backend.list_temp("") if repo.backend.capabilities.temp_files else []
    chunks, lease_infos, manifests, unreadable = _list_state(repo)
    trash = repo.trash_entries()
    reasons = retention.reasons(manifests, unreadable=unreadable)
    kept = [m for m in manifests if reasons[m.name]]
    dropped = [m for m in manifests if not reasons[m.name]]
    now = time.time()
    # as execute() would see it: the dropped manifests in the trash since now
    as_trash = [TrashEntry(f"(dropping {m.name})", m.name, now, m) for m in dropped]
    d = _decide(chunks, lease_infos, kept, [*trash, *as_trash], now=now, grace=grace_s, skew=skew_s)
    t = _decide_temp(temps, lease_infos, now=now, grace=grace_s, skew=skew_s)
    sizes = {layout.chunk_digest(c.key): c.size for c in chunks}
    kept_keys = d.referenced
    doomed = [] if unreadable else d.doomed
    blocked = d.doomed if unreadable else []
    held_until, held_all_until = d.held_until()
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
        chunks_freed=len(doomed),
        bytes_freed=_size(doomed) + sum(m.manifest_bytes for m in dropped),
        chunks_held=len(d.held_by_grace) + len(d.held_by_saves),
        bytes_held=_size(d.held_by_grace) + _size(d.held_by_saves),
        held_by_saves=len(d.held_by_saves),
        bytes_held_by_saves=_size(d.held_by_saves),
        held_by_grace=len(d.held_by_grace),
        bytes_held_by_grace=_size(d.held_by_grace),
        held_until=held_until,
        held_all_until=held_all_until,
        saves_in_flight=[x.describe() for x in d.live_saves],
        trash_entries=len(trash),
        unreadable=unreadable,
        chunks_blocked=len(blocked),
        bytes_blocked=_size(blocked),
        temp_files=len(t.doomed),
        temp_bytes=_size(t.doomed),
        temp_held=len(t.held),
        temp_bytes_held=_size(t.held),
        temp_held_until=t.held_until,
        skew=skew_s,
        planned_at=now,
        chunk_keys=frozenset(k for c in doomed if (k := layout.chunk_digest(c.key)) is not None),
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
    """Unreferenced chunks this run kept (younger than the grace, or possibly needed by a
    save in flight), and their bytes; split below, with when a gc frees them."""
    bytes_held: int = 0
    held_by_saves: int = 0
    bytes_held_by_saves: int = 0
    held_by_grace: int = 0
    bytes_held_by_grace: int = 0
    held_until: float | None = None
    """When a gc frees the first chunk the grace period held in this run (Unix seconds)."""
    held_all_until: float | None = None
    """When a gc frees the last of them."""
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
    unreadable: dict[str, str] = field(default_factory=dict)
    """Checkpoints whose manifest could not be read, with the error: this run deleted no
    chunk (it cannot know which ones they need); it did the rest."""
    chunks_blocked: int = 0
    """Chunks no readable manifest references that this run would have deleted, kept
    because of ``unreadable`` (and their bytes)."""
    bytes_blocked: int = 0
    temp_deleted: int = 0
    """Stale temporary files (``.tmp-*``, left by puts that never finished) deleted, and
    their bytes — first, before the gc lock is taken: on a full disk this makes room."""
    temp_bytes_deleted: int = 0
    temp_held: int = 0
    """Temporary files kept: younger than max(grace, clock skew), or of a save in flight."""
    temp_bytes_held: int = 0
    temp_held_until: float | None = None
    chunks_deferred: int = 0
    """Deletable chunks left because the storage was too full to publish the whole list
    (docs/gc.md, "A full disk"); 0 once later passes took them."""
    passes: int = 0
    """gc runs (lock, observation, published list, deletes) this call made: more than one
    when a full storage let it publish only part of the list at first."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["dropped"] = list(self.dropped)
        d["skipped"] = dict(self.skipped)
        d["new_checkpoints"] = list(self.new_checkpoints)
        d["unreadable"] = dict(self.unreadable)
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

    Order (docs/format.md): delete stale temporary files (no lock needed: G8) → lock →
    re-validate → drop manifests into trash → list chunks → read leases → read manifests and
    trash → decide → publish the chunk list → delete chunks → purge trash and dead leases →
    done. An unreadable manifest is reported (``report.unreadable``) and then no chunk is
    deleted, the rest is done. A storage too full for the lock record or the list fails with
    a :class:`~ckptstore.errors.StorageFullError` that says what to do; one with room for
    only part of the list deletes that part and then runs again for the rest (G9). An error
    part-way leaves a valid store: nothing is deleted before the list is published, and
    only unreferenced chunks are ever in it.

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
    report = GcReport(url=repo.url, dropped=[], plan=plan)
    live = _fresh(repo)
    _clean_temp(live.backend, plan.grace, plan.skew, report)
    lock = _acquire(live.backend, report, wait=wait, ttl=ttl, skew=plan.skew)
    return _run(repo, live, plan, lock, report, progress, t0, wait=wait, ttl=ttl)


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
    report = GcReport(url=repo.url, dropped=[])
    _clean_temp(live.backend, grace_s, leases.skew_of(live.backend, skew), report)
    lock = _acquire(live.backend, report, wait=wait, ttl=ttl, skew=skew)
    try:
        made = _plan(live, retention, grace_s, lock.skew)
    except BaseException:
        lock.release()
        raise
    report.plan = made
    return _run(repo, live, made, lock, report, progress, t0, wait=wait, ttl=ttl)


def _clean_temp(backend: Backend, grace: float, skew: float, report: GcReport) -> None:
    """Delete stale temporary files (docs/format.md G8). Needs no lock and no published
    list: nothing refers to a temporary file. Listed before the leases are read, so that
    the lease of every save whose put left a listed file is seen (as chunks in G3)."""
    if not backend.capabilities.temp_files:
        return
    temps = backend.list_temp("")
    if not temps:
        return
    lease_infos = leases.read_leases(backend)
    t = _decide_temp(temps, lease_infos, now=time.time(), grace=grace, skew=skew)
    backend.map(lambda o: backend.delete(o.key), t.doomed)
    report.temp_deleted += len(t.doomed)
    report.temp_bytes_deleted += _size(t.doomed)
    report.temp_held = len(t.held)
    report.temp_bytes_held = _size(t.held)
    report.temp_held_until = t.held_until


def _full_advice(report: GcReport, what: str, exc: BaseException) -> str:
    """The message of a gc that the full storage stopped: what it did, what to do."""
    done = (
        f"it deleted {report.temp_deleted} stale temporary file(s) "
        f"({report.temp_bytes_deleted} bytes) and {report.chunks_deleted} chunk(s)"
    )
    young = ""
    if report.temp_held:
        at = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.temp_held_until))
            if report.temp_held_until is not None
            else "once the saves in flight have ended"
        )
        young = (
            f"; {report.temp_held} more temporary file(s) ({report.temp_bytes_held} bytes) "
            f"are too young to be told from a put in progress and go from {at}: running gc "
            "again then may be enough"
        )
    return (
        f"storage full: gc could not {what} ({exc}); {done}{young}. gc must write that "
        'before it deletes any chunk (docs/gc.md, "A full disk"). Free a few KiB on the '
        "storage (on a local disk, any file outside the store; on an object store, raise the "
        "quota) and run `ckptstore gc --grace 0s` again: its first deletes make room for "
        "the rest"
    )


def _acquire(
    backend: Backend,
    report: GcReport,
    *,
    wait: float,
    ttl: float | None,
    skew: float | None,
) -> leases.Lease:
    """The gc lock; on a full storage, an error that says what to do."""
    try:
        return leases.acquire_gc(backend, wait=wait, ttl=ttl, skew=skew)
    except StorageFullError as exc:
        raise StorageFullError(
            _full_advice(report, "write its lock record (leases/gc-<id>.json)", exc)
        ) from exc


class _Pass:
    """One gc run inside :func:`_run`: whether it published a chunk list yet."""

    published = False


_MAX_PASSES = 8


def _run(
    repo: Repository,
    live: Repository,
    plan: GcPlan,
    lock: leases.Lease,
    report: GcReport,
    progress: Progress | None,
    t0: float,
    *,
    wait: float = 0.0,
    ttl: float | None = None,
) -> GcReport:
    """Execute ``plan`` holding ``lock``; releases or finishes the lock. ``live`` observes
    the store (its cache filled under the lock); drops go through ``repo`` so that the
    caller's instance forgets the dropped manifests.

    Normally one pass. When the storage is too full to publish the whole chunk list (or to
    copy a dropped manifest to the trash), the pass publishes and deletes what fits —
    largest chunks first — and ends; then, since it freed space, another full gc run
    (new lock record, new observation, new list) takes the rest, within the same plan."""
    bound: set[bytes] = set(plan.chunk_keys)
    deleted: set[bytes] = set()
    left: set[bytes] = set()
    drops: list[str] | None = None
    while True:
        report.passes += 1
        this = _Pass()
        deleted_before = report.chunks_deleted
        try:
            if drops is None:
                # which planned drops still stand (an unreadable manifest is reported, and
                # then no chunk goes: we could not know what it needs), then drop them
                drops = _revalidate(live, plan, report)
            else:
                drops = _revalidate(live, plan, report, only=set(drops))
            drops = _drop(repo, lock, drops, report, progress)
            left = _sweep(
                live, lock, report, plan, bound, this, progress, deleted, first=report.passes == 1
            )
        except BaseException:
            if this.published:  # saves must keep seeing the plan: mark it finished
                try:
                    lock.update(state="done", finished=time.time())
                except Exception as exc:  # noqa: BLE001 - the record expires, which says the same
                    log.warning("gc could not mark its record done: %s", exc)
                lock.stop()
            else:
                lock.release()
                _delete_quietly(live.backend, layout.gc_plan_key(lock.id))
            raise
        finally:
            report.seconds = time.monotonic() - t0
        _finish(live, lock, this.published)
        freed = report.chunks_deleted > deleted_before
        if not (left or drops) or not freed or report.passes >= _MAX_PASSES:
            break
        # what is left of the plan: the chunks this pass had no room to list, and those of
        # the checkpoints it had no room to drop
        bound = set(plan.chunk_keys) - deleted
        # the room this pass made lets the next publish the rest: a new gc run
        try:
            lock = _acquire(live.backend, report, wait=wait, ttl=ttl, skew=plan.skew)
        except CkptStoreError as exc:
            log.warning("gc could not start another pass for what was left: %s", exc)
            break
    report.chunks_deferred = len(left)
    report.chunks_skipped = len(set(plan.chunk_keys) - deleted - left)
    report.seconds = time.monotonic() - t0
    return report


def _delete_quietly(backend: Backend, key: str) -> None:
    try:
        backend.delete(key)
    except CkptStoreError as exc:
        log.warning("gc could not delete %s: %s", key, exc)


def _drop(
    repo: Repository,
    lock: leases.Lease,
    names: list[str],
    report: GcReport,
    progress: Progress | None,
) -> list[str]:
    """Drop ``names`` into the trash; returns those a full storage left for a later pass
    (their manifest could not be copied to ``trash/``; they stay checkpoints)."""
    if names:
        try:
            lock.update(dropped=names)  # informative
        except StorageFullError as exc:
            log.warning("gc could not record what it drops: %s", exc)
    deferred: list[str] = []
    for i, name in enumerate(names):
        if deferred:
            deferred.append(name)
            continue
        lock.check("drop checkpoints")
        try:
            _, size = repo.trash(name)
        except CheckpointNotFoundError:  # only a writer ignoring the lock does this
            report.skipped[name] = "gone: removed while this gc ran"
            continue
        except CheckpointBusyError as exc:  # G10: an overwrite of it is in flight
            report.skipped[name] = f"busy: {exc}"
            continue
        except StorageFullError:
            deferred.append(name)
            continue
        report.skipped.pop(name, None)
        report.dropped.append(name)
        report.bytes_deleted += size
        if progress:
            progress("drop", i + 1, len(names))
    for name in deferred:
        report.skipped[name] = (
            "storage full: its manifest could not be copied to trash/, so it was not dropped; "
            "the next gc (or pass) drops it once chunks were freed"
        )
    return deferred


def _revalidate(
    live: Repository, plan: GcPlan, report: GcReport, only: set[str] | None = None
) -> list[str]:
    """Under the gc lock: the planned drops (of ``only``, on a later pass) that still
    stand. Fills ``report.skipped``, ``report.new_checkpoints`` and ``report.unreadable``."""
    current, bad = live.scan()
    report.unreadable.update(_errors(bad))
    reasons = Retention.from_dict(plan.retention).reasons(current, strict=False)
    by_name = {m.name: m for m in current}
    if only is None:
        known = {(c.name, c.created) for c in plan.checkpoints}
        report.new_checkpoints = [m.name for m in current if (m.name, m.created) not in known]
    to_drop = []
    for c in plan.checkpoints:
        if c.keep or (only is not None and c.name not in only):
            continue
        m = by_name.get(c.name)
        if m is None:
            if c.name in bad:
                report.skipped[c.name] = "unreadable now: its manifest cannot be read"
            else:
                report.skipped[c.name] = "gone: removed since the plan"
        elif m.created != c.created:
            report.skipped[c.name] = "replaced: removed and saved again since the plan"
        elif reasons[c.name]:
            why = ", ".join(reasons[c.name])
            report.skipped[c.name] = f"now kept ({why}): the checkpoints changed since the plan"
        else:
            to_drop.append(c.name)
    return to_drop


def _publish_sizes(n: int) -> list[int]:
    """How many chunks to try to publish, largest list first: on a full storage a shorter
    list (of the largest chunks) may fit where the whole one does not."""
    return sorted({min(n, k) for k in (n, _BATCH, 16, 1)}, reverse=True)


def _publish(backend: Backend, lock: leases.Lease, doomed: list[ObjectInfo]) -> None:
    """G5: the plan object, then the record naming it. On failure neither names a chunk
    list (a plan object put is atomic; a record update that failed is undone in memory and
    the plan object deleted), so nothing may be deleted yet."""
    key = layout.gc_plan_key(lock.id)
    keys = [layout.chunk_digest(c.key) for c in doomed]
    backend.put(key, leases.encode_plan(k for k in keys if k))
    try:
        lock.update(
            state="planned", plan={"key": key, "chunks": len(doomed), "bytes": _size(doomed)}
        )
    except BaseException:
        _delete_quietly(backend, key)
        raise


def _sweep(
    repo: Repository,
    lock: leases.Lease,
    report: GcReport,
    plan: GcPlan,
    bound: set[bytes],
    this: _Pass,
    progress: Progress | None,
    deleted: set[bytes],
    *,
    first: bool = True,
) -> set[bytes]:
    """Steps 2-5 of :func:`execute`, deleting only chunks in ``bound`` (the plan's, less
    those earlier passes deleted; their keys are added to ``deleted``). Returns the chunks a
    full storage made it leave for another pass."""
    backend = repo.backend
    skew_s = lock.skew
    # 2. observe, in this order: chunks, leases, manifests, trash
    chunks, lease_infos, manifests, unreadable = _list_state(repo)
    trash = repo.trash_entries()
    now = time.time()
    d = _decide(chunks, lease_infos, manifests, trash, now=now, grace=plan.grace, skew=skew_s)
    # the plan bounds what goes: never a chunk it does not name
    doomed = [c for c in d.doomed if layout.chunk_digest(c.key) in bound]
    report.unreadable.update(unreadable)
    if report.unreadable:  # their chunks are unknown: none may go (docs/gc.md)
        report.chunks_blocked = len(d.doomed)
        report.bytes_blocked = _size(d.doomed)
        doomed = []
    elif first:
        report.chunks_unplanned = len(d.doomed) - len(doomed)
    report.chunks_held = len(d.held_by_grace) + len(d.held_by_saves)
    report.bytes_held = _size(d.held_by_grace) + _size(d.held_by_saves)
    report.held_by_saves = len(d.held_by_saves)
    report.bytes_held_by_saves = _size(d.held_by_saves)
    report.held_by_grace = len(d.held_by_grace)
    report.bytes_held_by_grace = _size(d.held_by_grace)
    report.held_until, report.held_all_until = d.held_until()
    report.saves_in_flight = len(d.live_saves)
    report.trash_kept = len(d.keep_trash)
    # 3. publish the list, then delete exactly that (largest first: on a full storage
    # perhaps only a part of the list can be published, and it should free the most)
    left: set[bytes] = set()
    if doomed:
        doomed.sort(key=lambda c: (-c.size, c.key))
        lock.check("publish its plan")
        error: StorageFullError | None = None
        for n in _publish_sizes(len(doomed)):
            try:
                _publish(backend, lock, doomed[:n])
            except StorageFullError as exc:
                error = exc
                continue
            left = {k for c in doomed[n:] if (k := layout.chunk_digest(c.key)) is not None}
            doomed = doomed[:n]
            break
        else:
            assert error is not None
            raise StorageFullError(
                _full_advice(report, "publish the list of chunks it deletes", error)
            ) from error
        this.published = report.plan_published = True  # from here on saves see what we delete
        total = report.chunks_deleted + len(doomed)
        for start in range(0, len(doomed), _BATCH):
            lock.check("delete chunks")
            batch = doomed[start : start + _BATCH]
            backend.map(lambda c: backend.delete(c.key), batch)
            deleted.update(k for c in batch if (k := layout.chunk_digest(c.key)) is not None)
            report.chunks_deleted += len(batch)
            report.bytes_deleted += _size(batch)
            if progress:
                progress("delete", report.chunks_deleted, total)
    # 4. the trash entries no running save needs, and dead leases / old gc records
    lock.check("purge the trash")
    backend.map(lambda t: backend.delete(t.key), d.purge_trash)
    report.trash_purged += len(d.purge_trash)
    report.leases_cleaned += _clean_leases(repo, lease_infos, lock, now, skew_s)
    # 5. the catalog matches the checkpoints again (docs/format.md C4)
    try:
        removed, written = repo.tidy_catalog()
    except StorageFullError as exc:  # an entry is derived data: the next gc writes it
        log.warning("gc could not write catalog entries: %s", exc)
    else:
        report.catalog_removed += removed
        report.catalog_written += written
    return left


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
