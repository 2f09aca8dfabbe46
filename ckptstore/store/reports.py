"""Read-only reports on a store: per-checkpoint summaries, per-tensor inspection, verify."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptstore.codecs.pipeline import Pipeline
from ckptstore.errors import (
    ChunkNotFoundError,
    CkptStoreError,
    CorruptChunkError,
    ManifestError,
    UnknownCodecError,
)
from ckptstore.store import layout
from ckptstore.store.blobs import BlobReader
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.chunks import content_key
from ckptstore.store.manifest import Blob, ChunkRef, Manifest
from ckptstore.store.repository import Repository


@dataclass
class TensorReport:
    """One line of ``inspect``."""

    fqn: str
    dtype: str
    shape: list[int]
    codec: str
    shards: int
    chunks: int
    logical_bytes: int
    stored_bytes: int
    shared_bytes: int
    """Stored bytes of chunks this tensor did not write itself: written by an earlier
    checkpoint, or by another tensor of the same save (tied weights). Inline data counts
    as written."""
    max_abs_error: float | None = None
    """Largest |x − x̂| a lossy codec introduced (None: stored lossless)."""
    rel_l2_error: float | None = None
    """‖x − x̂‖ / ‖x‖ over the tensor (None: stored lossless)."""
    fallback_chunks: int = 0
    """Chunks a lossy codec stored more exactly than asked (fp16 overflow/underflow patches,
    int8 chunks with inf/NaN kept lossless)."""
    delta_bytes: int = 0
    """Stored bytes of its chunks that are deltas against an earlier checkpoint's."""
    max_chain: int = 0
    """Longest delta chain of its chunks (a load reads at most this + 1 objects a chunk)."""

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


@dataclass
class InspectReport:
    checkpoint: CheckpointSummary
    tensors: list[TensorReport]
    objects: dict[str, int]
    """Object fqn → stored bytes (non-tensor values, serialized)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint.to_dict(),
            "tensors": [t.to_dict() for t in self.tensors],
            "objects": self.objects,
        }


def _codec_name(blob: Blob) -> str:
    return Pipeline.from_config(blob.codec).short()


def inspect(repo: Repository, name: str) -> InspectReport:
    m = repo.manifest(name)
    tensors = []
    for fqn, t in m.tensors.items():
        blobs = [s.blob for s in t.shards]
        stored = sum(b.stored_bytes for b in blobs)
        shared = sum(b.stored_bytes - b.new_bytes for b in blobs)
        err = t.error
        tensors.append(
            TensorReport(
                fqn=fqn,
                dtype=t.dtype,
                shape=list(t.shape),
                codec=_codec_name(blobs[0]) if blobs else "",
                shards=len(blobs),
                chunks=sum(len(b.chunks) for b in blobs),
                logical_bytes=t.logical_bytes,
                stored_bytes=stored,
                shared_bytes=shared,
                max_abs_error=None if err is None else err.max_abs,
                rel_l2_error=None if err is None else err.rel_l2,
                fallback_chunks=0 if err is None else err.fallback,
                delta_bytes=sum(c.stored for b in blobs for c in b.chunks if c.base),
                max_chain=max((len(c.base) for b in blobs for c in b.chunks), default=0),
            )
        )
    objects = {fqn: b.stored_bytes for fqn, b in m.objects.items()}
    return InspectReport(CheckpointSummary.of(m), tensors, objects)


# errors that mean the stored data is damaged; anything else (an unreachable server,
# denied access) aborts verify instead of marking every chunk as bad
DAMAGE = (CorruptChunkError, ChunkNotFoundError, ManifestError, UnknownCodecError)


@dataclass
class Problem:
    checkpoint: str
    item: str
    chunk: str
    message: str


@dataclass
class VerifyReport:
    checkpoints: list[str]
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checkpoints": self.checkpoints,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [asdict(p) for p in self.problems],
        }


def verify(
    repo: Repository,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Re-read and decode every chunk of one checkpoint (or all), checking checksums and,
    for lossless codecs, that the decoded bytes still hash to the chunk's key. Unreadable
    manifests are reported as problems too, not raised."""
    if name is not None:
        manifests = [repo.manifest(name)]
        bad: dict[str, CkptStoreError] = {}
    else:
        manifests, bad = repo.scan()
    report = VerifyReport([m.name for m in manifests] + list(bad))
    for bad_name, exc in bad.items():
        report.problems.append(Problem(bad_name, "(manifest)", "(manifest)", str(exc)))
    reader = BlobReader(repo)
    work: list[tuple[Manifest, str, Blob, ChunkRef]] = []
    for m in manifests:
        for fqn, blob in m.blobs():
            if blob.inline is not None:
                try:
                    reader.read_rows(blob, 0, blob.rows, f"{fqn!r} of checkpoint {m.name!r}")
                except DAMAGE as exc:
                    report.problems.append(Problem(m.name, fqn, "(inline)", str(exc)))
                continue
            for ref in blob.chunks:
                work.append((m, fqn, blob, ref))

    def check(task: tuple[Manifest, str, Blob, ChunkRef]) -> tuple[bytes, str | None, int]:
        m, fqn, blob, ref = task
        where = f"{fqn!r} (first seen in checkpoint {m.name!r})"
        try:
            pipeline = Pipeline.from_config(blob.codec)
            row_bytes = blob.nbytes // blob.rows if blob.rows else blob.nbytes
            body, raw = reader.fetch_chunk_parts(ref, pipeline, row_bytes, where)
            # the key hashes the lossy stage's output (the raw bytes when lossless); a delta
            # chunk's chain was checked level by level (every key, root to chunk)
            if not ref.base and content_key(pipeline, body) != ref.key:
                return ref.key, "decoded content does not match the chunk's key", ref.stored
            del raw
        except DAMAGE as exc:  # storage outages and refusals are raised, not reported
            return ref.key, str(exc), ref.stored
        return ref.key, None, ref.stored

    seen: dict[bytes, str | None] = {}
    unique = []
    for task in work:
        if task[3].key not in seen:
            seen[task[3].key] = None
            unique.append(task)
    for key, err, size in repo.backend.map(check, unique):
        seen[key] = err
        report.chunks_checked += 1
        report.bytes_checked += size
        if progress:
            progress(1)
    for m, fqn, _, ref in work:
        err = seen.get(ref.key)
        if err is not None:
            report.problems.append(Problem(m.name, fqn, layout.chunk_key(ref.key.hex()), err))
    return report
