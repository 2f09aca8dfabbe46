"""Space and change reports: ``du`` (what the store holds, what deleting a checkpoint would
free) and ``diff`` (what changed between two checkpoints). Read-only; no torch here."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptstore.store import layout
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.manifest import Blob, Manifest
from ckptstore.store.repository import Repository


# -- du -----------------------------------------------------------------------------------------
@dataclass
class CheckpointUsage(CheckpointSummary):
    """A checkpoint's figures (:class:`CheckpointSummary`) and what only it holds."""

    unique_bytes: int = 0
    """Bytes only it references: its chunks no other checkpoint names, plus its manifest —
    what dropping it (and a gc after) would free."""


@dataclass
class DuReport:
    url: str
    checkpoints: list[CheckpointUsage]
    logical_bytes: int = 0
    """Sum over checkpoints of their tensor bytes in memory."""
    referenced_bytes: int = 0
    """Sum over checkpoints of their stored bytes: what they would take without dedup."""
    unique_bytes: int = 0
    """Distinct chunk bytes the checkpoints reference, plus their manifests: what the
    checkpoints occupy."""
    unique_chunks: int = 0
    physical_bytes: int = 0
    """Every object under chunks/, checkpoints/, trash/ and leases/ (from one listing each)."""
    chunk_objects: int = 0
    garbage_chunks: int = 0
    """Chunk objects no checkpoint references (a gc deletes them once nothing holds them
    back), and their bytes."""
    garbage_bytes: int = 0
    trash_entries: int = 0
    trash_bytes: int = 0
    lease_objects: int = 0
    missing_chunks: int = 0
    """Chunks a checkpoint references that are not in the listing (run verify)."""

    @property
    def dedup_factor(self) -> float:
        """referenced / unique: how much sharing chunks between checkpoints saves."""
        return self.referenced_bytes / self.unique_bytes if self.unique_bytes else 0.0

    @property
    def compression_factor(self) -> float:
        """logical / referenced: what the codecs save."""
        return self.logical_bytes / self.referenced_bytes if self.referenced_bytes else 0.0

    @property
    def total_factor(self) -> float:
        """logical / unique: both together."""
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        d["dedup_factor"] = round(self.dedup_factor, 4)
        d["compression_factor"] = round(self.compression_factor, 4)
        d["total_factor"] = round(self.total_factor, 4)
        return d


def du(repo: Repository) -> DuReport:
    manifests = repo.manifests()
    listing = repo.backend.list_info(layout.CHUNKS)
    sizes = {k: o.size for o in listing if (k := layout.chunk_digest(o.key)) is not None}
    uses: Counter[bytes] = Counter()
    stored_of: dict[bytes, int] = {}
    per_keys = []
    for m in manifests:
        sizes_here = m.chunk_sizes()
        for k in m.chunk_keys() - sizes_here.keys():  # delta bases a load of it reads
            sizes_here[k] = sizes.get(k, 0)
        per_keys.append(sizes_here.keys())
        uses.update(sizes_here.keys())
        for k, n in sizes_here.items():
            stored_of.setdefault(k, n)
    report = DuReport(repo.url, [])
    for m, keys in zip(manifests, per_keys, strict=True):
        only = sum(sizes.get(k, stored_of[k]) for k in keys if uses[k] == 1)
        report.checkpoints.append(
            CheckpointUsage.from_summary(
                CheckpointSummary.of(m), unique_bytes=only + m.manifest_bytes
            )
        )
    report.logical_bytes = sum(c.logical_bytes for c in report.checkpoints)
    report.referenced_bytes = sum(c.stored_bytes for c in report.checkpoints)
    report.unique_chunks = len(uses)
    report.unique_bytes = sum(sizes.get(k, stored_of[k]) for k in uses) + sum(
        m.manifest_bytes for m in manifests
    )
    report.missing_chunks = sum(1 for k in uses if k not in sizes)
    report.chunk_objects = len(listing)
    garbage = [o for o in listing if layout.chunk_digest(o.key) not in uses]
    report.garbage_chunks = len(garbage)
    report.garbage_bytes = sum(o.size for o in garbage)
    trash = repo.backend.list_info(layout.TRASH)
    report.trash_entries = sum(1 for o in trash if layout.parse_trash_key(o.key))
    report.trash_bytes = sum(o.size for o in trash)
    lease_objs = repo.backend.list_info(layout.LEASES)
    report.lease_objects = sum(1 for o in lease_objs if layout.parse_lease_key(o.key))
    manifests_listing = repo.backend.list_info(layout.CHECKPOINTS)
    report.physical_bytes = (
        sum(o.size for o in listing)
        + sum(o.size for o in manifests_listing)
        + report.trash_bytes
        + sum(o.size for o in lease_objs)
    )
    return report


