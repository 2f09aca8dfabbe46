"""ckptstore: a compressed, content-addressed checkpoint store for PyTorch.

The torch-facing names (save, load, Writer, …) are imported lazily, so ``ckptstore.store``,
``ckptstore.codecs`` and the CLI's ls/inspect/verify run without importing torch.
"""

from __future__ import annotations

from typing import Any

from ckptstore.errors import *  # noqa: F403
from ckptstore.errors import __all__ as _errors
from ckptstore.version import __version__

_LAZY = {
    "save": "ckptstore.api",
    "async_save": "ckptstore.api",
    "load": "ckptstore.api",
    "load_full": "ckptstore.api",
    "Store": "ckptstore.store.facade",
    "check_name": "ckptstore.store.layout",
    "Retention": "ckptstore.store.retention",
    "GcPlan": "ckptstore.store.gc_plan",
    "GcReport": "ckptstore.store.gc_run",
    "Holds": "ckptstore.store.gc_rules",
    "retain_in_background": "ckptstore.background",
    "SaveInfo": "ckptstore.dcp.writer",
    "SaveOptions": "ckptstore.store.options",
    "Mirror": "ckptstore.store.options",
    "MirrorReport": "ckptstore.store.mirror",
    "wait_for_mirrors": "ckptstore.store.mirror",
    "CopyReport": "ckptstore.store.copy",
    "CheckpointSummary": "ckptstore.store.catalog",
    # what Store.manifest() returns: a checkpoint's contents down to its chunks (read-only)
    "Manifest": "ckptstore.store.manifest",
    "TensorEntry": "ckptstore.store.manifest",
    "Shard": "ckptstore.store.manifest",
    "Blob": "ckptstore.store.manifest",
    "ChunkRef": "ckptstore.store.manifest",
    "LoadInfo": "ckptstore.dcp.reader",
    "Writer": "ckptstore.dcp.writer",
    "Reader": "ckptstore.dcp.reader",
    "Settings": "ckptstore.knobs",
    "allow_globals": "ckptstore.dcp.safe_load",
}

__all__ = ["__version__", *_LAZY, *_errors]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
