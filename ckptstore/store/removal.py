"""``rm``: drop named checkpoints under the gc lock; their chunks go at the next gc.

No torch here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ckptstore.errors import CheckpointNotFoundError
from ckptstore.store import leases
from ckptstore.store.gc_run import GcReport
from ckptstore.store.repository import Repository


def remove(
    repo: Repository,
    names: Sequence[str],
    *,
    wait: float = 0.0,
    ttl: float | None = None,
    skew: float | None = None,
) -> GcReport:
    """Drop the named checkpoints under the gc lock; their chunks go at the next gc. All
    must exist (:class:`~ckptstore.errors.CheckpointNotFoundError` otherwise, and nothing is
    removed). An unreadable manifest is deleted outright (docs/format.md G2)."""
    if not names:
        raise ValueError("name at least one checkpoint to remove")
    names = list(dict.fromkeys(names))
    t0 = time.monotonic()
    lock = leases.acquire_gc(repo.backend, wait=wait, ttl=ttl, skew=skew)
    report = GcReport(url=repo.url, dropped=[])
    try:
        present = set(repo.names())
        missing = [n for n in names if n not in present]
        if missing:
            raise CheckpointNotFoundError(
                f"checkpoint(s) {missing} not found in {repo.url} (nothing deleted)"
            )
        lock.update(dropped=names)
        for name in names:
            lock.check("drop checkpoints")
            _, size = repo.trash(name)
            report.dropped.append(name)
            report.bytes_deleted += size
    finally:
        lock.release()  # rm publishes no chunk list: no save can need its record
        report.seconds = time.monotonic() - t0
    return report
