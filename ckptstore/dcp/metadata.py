"""Translate between a ckptstore Manifest and DCP's Metadata."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptstore.dcp.bridge import dtype_name, torch_dtype
from ckptstore.errors import ManifestError
from ckptstore.store.manifest import Blob, Manifest, Shard, TensorEntry
from ckptstore.store.shard_table import ShardTable, TableBuilder, TableError


def _plain(value: Any) -> Any:
    """planner_data (DCP's flatten mapping: fqn → tuple path) as msgpack-able lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"unsupported planner_data value {value!r}")


def manifest_from_metadata(
    metadata: Metadata,
    blobs: dict[tuple[str, tuple[int, ...] | None], Blob],
    *,
    name: str,
    step: int | None,
    created: float,
    writer: str,
    seconds: float,
) -> Manifest:
    """Build the manifest of a save from DCP's global metadata and every rank's blobs."""
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, Blob] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            ndim = len(md.size)
            builder = TableBuilder(ndim)
            get = blobs.get
            found = [(c.offsets, c.sizes, get((fqn, c.offsets))) for c in md.chunks]
            for c, (_, _, blob) in zip(md.chunks, found, strict=True):
                if blob is None:  # a torch.Size is a tuple: it finds the tuple keys
                    key = (fqn, tuple(int(x) for x in c.offsets))
                    raise ManifestError(f"no data was written for shard {key} of {fqn!r}")
            builder.add_many(found)
            try:
                table: ShardTable | None = builder.build()
                shards = None
            except TableError:  # the commit's validation names the field
                table = None
                shards = [
                    Shard(
                        [int(x) for x in c.offsets],
                        [int(x) for x in c.sizes],
                        blobs[(fqn, c.offsets)],
                    )
                    for c in md.chunks
                ]
            tensors[fqn] = TensorEntry(
                dtype_name(md.properties.dtype),
                [int(x) for x in md.size],
                shards,
                bool(md.properties.requires_grad),
                table=table,
            )
        elif isinstance(md, BytesStorageMetadata):
            if (fqn, None) not in blobs:
                raise ManifestError(f"no data was written for object {fqn!r}")
            objects[fqn] = blobs[(fqn, None)]
    try:
        planner_data = _plain(metadata.planner_data) if metadata.planner_data else None
    except TypeError:
        planner_data = None  # a custom planner's data we cannot store without pickle
    return Manifest(
        name=name,
        step=step,
        created=created,
        tensors=tensors,
        objects=objects,
        planner_data=planner_data,
        dcp_version=metadata.version,
        writer=writer,
        seconds=seconds,
    )


def metadata_from_manifest(manifest: Manifest, checkpoint_id: str) -> Metadata:
    """DCP metadata for loading: what the planners need, no chunk lists or inline data
    (the Reader hands each rank the records of its own reads with its plan)."""
    sdm: dict[str, Any] = {}
    sizes: dict[tuple[int, ...], torch.Size] = {}

    def size(v: list[int]) -> torch.Size:  # one object per distinct box corner or extent:
        k = tuple(v)  # tensors of one shape share them (a torch.Size costs ~2 µs to make)
        got = sizes.get(k)
        if got is None:
            got = sizes[k] = torch.Size(k)
        return got

    for fqn, t in manifest.tensors.items():
        table = t.packed
        if table is not None:  # from the columns: no shard objects
            chunks = [
                ChunkStorageMetadata(size(o), size(s))
                for o, s in zip(table.offsets.tolist(), table.sizes.tolist(), strict=True)
            ]
        else:
            chunks = [ChunkStorageMetadata(size(s.offsets), size(s.sizes)) for s in t.shards]
        sdm[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=torch_dtype(t.dtype), requires_grad=t.requires_grad),
            size=torch.Size(t.shape),
            chunks=chunks,
        )
    for fqn in manifest.objects:
        sdm[fqn] = BytesStorageMetadata()
    planner_data = None
    if manifest.planner_data is not None:
        planner_data = {k: tuple(v) for k, v in manifest.planner_data.items()}
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=planner_data,
        storage_data=None,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id),
        version=manifest.dcp_version,
    )
