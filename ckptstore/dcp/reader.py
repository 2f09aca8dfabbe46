"""``Reader``: a DCP StorageReader over a ckptstore store.

DCP plans which boxes of which saved shards each rank needs (that is resharding); this
reader fetches only the chunks whose rows overlap each box, checks and decodes them on a
thread pool and copies the box into the destination tensor.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptstore.backend import Backend
from ckptstore.codecs.pipeline import Pipeline
from ckptstore.dcp import staging
from ckptstore.dcp.bridge import from_bytes, torch_dtype
from ckptstore.dcp.checks import store_url
from ckptstore.dcp.metadata import metadata_from_manifest
from ckptstore.dcp.safe_load import load_object
from ckptstore.errors import (
    MismatchError,
    UnknownCodecError,
)
from ckptstore.knobs import Settings
from ckptstore.store.blobs import BlobReader
from ckptstore.store.columns import ManifestColumns, RankRecords
from ckptstore.store.manifest import Blob, ChunkRef, Manifest, Shard
from ckptstore.store.options import Mirror
from ckptstore.store.repository import Repository
from ckptstore.store.session import LoadSession
from ckptstore.store.tiers import TieredBackend, open_tiered

# what a rank needs of one saved item: (fqn, dtype name or None for objects, its record)
Record = tuple[str, str | None, Shard | Blob]


@dataclass
class LoadInfo:
    """What one load read (this rank)."""

    name: str
    bytes_read: int
    objects_read: int
    seconds: float
    objects_from_mirror: int = 0
    """Of ``objects_read``, those the store lacked and the mirror served (with
    ``mirror=``; docs/tiers.md)."""


class Reader(StorageReader):
    """Load DCP checkpoints from a ckptstore store at ``url``.

    ``dcp.load(sd, storage_reader=ckptstore.Reader(url, step=3))``; with neither step nor
    name, the latest committed checkpoint.
    """

    def __init__(
        self,
        url: str | Backend,
        *,
        step: int | None = None,
        name: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        threads: int | None = None,
        allow_pickle: bool = False,
        strict_dtype: bool = False,
        settings: Settings | None = None,
        mirror: str | Mirror | None = None,
    ) -> None:
        super().__init__()
        url = store_url(url)  # a TypeError for url=123, before anything else
        self.settings = Settings.resolve(settings)  # the edge for plain-DCP users
        self.url: str | Backend = url
        self.step = step
        self.name = name
        self.storage_options = dict(storage_options or {})
        self.mirror = Mirror.of(mirror)
        """The durable tier: what the store at ``url`` lacks is read from it
        (docs/tiers.md)."""
        self.threads = threads
        self.allow_pickle = allow_pickle
        self.strict_dtype = strict_dtype
        """Refuse (MismatchError) a template tensor whose dtype differs from the saved one,
        instead of casting as DCP does."""
        self.manifest: Manifest | None = None
        """The checkpoint's manifest, on the rank that read it (the coordinator)."""
        self.metadata: Metadata | None = None
        """DCP metadata of the checkpoint being loaded."""
        self.load_info: LoadInfo | None = None
        self._repo: Repository | None = None
        self._preset = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_repo"] = None
        return state

    @property
    def where(self) -> str:
        return self.url.url if isinstance(self.url, Backend) else self.url

    def _repository(self) -> Repository:
        if self._repo is None:
            if self.mirror is not None:
                self._repo = open_tiered(
                    self.url, self.mirror, self.storage_options, settings=self.settings
                )
            else:
                self._repo = Repository.open(self.url, self.storage_options, settings=self.settings)
        return self._repo

    # -- DCP protocol -------------------------------------------------------------------
    def reset(self, checkpoint_id: str | Any | None = None) -> None:
        """DCP calls this only when ``dcp.load`` got a checkpoint_id: use it as the name."""
        if checkpoint_id is not None:
            self.name, self.step = str(checkpoint_id), None
            self.metadata = self.manifest = None
            self._preset = False

    def preset(self, name: str, metadata: Metadata) -> None:
        """For the next load only: the checkpoint and metadata the coordinator resolved and
        read for every rank (``ckptstore.load`` broadcasts them), so this rank reads no
        manifest. Without it each ``dcp.load`` resolves and reads on every rank."""
        if self.manifest is not None and self.manifest.name != name:
            self.manifest = None  # of an earlier load through this reader: never use it
        self.name, self.step, self.metadata = name, None, metadata
        self._preset = True

    def open(self) -> Metadata:
        """Resolve the checkpoint, read its manifest (this rank) and build DCP's metadata
        without per-chunk records: those go to each rank with its plan."""
        session = LoadSession(self._repository(), step=self.step, name=self.name)
        self.name, self.step, self.manifest = session.name, None, session.manifest
        self.metadata = metadata_from_manifest(self.manifest, f"{self.where}#{session.name}")
        return self.metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # called on every rank of every load: per-load state starts here
        self.load_info = None
        if not self._preset or self.metadata is None:
            self.open()  # plain dcp.load: resolve again on every load, on every rank
        assert self.metadata is not None
        return self.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The coordinator hands each rank the records (chunk lists, inline data) of just
        the saved items its plan reads."""
        if self.manifest is None:
            self.open()
        assert self.manifest is not None
        m = self.manifest
        # every tensor's shard table as one set of columns: each rank's reads are found
        # and its shards packed with numpy, no object per shard (docs/distributed.md)
        cols = ManifestColumns.of(m)
        out = []
        for plan in plans:
            objects: dict[tuple[str, tuple[int, ...] | None], Record] = {}
            seen: set[tuple[str, tuple[int, ...] | None]] = set()
            fqns: list[str] = []
            offsets: list[tuple[int, ...]] = []
            for req in plan.items:
                key = _index_key(req)
                if key in seen:
                    continue
                seen.add(key)
                fqn, offset = key
                if offset is None:
                    if fqn not in m.objects:
                        raise MismatchError(
                            f"{fqn!r} has no saved data for {req.storage_index} in checkpoint "
                            f"{m.name!r}"
                        )
                    objects[key] = (fqn, None, m.objects[fqn])
                    continue
                fqns.append(fqn)
                offsets.append(offset)
            found = cols.find(fqns, offsets)
            missing = np.flatnonzero(found < 0)
            if len(missing):
                i = int(missing[0])
                raise MismatchError(
                    f"{fqns[i]!r} has no saved data for offset {list(offsets[i])} in "
                    f"checkpoint {m.name!r}"
                )
            records = RankRecords(objects, cols.slice(found) if fqns else None)
            storage = {"checkpoint": m.name, "records": records}
            out.append(dataclasses.replace(plan, storage_data=storage))
        return out

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        t0 = time.monotonic()
        repo = self._repository()
        mirror_before = getattr(repo.backend, "from_mirror", 0)
        reader = BlobReader(repo, threads=self.threads)
        storage = plan.storage_data if isinstance(plan.storage_data, dict) else {}
        records: Any = storage.get("records") or {}
        ckpt = str(storage.get("checkpoint") or self.name or "?")

        # 1. objects: small, read whole, deserialized safely, on this thread
        # 2. tensors: resolve every destination first (the planner is not thread-safe),
        #    then fetch each needed chunk once and copy its overlap into every box needing it
        # (shard, chunk key) → the shard, its chunk entries with that key (equal content may
        # sit at several row ranges: zero rows, repeated blocks) and the boxes needing them
        work: dict[tuple[int, bytes], tuple[Shard, dict[int, ChunkRef | None], dict]] = {}
        targets: list[tuple[ReadItem, torch.Tensor]] = []
        for req in plan.items:
            fqn, dtype, rec = self._record(req, records)
            where = f"{fqn!r} of checkpoint {ckpt!r}"
            if req.type == LoadItemType.BYTE_IO:
                blob = rec if isinstance(rec, Blob) else rec.blob
                raw = reader.read_rows(blob, 0, blob.rows, where).tobytes()
                # deserialize once, safely; hand DCP's planner (which calls torch.load with
                # weights_only=False) a fresh serialization of the already-loaded value
                value = load_object(raw, where, self.allow_pickle)
                fresh = io.BytesIO()
                torch.save(value, fresh)
                fresh.seek(0)
                planner.load_bytes(req, fresh)
                continue
            assert isinstance(rec, Shard) and dtype is not None
            target = planner.resolve_tensor(req).detach()
            self._check(req, dtype, target, fqn, ckpt)
            targets.append((req, target))
            r0, r1 = _row_span(req, rec)
            refs: list[ChunkRef | None] = (
                [None]
                if rec.blob.inline is not None
                else [c for c in rec.blob.chunks if c.row_start < r1 and c.row_stop > r0]
            )
            for ref in refs:
                key = (id(rec), ref.key if ref is not None else b"")
                entry = work.setdefault(key, (rec, {}, {}))
                entry[1][ref.row_start if ref is not None else -1] = ref
                entry[2][id(req)] = (req, target, where, dtype)

        shared = _overlapping(t for _, t in targets)
        # GPU destinations: chunks decoded into pinned buffers, copied to the device rows
        # on a side stream that first waits for the work queued on this thread's stream
        devices: dict[int, staging.DeviceOps] = {}
        pools: dict[Any, staging.PinnedPool | None] = {}
        for _, target in targets:
            ops = staging.ops_for(target)
            if ops is not None:
                devices[id(target)] = ops
                if ops.key not in pools:
                    ops.order_after_producer()
                    pools[ops.key] = staging.pool_for(ops, self.settings)

        def copier(target: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
            """How to copy into ``target``: for a device tensor on the side stream (after
            the caller's queued work, as every copy of this load), waiting for it."""
            dev = devices.get(id(target))
            if dev is None:
                return _copy
            return lambda dst, src: dev.wait(dev.to_device(dst, src))

        def to_device(
            task: tuple[Shard, dict[int, ChunkRef | None], dict],
            first: ChunkRef,
            pipeline: Pipeline,
            spans: list[tuple[int, int]],
            saved: torch.dtype,
        ) -> bool:
            """Decode the chunk into a pinned buffer and copy it to every device box
            (others from the same buffer); False when no pinned buffer fits it."""
            shard, _, users = task
            row_bytes = shard.blob.nbytes // shard.blob.rows
            n = (first.row_stop - first.row_start) * row_bytes
            ops = next((devices[id(u[1])] for u in users.values() if id(u[1]) in devices), None)
            pool = pools.get(ops.key) if ops is not None else None
            if pool is None or n > pool.buffer_bytes:
                return False
            buf = pool.acquire()
            copies: list[tuple[staging.DeviceOps, Any]] = []
            try:
                raw = buf[:n].numpy()
                reader.fetch_chunk_into(first, pipeline, row_bytes, _users_where(users), raw)
                for c0, c1 in spans:
                    for req, target, _, _ in users.values():
                        dev = devices.get(id(target))
                        rows = None if dev is None else _rows(c0, c1, shard, req, target, saved)
                        if dev is not None and rows is not None:
                            copies.append((dev, dev.to_device(rows, buf[:n])))
                        else:
                            _copy_overlap(raw, c0, c1, shard, req, target, saved, copier(target))
            finally:
                for dev, event in copies:  # the buffer is reused only after its copies
                    dev.wait(event)
                pool.release(buf)
            return True

        def fetch(task: tuple[Shard, dict[int, ChunkRef | None], dict]) -> None:
            shard, refs, users = task
            blob = shard.blob
            rows_total = blob.rows
            row_bytes = blob.nbytes // rows_total if rows_total else 0
            where = next(iter(users.values()))[2]
            first = next(iter(refs.values()))
            saved = torch_dtype(next(iter(users.values()))[3])
            placed: tuple[int, int, int] | None = None  # (chunk rows, box) decoded in place
            if first is None:
                raw = reader.read_rows(blob, 0, rows_total, where)
                spans = [(0, rows_total)]
            else:  # fetched and decoded once, copied to every row range with this content
                try:
                    pipeline = Pipeline.from_config(blob.codec)
                except UnknownCodecError as exc:
                    raise UnknownCodecError(f"{where}: {exc}") from None
                spans = [(r.row_start, r.row_stop) for r in refs.values() if r is not None]
                if devices and to_device(task, first, pipeline, spans, saved):
                    return
                # straight into a destination that holds the whole chunk as raw bytes
                # (contiguous CPU memory of the saved dtype, aliased by no other box);
                # else into this thread's scratch buffer, then copied
                dst = None
                for c0, c1 in spans:
                    for req, target, _, _ in users.values():
                        if id(target) not in shared:
                            dst = _in_place(c0, c1, shard, req, target, saved)
                        if dst is not None:
                            placed = (c0, c1, id(req))
                            break
                    if dst is not None:
                        break
                if dst is None:
                    dst = _scratch((first.row_stop - first.row_start) * row_bytes)
                reader.fetch_chunk_into(first, pipeline, row_bytes, where, dst)
                raw = dst
            for c0, c1 in spans:
                for req, target, _, _ in users.values():
                    if placed != (c0, c1, id(req)):
                        _copy_overlap(raw, c0, c1, shard, req, target, saved, copier(target))

        threads = self.settings.threads if self.threads is None else self.threads
        if repo.backend.capabilities.remote and self.threads is None:
            # latency-bound: more in flight
            threads = max(threads, self.settings.io_requests)
        tasks = list(work.values())
        if threads > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-load") as pool:
                for f in [pool.submit(fetch, t) for t in tasks]:
                    f.result()
        else:
            for t in tasks:
                fetch(t)
        for req, target in targets:
            planner.commit_tensor(req, target)
        self._preset = False  # a later load through this reader resolves anew
        tiered = repo.backend
        self.load_info = LoadInfo(
            name=ckpt,
            bytes_read=reader.bytes_fetched,
            objects_read=reader.objects_fetched,
            seconds=time.monotonic() - t0,
            objects_from_mirror=(
                tiered.from_mirror - mirror_before if isinstance(tiered, TieredBackend) else 0
            ),
        )
        done: Future[None] = Future()
        done.set_result(None)
        return done

    # -- helpers ------------------------------------------------------------------------
    def _record(self, req: ReadItem, records: Any) -> Record:
        rec = records.get(_index_key(req))
        if rec is None:
            raise MismatchError(
                f"{req.storage_index.fqn!r} has no saved data for {req.storage_index} "
                "(no record in this rank's load plan)"
            )
        return rec

    def _check(self, req: ReadItem, saved: str, target: torch.Tensor, fqn: str, ckpt: str) -> None:
        if self.strict_dtype and torch_dtype(saved) != target.dtype:
            raise MismatchError(
                f"dtype mismatch for {fqn!r}: checkpoint {ckpt!r} holds {saved}, "
                f"the state dict has {str(target.dtype).replace('torch.', '')}"
            )
        if list(target.shape) != [int(x) for x in req.lengths]:
            raise MismatchError(
                f"shape mismatch for {fqn!r} in checkpoint {ckpt!r}: destination box "
                f"{list(target.shape)} vs {list(req.lengths)} planned"
            )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | Any) -> bool:
        return False


