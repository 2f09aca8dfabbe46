"""Whole tensors of a stored checkpoint, assembled from their shards: the one place that
does it, for ``load_full`` and ``ckptstore export`` (the DCP Reader copies boxes into the
caller's own tensors instead)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ckptstore.dcp.bridge import dtype_name, from_bytes, torch_dtype
from ckptstore.store.session import LoadSession

__all__ = ["dtype_name", "full_tensor", "iter_full_tensors", "torch_dtype"]


def full_tensor(
    session: LoadSession, fqn: str, pool: ThreadPoolExecutor | None = None
) -> torch.Tensor:
    """Tensor ``fqn`` of the session's checkpoint as one CPU tensor (dequantized where it
    was stored lossy): every shard read, its chunks checked against their keys."""
    t = session.manifest.tensors[fqn]
    full = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
    where = session.where(fqn)
    for shard in t.shards:
        raw = session.reader.read_rows(shard.blob, 0, shard.blob.rows, where, pool)
        box = full
        for dim, (off, size) in enumerate(zip(shard.offsets, shard.sizes, strict=True)):
            box = box.narrow(dim, off, size)
        box.copy_(from_bytes(raw, full.dtype, shard.sizes))
    return full


def iter_full_tensors(
    session: LoadSession, fqns: Iterable[str], pool: ThreadPoolExecutor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(fqn, whole tensor)`` one at a time, in ``fqns`` order (memory: one tensor)."""
    for fqn in fqns:
        yield fqn, full_tensor(session, fqn, pool)
