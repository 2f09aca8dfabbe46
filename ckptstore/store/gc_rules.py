"""Which objects a gc may delete: the safety rules that :mod:`~ckptstore.store.gc_plan` and
:mod:`~ckptstore.store.gc_run` both apply, and the observation of the store they apply them to.

:func:`decide` says which listed chunk objects go and which are held back (docs/format.md
G3–G5), :func:`decide_temp` which stale temporary files go (G8). :class:`Holds` is the one
record of what a gc holds back, why, and when a gc frees it; :meth:`Decision.holds` fills
it, for the plan and for the report alike. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ckptstore.backend.base import ObjectInfo
from ckptstore.store import layout, leases
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository, TrashEntry


@dataclass
class Holds:
    """Unreferenced chunk objects a gc keeps for now — younger than the grace period, or
    possibly needed by a save in flight — and when a gc frees them. A :class:`GcPlan` says
    what a run now would hold back, a :class:`GcReport` what its run held back.

    In ``to_dict()`` (and so in ``ckptstore gc --json``) the fields are flat keys of the
    plan or report: ``chunks_held``, ``bytes_held``, ``held_by_saves``,
    ``bytes_held_by_saves``, ``held_by_grace``, ``bytes_held_by_grace``, ``held_until``,
    ``held_all_until``."""

    chunks: int = 0
    """Chunk objects held back, and their bytes."""
    bytes: int = 0
    by_saves: int = 0
    """Of ``chunks``: possibly needed by a save in flight (a gc after it ended frees them)."""
    bytes_by_saves: int = 0
    by_grace: int = 0
    """Of ``chunks``: younger than the grace period."""
    bytes_by_grace: int = 0
    until: float | None = None
    """When a gc frees the first chunk the grace period holds (Unix seconds): the oldest
    one's modification time + the grace. None: the grace holds none with a known age."""
    all_until: float | None = None
    """When a gc frees the last of them (the youngest one's mtime + the grace)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunks_held": self.chunks,
            "bytes_held": self.bytes,
            "held_by_saves": self.by_saves,
            "bytes_held_by_saves": self.bytes_by_saves,
            "held_by_grace": self.by_grace,
            "bytes_held_by_grace": self.bytes_by_grace,
            "held_until": self.until,
            "held_all_until": self.all_until,
        }


def size_of(objs: Iterable[ObjectInfo]) -> int:
    return sum(o.size for o in objs)


@dataclass
class Decision:
    """Which chunk objects may go, which are held back, and which trash entries a running
    save may still need."""

    doomed: list[ObjectInfo]
    held_by_grace: list[ObjectInfo]
    held_by_saves: list[ObjectInfo]
    keep_trash: list[TrashEntry]
    purge_trash: list[TrashEntry]
    live_saves: list[leases.LeaseInfo]
    referenced: set[bytes]
    grace: float = 0.0

    def holds(self) -> Holds:
        """What this decision holds back. When a gc frees it: the chunks the grace period
        holds go from the oldest one's mtime + the grace, all by the youngest one's (None:
        none with a known age); those held for saves in flight once those saves ended."""
        ages = [c.mtime for c in self.held_by_grace if c.mtime is not None]
        return Holds(
            chunks=len(self.held_by_grace) + len(self.held_by_saves),
            bytes=size_of(self.held_by_grace) + size_of(self.held_by_saves),
            by_saves=len(self.held_by_saves),
            bytes_by_saves=size_of(self.held_by_saves),
            by_grace=len(self.held_by_grace),
            bytes_by_grace=size_of(self.held_by_grace),
            until=min(ages) + self.grace if ages else None,
            all_until=max(ages) + self.grace if ages else None,
        )


@dataclass
class TempDecision:
    """Which stale temporary files go (docs/format.md, "Temporary files")."""

    doomed: list[ObjectInfo]
    held: list[ObjectInfo]
    held_until: float | None


def decide_temp(
    temps: Iterable[ObjectInfo],
    lease_infos: Iterable[leases.LeaseInfo],
    *,
    now: float,
    grace: float,
    skew: float,
) -> TempDecision:
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
    return TempDecision(doomed, held, min(until, default=None))


def decide(
    chunks: Iterable[ObjectInfo],
    lease_infos: Iterable[leases.LeaseInfo],
    manifests: Iterable[Manifest],
    trash: Iterable[TrashEntry],
    *,
    now: float,
    grace: float,
    skew: float,
) -> Decision:
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
    return Decision(doomed, by_grace, by_saves, keep_trash, purge_trash, saves, referenced, grace)


# -- observing the store --------------------------------------------------------------------
def fresh(repo: Repository) -> Repository:
    """The same store, with no manifests cached. A :class:`Repository` caches manifests by
    name, but a name can be removed and saved again by another process: gc reads what is
    there now. (Under the gc lock nobody else removes a checkpoint, so what this instance
    caches from then on stays true while the lock is held.)"""
    return Repository.open(repo.backend, settings=repo.settings)


def list_state(
    repo: Repository,
) -> tuple[list[ObjectInfo], list[leases.LeaseInfo], list[Manifest], dict[str, str]]:
    """Chunks, then leases, then manifests — the order a gc run relies on. The last item:
    the checkpoints whose manifest cannot be read, with the error (their chunks are unknown,
    so no chunk may go while there is one)."""
    chunks = repo.backend.list_info(layout.CHUNKS)
    lease_infos = leases.read_leases(repo.backend)
    manifests, bad = repo.scan()
    return chunks, lease_infos, manifests, error_texts(bad)


def error_texts(bad: Mapping[str, BaseException]) -> dict[str, str]:
    return {name: f"{type(exc).__name__}: {exc}" for name, exc in bad.items()}
