"""overwrite=True (docs/format.md O1–O5 and G10): never-overwrite stays the
default; an explicit overwrite keeps the old checkpoint loadable until its commit, leaves one
of the two complete after a crash at any step, and is safe beside gc."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
from ckptstore import errors
from ckptstore.backend import open_backend
from ckptstore.store import gc_run, layout, removal
from ckptstore.store.repository import Repository
from ckptstore.store.retention import Retention
from ckptstore.store.session import SaveSession
from ckptstore.testing.faulty import FaultyBackend

OLD = {"w": torch.arange(65536.0).reshape(512, 128), "b": torch.ones(8)}
NEW = {"w": -torch.arange(65536.0).reshape(512, 128), "b": torch.ones(8)}
NAME = layout.step_name(1)


def _is(full: dict, sd: dict) -> bool:
    return all(torch.equal(full[k], v) for k, v in sd.items())


def _store(tmp_path) -> str:
    url = str(tmp_path / "s")
    ckptstore.save(OLD, url, step=1, chunk_bytes=16384)
    return url


def test_default_refuses_with_dcps_words(tmp_path):
    url = _store(tmp_path)
    with pytest.raises(errors.CheckpointExistsError, match="Checkpoint already exists"):
        ckptstore.save(NEW, url, step=1)
    with pytest.raises(errors.CheckpointExistsError, match="Checkpoint already exists"):
        ckptstore.async_save(NEW, url, step=1).result()
    with pytest.raises(Exception, match="Checkpoint already exists"):  # noqa: B017
        try:
            dcp.save(NEW, storage_writer=ckptstore.Writer(url, step=1))
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            raise Exception(str(exc)) from None
    assert _is(ckptstore.load_full(url), OLD)


@pytest.mark.parametrize("how", ["save", "async_save", "dcp"])
def test_overwrite_replaces(tmp_path, how):
    url = _store(tmp_path)
    if how == "save":
        info = ckptstore.save(NEW, url, step=1, overwrite=True, chunk_bytes=16384)
        assert info.name == NAME
    elif how == "async_save":
        ckptstore.async_save(NEW, url, step=1, overwrite=True, chunk_bytes=16384).result()
    else:
        dcp.save(NEW, storage_writer=ckptstore.Writer(url, step=1, overwrite=True))
    assert _is(ckptstore.load_full(url, step=1), NEW)
    out = {k: torch.zeros_like(v) for k, v in NEW.items()}
    ckptstore.load(out, url)
    assert _is(out, NEW)
    repo = Repository.open(url)
    summaries, bad = repo.summaries()
    assert [s.name for s in summaries] == [NAME] and not bad
    assert len(repo.backend.list(layout.CATALOG)) == 1  # the old entry went (C3)
    assert len(repo.trash_entries()) == 1  # the old manifest, for saves that read it (O2)
    # a gc afterwards: the new checkpoint intact, the old one's own chunks collected
    report = gc_run.collect(Repository.open(url), grace=0)
    assert report.chunks_deleted > 0
    assert _is(ckptstore.load_full(url, step=1), NEW)


def test_overwrite_of_a_name_not_there_is_a_plain_save(tmp_path):
    url = str(tmp_path / "s")
    ckptstore.save(NEW, url, step=3, overwrite=True)
    assert _is(ckptstore.load_full(url, step=3), NEW)


# where a crash can hit the overwrite's commit, and which checkpoint must be there after
CRASHES = [
    ("put", "chunks/*", "old"),  # while writing chunks
    ("put", "trash/*", "old"),  # O2: copying the old manifest to the trash
    ("delete", "catalog/*", "old"),  # O3: deleting the old catalog entry
    ("put", "checkpoints/*", "old"),  # O4: the commit itself
    ("put", "catalog/*", "new"),  # O5: the new catalog entry, after the commit
    ("delete", "leases/*", "new"),  # releasing the lease
]


@pytest.mark.parametrize(("op", "match", "left"), CRASHES)
def test_crash_at_each_step_leaves_one_complete(tmp_path, op, match, left):
    url = _store(tmp_path)
    faulty = FaultyBackend(open_backend(url))
    faulty.fail(op, match, times=1)
    try:
        ckptstore.save(NEW, faulty, step=1, overwrite=True, chunk_bytes=16384)
    except BaseException:  # noqa: BLE001 - the injected failure, however DCP wraps it
        pass
    expected = OLD if left == "old" else NEW
    assert _is(ckptstore.load_full(url, step=1), expected)
    assert [s.name for s in Repository.open(url).summaries()[0]] == [NAME]
    # a gc after the crash keeps it whole (grace 0: only leases and references protect)
    gc_run.collect(Repository.open(url), grace=0)
    assert _is(ckptstore.load_full(url, step=1), expected)
    # and overwriting again works (a lease the crash left holds the name until it expires,
    # TTL + skew: O1; here we expire it by hand)
    backend = open_backend(url)
    for key in backend.list(layout.LEASES):
        backend.delete(key)
    ckptstore.save(NEW, url, step=1, overwrite=True, chunk_bytes=16384)
    assert _is(ckptstore.load_full(url, step=1), NEW)


def test_gc_does_not_drop_a_checkpoint_being_overwritten(tmp_path):
    """G10: a gc (or rm) that took its lock after the overwrite's commit check reads the
    save leases and leaves that name alone; the overwrite then commits."""
    url = _store(tmp_path)
    ckptstore.save({"x": torch.ones(2)}, url, step=2)  # so keep_last=1 would drop step 1
    repo = Repository.open(url)
    session = SaveSession(repo, NAME, step=1, overwrite=True).begin()
    try:
        with pytest.raises(errors.CheckpointBusyError, match="overwrite=True"):
            removal.remove(Repository.open(url), [NAME])
        report = gc_run.collect(Repository.open(url), Retention(keep_last=1), grace=0)
        assert NAME not in report.dropped and "busy" in report.skipped.get(NAME, "busy")
        assert _is(ckptstore.load_full(url, step=1), OLD)
        # a second overwrite of the same name waits for the first (O1), then gives up
        with pytest.raises(errors.CheckpointBusyError, match="saving it too"):
            SaveSession(Repository.open(url), NAME, overwrite=True, gc_wait=0.3).begin()
    finally:
        session.release()
    removal.remove(Repository.open(url), [NAME])  # once the save is over, it can go
    assert [s.name for s in Repository.open(url).summaries()[0]] == [layout.step_name(2)]


def test_gc_running_beside_the_overwrite(tmp_path):
    """A gc that runs while the overwrite writes its chunks (between its chunk puts) never
    makes the committed checkpoint name a missing chunk."""
    url = _store(tmp_path)
    ckptstore.save({"x": torch.ones(2)}, url, step=2)  # so keep_last=1 would drop step 1
    faulty = FaultyBackend(open_backend(url))
    ran = []

    def run_gc(_key: str) -> None:
        if not ran:
            ran.append(gc_run.collect(Repository.open(url), Retention(keep_last=1), grace=0))

    faulty.on("put", "chunks/*", run_gc, after=1, times=1)
    ckptstore.save(NEW, faulty, step=1, overwrite=True, chunk_bytes=16384)
    assert ran and NAME not in ran[0].dropped  # its save lease kept the name (G10)
    assert _is(ckptstore.load_full(url, step=1), NEW)
    gc_run.collect(Repository.open(url), grace=0)
    assert _is(ckptstore.load_full(url, step=1), NEW)
