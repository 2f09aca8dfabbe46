"""The gc plan: what a gc run with a retention policy would do now (as restic's prune plans).

:func:`plan` is read-only: which checkpoints the policy keeps and drops, and which chunk
objects a gc run now would delete or hold back. ``gc --dry-run`` prints it and stops;
:func:`~ckptstore.store.gc_run.execute` runs it. No torch here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ckptstore.store import layout, leases
from ckptstore.store.gc_rules import Holds, decide, decide_temp, fresh, list_state, size_of
from ckptstore.store.repository import Repository, TrashEntry
from ckptstore.store.retention import Retention, grace_of


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
    :func:`~ckptstore.store.gc_run.execute` runs exactly this — or less, where the store
    changed since."""

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
    held: Holds = field(default_factory=Holds)
    """Unreferenced chunk objects a run now keeps, why, and when a gc frees them."""
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
    """The clock-skew margin the plan was made with; execute runs with it too."""
    planned_at: float = 0.0
    """When the plan was made (Unix seconds, this machine's clock)."""
    chunk_keys: frozenset[bytes] = field(default_factory=frozenset, repr=False)
    """The 16-byte keys of the ``chunks_freed`` chunk objects: execute deletes no chunk
    outside this set. (Not in :meth:`to_dict`.)"""

    @property
    def kept(self) -> list[str]:
        return [c.name for c in self.checkpoints if c.keep]

    @property
    def dropped(self) -> list[str]:
        return [c.name for c in self.checkpoints if not c.keep]

    @property
    def manifest_bytes_freed(self) -> int:
        """Of ``bytes_freed``: the dropped checkpoints' manifests."""
        return sum(c.manifest_bytes for c in self.checkpoints if not c.keep)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "held":
                d.update(self.held.to_dict())
            elif f.name != "chunk_keys":
                d[f.name] = getattr(self, f.name)
        d["retention"] = dict(self.retention)
        d["checkpoints"] = [asdict(c) for c in self.checkpoints]
        d["saves_in_flight"] = list(self.saves_in_flight)
        d["unreadable"] = dict(self.unreadable)
        d["kept"] = self.kept
        d["dropped"] = self.dropped
        return d


def plan(
    repo: Repository,
    retention: Retention | None = None,
    *,
    grace: str | float | None = None,
    skew: float | None = None,
) -> GcPlan:
    """Read-only: what a gc run with this policy would keep, drop, delete and hold back.
    Takes no lock and writes nothing; hand the result to
    :func:`~ckptstore.store.gc_run.execute` to run it."""
    return make_plan(
        fresh(repo),
        retention or Retention(),
        grace_of(repo, grace),
        leases.skew_of(repo.backend, skew),
    )


def make_plan(repo: Repository, retention: Retention, grace_s: float, skew_s: float) -> GcPlan:
    """:func:`plan` with the grace and the skew margin resolved to seconds, on ``repo`` as
    it is (:func:`~ckptstore.store.gc_run.collect` calls it holding the gc lock)."""
    temps = repo.backend.list_temp("") if repo.backend.capabilities.temp_files else []
    chunks, lease_infos, manifests, unreadable = list_state(repo)
    trash = repo.trash_entries()
    reasons = retention.reasons(manifests, unreadable=unreadable)
    kept = [m for m in manifests if reasons[m.name]]
    dropped = [m for m in manifests if not reasons[m.name]]
    now = time.time()
    # as execute() would see it: the dropped manifests in the trash since now
    as_trash = [TrashEntry(f"(dropping {m.name})", m.name, now, m) for m in dropped]
    d = decide(chunks, lease_infos, kept, [*trash, *as_trash], now=now, grace=grace_s, skew=skew_s)
    t = decide_temp(temps, lease_infos, now=now, grace=grace_s, skew=skew_s)
    sizes = {layout.chunk_digest(c.key): c.size for c in chunks}
    kept_keys = d.referenced
    doomed = [] if unreadable else d.doomed
    blocked = d.doomed if unreadable else []
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
        bytes_total=size_of(chunks),
        chunks_kept=sum(1 for k in kept_keys if k in sizes),
        bytes_kept=sum(sizes[k] for k in kept_keys if k in sizes)
        + sum(m.manifest_bytes for m in kept),
        chunks_freed=len(doomed),
        bytes_freed=size_of(doomed) + sum(m.manifest_bytes for m in dropped),
        held=d.holds(),
        saves_in_flight=[x.describe() for x in d.live_saves],
        trash_entries=len(trash),
        unreadable=unreadable,
        chunks_blocked=len(blocked),
        bytes_blocked=size_of(blocked),
        temp_files=len(t.doomed),
        temp_bytes=size_of(t.doomed),
        temp_held=len(t.held),
        temp_bytes_held=size_of(t.held),
        temp_held_until=t.held_until,
        skew=skew_s,
        planned_at=now,
        chunk_keys=frozenset(k for c in doomed if (k := layout.chunk_digest(c.key)) is not None),
    )