def _users_where(users: dict) -> str:
    """The message label of a chunk's first user (its tensor and checkpoint)."""
    return str(next(iter(users.values()))[2])


def _index_key(req: ReadItem) -> tuple[str, tuple[int, ...] | None]:
    """A saved item's identity: fqn and shard corner (None for an object)."""
    off = req.storage_index.offset  # a torch.Size: its elements are ints
    return req.storage_index.fqn, None if off is None else tuple(off)


def _row_span(req: ReadItem, shard: Shard) -> tuple[int, int]:
    """Rows of ``shard`` (dim 0, shard-local) that ``req`` needs."""
    if not shard.sizes:
        return 0, 1
    r0 = int(req.storage_offsets[0])
    return r0, r0 + int(req.lengths[0])


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's reused decode buffer, ``nbytes`` long (valid until its next call): no
    fresh chunk-sized allocation (page faults) per chunk."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses that tensor ``t`` may touch (torch strides are never
    negative)."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _overlapping(targets: Iterable[torch.Tensor]) -> set[int]:
    """ids of the destination boxes whose memory may overlap another's (tied weights, one
    tensor under two names): those are never decoded in place — two threads rebuilding
    equal bytes in one place could see each other's half-done work in the key check."""
    spans = sorted((*_span(t), id(t)) for t in targets if t.numel() and t.device.type == "cpu")
    out: set[int] = set()
    end, last = -1, None
    for lo, hi, ident in spans:
        if lo < end:
            out.add(ident)
            if last is not None:
                out.add(last)
        if hi > end:
            end, last = hi, ident
    return out


