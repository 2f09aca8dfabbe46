"""``Writer``: a DCP StorageWriter that stores into a ckptstore store.

DCP plans which rank writes which shard (replicas are written once); each rank's
``write_data`` cuts its shards into content-addressed chunks and uploads the new ones; the
coordinator's ``finish`` commits the manifest. Call order (torch storage.py): reset →
set_up_storage_writer → prepare_local_plan → prepare_global_plan → write_data → finish.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import uuid
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ckptstore.backend import Backend
from ckptstore.codecs.pipeline import default_pipeline
from ckptstore.codecs.policy import DeltaPolicy, QuantizePolicy
from ckptstore.dcp import device_quant, staging
from ckptstore.dcp.bridge import dtype_name, raw_size, to_host_bytes
from ckptstore.dcp.checks import check_tensor, store_url
from ckptstore.dcp.metadata import manifest_from_metadata
from ckptstore.errors import UnsupportedValueError
from ckptstore.store import layout
from ckptstore.store.blobs import BlobWriter, ChunkIndex
from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.columns import gather_keys
from ckptstore.store.manifest import Blob, Manifest
from ckptstore.store.mirror import MirrorJob, MirrorReport, MirrorUploader, uploader_for
from ckptstore.store.options import SaveOptions
from ckptstore.store.repository import Repository
from ckptstore.store.session import ParentIndex, SaveSession
from ckptstore.version import __version__


@dataclass
class SaveInfo(CheckpointSummary):
    """What one save did: the checkpoint's figures (:class:`CheckpointSummary`, whole
    checkpoint, all ranks) and the save's own results."""

    retention: Any = field(default=None, repr=False, compare=False, metadata={"data": False})
    """With ``keep_last``: on rank 0, the future of the gc started after this save (its
    ``GcReport``, or None when another gc was running); None elsewhere."""
    mirrored: Any = field(default=None, repr=False, compare=False, metadata={"data": False})
    """With ``mirror``: this rank's future of the upload (its ``MirrorReport``, whose
    ``durable``/``seconds`` say when the checkpoint was committed in the mirror; a
    ``MirrorError`` when it was not); None without a mirror."""

    @classmethod
    def of(cls, manifest: Manifest) -> SaveInfo:
        """The figures of a committed checkpoint (``manifest_bytes`` must be known)."""
        return cls.from_summary(CheckpointSummary.of(manifest))


