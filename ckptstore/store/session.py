"""Save and load sessions: the store's own protocol, torch-free, used by every writer (the
DCP adapter, ``ckptstore import``, any future adapter) and reader alike.

A save (docs/format.md, "Read and write ordering", S1–S4, and "Catalog"):

1. :meth:`SaveSession.begin` refuses an existing name and takes the save lease — before
   anything that tells the save which chunks exist is read;
2. :meth:`SaveSession.parent` reads the parent checkpoint (the latest, once, on the
   coordinator) and :meth:`SaveSession.index_for` cuts from it what each rank's share needs;
3. every rank writes its chunks through a :class:`~ckptstore.store.blobs.BlobWriter` over a
   :class:`~ckptstore.store.blobs.ChunkIndex`: parent chunks are named as they are, every
   other chunk is put under the lease (so a concurrent gc keeps it), existing or not;
4. :meth:`SaveSession.commit` runs the commit check against concurrent gc, puts the manifest
   create-only (the commit), writes its catalog entry and releases the lease. With
   ``overwrite=True`` the commit replaces a checkpoint of the same name instead (O1–O5:
   the only save of that name; old manifest to the trash, its catalog entry deleted, one
   atomic put of the new manifest over it).

Nothing here reads more than the parent manifest, the catalog listing and the lease records:
the cost of a save does not grow with the number of checkpoints in the store.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ckptstore.errors import (
    CheckpointBusyError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    ManifestError,
)
from ckptstore.store import layout, leases, refs
from ckptstore.store.blobs import BlobReader
from ckptstore.store.columns import ManifestColumns, gather_keys, ranges
from ckptstore.store.manifest import Blob, Manifest, Shard
from ckptstore.store.repository import Repository

log = logging.getLogger(__name__)

# the checkpoint this process committed last, per store: the default parent of its next save
# (a training loop's previous checkpoint), found with one read instead of a listing
_last_commit: dict[str, str] = {}
_last_commit_lock = threading.Lock()


@dataclass(frozen=True)
class ParentChunk:
    """A chunk of the parent checkpoint: which global rows of which tensor it holds."""

    fqn: str
    key: bytes
    row_start: int
    """First global row (dim 0 of the whole tensor; byte offset for objects)."""
    row_stop: int
    stored: int
    chain: tuple[bytes, ...] = ()
    """Its delta chain ([direct base, …, root]; empty when standalone)."""
    codec: bytes = b""
    """Its blob's codec chain (msgpack, as Pipeline.spec): a delta needs the same."""
    inner: tuple[int, ...] = ()
    """Its shard's box outside dim 0 (offsets then sizes): a delta needs the same."""


class PackedChunks:
    """Parent chunks as columns (what the coordinator's batched lookup hands a rank): one
    entry per chunk, its tensor by index into ``fqns``, its rows global (dim 0 of the whole
    tensor), its codec by index into ``specs``; every tensor here is a dim-0 slab, so the
    box outside dim 0 is the tensor's own (``inners``)."""

    def __init__(
        self,
        fqns: list[str],
        inners: list[tuple[int, ...]],
        fidx: np.ndarray,
        keys: bytes,
        row_start: np.ndarray,
        row_stop: np.ndarray,
        stored: np.ndarray,
        spec: np.ndarray,
        specs: list[bytes],
        chains: dict[int, tuple[bytes, ...]],
    ) -> None:
        self.fqns, self.inners, self.fidx, self.keys = fqns, inners, fidx, keys
        self.row_start, self.row_stop, self.stored = row_start, row_stop, stored
        self.spec, self.specs, self.chains = spec, specs, chains

    def __len__(self) -> int:
        return len(self.fidx)

    def key_list(self) -> list[bytes]:
        k = self.keys
        return [k[i : i + 16] for i in range(0, len(k), 16)]

    def to_chunks(self) -> list[ParentChunk]:
        keys = self.key_list()
        rs, re, st = self.row_start.tolist(), self.row_stop.tolist(), self.stored.tolist()
        sp, fi = self.spec.tolist(), self.fidx.tolist()
        return [
            ParentChunk(
                self.fqns[fi[i]],
                keys[i],
                rs[i],
                re[i],
                st[i],
                self.chains.get(i, ()),
                self.specs[sp[i]],
                self.inners[fi[i]],
            )
            for i in range(len(keys))
        ]


