"""``refs/latest/``: pointers to the newest committed checkpoint, so "latest" costs one
listing of a prefix that holds about one key, not listings that grow with history
(docs/format.md, "refs/latest").

Each save, after its commit and catalog entry and under its lease, creates an empty object
``refs/latest/<created µs>.<step>.<name>`` (keys sort like the checkpoints they name), then
deletes the pointers older than its own. A reader lists the prefix, takes the newest pointer
whose manifest exists, and falls back to the catalog when there is none. The manifest stays
the truth: a pointer is only a hint about which manifest to read.
"""

from __future__ import annotations

import logging

from ckptstore.backend import Backend
from ckptstore.errors import CkptStoreError
from ckptstore.store import layout
from ckptstore.store.catalog import created_us

log = logging.getLogger(__name__)

PREFIX = "refs/latest/"


def pointer_key(name: str, created: float, step: int | None) -> str:
    return f"{PREFIX}{created_us(created):016d}.{'n' if step is None else step}.{name}"


def parse(key: str) -> tuple[tuple[int, int, str], str] | None:
    """(order, name) of a pointer key; None for anything else under the prefix."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split(".", 2)
    if len(parts) != 3 or len(parts[0]) != 16 or not parts[0].isdigit():
        return None
    us, step, name = parts
    if step != "n" and not step.isdigit():
        return None
    try:
        layout.check_name(name)
    except ValueError:
        return None
    return (int(us), -1 if step == "n" else int(step), name), name


def point(backend: Backend, name: str, created: float, step: int | None) -> None:
    """After a commit (its writer still holding the lease): add this checkpoint's pointer,
    drop the older ones. Failing costs only the pointer: readers then use the catalog."""
    key = pointer_key(name, created, step)
    try:
        backend.put(key, b"")
        mine = parse(key)
        assert mine is not None
        found = [(got[0], other) for other in backend.list(PREFIX) if (got := parse(other))]
        newest = max(found)[0] if found else mine[0]
        for order, other in found:  # older ones go; ours too when a newer one is there
            if order < mine[0] or (other == key and order < newest):
                backend.delete(other)
    except CkptStoreError as exc:
        log.warning("checkpoint %r committed, refs/latest not updated: %s", name, exc)


def candidates(backend: Backend) -> list[str]:
    """Checkpoint names the pointers name, newest first (one listing)."""
    found = [p for p in map(parse, backend.list(PREFIX)) if p is not None]
    return [name for _, name in sorted(found, reverse=True)]
