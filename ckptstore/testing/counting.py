"""A backend wrapper that counts requests and bytes per area of the store (the first key
component: ``chunks``, ``checkpoints``, ``catalog``, ``leases``, …), for tests and benchmarks
that show what an operation reads — e.g. that a save's metadata reads do not grow with the
number of checkpoints, or with the number of ranks."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from ckptstore.backend.base import Backend, ObjectInfo, WrappedBackend

METADATA_AREAS = frozenset({"checkpoints", "catalog", "store.json", "trash"})


def area(key: str) -> str:
    return key.split("/", 1)[0]


class CountingBackend(WrappedBackend):
    """Counts ``(operation, area)`` → requests and bytes read; :meth:`reset` zeroes them."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bytes_read: Counter[str] = Counter()
        self.keys_listed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # pickles as a fresh counter
        return {"inner": self.inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"])  # type: ignore[misc]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_read.clear()
            self.keys_listed.clear()

    def _count(self, op: str, key: str, nbytes: int = 0, listed: int = 0) -> None:
        with self._lock:
            self.requests[(op, area(key))] += 1
            self.bytes_read[area(key)] += nbytes
            self.keys_listed[area(key)] += listed

    # -- figures ----------------------------------------------------------------------------
    def metadata_requests(self) -> int:
        """Requests to anything but chunk objects (manifests, catalog, leases, config)."""
        return sum(n for (_, a), n in self.requests.items() if a != "chunks")

    def metadata_bytes(self) -> int:
        """Bytes read of manifests, catalog entries and store config (not chunks, leases)."""
        return sum(n for a, n in self.bytes_read.items() if a in METADATA_AREAS)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": {f"{op} {a}": n for (op, a), n in sorted(self.requests.items())},
            "bytes_read": dict(self.bytes_read),
            "keys_listed": dict(self.keys_listed),
            "metadata_requests": self.metadata_requests(),
            "metadata_bytes": self.metadata_bytes(),
        }

    # -- counted operations -----------------------------------------------------------------
    def get(self, key: str) -> bytes:
        try:
            data = self.inner.get(key)
        except Exception:
            self._count("get", key)
            raise
        self._count("get", key, len(data))
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.inner.get_range(key, start, end)
        self._count("get", key, len(data))
        return data

    def exists(self, key: str) -> bool:
        self._count("head", key)
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        self._count("head", key)
        return self.inner.size(key)

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self._count("put", key)
        self.inner.put(key, data, create_only=create_only)

    def put_fresh(self, key: str, data: bytes | memoryview) -> bool:
        self._count("put", key)  # the inner backend's own: one request where it can
        return self.inner.put_fresh(key, data)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        keys = self.inner.list(prefix)
        self._count("list", prefix, listed=len(keys))
        return keys

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        found = self.inner.list_info(prefix)
        self._count("list", prefix, listed=len(found))
        return found
