"""Reading from two tiers: the primary store first, the mirror for what it lacks.

A load that names a mirror (``load(sd, "/nvme/run", mirror="s3://bucket/run")``) opens a
:class:`Repository` over a :class:`TieredBackend`: listings are the union of both stores,
so "latest" is the newest checkpoint committed in either; every object is read from the
primary where it is there and from the mirror otherwise. A chunk read from the mirror is
checked and, with ``Mirror.read_through`` (the default), written to the primary, so the next
load of it is local — what a node that lost its disk, or a new machine, needs. Nothing else
is ever written: a manifest is not copied to the primary without its chunks (use
``ckptstore cp`` for whole checkpoints). No torch here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from ckptstore.backend import Backend, ObjectInfo, WrappedBackend, open_backend
from ckptstore.errors import CkptStoreError, ObjectNotFoundError, StoreNotFoundError
from ckptstore.knobs import Settings
from ckptstore.store import chunks, layout
from ckptstore.store.options import Mirror
from ckptstore.store.repository import Repository

__all__ = ["TieredBackend", "open_tiered"]

log = logging.getLogger(__name__)


class TieredBackend(WrappedBackend):
    """``primary`` (the wrapped backend) first, ``mirror`` for what it lacks; read-only
    apart from the read-through copies of chunks."""

    def __init__(self, primary: Backend, mirror: Backend, *, read_through: bool = True) -> None:
        super().__init__(primary)
        self.mirror = mirror
        self.read_through = read_through
        self._lock = threading.Lock()
        self.from_mirror = 0
        """Objects read from the mirror because the primary lacked them."""
        self.written_back = 0
        """Chunks written to the primary after a read from the mirror."""

    def __repr__(self) -> str:
        return f"TieredBackend({self.inner!r}, mirror={self.mirror!r})"

    def _count(self, **n: int) -> None:
        with self._lock:
            self.from_mirror += n.get("from_mirror", 0)
            self.written_back += n.get("written_back", 0)

    def get(self, key: str) -> bytes:
        try:
            return self.inner.get(key)
        except ObjectNotFoundError:
            pass
        try:
            data = self.mirror.get(key)
        except ObjectNotFoundError:
            raise ObjectNotFoundError(
                f"{self.inner.describe(key)} not found, nor in the mirror "
                f"({self.mirror.describe(key)})"
            ) from None
        self._count(from_mirror=1)
        if self.read_through and layout.chunk_digest(key) is not None:
            self._write_back(key, data)
        return data

    def _write_back(self, key: str, data: bytes) -> None:
        """Keep a checked copy of a chunk in the primary; a failure (a full disk) costs
        only the next load's locality."""
        try:
            chunks.unframe(data, self.mirror.describe(key))  # never cache a corrupt copy
            self.inner.put(key, data)
        except CkptStoreError as exc:
            log.warning("chunk %s read from the mirror, not cached in the primary: %s", key, exc)
            return
        self._count(written_back=1)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            return self.inner.get_range(key, start, end)
        except ObjectNotFoundError:
            self._count(from_mirror=1)
            return self.mirror.get_range(key, start, end)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key) or self.mirror.exists(key)

    def size(self, key: str) -> int:
        try:
            return self.inner.size(key)
        except ObjectNotFoundError:
            return self.mirror.size(key)

    def list(self, prefix: str) -> list[str]:
        return sorted(set(self.inner.list(prefix)) | set(self.mirror.list(prefix)))

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        raise TypeError(self._read_only(f"write {key}"))

    def delete(self, key: str) -> None:
        raise TypeError(self._read_only(f"delete {key}"))

    def _read_only(self, what: str) -> str:
        return (
            f"cannot {what}: {self.inner.url} with its mirror {self.mirror.url} is read as "
            "one store (loads, listings); open one of them alone to change it"
        )

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        out = {i.key: i for i in self.mirror.list_info(prefix)}
        out.update({i.key: i for i in self.inner.list_info(prefix)})
        return [out[k] for k in sorted(out)]


def open_tiered(
    url: str | Backend,
    mirror: Mirror,
    storage_options: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
) -> Repository:
    """A repository that reads ``url`` first and ``mirror`` for what it lacks. A primary
    with no store yet (a new machine, a lost disk) is created when ``read_through`` is on
    (it is the cache), else read as empty."""
    if isinstance(url, Backend):
        primary_backend = url
    else:
        primary_backend = open_backend(url, storage_options, settings)
    primary_url = primary_backend.url
    mirror_backend = open_backend(
        mirror.url, mirror.options_for(primary_url, storage_options), settings
    )
    Repository.open(mirror_backend, settings=settings)  # a StoreNotFoundError naming it
    try:
        Repository.open(primary_backend, create=mirror.read_through, settings=settings)
    except StoreNotFoundError:
        pass  # no primary store and no read-through: everything comes from the mirror
    tiered = TieredBackend(primary_backend, mirror_backend, read_through=mirror.read_through)
    return Repository.open(tiered, settings=settings)
