"""Tensor ↔ byte buffer, and torch dtype ↔ the dtype names stored in manifests."""

from __future__ import annotations

import sys

import torch

from ckptstore.codecs.base import byte_view
from ckptstore.codecs.pipeline import DTYPES
from ckptstore.errors import MismatchError

# torch's dtypes for the names of the one dtype table (codecs.DTYPES), those this torch has
_BY_NAME: dict[str, torch.dtype] = {
    name: dt for name in DTYPES if isinstance(dt := getattr(torch, name, None), torch.dtype)
}
_BY_DTYPE = {v: k for k, v in _BY_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise MismatchError(f"ckptstore cannot store tensors of dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise MismatchError(f"checkpoint holds dtype {name!r}, unknown to this torch") from None


if sys.byteorder != "little":  # pragma: no cover - no such machine in CI
    raise ImportError("ckptstore format v1 stores little-endian bytes; this host is big-endian")


def raw_size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def to_host_bytes(tensor: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """The raw bytes of ``tensor`` on the host, row-major; also returns the tensor that owns
    them (keep it alive while the view is used). Copies only when needed: device tensors,
    non-contiguous views and conjugate/negative views."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b""), t
    flat = t.reshape(-1).view(torch.uint8)
    return byte_view(flat.numpy()), t


def from_bytes(raw, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A CPU tensor viewing ``raw`` (a numpy uint8 array or bytes) as ``dtype``/``shape``."""
    import numpy as np

    arr = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    if arr.size == 0:
        return torch.empty(shape, dtype=dtype)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).view(dtype).reshape(shape)
