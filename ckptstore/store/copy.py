"""Copy checkpoints between two stores: the chunks the destination lacks, then the manifest.

Chunk keys are content keys (docs/format.md, "Chunk keys"): a chunk has the same key in
every store, so a copy sends only the objects the destination does not hold, and a copy
killed part-way is finished by the next one without re-sending what arrived. Each checkpoint
is committed in the destination by the save protocol (lease → chunks → commit check →
create-only manifest put → catalog entry), so a reader of the destination sees a copied
checkpoint whole or not at all, and a gc there is safe beside the copy. Used by
``ckptstore cp``, :meth:`ckptstore.Store.copy_to` and the mirror uploader. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from ckptstore.errors import CheckpointExistsError, ObjectNotFoundError
from ckptstore.store import chunks, layout
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository
from ckptstore.store.session import SaveSession

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the stored bytes of each chunk object handled (sent or skipped)."""


@dataclass
class CopyReport:
    """What a copy did: checkpoints committed in the destination and the objects sent."""

    src: str
    dst: str
    copied: list[str] = field(default_factory=list)
    """Checkpoints committed in the destination by this copy."""
    present: list[str] = field(default_factory=list)
    """Checkpoints the destination held already, with the same manifest: nothing to do."""
    objects_sent: int = 0
    """Chunk objects and manifests put into the destination."""
    bytes_sent: int = 0
    objects_skipped: int = 0
    """Chunk objects the destination held already (not sent)."""
    bytes_skipped: int = 0
    seconds: float = 0.0

    def add(self, other: ChunkTransfer) -> None:
        self.objects_sent += other.objects_sent
        self.bytes_sent += other.bytes_sent
        self.objects_skipped += other.objects_skipped
        self.bytes_skipped += other.bytes_skipped

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


@dataclass
class ChunkTransfer:
    """Chunk objects sent and skipped by one :func:`send_chunks`."""

    objects_sent: int = 0
    bytes_sent: int = 0
    objects_skipped: int = 0
    bytes_skipped: int = 0


def present_chunks(dst: Repository) -> set[bytes]:
    """The chunk keys ``dst`` holds now: one listing of ``chunks/`` (paged by the backend).
    What a gc deletes after this is caught by the commit check."""
    out = set()
    for key in dst.backend.list(layout.CHUNKS):
        digest = layout.chunk_digest(key)
        if digest is not None:
            out.add(digest)
    return out


def send_chunks(
    src: Repository,
    dst: Repository,
    keys: Iterable[bytes],
    *,
    present: set[bytes] | Callable[[bytes], bool],
    sizes: dict[bytes, int] | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
) -> ChunkTransfer:
    """Put into ``dst`` each chunk of ``keys`` that it lacks, read from ``src`` and checked
    (magic and checksum: a corrupt source object is a ``CorruptChunkError`` naming it, never
    copied); ``threads`` puts at once (default the ``io_requests`` knob), none started after
    the first failure. ``present``: the keys ``dst`` is known to hold, or a per-key check.
    The caller holds a save lease on ``dst`` (S1) so that a gc keeps what arrives."""
    out = ChunkTransfer()
    todo: list[bytes] = []
    unique = list(dict.fromkeys(keys))
    if callable(present):
        held = dst.backend.map(present, unique, threads=threads)
    else:
        held = [k in present for k in unique]
    for key, there in zip(unique, held, strict=True):
        if there:
            out.objects_skipped += 1
            size = (sizes or {}).get(key, 0)
            out.bytes_skipped += size
            if progress is not None:
                progress(size)
        else:
            todo.append(key)

    def one(key: bytes) -> int:
        size = copy_chunk(src, dst, key)
        if progress is not None:
            progress(size)
        return size

    sent = _run_stopping_at_first_error(one, todo, threads or dst.settings.io_requests)
    out.objects_sent += len(sent)
    out.bytes_sent += sum(sent)
    return out


def _run_stopping_at_first_error(
    fn: Callable[[bytes], int], args: list[bytes], threads: int
) -> list[int]:
    """``fn`` over ``args`` on ``threads`` threads; at the first error no new call starts
    (those queued are cancelled, those running end), then it is raised."""
    if not args:
        return []
    pool = ThreadPoolExecutor(min(threads, len(args)), thread_name_prefix="ckptstore-copy")
    try:
        futures = [pool.submit(fn, a) for a in args]
        for f in as_completed(futures):
            if f.exception() is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def copy_chunk(src: Repository, dst: Repository, key: bytes) -> int:
    """Put chunk ``key`` of ``src`` into ``dst`` after checking it; returns its size."""
    name = layout.chunk_key(key.hex())
    try:
        data = src.backend.get(name)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"chunk {src.backend.describe(name)} is missing: cannot copy it to {dst.url}"
        ) from None
    chunks.unframe(data, src.backend.describe(name))
    dst.backend.put(name, data)
    return len(data)


def chunk_exists(repo: Repository) -> Callable[[bytes], bool]:
    """A per-key existence check in ``repo`` (one request per key)."""

    def check(key: bytes) -> bool:
        return repo.backend.exists(layout.chunk_key(key.hex()))

    return check


def copy_checkpoint(
    src: Repository,
    dst: Repository,
    name: str,
    *,
    present: set[bytes] | None = None,
    report: CopyReport | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
) -> CopyReport:
    """Copy checkpoint ``name`` from ``src`` into ``dst`` (see the module docstring). A
    checkpoint of that name already in ``dst`` with the same manifest bytes counts as
    present; with other bytes it is a ``CheckpointExistsError``."""
    report = report if report is not None else CopyReport(src.url, dst.url)
    mkey = layout.manifest_key(name)
    data = src.manifest_data(name)
    manifest = Manifest.decode(data, src.backend.describe(mkey))
    if dst.exists(name):
        if dst.backend.get(mkey) == data:
            report.present.append(name)
            return report
        raise CheckpointExistsError(
            f"checkpoint {name!r} exists in {dst.url} with another manifest than in "
            f"{src.url}; not copied (remove it there first)"
        )
    session = SaveSession(dst, name, step=manifest.step).begin()
    with session:
        if present is None:
            present = present_chunks(dst)
        keys = manifest.chunk_keys()
        sizes = {c.key: c.stored for _, b in manifest.blobs() for c in b.chunks}
        part = send_chunks(
            src, dst, sorted(keys), present=present, sizes=sizes, progress=progress, threads=threads
        )
        report.add(part)
        present |= keys
        try:
            size = session.commit(manifest, data=data)  # the source's bytes, unchanged
        except CheckpointExistsError:
            if dst.backend.get(mkey) != data:
                raise
            report.present.append(name)  # another copy committed it meanwhile
            return report
    report.objects_sent += 1
    report.bytes_sent += size
    report.copied.append(name)
    return report


def copy_checkpoints(
    src: Repository,
    dst: Repository,
    names: Iterable[str],
    *,
    progress: Progress | None = None,
    threads: int | None = None,
) -> CopyReport:
    """Copy each checkpoint of ``names`` (oldest first is best: later ones then send only
    what they add), listing ``dst``'s chunks once."""
    t0 = time.monotonic()
    report = CopyReport(src.url, dst.url)
    present: set[bytes] | None = None
    for name in names:
        if present is None:
            present = present_chunks(dst)
        copy_checkpoint(
            src, dst, name, present=present, report=report, progress=progress, threads=threads
        )
    report.seconds = time.monotonic() - t0
    return report
