"""Checks at the edge of a save or load: the store URL's type, and state dict values that
cannot be stored (sparse and meta tensors), each refused with a message naming the key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ckptstore.backend import Backend
from ckptstore.errors import UnsupportedValueError
from ckptstore.nested import leaves


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


def check_state_dict(state_dict: Any, verb: str = "save") -> None:
    """Refuse what is not a state dict (a module or optimizer passed instead of its
    ``state_dict()``, a tensor, a list) before DCP turns it into an AttributeError from deep
    inside its planner."""
    if isinstance(state_dict, Mapping):
        return
    hint = ""
    if callable(getattr(state_dict, "state_dict", None)):
        hint = f"; pass {type(state_dict).__name__}.state_dict() (or a dict holding it)"
    raise UnsupportedValueError(
        f"{verb} takes a state dict (a mapping of names to tensors and values), not a "
        f"{type(state_dict).__name__}{hint}"
    )


def check_state(obj: Any) -> None:
    """:func:`check_tensor` on every tensor of a (nested) state dict before a save starts;
    key paths are dotted like DCP's (``optim.state.0.exp_avg``)."""
    for path, tensor in leaves(obj, torch.Tensor):
        check_tensor(path, tensor)
