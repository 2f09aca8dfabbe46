"""Checks at the edge of a save or load: the store URL's type, and state dict values that
cannot be stored (sparse and meta tensors), each refused with a message naming the key."""

from __future__ import annotations

import os
from typing import Any

import torch

from ckptstore.backend import Backend
from ckptstore.errors import UnsupportedValueError


def store_url(url: Any) -> str | Backend:
    """``url`` as the Writer/Reader keep it: a Backend as is, a path or string as a str.
    Anything else (an int, bytes, None) is a TypeError before any storage is touched —
    ``str(123)`` would quietly make a store ``./123``."""
    if isinstance(url, Backend):
        return url
    if isinstance(url, (str, os.PathLike)):
        path = os.fspath(url)
        if isinstance(path, str):
            return path
    raise TypeError(
        f"store URL must be a string, a path or a Backend, not {type(url).__name__} ({url!r:.60})"
    )


def check_tensor(fqn: str, tensor: torch.Tensor) -> None:
    """Refuse, naming the key, a tensor that has no dense bytes to store."""
    if not isinstance(tensor, torch.Tensor):
        return  # (what a custom planner hands over is its business)
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(
            f"{fqn!r} is a sparse tensor ({str(tensor.layout).replace('torch.', '')}): "
            f"ckptstore stores dense tensors only; save {fqn}.to_dense(), or its indices and "
            "values as two tensors"
        )
    if tensor.is_meta:
        raise UnsupportedValueError(
            f"{fqn!r} is a meta tensor (a shape {list(tensor.shape)} without data): "
            "materialize it before saving (e.g. module.to_empty(device=...) and initialize)"
        )


def check_state(obj: Any, path: str = "") -> None:
    """:func:`check_tensor` on every tensor of a (nested) state dict before a save starts;
    key paths are dotted like DCP's (``optim.state.0.exp_avg``)."""
    if isinstance(obj, torch.Tensor):
        check_tensor(path, obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_state(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_state(v, f"{path}.{i}" if path else str(i))