class Writer(StorageWriter):
    """Store DCP checkpoints in a ckptstore store at ``url``.

    ``dcp.save(sd, storage_writer=ckptstore.Writer(url, step=3))``. Holds no open clients
    or threads between calls, so it pickles for process-based async save. A checkpoint of
    the same name is refused (``CheckpointExistsError``) unless ``overwrite=True``, which
    replaces it at the commit: until then the old one stays loadable.
    """

    def __init__(
        self,
        url: str | Backend,
        *,
        step: int | None = None,
        name: str | None = None,
        options: SaveOptions | None = None,
        int_keys: list[list[Any]] | None = None,
        **option_fields: Any,
    ) -> None:
        super().__init__()
        url = store_url(url)  # a TypeError for url=123, before anything else
        opts = SaveOptions.build(options, caller="Writer", **option_fields)
        if opts.keep_last is not None:
            raise ValueError(
                "Writer does not apply keep_last: ckptstore.save/async_save do; after "
                "dcp.save, call ckptstore.Store(url).gc(keep_last=N)"
            )
        self.options = opts
        # the edge for plain-DCP users: settings resolved once, here (and pickled along)
        self.settings = opts.resolved_settings()
        self.policy = QuantizePolicy(  # validates names now, not mid-save
            opts.quantize,
            min_bytes=self.settings.quantize_min_bytes,
            zstd_level=self.settings.zstd_level,
        )
        self.delta = DeltaPolicy(opts.delta)
        """Which lossless tensors may be stored as deltas against the parent (opt-in)."""
        self.url: str | Backend = url
        self.parent = opts.parent
        self.overwrite = opts.overwrite
        """Replace a checkpoint of the same name, crash-safely (docs/format.md O1–O5),
        instead of refusing with CheckpointExistsError."""
        self.step = step
        self.name = layout.resolve_name(step, name)
        self.storage_options = dict(opts.storage_options or {})
        self.mirror = opts.mirror
        """The durable tier each committed checkpoint is copied to in the background."""
        self.mirror_skip = False
        """This save is not mirrored (set by ``ckptstore.save`` when uploads are behind)."""
        self.mirrored: ThreadFuture[MirrorReport] | None = None
        """This rank's upload of the last checkpoint saved (with a mirror)."""
        self._mirror_job: MirrorJob | None = None
        self.int_keys = int_keys or []
        self.is_coordinator = True
        self.rank: int | None = None
        self.save_info: SaveInfo | None = None
        self._repo: Repository | None = None
        self._session: SaveSession | None = None  # the coordinator's, during a save
        self._t0 = 0.0
        self._save_id = ""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_repo"] = None
        state["_session"] = None
        state["_mirror_job"] = None
        state["mirrored"] = None
        return state

    @property
    def where(self) -> str:
        """The store's URL, for messages."""
        return self.url.url if isinstance(self.url, Backend) else self.url

    # -- DCP protocol -------------------------------------------------------------------
    def reset(self, checkpoint_id: str | Any | None = None) -> None:
        """DCP calls this only when ``dcp.save`` got a checkpoint_id: use it as the name."""
        if checkpoint_id is not None:
            self.name = layout.check_name(str(checkpoint_id))
            self.step = layout.step_of_name(self.name)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # called on every save: per-checkpoint state starts here
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.save_info = None
        self.mirrored = None
        self._t0 = time.monotonic()
        self._save_id = uuid.uuid4().hex
        self._mirror_save = ""
        self._world = 1
        # a job of an earlier save is left to finish: ckptstore.save abandoned it if that
        # save failed (else, under plain dcp.save, it waits up to Mirror.ranks_wait)
        self._mirror_job = None
        self.release_lease()  # left by an earlier save that failed on another rank

    def _repository(self) -> Repository:
        if self._repo is None:
            self._repo = Repository.open(
                self.url, self.storage_options, create=True, settings=self.settings
            )
        return self._repo

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._begin()
        # this rank's id of this save, which the coordinator returns in its ParentIndex:
        # only an index carrying it was made (and read under the lease) for this save
        return dataclasses.replace(plan, storage_data=self._save_id)

    def _begin(self) -> None:
        """The coordinator begins the save session (refuse an existing name, take the
        lease) before any rank learns which chunks exist (every rank's write_data comes
        after the coordinator's prepare_global_plan); other ranks read nothing here."""
        if self.is_coordinator and self._session is None:
            session = SaveSession(
                self._repository(),
                self.name,
                step=self.step,
                parent=self.parent,
                overwrite=self.overwrite,
            )
            self._session = session.begin()

    def release_lease(self) -> None:
        """End the save session without a commit (a save that failed); idempotent."""
        session, self._session = self._session, None
        if session is not None:
            session.release()

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Hand each rank the parent's chunks for just its share: the coordinator reads
        the parent manifest once, no rank reads store metadata itself."""
        self._begin()
        assert self._session is not None
        ranks = []
        for plan in plans:
            boxes = []
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    boxes.append((item.index.fqn, None, None))
                elif item.tensor_data is not None:
                    chunk = item.tensor_data.chunk
                    boxes.append((item.index.fqn, chunk.offsets, chunk.sizes))
            ranks.append((boxes, plan.storage_data if isinstance(plan.storage_data, str) else ""))
        indexes = self._session.indexes_for(ranks)  # all ranks at once, numpy over columns
        for index in indexes:
            index.save = self._save_id  # the save's id on every rank (mirror markers)
            index.world = len(plans)
        return [
            dataclasses.replace(plan, storage_data=index)
            for plan, index in zip(plans, indexes, strict=True)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._begin()  # (begun already unless DCP skipped the planning steps)
        try:
            return self._write_data(plan, planner)
        except BaseException:
            self.release_lease()
            self.abandon_mirror()
            raise

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        repo = self._repository()
        parent = plan.storage_data
        if (
            not isinstance(parent, ParentIndex)
            or parent.checkpoint != self.name
            or not parent.token
            or parent.token != self._save_id
        ):  # a plan DCP cached from an earlier save (maybe of this very name): not ours
            parent = ParentIndex(self.name, None)
        # every value is serialized before any chunk is written: one that does not pickle
        # fails the save here, naming its key, with nothing uploaded
        objects = {
            id(item): _serialize(planner, item)
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        }
        self._mirror_save = parent.save
        self._world = parent.world if parent.save else _world_size()
        job = self._queue_mirror() if self.mirror is not None else None
        pending: list[tuple[Any, ThreadFuture[Blob]]] = []
        if job is not None and self.mirror.stream:  # each blob's chunks go up as written
            pending = _Feeding(job)
        with BlobWriter(
            repo,
            ChunkIndex(repo, parent.sizes()),
            chunk_bytes=self.settings.chunk_bytes,
            inline_bytes=self.settings.inline_bytes,
            threads=self.settings.threads,
        ) as writer:
            budget = self.settings.stage_bytes
            staged: list[tuple[int, ThreadFuture[Blob]]] = []  # host copies still encoding
            # GPU tensors: chunk by chunk through the pinned pool, one stager per device
            stagers: dict[Any, staging.DeviceToHost | None] = {}
            try:
                for item in plan.items:
                    if item.type == WriteItemType.BYTE_IO:
                        buf = objects.pop(id(item))
                        fut = writer.submit(
                            buf,
                            default_pipeline("bytes", zstd_level=self.settings.zstd_level),
                            rows=len(buf),
                        )
                        pending.append((item, fut))
                        continue
                    tensor: torch.Tensor = planner.resolve_data(item)
                    check_tensor(item.index.fqn, tensor)
                    rows = tensor.shape[0] if tensor.dim() > 0 else 1
                    offsets = item.tensor_data.chunk.offsets if item.tensor_data else ()
                    first_row = int(offsets[0]) if len(offsets) else 0
                    global_shape = item.tensor_data.size if item.tensor_data else tensor.shape
                    pipeline = self.policy.pipeline_for(
                        item.index.fqn,
                        dtype_name(tensor.dtype),
                        math.prod(global_shape) * tensor.element_size(),
                    )
                    if _quantize_on_device(tensor, pipeline, self.settings.device_quantize):
                        fut = _submit_on_device(writer, tensor, pipeline, rows, first_row)
                        pending.append((item, fut))
                        continue
                    bases = None
                    if self.delta.wants(item.index.fqn, pipeline):
                        sizes = item.tensor_data.chunk.sizes if item.tensor_data else ()
                        bases = parent.bases_for(item.index.fqn, offsets, sizes, pipeline.spec)
                    ops = staging.ops_for(tensor)
                    if ops is not None:
                        if ops.key not in stagers:
                            pool = staging.pool_for(ops, self.settings)
                            stagers[ops.key] = pool and staging.DeviceToHost(writer, pool)
                        stager = stagers[ops.key]
                        if stager is not None:
                            fut = stager.add(
                                tensor, ops, pipeline, rows=rows, first_row=first_row, bases=bases
                            )
                            if fut is not None:
                                pending.append((item, fut))
                                continue
                    copies = tensor.device.type != "cpu" or not tensor.is_contiguous()
                    if copies:  # bound host memory: wait for earlier copies to be encoded
                        while staged and sum(n for n, _ in staged) + raw_size(tensor) > budget:
                            staged.pop(0)[1].result()
                    raw, owner = to_host_bytes(tensor)
                    fut = writer.submit(
                        raw,
                        pipeline,
                        rows=rows,
                        first_row=first_row,
                        keep_alive=owner,
                        bases=bases,
                    )
                    if copies:
                        staged.append((raw.nbytes, fut))
                    pending.append((item, fut))
                for stager in stagers.values():
                    if stager is not None:
                        stager.flush()
            except BaseException as exc:
                for stager in stagers.values():
                    if stager is not None:
                        stager.abort(exc)
                raise
            results = []
            for item, fut in pending:
                blob = fut.result()
                results.append(
                    WriteResult(
                        index=item.index, size_in_bytes=blob.stored_bytes, storage_data=blob
                    )
                )
        if job is not None:
            if not isinstance(pending, _Feeding):  # the share's chunks go up now
                job.add([e for _, fut in pending for e in _chunk_entries(fut.result())])
            job.close()
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def _queue_mirror(self) -> MirrorJob:
        """Queue this rank's share of the checkpoint with the mirror uploader (its chunks
        follow as they are written; waits while ``max_pending`` uploads are pending)."""
        assert self.mirror is not None
        world = self._world
        rank = 0 if world == 1 else self.rank
        if rank is None:  # a torch that does not pass rank= to the writer
            rank = torch.distributed.get_rank()
        job = MirrorJob(
            self.name,
            rank=rank,
            world=world,
            save_id=self._mirror_save if world > 1 else self._save_id,
            coordinator=self.is_coordinator,
            started=self._t0,
            skip=self.mirror_skip,
            streamed=True,
        )
        self.mirrored = self.mirror_uploader().submit(job)
        self._mirror_job = job
        return job

    def abandon_mirror(self, why: str = "the save failed") -> None:
        """The save did not commit: upload no more of it, commit nothing (idempotent; a
        no-op once the primary commit is done)."""
        job, self._mirror_job = self._mirror_job, None
        if job is not None:
            job.cancel(why)

    def mirror_uploader(self) -> MirrorUploader:
        """This process's uploader from this store to ``mirror``."""
        assert self.mirror is not None
        return uploader_for(
            self._repository(),
            self.mirror,
            storage_options=self.storage_options,
            settings=self.settings,
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        blobs = {}
        for rank_results in results:
            for wr in rank_results:  # torch.Size hashes and compares as the tuple it is
                blobs[(wr.index.fqn, wr.index.offset)] = wr.storage_data
        seconds = time.monotonic() - self._t0
        manifest = manifest_from_metadata(
            metadata,
            blobs,
            name=self.name,
            step=self.step,
            created=time.time(),
            writer=f"ckptstore {__version__}",
            seconds=seconds,
        )
        manifest.int_keys = self.int_keys
        _one_writer_per_chunk(manifest)
        self._begin()
        session, self._session = self._session, None
        assert session is not None
        session.commit(manifest)  # releases the lease, whatever happens
        self.save_info = SaveInfo.of(manifest)
        self.save_info.seconds = time.monotonic() - self._t0
        job, self._mirror_job = self._mirror_job, None
        if job is not None:
            job.committed()  # the mirror commit may follow (ckptstore.save hands out the future)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{self.where}#{self.name}", save_id=self._save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | Any) -> bool:
        return False  # never picked automatically by dcp for a bare path


def _serialize(planner: SavePlanner, item: Any) -> bytes:
    """The bytes DCP's planner makes of a non-tensor value (torch.save), or a clear error
    naming its key when the value does not pickle."""
    try:
        data = planner.resolve_data(item)
    except Exception as exc:  # pickling raises AttributeError, TypeError, PicklingError...
        raise UnsupportedValueError(
            f"{item.index.fqn!r} cannot be saved: {type(exc).__name__}: {exc} (values other "
            "than tensors are stored with torch.save/pickle: a lambda, a local function or "
            "class, a lock or an open file cannot be; save plain data instead)"
        ) from exc
    return data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)


