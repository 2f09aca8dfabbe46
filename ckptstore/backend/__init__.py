"""Storage backend: the only layer that knows fsspec and its exceptions."""

from ckptstore.backend.fsspec_backend import (
    Backend,
    Capabilities,
    Failure,
    Stats,
    classify,
    open_backend,
)

__all__ = ["Backend", "Capabilities", "Failure", "Stats", "classify", "open_backend"]