@dataclass
class ParentIndex:
    """What the coordinator hands one rank: the parent's chunks overlapping that rank's
    share. ``token`` is the rank's own id of the save it was made for (the rank sent it with
    its local plan): a plan DCP cached from an earlier save — even one of the same name,
    overwritten or removed and saved again — carries another token, and a writer must then
    ignore the index, which was not read under this save's lease. The chunks come as
    objects (``chunks``) and, from the batched lookup, as columns (``packed``)."""

    checkpoint: str
    parent: str | None
    chunks: list[ParentChunk] = field(default_factory=list)
    token: str = ""
    packed: PackedChunks | None = None
    save: str = ""
    """The coordinator's id of this save, the same in every rank's index."""
    world: int = 1
    """How many ranks write this save."""

    def all_chunks(self) -> list[ParentChunk]:
        """Every chunk as an object (the packed ones built now)."""
        return self.chunks + (self.packed.to_chunks() if self.packed is not None else [])

    def sizes(self) -> dict[bytes, int]:
        out = {c.key: c.stored for c in self.chunks}
        if self.packed is not None:
            out.update(zip(self.packed.key_list(), self.packed.stored.tolist(), strict=True))
        return out

    def bases_for(
        self, fqn: str, offsets: Sequence[int], sizes: Sequence[int], spec: bytes
    ) -> dict[tuple[int, int], tuple[bytes, tuple[bytes, ...], int]]:
        """Delta candidates of a shard of ``fqn`` (box ``offsets``+``sizes``, codec chain
        ``spec``): the parent chunks of the same box outside dim 0 and the same codec, by
        their global rows (``BlobWriter.submit(bases=)``)."""
        by_fqn = self.__dict__.get("_by_fqn")
        if by_fqn is None:
            by_fqn = {}
            for c in self.all_chunks():
                by_fqn.setdefault(c.fqn, []).append(c)
            self.__dict__["_by_fqn"] = by_fqn
        inner = (*offsets[1:], *sizes[1:])
        return {
            (c.row_start, c.row_stop): (c.key, c.chain, c.stored)
            for c in by_fqn.get(fqn, ())
            if c.inner == inner and c.codec == spec
        }


def _box_rows(blob: Blob, first_row: int) -> list[tuple[int, int, bytes, int]]:
    return [(first_row + c.row_start, first_row + c.row_stop, c.key, c.stored) for c in blob.chunks]


class _Shards:
    """A tensor's shards sorted by their first row, to find those overlapping a row range
    in O(log shards + found) — a W-rank save asks W times, so a scan would cost W²."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = sorted(shards, key=lambda s: s.offsets[0] if s.offsets else 0)
        self.starts = [s.offsets[0] if s.offsets else 0 for s in self.shards]
        self.longest = max((s.sizes[0] if s.sizes else 1 for s in self.shards), default=0)

    def overlapping(self, lo: int, hi: int) -> list[Shard]:
        i = bisect.bisect_right(self.starts, lo - self.longest)
        j = bisect.bisect_left(self.starts, hi)
        return [s for s in self.shards[i:j] if not s.sizes or s.offsets[0] + s.sizes[0] > lo]


class ParentLookup:
    """The parent checkpoint's chunks by (tensor, box), built once from its manifest."""

    def __init__(self, parent: Manifest | None) -> None:
        self.parent = parent
        self._by_fqn: dict[str, _Shards] = {}

    def chunks(
        self, fqn: str, offsets: Sequence[int] | None = None, sizes: Sequence[int] | None = None
    ) -> list[ParentChunk]:
        """The chunks holding any element of box ``offsets``+``sizes`` of tensor ``fqn``
        (of object ``fqn`` when no box is given)."""
        parent = self.parent
        if parent is None:
            return []
        if offsets is None:
            blob = parent.objects.get(fqn)
            if blob is None:
                return []
            return [ParentChunk(fqn, k, a, b, n) for a, b, k, n in _box_rows(blob, 0)]
        entry = parent.tensors.get(fqn)
        if entry is None or sizes is None or len(entry.shape) != len(offsets):
            return []
        found = self._by_fqn.get(fqn)
        if found is None:
            found = self._by_fqn[fqn] = _Shards(entry.shards)
        lo = offsets[0] if offsets else 0
        hi = lo + (sizes[0] if sizes else 1)
        out = []
        for shard in found.overlapping(lo, hi) if offsets else found.shards:
            if any(
                o + s <= so or so + ss <= o
                for o, s, so, ss in zip(
                    offsets[1:], sizes[1:], shard.offsets[1:], shard.sizes[1:], strict=False
                )
            ):
                continue  # no overlap outside dim 0
            first = shard.offsets[0] if shard.offsets else 0
            spec = msgpack.packb(shard.blob.codec)
            inner = (*shard.offsets[1:], *shard.sizes[1:])
            for c in shard.blob.chunks:
                a, b = first + c.row_start, first + c.row_stop
                if not shard.offsets or (a < hi and b > lo):
                    out.append(ParentChunk(fqn, c.key, a, b, c.stored, c.base, spec, inner))
        return out