def _in_place(
    c0: int, c1: int, shard: Shard, req: ReadItem, target: torch.Tensor, dtype: torch.dtype
) -> np.ndarray | None:
    """The bytes of ``target`` that chunk rows [c0, c1) of ``shard`` fill, as a writable
    uint8 array, when the chunk can be decoded straight into them: a CPU tensor of the
    saved dtype, the box taking whole rows, the chunk inside the box and those rows
    contiguous. Else None."""
    if target.device.type != "cpu":
        return None
    rows = _rows(c0, c1, shard, req, target, dtype)
    return None if rows is None else rows.numpy()


def _rows(
    c0: int, c1: int, shard: Shard, req: ReadItem, target: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """The bytes (a uint8 view, on the target's device) of ``target`` that chunk rows
    [c0, c1) of ``shard`` fill, when they take the chunk's raw bytes as they are: the saved
    dtype, the box taking whole rows, the chunk inside the box and those rows contiguous.
    Else None."""
    if target.dtype != dtype or not shard.sizes:
        return None
    if target.is_conj() or target.is_neg() or type(target) is not torch.Tensor:
        return None
    for dim in range(1, len(shard.sizes)):
        if int(req.storage_offsets[dim]) != 0 or int(req.lengths[dim]) != int(shard.sizes[dim]):
            return None
    r0, r1 = _row_span(req, shard)
    if c0 < r0 or c1 > r1 or c1 <= c0:
        return None
    rows = target[c0 - r0 : c1 - r0]
    if rows.numel() == 0 or not rows.is_contiguous():
        return None
    return rows.reshape(-1).view(torch.uint8)


def _copy_overlap(
    raw,
    c0: int,
    c1: int,
    shard: Shard,
    req: ReadItem,
    target: torch.Tensor,
    dtype: torch.dtype,
    copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """Copy the part of chunk rows [c0, c1) of ``shard`` (saved as ``dtype``) that ``req``
    wants into ``target`` with ``copy(dst, src)`` (default :func:`_copy`); casts to the
    target's dtype as DCP does."""
    copy = copy or _copy
    if not shard.sizes:  # 0-d tensor
        copy(target, from_bytes(raw, dtype, []))
        return
    r0, r1 = _row_span(req, shard)
    a, b = max(c0, r0), min(c1, r1)
    if a >= b:
        return
    row_shape = list(shard.sizes[1:])
    src = from_bytes(raw, dtype, [c1 - c0, *row_shape])[a - c0 : b - c0]
    for dim in range(1, len(shard.sizes)):
        src = src.narrow(dim, int(req.storage_offsets[dim]), int(req.lengths[dim]))
    copy(target[a - r0 : b - r0], src)


_GRAIN = 32768
"""torch's intra-op grain size: smaller copies run on the calling thread."""
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between CPU tensors of one dtype as a numpy copy (one thread, the
    GIL released): torch's copy_ splits large copies over its intra-op threads, which on a
    busy box — or from several loader threads at once — ran 10-25x slower than a memcpy
    (docs/benchmarks.md, "Load")."""
    view = _SAME_SIZE_INT.get(dst.element_size())
    if (
        view is None
        or dst.numel() < _GRAIN  # small: torch copies on this thread, with less overhead
        or dst.device.type != "cpu"
        or src.device.type != "cpu"
        or dst.dtype != src.dtype
        or dst.is_conj()
        or dst.is_neg()
        or src.is_conj()
        or src.is_neg()
    ):
        dst.copy_(src)
        return
    np.copyto(dst.view(view).numpy(), src.view(view).numpy())
