"""Storage backend: the contract (:mod:`.base`), its fsspec implementation (the only layer
that knows fsspec and its exceptions), and the wrapper base that test doubles build on."""

from ckptstore.backend.base import (
    Backend,
    BackendWrapper,
    Cancel,
    Capabilities,
    ObjectInfo,
    Stats,
    WrappedBackend,
    io_pool,
)
from ckptstore.backend.fsspec_backend import Failure, FsspecBackend, classify, open_backend

__all__ = [
    "Backend",
    "BackendWrapper",
    "Cancel",
    "Capabilities",
    "Failure",
    "FsspecBackend",
    "ObjectInfo",
    "Stats",
    "WrappedBackend",
    "classify",
    "io_pool",
    "open_backend",
]
