"""A store with a long history in seconds: copies of one committed checkpoint under new step
names, each with its catalog entry — objects exactly like those real saves write, for tests
and benchmarks of how costs grow (or do not) with the number of checkpoints."""

from __future__ import annotations

import time

from ckptstore.store import layout
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository


def replicate(repo: Repository, source: str, n: int, *, first_step: int) -> list[str]:
    """Commit ``n`` copies of checkpoint ``source`` as steps ``first_step`` … (reusing its
    chunks, none marked new), all older than now. Returns their names."""
    m = repo.manifest(source)
    data = m.encode()
    now = time.time()

    def one(i: int) -> str:
        copy = Manifest.decode(data, "(copy)")
        copy.step = first_step + i
        copy.name = layout.step_name(copy.step)
        copy.created = now - (n - i) * 60.0
        for _, blob in copy.blobs():
            for c in blob.chunks:
                c.new = False
        repo._commit_manifest(copy)
        repo.write_catalog_entry(copy)
        return copy.name

    return repo.backend.map(one, list(range(n)), threads=8)
