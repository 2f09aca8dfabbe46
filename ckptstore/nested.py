"""The one walk over nested state dicts, so every part of ckptstore agrees on what is a
container and what is a value.

The rule: a ``Mapping`` is a container (its keys are the steps), and so are a ``list`` and a
plain ``tuple`` (their indices are the steps); a namedtuple, a tensor and everything else is
a leaf. This is the rule a user reads off their state dict; where DCP's flattening differs
(it stores a tuple whole, as one pickled value), the caller that cares says so with the
step kinds it gets. Torch-free: callers test the leaves (``isinstance(x, torch.Tensor)``).
Public: the trainer plug-ins and the bench use it (docs/api.md, "ckptstore.nested").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

StepKind = Literal["key", "list", "tuple"]
Step = tuple[Any, StepKind]
"""One step of a path: a mapping key, or an index into a list or a plain tuple."""
Path = tuple[Step, ...]


def is_container(value: Any) -> bool:
    """Whether :func:`walk` descends into ``value``."""
    return isinstance(value, (Mapping, list)) or _plain_tuple(value)


def walk(obj: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every node of ``obj``, containers included, parents before their children, with its
    path from ``obj`` (the root itself has the empty path)."""
    yield path, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from walk(v, (*path, (k, "key")))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, (*path, (i, "list")))
    elif _plain_tuple(obj):
        for i, v in enumerate(obj):
            yield from walk(v, (*path, (i, "tuple")))


def leaves(obj: Any, kind: type | tuple[type, ...] = object) -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) for every leaf of ``obj`` that is an instance of ``kind``; the
    path is dotted as DCP names keys (``optim.state.0.exp_avg``)."""
    for path, value in walk(obj):
        if not is_container(value) and isinstance(value, kind):
            yield dotted(path), value


def dotted(path: Path) -> str:
    """``path`` as DCP's dotted key."""
    return ".".join(str(key) for key, _ in path)


def map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` rebuilt with ``fn`` applied to every leaf (dicts as dicts, other mappings as
    dicts, lists as lists, plain tuples as tuples)."""
    if isinstance(obj, Mapping):
        return {k: map_leaves(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_leaves(v, fn) for v in obj]
    if _plain_tuple(obj):
        return tuple(map_leaves(v, fn) for v in obj)
    return fn(obj)


def _plain_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and not hasattr(value, "_fields")


__all__ = ["Path", "Step", "StepKind", "dotted", "is_container", "leaves", "map_leaves", "walk"]
