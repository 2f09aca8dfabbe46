"""A store with a long history in seconds: copies of one committed checkpoint under new step
names, each with its catalog entry — objects exactly like those real saves write, for tests
and benchmarks of how costs grow (or do not) with the number of checkpoints; and
:func:`add_checkpoint`, which places any ready-made manifest in a store the same way."""

from __future__ import annotations

import time

from ckptstore.store import layout, refs
from ckptstore.store.manifest import Manifest
from ckptstore.store.repository import Repository


def add_checkpoint(repo: Repository, manifest: Manifest) -> int:
    """Commit ``manifest`` in ``repo`` and write its catalog entry, as a save would, but
    without the save protocol (no lease, no commit check): for tests and benchmarks that
    build a store's history directly, with no gc running beside. The chunks it names are
    not checked: put them in the store first if anything will read them. Returns the
    manifest's size; raises :class:`~ckptstore.errors.CheckpointExistsError` when its name
    is taken."""
    size = repo.commit_manifest(manifest)
    repo.write_catalog_entry(manifest)
    refs.point(repo.backend, manifest.name, manifest.created, manifest.step)
    return size


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
        add_checkpoint(repo, copy)
        return copy.name

    return repo.backend.map(one, list(range(n)), threads=8)
