"""Running a gc plan: :func:`execute` runs a plan made by :func:`~ckptstore.store.gc_plan.plan`,
:func:`collect` plans and runs under one hold of the gc lock (as restic's prune does).

:func:`execute` takes the store's gc lock, re-validates the plan against the store as it is
now, drops the planned checkpoints that are still there (their manifests go to ``trash/``),
then observes the store in a fixed order and deletes the planned chunks that no kept
checkpoint, no trash entry still needed and no running save may reference — after
publishing that list, so a save about to commit can check it. It never drops a checkpoint or
deletes a chunk the plan does not name; what changed since the plan only makes it do less
(docs/gc.md, "Plan, then execute"). Then it purges the trash no save needs, dead leases and
old gc records, and tidies the catalog. :func:`collect` is for callers that show no plan
(retention after a save).

The rules and why they are safe are in docs/format.md ("Leases and garbage collection");
docs/gc.md explains the commands. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ckptstore.backend import Backend
from ckptstore.backend.base import ObjectInfo
from ckptstore.errors import (
    CheckpointBusyError,
    CheckpointNotFoundError,
    CkptStoreError,
    ObjectNotFoundError,
    StorageFullError,
)
from ckptstore.store import layout, leases
from ckptstore.store.gc_plan import GcPlan, make_plan
from ckptstore.store.gc_rules import (
    Holds,
    decide,
    decide_temp,
    error_texts,
    fresh,
    list_state,
    size_of,
)
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention, grace_of

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase is "drop" or "delete"."""


# -- the report ---------------------------------------------------------------------------------
@dataclass
class GcReport:
    """What a gc run did."""

    url: str
    dropped: list[str]
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    """Chunk bytes deleted plus the bytes of the dropped manifests."""
    held: Holds = field(default_factory=Holds)
    """Unreferenced chunks this run kept (younger than the grace, or possibly needed by a
    save in flight), why, and when a gc frees them."""
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
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "held":
                d.update(self.held.to_dict())
            else:
                d[f.name] = getattr(self, f.name)
        d["dropped"] = list(self.dropped)
        d["skipped"] = dict(self.skipped)
        d["new_checkpoints"] = list(self.new_checkpoints)
        d["unreadable"] = dict(self.unreadable)
        d["plan"] = self.plan.to_dict() if self.plan is not None else None
        return d


# -- execute ----------------------------------------------------------------------------------
_BATCH = 256


def execute(
    repo: Repository,
    plan: GcPlan,
    *,
    wait: float = 0.0,
    ttl: float | None = None,
    progress: Progress | None = None,
) -> GcReport:
    """Run ``plan`` (made by :func:`~ckptstore.store.gc_plan.plan`, typically shown to the
    user first) under the store's gc lock (:class:`~ckptstore.errors.GcBusyError` if another
    gc holds it for ``wait`` seconds). ``report.plan`` is ``plan``.

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
    only unreferenced chunks are ever in it."""
    if not isinstance(plan, GcPlan):
        raise TypeError(
            f"execute() runs a GcPlan (from gc_plan.plan), not {type(plan).__name__}: "
            "for a Retention, plan it first, or call collect()"
        )
    if plan.url != repo.url:
        raise ValueError(f"this gc plan is for {plan.url}, not {repo.url}")
    t0 = time.monotonic()
    report = GcReport(url=repo.url, dropped=[], plan=plan)
    live = fresh(repo)
    _clean_temp(live.backend, plan.grace, plan.skew, report)
    _clean_upload_markers(live.backend, plan.grace)
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
    live = fresh(repo)
    report = GcReport(url=repo.url, dropped=[])
    _clean_temp(live.backend, grace_s, leases.skew_of(live.backend, skew), report)
    _clean_upload_markers(live.backend, grace_s)
    lock = _acquire(live.backend, report, wait=wait, ttl=ttl, skew=skew)
    try:
        made = make_plan(live, retention, grace_s, lock.skew)
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
    t = decide_temp(temps, lease_infos, now=time.time(), grace=grace, skew=skew)
    backend.map(lambda o: backend.delete(o.key), t.doomed)
    report.temp_deleted += len(t.doomed)
    report.temp_bytes_deleted += size_of(t.doomed)
    report.temp_held = len(t.held)
    report.temp_bytes_held = size_of(t.held)
    report.temp_held_until = t.held_until


MARKER_AGE = 86400.0
"""Mirror-upload markers (docs/format.md M6) older than this (and than the grace) are left
by uploads that crashed: no upload in flight waits that long for them by default."""


def _clean_upload_markers(backend: Backend, grace: float) -> None:
    """Delete mirror-upload markers (``uploads/``) left by crashed uploads (M6). Nothing a
    gc protects refers to them; an upload whose marker went would end without a commit."""
    now = time.time()
    oldest = now - max(grace, MARKER_AGE)
    try:
        stale = [
            i.key
            for i in backend.list_info(layout.UPLOADS + "/")
            if i.mtime is not None and i.mtime < oldest
        ]
        backend.map(backend.delete, stale)
    except CkptStoreError as exc:  # only tidiness is lost
        log.info("stale upload markers not removed from %s: %s", backend.url, exc)
        return
    if stale:
        log.info("removed %d stale upload marker(s) from %s", len(stale), backend.url)


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
    report.unreadable.update(error_texts(bad))
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
            state="planned", plan={"key": key, "chunks": len(doomed), "bytes": size_of(doomed)}
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
    chunks, lease_infos, manifests, unreadable = list_state(repo)
    trash = repo.trash_entries()
    now = time.time()
    d = decide(chunks, lease_infos, manifests, trash, now=now, grace=plan.grace, skew=skew_s)
    # the plan bounds what goes: never a chunk it does not name
    doomed = [c for c in d.doomed if layout.chunk_digest(c.key) in bound]
    report.unreadable.update(unreadable)
    if report.unreadable:  # their chunks are unknown: none may go (docs/gc.md)
        report.chunks_blocked = len(d.doomed)
        report.bytes_blocked = size_of(d.doomed)
        doomed = []
    elif first:
        report.chunks_unplanned = len(d.doomed) - len(doomed)
    report.held = d.holds()
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
            report.bytes_deleted += size_of(batch)
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