def _quantize_on_device(tensor: torch.Tensor, pipeline: Any, cpu_too: bool) -> bool:
    """GPU tensors with a lossy pipeline are quantized where they live, so only the
    quantized bytes are copied to the host (CKPTSTORE_DEVICE_QUANTIZE=1 does it for CPU
    tensors too — the tests use that to run this path without a GPU)."""
    lossy, _ = pipeline.split()
    if lossy is None or not device_quant.supports(lossy) or tensor.numel() == 0:
        return False
    return tensor.device.type != "cpu" or cpu_too


def _submit_on_device(
    writer: BlobWriter, tensor: torch.Tensor, pipeline: Any, rows: int, first_row: int
) -> ThreadFuture[Blob]:
    lossy, _ = pipeline.split()
    flat = tensor.detach().contiguous().reshape(-1)
    per_row = flat.numel() // max(rows, 1)
    return writer.submit_quantized(
        lambda a, b: device_quant.quantize(lossy, flat[a * per_row : b * per_row]),
        pipeline,
        nbytes=flat.numel() * flat.element_size(),
        rows=rows,
        first_row=first_row,
    )


def _world_size() -> int:
    """The default group's size, for a plan DCP cached (which carries no index of ours)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Feeding(list):  # type: ignore[type-arg]
    """The write futures of a save with a mirror: each blob, once written, hands its chunks
    (delta bases included) to the rank's mirror job."""

    def __init__(self, job: MirrorJob) -> None:
        super().__init__()
        self.job = job

    def append(self, pair: tuple[Any, ThreadFuture[Blob]]) -> None:
        super().append(pair)
        pair[1].add_done_callback(self._done)

    def _done(self, fut: ThreadFuture[Blob]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the save fails; write_data abandons the job
        self.job.add(_chunk_entries(fut.result()))


def _chunk_entries(blob: Blob) -> list[tuple[bytes, bool, int]]:
    """A blob's chunks for the mirror job: (key, written new, stored size), delta bases
    included (a load of the chunk reads them)."""
    entries = []
    for c in blob.chunks:
        entries.append((c.key, c.new, c.stored))
        entries.extend((b, False, 0) for b in c.base)
    return entries


def _one_writer_per_chunk(manifest: Manifest) -> None:
    """Ranks that wrote equal content at once each marked the chunk new; count it once
    (the first in manifest order keeps the mark): numpy over each tensor's table."""
    tables = [t.table for t in manifest.tensors.values()]
    picked = [np.flatnonzero(t.new) for t in tables]
    keys = np.frombuffer(
        b"".join(gather_keys(t.keys, p) for t, p in zip(tables, picked, strict=True)), "V16"
    )
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(keys), bool)
    keep[first] = True
    at = 0
    for t, p in zip(tables, picked, strict=True):
        if len(p):
            new = np.array(t.new, np.uint8)
            new[p[~keep[at : at + len(p)]]] = 0
            t.new = new
            at += len(p)
    if not any(b.chunks for b in manifest.objects.values()):
        return
    seen = set(keys[first].tolist())
    for blob in manifest.objects.values():
        for c in blob.chunks:
            if c.new and c.key in seen:
                c.new = False
            elif c.new:  # only a write counts: a reuse seen first must not unmark it
                seen.add(c.key)