# -- diff ---------------------------------------------------------------------------------------
@dataclass
class ItemDiff:
    """One tensor (or non-tensor value) present in both checkpoints that differs."""

    fqn: str
    kind: str  # "tensor" or "object"
    chunks: int
    """Chunks (or inline pieces) of it in B."""
    chunks_changed: int
    """Of those, how many A does not have."""
    new_bytes: int
    """Stored bytes of B's pieces of it that A does not have."""
    detail: str = ""
    """What else changed: dtype, shape, codec."""


@dataclass
class DiffReport:
    url: str
    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[ItemDiff] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    shared_bytes: int = 0
    """Stored bytes of B's distinct chunks that A references too."""
    new_bytes: int = 0
    """Stored bytes of B that A does not have: distinct chunks A lacks, plus the inline data
    of B's added and changed items."""
    b_stored_bytes: int = 0
    """B's distinct chunk bytes plus its manifest."""
    b_manifest_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "from": self.a,
            "to": self.b,
            "added": self.added,
            "removed": self.removed,
            "changed": [asdict(c) for c in self.changed],
            "unchanged": self.unchanged,
            "counts": {
                "added": len(self.added),
                "removed": len(self.removed),
                "changed": len(self.changed),
                "unchanged": len(self.unchanged),
            },
            "shared_bytes": self.shared_bytes,
            "new_bytes": self.new_bytes,
            "b_stored_bytes": self.b_stored_bytes,
            "b_manifest_bytes": self.b_manifest_bytes,
        }


def _pieces(blobs: list[Blob]) -> list[tuple[Any, int]]:
    """Identity and stored size of each piece of an item: chunk keys with their rows, inline
    frames by content."""
    out: list[tuple[Any, int]] = []
    for b in blobs:
        if b.inline is not None:
            out.append((("inline", b.inline), len(b.inline)))
        else:
            out += [((c.key, c.row_start, c.row_stop), c.stored) for c in b.chunks]
    return out


def _items(m: Manifest) -> dict[str, tuple[str, str, list[Blob]]]:
    """fqn → (kind, description of dtype/shape/boxes, blobs)."""
    out: dict[str, tuple[str, str, list[Blob]]] = {}
    for fqn, t in m.tensors.items():
        boxes = [(tuple(s.offsets), tuple(s.sizes)) for s in t.shards]
        out[fqn] = ("tensor", f"{t.dtype} {list(t.shape)} {boxes}", [s.blob for s in t.shards])
    for fqn, b in m.objects.items():
        out[fqn] = ("object", "", [b])
    return out


def diff(repo: Repository, a: str, b: str) -> DiffReport:
    ma, mb = repo.manifest(a), repo.manifest(b)
    ia, ib = _items(ma), _items(mb)
    keys_a = ma.chunk_keys()
    report = DiffReport(repo.url, a, b, b_manifest_bytes=mb.manifest_bytes)
    report.added = [f for f in ib if f not in ia]
    report.removed = [f for f in ia if f not in ib]
    for fqn, (kind, desc, blobs) in ib.items():
        if fqn not in ia:
            report.new_bytes += sum(len(x.inline) for x in blobs if x.inline is not None)
            continue
        kind_a, desc_a, blobs_a = ia[fqn]
        pa, pb = _pieces(blobs_a), _pieces(blobs)
        codec_same = [x.codec for x in blobs_a] == [x.codec for x in blobs]
        if pa == pb and desc_a == desc and kind_a == kind and codec_same:
            report.unchanged.append(fqn)
            continue
        have = {p for p, _ in pa}
        fresh = [(p, n) for p, n in pb if p not in have]
        # a chunk A has under another row range still costs nothing new
        fresh_bytes = sum(n for p, n in fresh if not (isinstance(p[0], bytes) and p[0] in keys_a))
        notes = []
        if kind_a != kind:
            notes.append(f"{kind_a} → {kind}")
        elif desc_a != desc:
            notes.append(f"{desc_a} → {desc}")
        if not codec_same:
            notes.append("codec changed")
        report.changed.append(
            ItemDiff(fqn, kind, len(pb), len(fresh), fresh_bytes, "; ".join(notes))
        )
        report.new_bytes += sum(n for p, n in fresh if p[0] == "inline")
    sizes = mb.chunk_sizes()
    report.shared_bytes = sum(n for k, n in sizes.items() if k in keys_a)
    report.new_bytes += sum(n for k, n in sizes.items() if k not in keys_a)
    report.b_stored_bytes = sum(sizes.values()) + mb.manifest_bytes
    return report
