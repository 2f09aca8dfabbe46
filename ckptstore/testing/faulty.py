"""A fault-injecting in-memory fsspec filesystem, registered as ``faulty://``.

Because faults happen below fsspec, a test exercises the whole real path (URL parsing,
backend error translation, store, DCP) and only the storage misbehaves. Faults are set on
the class and cleared with :func:`reset` (tests use the ``faults`` fixture).
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from ckptstore.errors import BackendError


@dataclass
class FaultPlan:
    fail_put_after: int | None = None
    """Let this many matching puts succeed, then fail every later one."""
    put_match: str = "*"
    corrupt_get_match: str | None = None
    """Flip one bit in the middle of every object read whose path matches."""
    truncate_get_match: str | None = None
    """Return only the first half of every object read whose path matches."""
    fail_delete_after: int | None = None
    """Let this many matching deletes succeed, then fail every later one."""
    delete_match: str = "*"
    puts: int = 0
    deletes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyFileSystem(MemoryFileSystem):
    protocol = "faulty"
    store: dict = {}  # noqa: RUF012 - its own namespace, apart from memory://
    pseudo_dirs = [""]  # noqa: RUF012
    plan = FaultPlan()

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        plan = type(self).plan
        if fnmatch.fnmatch(path, plan.put_match) and plan.fail_put_after is not None:
            with plan.lock:
                plan.puts += 1
                n = plan.puts
            if n > plan.fail_put_after:
                raise OSError(f"injected put failure #{n} on {path}")
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def rm_file(self, path):
        plan = type(self).plan
        if fnmatch.fnmatch(path, plan.delete_match) and plan.fail_delete_after is not None:
            with plan.lock:
                plan.deletes += 1
                n = plan.deletes
            if n > plan.fail_delete_after:
                raise OSError(f"injected delete failure #{n} on {path}")
        return super().rm_file(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        plan = type(self).plan
        if plan.corrupt_get_match and fnmatch.fnmatch(path, plan.corrupt_get_match) and data:
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x10
            data = bytes(buf)
        if plan.truncate_get_match and fnmatch.fnmatch(path, plan.truncate_get_match):
            data = data[: len(data) // 2]
        return data


def reset() -> None:
    """Clear every fault and every stored object."""
    FaultyFileSystem.plan = FaultPlan()
    FaultyFileSystem.store.clear()
    FaultyFileSystem.pseudo_dirs[:] = [""]


def set_plan(**kwargs: object) -> FaultPlan:
    FaultyFileSystem.plan = FaultPlan(**kwargs)  # type: ignore[arg-type]
    return FaultyFileSystem.plan


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


class failing_puts:  # noqa: N801 - used like a function: ``with failing_puts(after=2):``
    """Make every Backend in this process fail puts whose key contains ``match`` after
    ``after`` of them succeeded — a backend that breaks on the Nth write, on any storage."""

    def __init__(self, after: int, match: str = "") -> None:
        self.after = after
        self.match = match
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> failing_puts:
        from ckptstore.backend import Backend

        self._original = original = Backend.put
        outer = self

        def put(backend, key, data, *, create_only=False):
            if outer.match in key:
                with outer._lock:
                    outer.count += 1
                    n = outer.count
                if n > outer.after:
                    raise BackendError(f"injected put failure #{n} on {backend.describe(key)}")
            return original(backend, key, data, create_only=create_only)

        Backend.put = put  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from ckptstore.backend import Backend

        Backend.put = self._original  # type: ignore[method-assign]


class failing_deletes:  # noqa: N801 - used like a function: ``with failing_deletes(after=2):``
    """Make every Backend in this process fail deletes whose key contains ``match`` after
    ``after`` of them succeeded — a gc that breaks part-way, on any storage."""

    def __init__(self, after: int, match: str = "") -> None:
        self.after = after
        self.match = match
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> failing_deletes:
        from ckptstore.backend import Backend

        self._original = original = Backend.delete
        outer = self

        def delete(backend, key):
            if outer.match in key:
                with outer._lock:
                    outer.count += 1
                    n = outer.count
                if n > outer.after:
                    raise BackendError(f"injected delete failure #{n} on {backend.describe(key)}")
            return original(backend, key)

        Backend.delete = delete  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from ckptstore.backend import Backend

        Backend.delete = self._original  # type: ignore[method-assign]
