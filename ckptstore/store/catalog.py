"""The catalog: one empty object per committed checkpoint whose *key* carries what ``ls``
shows, so listing a store of 1,000 checkpoints is two listings and no reads.

``catalog/<name>/<created µs, 16 digits>.s<step>.t<tensors>.o<objects>.l<logical>.b<stored>.
w<new>.c<chunks>.n<new chunks>.m<manifest bytes>.d<save ms>`` (docs/format.md, "Catalog"),
then ``.x<delta bytes>.k<max chain>`` for a delta save only (a reader that predates delta
does not parse such a key and reads the manifest instead, as for a missing entry):
one folder per name, so a writer finds its own entry with a listing of one key. The manifest
stays the commit and the truth: a catalog entry counts only while its manifest is listed,
and a listed manifest without an entry is read instead (a crash between commit and entry,
or a store written before the catalog existed). No torch here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptstore.store import layout
from ckptstore.store.manifest import Manifest

_ENTRY = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})/(\d{16})\."
    r"s(n|\d+)\.t(\d+)\.o(\d+)\.l(\d+)\.b(\d+)\.w(\d+)\.c(\d+)\.n(\d+)\.m(\d+)\.d(\d+)"
    r"(?:\.x(\d+)\.k(\d+))?$"
)


_Record = TypeVar("_Record", bound="CheckpointSummary")


@dataclass
class CheckpointSummary:
    """The figures every checkpoint has: one line of ``ls``, and the base of ``SaveInfo``,
    ``du``'s ``CheckpointUsage`` and ``ImportInfo`` — a field added here shows everywhere
    (docs/api.md "CheckpointSummary" is checked against these fields by a test)."""

    name: str
    step: int | None
    created: float
    """Commit time, Unix seconds (whole microseconds, as the catalog carries it)."""
    logical_bytes: int
    """Bytes of the tensors as held in memory (non-tensor values not counted)."""
    stored_bytes: int
    """Bytes the checkpoint references after codecs: chunks (shared ones included), inline
    data and manifest."""
    new_bytes: int
    """Bytes its save wrote: new chunks, inline data, manifest."""
    tensors: int
    objects: int
    """Non-tensor values."""
    seconds: float
    """Duration of the save."""
    chunks: int = 0
    """Chunk references of the checkpoint (each use counted)."""
    new_chunks: int = 0
    """Chunk objects its save wrote."""
    manifest_bytes: int = 0
    delta_bytes: int = 0
    """Stored bytes of its chunks that are deltas (each use counted)."""
    max_chain: int = 0
    """Longest delta chain of its chunks."""

    @classmethod
    def of(cls, m: Manifest) -> CheckpointSummary:
        """The summary of a manifest whose ``manifest_bytes`` is known."""
        return cls(
            name=m.name,
            step=m.step,
            created=created_us(m.created) / 1e6,  # as a catalog entry carries it
            logical_bytes=m.logical_bytes,
            stored_bytes=m.stored_bytes,
            new_bytes=m.new_bytes,
            tensors=len(m.tensors),
            objects=len(m.objects),
            seconds=m.seconds,
            chunks=m.chunk_count,
            new_chunks=m.new_chunk_count,
            manifest_bytes=m.manifest_bytes,
            delta_bytes=m.delta_chunk_bytes,
            max_chain=m.max_chain,
        )

    @classmethod
    def from_summary(cls: type[_Record], s: CheckpointSummary, **extra: Any) -> _Record:
        """A record of this class with the figures of ``s`` and the ``extra`` fields of
        this class (a subclass adds its own: ``SaveInfo.from_summary(s, retention=f)``)."""
        figures = {f.name: getattr(s, f.name) for f in dataclasses.fields(CheckpointSummary)}
        return cls(**{**figures, **extra})

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0

    @property
    def order(self) -> tuple[float, int, str]:
        """Sort key of checkpoints, oldest first (docs/format.md, "Checkpoint names and
        order"): created, then step (None as −1), then name."""
        return (self.created, self.step if self.step is not None else -1, self.name)

    def to_dict(self) -> dict[str, Any]:
        """Every field (a subclass's too) but those marked ``metadata={"data": False}``
        (live objects such as a future), and the ratio."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("data", True)
        }
        return {**out, "ratio": round(self.ratio, 4)}


def created_us(created: float) -> int:
    """Commit time in whole microseconds, as the entry key carries it."""
    return max(0, int(round(created * 1e6)))


def entry_key(s: CheckpointSummary) -> str:
    """The catalog key of a checkpoint's summary."""
    layout.check_name(s.name)
    step = "n" if s.step is None else str(int(s.step))
    fields = (
        f"s{step}.t{s.tensors}.o{s.objects}.l{s.logical_bytes}.b{s.stored_bytes}"
        f".w{s.new_bytes}.c{s.chunks}.n{s.new_chunks}.m{s.manifest_bytes}"
        f".d{max(0, int(round(s.seconds * 1000)))}"
    )
    if s.delta_bytes or s.max_chain:  # only delta saves: other keys stay as v0.1 wrote them
        fields += f".x{s.delta_bytes}.k{s.max_chain}"
    return f"{entry_prefix(s.name)}{created_us(s.created):016d}.{fields}"


def entry_prefix(name: str) -> str:
    """The folder of checkpoint ``name``'s catalog entry."""
    return f"{layout.CATALOG}/{layout.check_name(name)}/"


def parse_entry_key(key: str) -> CheckpointSummary | None:
    """The summary a catalog key carries, or None if ``key`` is not a catalog entry."""
    if not key.startswith(layout.CATALOG + "/"):
        return None
    m = _ENTRY.match(key[len(layout.CATALOG) + 1 :])
    if m is None:
        return None
    name, us, step, tensors, objects, logical, stored, new, chunks, new_chunks, mb, ms, dx, dk = (
        m.groups()
    )
    return CheckpointSummary(
        name=name,
        step=None if step == "n" else int(step),
        created=int(us) / 1e6,
        logical_bytes=int(logical),
        stored_bytes=int(stored),
        new_bytes=int(new),
        tensors=int(tensors),
        objects=int(objects),
        seconds=int(ms) / 1000,
        chunks=int(chunks),
        new_chunks=int(new_chunks),
        manifest_bytes=int(mb),
        delta_bytes=int(dx or 0),
        max_chain=int(dk or 0),
    )


def entries_by_name(keys: list[str]) -> dict[str, tuple[str, CheckpointSummary]]:
    """Catalog keys → name → (key, summary); of several entries for one name (left by a
    drop that stopped half-way), the newest wins."""
    out: dict[str, tuple[str, CheckpointSummary]] = {}
    for key in keys:
        s = parse_entry_key(key)
        if s is None:
            continue
        seen = out.get(s.name)
        if seen is None or s.order > seen[1].order:
            out[s.name] = (key, s)
    return out