class _SlabChunks:
    """The parent's chunks of dim-0 slab tensors sorted by (tensor, first global row):
    a rank's row range of a tensor is then one searchsorted away."""

    def __init__(self, cols: ManifestColumns) -> None:
        self.cols = cols
        top = int(cols.gstop.max()) + 1 if len(cols.gstop) else 1
        self.scale = top
        tid = cols.tid[cols.chunk_shard]
        if len(cols.names) * top >= 1 << 62:  # rows too large to key together
            self.scale = 0
            return
        key = tid * top + cols.gstart
        self.order = np.argsort(key, kind="stable")
        self.starts = key[self.order]
        self.stops = (tid * top + cols.gstop)[self.order]
        self.inners = [(*[0] * (len(s) - 1), *s[1:]) if s else () for s in cols.shapes]

    def packed(self, tids: list[int], los: list[int], his: list[int]) -> PackedChunks:
        cols = self.cols
        t = np.asarray(tids, np.int64)
        if self.scale:
            a = np.searchsorted(self.stops, t * self.scale + np.asarray(los), "right")
            b = np.searchsorted(self.starts, t * self.scale + np.asarray(his), "left")
            ids = np.unique(self.order[ranges(a, b)])
        else:  # per box: a mask over the tensor's chunks
            found = []
            for ti, lo, hi in zip(tids, los, his, strict=True):
                sel = np.flatnonzero(
                    (cols.tid[cols.chunk_shard] == ti) & (cols.gstart < hi) & (cols.gstop > lo)
                )
                found.append(sel)
            ids = np.unique(np.concatenate(found))
        shard = cols.chunk_shard[ids]
        used, fidx = np.unique(cols.tid[shard], return_inverse=True)
        chains: dict[int, tuple[bytes, ...]] = {}
        if cols.nbases is not None:
            for j in np.flatnonzero(cols.nbases[ids]).tolist():
                c = int(ids[j])
                a0, a1 = int(cols.base_at[c]), int(cols.base_at[c + 1])
                chains[j] = tuple(cols.bases[x * 16 : (x + 1) * 16] for x in range(a0, a1))
        return PackedChunks(
            [cols.names[u] for u in used.tolist()],
            [self.inners[u] for u in used.tolist()],
            fidx.astype(np.int32),
            gather_keys(cols.keys, ids),
            cols.gstart[ids],
            cols.gstop[ids],
            cols.stored[ids],
            cols.codec[shard].astype(np.int32),
            cols.specs,
            chains,
        )


