"""Whole tensors of a stored checkpoint, assembled from their shards: the one place that
does it, for ``load_full`` and ``ckptstore export`` (the DCP Reader copies boxes into the
caller's own tensors instead)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ckptstore.dcp.bridge import dtype_name, from_bytes, torch_dtype
from ckptstore.errors import AllocationError
from ckptstore.store.session import LoadSession

__all__ = ["dtype_name", "full_tensor", "iter_full_tensors", "torch_dtype"]


def full_tensor(
    session: LoadSession, fqn: str, pool: ThreadPoolExecutor | None = None
) -> torch.Tensor:
    """Tensor ``fqn`` of the session's checkpoint as one CPU tensor (dequantized where it
    was stored lossy): every shard read, its chunks checked against their keys."""
    t = session.manifest.tensors[fqn]
    where = session.where(fqn)
    full = _allocate(where, list(t.shape), torch_dtype(t.dtype))
    for shard in t.shards:
        raw = session.reader.read_rows(shard.blob, 0, shard.blob.rows, where, pool)
        box = full
        for dim, (off, size) in enumerate(zip(shard.offsets, shard.sizes, strict=True)):
            box = box.narrow(dim, off, size)
        box.copy_(from_bytes(raw, full.dtype, shard.sizes))
    return full


def _allocate(where: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape)``, or an AllocationError naming the tensor and its size."""
    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:
        nbytes = math.prod(shape) * dtype.itemsize
        raise AllocationError(
            f"cannot allocate {where}: shape {shape} {str(dtype).replace('torch.', '')} "
            f"needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB) in host memory "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None


def iter_full_tensors(
    session: LoadSession, fqns: Iterable[str], pool: ThreadPoolExecutor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(fqn, whole tensor)`` one at a time, in ``fqns`` order (memory: one tensor)."""
    for fqn in fqns:
        yield fqn, full_tensor(session, fqn, pool)
