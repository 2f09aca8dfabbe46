"""One backend over any fsspec filesystem.

Keys are '/'-separated paths relative to the store root. Every put is atomic (a reader sees
the whole object or none of it) and a create-only put never replaces an existing object;
how each filesystem provides that is recorded in :class:`Capabilities`, not tested by
protocol name elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptstore import knobs
from ckptstore.errors import (
    BackendError,
    ObjectExistsError,
    ObjectNotFoundError,
    UnknownSchemeError,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees, as data."""

    atomic_put: bool
    """A reader never observes a partially written object."""
    atomic_create: bool
    """``put(create_only=True)`` is atomic against a concurrent writer of the same key."""
    local: bool
    """Objects are files on this machine's filesystem."""


class Backend:
    """Byte objects under a root URL: get / put / list / delete, single and batched."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        is_local = isinstance(fs, LocalFileSystem)
        self.capabilities = Capabilities(atomic_put=True, atomic_create=True, local=is_local)

    # -- keys ---------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of ``key``."""
        return f"{self.root}/{key}" if self.root else key

    def describe(self, key: str) -> str:
        """A human-readable location of ``key`` for error messages."""
        return f"{self.url.rstrip('/')}/{key}"

    # -- single-object operations --------------------------------------------------------
    def get(self, key: str) -> bytes:
        """The whole object. Raises ObjectNotFoundError if absent."""
        return self._guard(key, lambda: self.fs.cat_file(self.path(key)))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        return self._guard(key, lambda: self.fs.cat_file(self.path(key), start=start, end=end))

    def exists(self, key: str) -> bool:
        return bool(self._guard(key, lambda: self.fs.exists(self.path(key))))

    def size(self, key: str) -> int:
        return int(self._guard(key, lambda: self.fs.size(self.path(key))))

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key`` atomically.

        With ``create_only`` the put fails with ObjectExistsError if the key exists, and
        never replaces it, even against a concurrent writer.
        """
        if self.capabilities.local:
            self._guard(key, lambda: self._put_local(key, data, create_only))
            return
        mode = "create" if create_only else "overwrite"
        try:
            self._guard(key, lambda: self.fs.pipe_file(self.path(key), bytes(data), mode=mode))
        except FileExistsError as exc:
            raise ObjectExistsError(f"{self.describe(key)} already exists") from exc

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""
        try:
            self._guard(key, lambda: self.fs.rm_file(self.path(key)))
        except ObjectNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        """Keys under folder ``prefix`` (recursively), relative to the root, sorted."""
        base = self.path(prefix).rstrip("/")
        try:
            found = self._guard(prefix, lambda: self.fs.find(base))
        except ObjectNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        keys = []
        for p in found:
            p = self.fs._strip_protocol(p)
            rel = p[len(root) + 1 :] if root and p.startswith(root + "/") else p.lstrip("/")
            if "/.tmp-" in "/" + rel or rel.rsplit("/", 1)[-1].startswith(".tmp-"):
                continue
            keys.append(rel)
        return sorted(keys)

    # -- batches ------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str], threads: int | None = None) -> dict[str, bytes]:
        """Fetch many objects concurrently."""
        keys = list(dict.fromkeys(keys))
        return dict(zip(keys, self.map(self.get, keys, threads), strict=True))

    def put_many(self, items: Mapping[str, bytes], threads: int | None = None) -> None:
        """Store many objects concurrently (each atomically)."""
        self.map(lambda kv: self.put(kv[0], kv[1]), list(items.items()), threads)

    def map(self, fn: Callable[[Any], T], args: list[Any], threads: int | None = None) -> list[T]:
        """Run ``fn`` over ``args`` on a bounded thread pool, in order; first error raises."""
        n = min(knobs.get("THREADS", threads), max(1, len(args)))
        if n <= 1:
            return [fn(a) for a in args]
        with ThreadPoolExecutor(n, thread_name_prefix="ckptstore-io") as pool:
            return list(pool.map(fn, args))

    # -- internals ----------------------------------------------------------------------
    def _put_local(self, key: str, data: bytes | memoryview, create_only: bool) -> None:
        dst = self.fs._strip_protocol(self.path(key))
        folder = os.path.dirname(dst)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            if knobs.get("FSYNC"):
                f.flush()
                os.fsync(f.fileno())
        try:
            if create_only:
                try:
                    os.link(tmp, dst)  # atomic, fails if dst exists
                except FileExistsError as exc:
                    raise ObjectExistsError(f"{self.describe(key)} already exists") from exc
            else:
                os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _guard(self, key: str, fn: Callable[[], T]) -> T:
        """Run one storage call, translating fsspec/OS errors into the ckptstore tree."""
        try:
            return fn()
        except (ObjectExistsError, ObjectNotFoundError):
            raise
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{self.describe(key)} not found") from exc
        except FileExistsError:
            raise
        except PermissionError as exc:
            raise BackendError(f"permission denied on {self.describe(key)}: {exc}") from exc
        except OSError as exc:
            raise BackendError(f"storage error on {self.describe(key)}: {exc}") from exc


def open_backend(url: str, storage_options: Mapping[str, Any] | None = None) -> Backend:
    """Open the fsspec filesystem behind ``url``. Plain paths mean the local filesystem."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"store URL must be a string or path, not {type(url).__name__}")
    url = os.fspath(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise UnknownSchemeError(f"unknown URL scheme in {url!r}: {exc}") from exc
        raise
    except ImportError as exc:
        raise UnknownSchemeError(
            f"the filesystem for {url!r} needs a package that is not installed: {exc}"
        ) from exc
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    return Backend(fs, root, url)