class SaveSession:
    """The coordinator's side of one save: lease, parent, commit check, commit, release.

    ``with SaveSession(repo, name, step=…).begin() as s: …; s.commit(manifest)``; leaving
    the block without a commit releases the lease (the chunks written stay for gc)."""

    def __init__(
        self,
        repo: Repository,
        name: str,
        *,
        step: int | None = None,
        parent: str | None = None,
        gc_wait: float | None = None,
        overwrite: bool = False,
    ) -> None:
        self.repo = repo
        self.name = layout.check_name(name)
        self.overwrite = overwrite
        """Replace a checkpoint of this name at the commit (docs/format.md O1–O5) instead of
        refusing it."""
        self.step = step
        self.parent_name = parent
        """Parent to dedup (and delta) against. None: the checkpoint this process committed
        last to this store if it still exists, else the latest one."""
        self.gc_wait = gc_wait
        self.lease: leases.Lease | None = None
        self._finalizer: weakref.finalize | None = None
        self._parent: Manifest | None = None
        self._parent_read = False
        self._lookup: ParentLookup | None = None

    def begin(self) -> SaveSession:
        """S1: refuse an existing name (unless overwriting), then take the save lease; an
        overwrite then makes sure it is the only save of that name (O1)."""
        if not self.overwrite and self.repo.exists(self.name):
            raise CheckpointExistsError(
                f"Checkpoint already exists: {self.name!r} in {self.repo.url}; "
                "checkpoints are not overwritten unless you pass overwrite=True"
            )
        if self.lease is None and self.overwrite:
            self._take_alone()
        if self.lease is None:
            lease = leases.Lease.acquire(
                self.repo.backend,
                "save",
                checkpoint=self.name,
                ttl=self.repo.settings.lease_ttl,
                skew=self.repo.settings.clock_skew,
            )
            self._finalizer = weakref.finalize(self, lease.release)  # if dropped unreleased
            self.lease = lease
        return self

    def _take_alone(self) -> None:
        """O1: take the lease, then read the save leases; while another live one names
        this checkpoint, give ours back and try again (as gc takes its lock, G1: of two
        racing overwriters at least one sees the other), for at most GC_WAIT seconds."""
        settings = self.repo.settings
        wait = settings.gc_wait if self.gc_wait is None else self.gc_wait
        deadline = time.monotonic() + wait
        while True:
            lease = leases.Lease.acquire(
                self.repo.backend,
                "save",
                checkpoint=self.name,
                ttl=settings.lease_ttl,
                skew=settings.clock_skew,
            )
            others = [i for i in self.repo.saves_of(self.name) if i.id != lease.id]
            if not others:
                self._finalizer = weakref.finalize(self, lease.release)
                self.lease = lease
                return
            lease.release()
            if time.monotonic() >= deadline:
                raise CheckpointBusyError(
                    f"checkpoint {self.name!r} not saved: {others[0].describe()} is saving "
                    f"it too (waited {wait:.0f}s); try again once that save has finished"
                )
            time.sleep(min(0.05 + random.random() * 0.2, max(0.0, deadline - time.monotonic())))

    def parent(self) -> Manifest | None:
        """The parent checkpoint's manifest (None in an empty store), read once, under the
        lease. A parent that cannot be read costs dedup, not the save."""
        if self.lease is None:
            raise RuntimeError("SaveSession.parent() before begin()")
        if not self._parent_read:
            self._parent_read = True
            try:
                name = self.parent_name
                if name is None:
                    self._parent = self._last_committed()
                    if self._parent is not None:
                        return self._parent
                    latest = self.repo.latest()
                    name = latest.name if latest is not None else None
                # read anew: a cached manifest of that name may be of a checkpoint removed
                # and saved again since
                self._parent = self.repo.manifest(name, cached=False) if name else None
            except CheckpointNotFoundError:
                if self.parent_name is not None:
                    raise
                self._parent = None
            except CkptStoreError as exc:
                if self.parent_name is not None:
                    raise
                log.warning(
                    "save of %r dedups against nothing: parent unreadable: %s", self.name, exc
                )
                self._parent = None
        return self._parent

    def _last_committed(self) -> Manifest | None:
        """The checkpoint this process committed last to this store, if it still exists:
        any committed checkpoint is a correct parent, and in a training loop this is the
        one the next save shares most with — one read, no listing of the catalog."""
        with _last_commit_lock:
            name = _last_commit.get(self.repo.url)
        if name is None:
            return None
        try:
            return self.repo.manifest(name, cached=False)
        except CheckpointNotFoundError:
            return None

    def index_for(
        self,
        boxes: Sequence[tuple[str, Sequence[int] | None, Sequence[int] | None]],
        token: str = "",
    ) -> ParentIndex:
        """The parent chunks of a rank's share: ``boxes`` are (fqn, offsets, sizes), with
        offsets None for an object; ``token`` the rank's id of this save."""
        parent = self.parent()
        if self._lookup is None:
            self._lookup = ParentLookup(parent)
        chunks: dict[tuple[object, ...], ParentChunk] = {}
        for fqn, offsets, sizes in boxes:
            for c in self._lookup.chunks(fqn, offsets, sizes):
                chunks.setdefault((c.key, c.fqn, c.row_start, c.inner), c)
        return ParentIndex(self.name, parent.name if parent else None, list(chunks.values()), token)

    def indexes_for(
        self,
        ranks: Sequence[
            tuple[Sequence[tuple[str, Sequence[int] | None, Sequence[int] | None]], str]
        ],
    ) -> list[ParentIndex]:
        """:meth:`index_for` of every rank at once (``ranks``: each rank's boxes and
        token): boxes of dim-0 slab tensors are looked up with numpy over the parent's
        columns, others one by one."""
        parent = self.parent()
        if parent is None:
            return [ParentIndex(self.name, None, [], token) for _, token in ranks]
        if self._lookup is None:
            self._lookup = ParentLookup(parent)
        cols = self.__dict__.get("_columns")
        if cols is None:
            cols = self.__dict__["_columns"] = _SlabChunks(ManifestColumns.of(parent))
        out = []
        tid_of = cols.cols.tid_of
        slab_ndim = [  # per tensor: its rank when it is a dim-0 slab, else -1
            int(n) if ok else -1
            for n, ok in zip(cols.cols.ndims.tolist(), cols.cols.slabs.tolist(), strict=True)
        ]
        for boxes, token in ranks:
            tids: list[int] = []
            los: list[int] = []
            his: list[int] = []
            chunks: dict[tuple[object, ...], ParentChunk] = {}
            for fqn, offsets, sizes in boxes:
                t = tid_of.get(fqn) if offsets else None
                if (
                    t is not None
                    and sizes is not None
                    and len(offsets) == slab_ndim[t]
                    and all(sizes)
                ):
                    tids.append(t)
                    los.append(offsets[0])
                    his.append(offsets[0] + sizes[0])
                    continue
                for c in self._lookup.chunks(fqn, offsets, sizes):
                    chunks.setdefault((c.key, c.fqn, c.row_start, c.inner), c)
            packed = cols.packed(tids, los, his) if tids else None
            out.append(ParentIndex(self.name, parent.name, list(chunks.values()), token, packed))
        # every rank has its share: free the parent (a later index_for reads it again)
        del self.__dict__["_columns"]
        self._parent, self._parent_read, self._lookup = None, False, None
        return out

    def commit(self, manifest: Manifest, *, data: bytes | None = None) -> int:
        """S3–S4: commit check, create-only put of the manifest, catalog entry, release.
        Returns the manifest's size. The lease is released whatever happens. ``data``: the
        manifest's bytes as another store holds them (a copy commits them unchanged)."""
        if manifest.name != self.name:
            raise ValueError(f"session of {self.name!r} cannot commit {manifest.name!r}")
        if self.lease is None:
            raise RuntimeError("SaveSession.commit() without begin()")
        try:
            try:  # what a reader would refuse is never committed
                manifest.validate()
            except ValueError as exc:
                raise ManifestError(
                    f"checkpoint {self.name!r} not committed: its manifest is invalid: {exc}"
                ) from exc
            leases.check_commit(
                self.repo.backend,
                self.lease,
                manifest.chunk_keys,  # built only when a gc plan is to be compared
                checkpoint=self.name,
                wait=self.repo.settings.gc_wait if self.gc_wait is None else self.gc_wait,
            )
            self.lease.check(f"commit checkpoint {self.name!r}")
            if self.overwrite:
                size = self.repo._replace_manifest(manifest)
            else:
                size = self.repo.commit_manifest(manifest, data=data)
            # C1, under the lease: no rm or gc drops the checkpoint (G10) before its entry
            # exists, so a drop always finds the entry it must delete first (C3)
            try:
                self.repo.write_catalog_entry(manifest)
            except CkptStoreError as exc:  # committed: ls reads its manifest until gc tidies
                log.warning("checkpoint %r committed, its catalog entry not: %s", self.name, exc)
            refs.point(self.repo.backend, manifest.name, manifest.created, manifest.step)
        finally:
            self.release()
        with _last_commit_lock:
            _last_commit[self.repo.url] = self.name
        return size

    def release(self) -> None:
        """Give up the lease (after the commit, or when the save failed)."""
        lease, self.lease = self.lease, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if lease is not None:
            lease.release()

    def __enter__(self) -> SaveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LoadSession:
    """One load: resolve the checkpoint once, read its manifest, read its chunks."""

    def __init__(
        self,
        repo: Repository,
        *,
        step: int | None = None,
        name: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.repo = repo
        self.name = repo.resolve(step, name)
        # read anew: the checkpoint may have been overwritten, or removed and saved again,
        # since this repository cached it
        self.manifest = repo.manifest(self.name, cached=False)
        self.reader = BlobReader(repo, threads=threads)

    def where(self, fqn: str) -> str:
        return f"{fqn!r} of checkpoint {self.name!r}"
