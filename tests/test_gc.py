"""Retention and gc: policies, plan vs execute, and safety beside saves in flight (the dedup
race, fresh chunks, the commit check), the gc lock, leases, and gc failing part-way."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.distributed.checkpoint import DefaultSavePlanner

import ckptstore
from ckptstore import errors
from ckptstore.backend import open_backend
from ckptstore.store import Repository, gc_plan, gc_run, layout, leases, removal
from ckptstore.store.retention import Retention, parse_duration
from ckptstore.testing.faulty import FaultyBackend
from tests.helpers import assert_same

CHUNK = 64 * 1024  # 16 rows of 1024 float32 per chunk


def _tensor(seed: int, rows: int = 64) -> torch.Tensor:
    return torch.randn(rows, 1024, generator=torch.Generator().manual_seed(seed))


def _state(seed: int, frozen: torch.Tensor | None = None) -> dict:
    out = {"head": _tensor(1000 + seed), "bias": torch.full((8,), float(seed))}
    if frozen is not None:
        out["frozen"] = frozen
    return out


def _save(state: dict, url: str, step: int | None = None, **kw):
    return ckptstore.save(state, url, step=step, chunk_bytes=CHUNK, **kw)


def _chunks(url: str) -> set[str]:
    return set(Repository.open(url).backend.list(layout.CHUNKS))


def _referenced(url: str) -> set[str]:
    repo = Repository.open(url)
    keys: set[bytes] = set()
    for m in repo.manifests():
        keys |= m.chunk_keys()
    return {layout.chunk_key(k.hex()) for k in keys}


def _names(url: str) -> list[str]:
    return [c.name for c in ckptstore.Store(url).list()]


@pytest.fixture
def small_skew(monkeypatch):
    monkeypatch.setenv("CKPTSTORE_CLOCK_SKEW", "1")


# -- durations and policies -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,seconds",
    [("0s", 0), ("90", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("7d", 604800),
     ("1.5h", 5400), ("250ms", 0.25), (12, 12)],
)  # fmt: skip
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "2x", "-1s", "1h 2", "s1"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.fixture
def ten(store_url):
    """Checkpoints of steps 0, 10, …, 90 and one named 'base' saved in between."""
    for i in range(10):
        _save(_state(i), store_url, step=10 * i)
        if i == 4:
            ckptstore.save({"b": torch.ones(4)}, store_url, name="base")
    return store_url


def _kept(url: str, **policy) -> list[str]:
    return gc_plan.plan(Repository.open(url), Retention(**policy), grace=0).kept


def test_retention_policies(ten):
    s = layout.step_name
    assert _kept(ten) == _names(ten)  # no rule: keep all
    assert _kept(ten, keep_last=3) == [s(70), s(80), s(90)]
    assert _kept(ten, keep_every=30) == [s(0), s(30), s(60), s(90)]
    assert _kept(ten, keep_every=40) == [s(0), s(40), s(80), s(90)]  # latest always kept
    assert _kept(ten, keep=("base",)) == ["base", s(90)]
    assert _kept(ten, keep=("20", s(50))) == [s(20), s(50), s(90)]  # a number is a step
    assert _kept(ten, keep_last=2, keep_every=50, keep=("base",)) == [
        s(0),
        "base",
        s(50),
        s(80),
        s(90),
    ]
    with pytest.raises(errors.CheckpointNotFoundError, match="nope"):
        _kept(ten, keep=("nope",))
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            Retention(keep_last=bad)


def test_plan_reasons(ten):
    p = gc_plan.plan(Repository.open(ten), Retention(keep_last=2, keep_every=90), grace=0)
    why = {c.name: c.reasons for c in p.checkpoints}
    assert why[layout.step_name(90)] == ["latest", "last 2", "every 90"]
    assert why[layout.step_name(0)] == ["every 90"]
    assert why[layout.step_name(10)] == []


def _all_objects(url: str) -> dict[str, bytes]:
    backend = Repository.open(url).backend
    return {k: backend.get(k) for k in backend.list("")}


def test_dry_run_deletes_nothing(ten):
    before = _all_objects(ten)
    report = ckptstore.Store(ten).gc(keep_last=2, grace=0, dry_run=True)
    assert report.dry_run and report.chunks_deleted == 0 and report.dropped == []
    assert len(report.plan.dropped) == 9 and report.plan.chunks_freed > 0
    assert _all_objects(ten) == before
    # the plan says what a run then does
    done = ckptstore.Store(ten).gc(keep_last=2, grace=0)
    assert done.dropped == report.plan.dropped
    assert done.chunks_deleted == report.plan.chunks_freed
    assert done.bytes_deleted == report.plan.bytes_freed


def test_gc_deletes_exactly_what_no_kept_checkpoint_references(store_url):
    frozen = _tensor(7, rows=256)
    states = {i: _state(i, frozen) for i in range(6)}
    for i, st in states.items():
        _save(st, store_url, step=i)
    before = _chunks(store_url)
    report = ckptstore.Store(store_url).gc(keep_last=2, grace=0)
    assert report.dropped == [layout.step_name(i) for i in range(4)]
    after = _chunks(store_url)
    assert after == _referenced(store_url)
    assert len(before) - len(after) == report.chunks_deleted == 4 * 4  # 4 head chunks each
    assert ckptstore.Store(store_url).verify().ok
    for i in (4, 5):
        assert_same(states[i], ckptstore.load_full(store_url, step=i))
    # nothing left: trash purged, lock gone
    backend = Repository.open(store_url).backend
    assert backend.list(layout.TRASH) == [] and backend.list(layout.LEASES) == []
    # a second run finds nothing to do
    again = ckptstore.Store(store_url).gc(keep_last=2, grace=0)
    assert again.dropped == [] and again.chunks_deleted == 0


def test_grace_keeps_young_chunks(local_url):
    for i in range(3):
        _save(_state(i), local_url, step=i)
    report = ckptstore.Store(local_url).gc(keep_last=1)  # default grace: 1 h
    assert len(report.dropped) == 2 and report.chunks_deleted == 0
    assert report.held.chunks == 8
    report = ckptstore.Store(local_url).gc(grace="0s")  # no policy: garbage only
    assert report.dropped == [] and report.chunks_deleted == 8
    assert _chunks(local_url) == _referenced(local_url)


def test_rm_then_gc(store_url):
    for i in range(3):
        _save(_state(i), store_url, step=i)
    store = ckptstore.Store(store_url)
    assert store.delete(step=1) == layout.step_name(1)
    assert _names(store_url) == [layout.step_name(0), layout.step_name(2)]
    with pytest.raises(errors.CheckpointNotFoundError):
        store.delete(step=1)
    report = ckptstore.Store(store_url).gc(grace=0)
    assert report.chunks_deleted == 4 and ckptstore.Store(store_url).verify().ok


def _old_temp_file(url: str, folder: str, nbytes: int = 100, age: float = 3600) -> str:
    """A ``.tmp-*`` file as a put killed mid-write leaves it, ``age`` seconds old."""
    import os
    import uuid

    path = os.path.join(url, folder, f".tmp-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * nbytes)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_gc_with_an_unreadable_manifest_deletes_no_chunk_and_does_the_rest(local_url):
    for i in range(4):
        _save(_state(i), local_url, step=i)
    store = ckptstore.Store(local_url)
    store.delete(step=0)  # its 4 chunks are garbage, its manifest in the trash
    repo = Repository.open(local_url)
    path = repo.backend.path(layout.manifest_key(layout.step_name(1)))
    with open(path, "r+b") as f:
        f.truncate(40)
    temp = _old_temp_file(local_url, "chunks/ab")
    before = _chunks(local_url)
    plan = gc_plan.plan(Repository.open(local_url), Retention(keep_last=1), grace=0)
    assert list(plan.unreadable) == [layout.step_name(1)]
    assert plan.unreadable[layout.step_name(1)]  # the error, as text
    assert plan.dropped == [layout.step_name(2)] and plan.kept == [layout.step_name(3)]
    # step 1's chunks are unknown: nothing is planned, what would go is counted as blocked
    assert plan.chunks_freed == 0 and not plan.chunk_keys and plan.chunks_blocked == 12
    assert plan.temp_files == 1 and plan.temp_bytes == 100
    report = ckptstore.Store(local_url).run_gc(plan)
    assert list(report.unreadable) == [layout.step_name(1)]
    assert report.dropped == [layout.step_name(2)]  # the policy's drops still happen
    assert report.chunks_deleted == 0 and report.chunks_blocked == 12
    assert _chunks(local_url) == before  # not one chunk
    assert report.trash_purged == 2 and repo.backend.list(layout.TRASH) == []
    assert report.temp_deleted == 1 and not os.path.exists(temp)
    assert repo.backend.list(layout.LEASES) == []  # the lock was given back
    assert sorted(repo.names()) == [layout.step_name(1), layout.step_name(3)]
    # collect() (retention after a save) behaves the same
    again = gc_run.collect(Repository.open(local_url), Retention(keep_last=1), grace=0)
    assert again.chunks_deleted == 0 and list(again.unreadable) == [layout.step_name(1)]
    # --keep naming the unreadable checkpoint is no error (it is never dropped anyway)
    assert gc_plan.plan(repo, Retention(keep=(layout.step_name(1),)), grace=0).unreadable
    assert gc_plan.plan(repo, Retention(keep=("1",)), grace=0).unreadable
    # rm deletes an unreadable manifest outright; gc then frees everything
    removal.remove(Repository.open(local_url), [layout.step_name(1)])
    report = ckptstore.Store(local_url).gc(keep_last=1, grace=0)
    assert report.unreadable == {} and report.chunks_deleted == 12
    assert _chunks(local_url) == _referenced(local_url)
    assert ckptstore.Store(local_url).verify().ok


# -- saves in flight -------------------------------------------------------------------------
class PausingPlanner(DefaultSavePlanner):
    """Stops the save in write_data when it reaches ``fqn`` (after it read its dedup index
    and handed the earlier items to the encoders) until ``go`` is set."""

    def __init__(self, fqn: str) -> None:
        super().__init__()
        self.fqn = fqn
        self.reached = threading.Event()
        self.go = threading.Event()

    def resolve_data(self, write_item):
        if write_item.index.fqn == self.fqn:
            self.reached.set()
            assert self.go.wait(60), "test never let the save go on"
        return super().resolve_data(write_item)


class SaveThread(threading.Thread):
    def __init__(self, state: dict, url: str, step: int, planner: PausingPlanner) -> None:
        super().__init__(daemon=True)
        self.args = (state, url, step, planner)
        self.error: BaseException | None = None
        self.info = None

    def run(self) -> None:
        state, url, step, planner = self.args
        try:
            self.info = _save(state, url, step, planner=planner)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc

    def pause_point(self) -> None:
        assert self.args[3].reached.wait(60), "the save did not reach its pause point"

    def finish(self) -> None:
        self.args[3].go.set()
        self.join(60)


def test_dedup_race_save_reuses_chunks_of_a_checkpoint_gc_drops(store_url, small_skew):
    """A save read the dedup index while checkpoint D still existed and reuses D's chunks;
    gc drops D meanwhile. The chunks must survive and the save must commit intact."""
    shared = _tensor(42, rows=64)  # 4 chunks only D has
    _save({"x": shared, "other": _tensor(1)}, store_url, step=1)  # D
    _save(_state(2), store_url, step=2)
    d_chunks = _referenced(store_url) - {layout.chunk_key(k.hex()) for k in _keys_of(store_url, 2)}
    state = {"x": shared, "zz_pause": _tensor(3)}
    save = SaveThread(state, store_url, 3, PausingPlanner("zz_pause"))
    save.start()
    save.pause_point()
    report = ckptstore.Store(store_url).gc(keep_last=1, grace=0)
    assert report.dropped == [layout.step_name(1)]
    assert report.saves_in_flight == 1 and report.trash_kept == 1
    assert d_chunks <= _chunks(store_url)  # held for the save in flight
    save.finish()
    assert save.error is None and save.info.new_chunks == 4  # x was reused, not rewritten
    assert ckptstore.Store(store_url).verify().ok
    assert_same(state, ckptstore.load_full(store_url, step=3))
    # once the save is done, the trash goes and so do the chunks only D had
    report = ckptstore.Store(store_url).gc(keep_last=1, grace=0)
    assert report.dropped == [layout.step_name(2)] and report.trash_purged == 2
    assert Repository.open(store_url).backend.list(layout.TRASH) == []
    assert ckptstore.Store(store_url).verify().ok


def _keys_of(url: str, step: int) -> set[bytes]:
    repo = Repository.open(url)
    return repo.manifest(repo.resolve(step=step)).chunk_keys()


def test_fresh_chunks_of_a_save_in_flight_are_kept(store_url, small_skew):
    _save(_state(0), store_url, step=0)
    _save(_state(1), store_url, step=1)
    ckptstore.Store(store_url).delete(step=0)  # garbage from before the save: may go
    time.sleep(1.2)  # > the skew margin
    state = {"fresh": _tensor(77, rows=128), "zz_pause": _tensor(78)}
    save = SaveThread(state, store_url, 2, PausingPlanner("zz_pause"))
    save.start()
    save.pause_point()
    deadline = time.monotonic() + 30
    while len(_chunks(store_url) - _referenced(store_url)) < 8:  # fresh's 8 chunks land
        assert time.monotonic() < deadline
        time.sleep(0.05)
    report = ckptstore.Store(store_url).gc(grace=0)
    assert report.held.by_saves == 8 and report.chunks_deleted == 4  # step 0's head only
    assert report.trash_purged == 1
    save.finish()
    assert save.error is None
    assert ckptstore.Store(store_url).verify().ok
    assert_same(state, ckptstore.load_full(store_url, step=2))


def _gated(url: str, prefix: str, release_after: float | None = None):
    """The store's backend, wrapped so that every delete of a key under ``prefix`` waits
    until the returned gate is released (a gc mid-sweep); with ``release_after``, a timer
    releases it that many seconds after the first delete was held."""
    faulty = FaultyBackend(open_backend(url))
    return faulty, faulty.pause("delete", prefix + "/*", release_after=release_after)


def _garbage_x(url: str) -> dict:
    """Checkpoint 2 stays; x (4 chunks) was only in checkpoint 1, now removed: garbage old
    enough for grace 0."""
    content = {"x": _tensor(5)}
    _save(content, url, step=1)
    _save(_state(2), url, step=2)
    ckptstore.Store(url).delete(step=1)
    return content


def _gc_in_thread(backend: FaultyBackend, result: dict) -> threading.Thread:
    runner = threading.Thread(
        target=lambda: result.setdefault("r", ckptstore.Store(backend).gc(grace=0)), daemon=True
    )
    runner.start()
    return runner


def test_commit_check_refuses_a_chunk_a_running_gc_deletes_after_the_write(store_url, small_skew):
    """The backstop: a save (re)writes chunks a running gc has planned and then deletes.
    The save sees the published plan, waits for the gc, finds them gone: no commit."""
    content = _garbage_x(store_url)
    result: dict = {}
    backend, gate = _gated(store_url, layout.CHUNKS, release_after=2.0)
    runner = _gc_in_thread(backend, result)
    assert gate.wait_reached(60)  # plan published, deletes held for 2 s
    with pytest.raises(errors.ConcurrentGcError, match="deleted 4 chunk"):
        _save(content, store_url, step=3)
    runner.join(60)
    assert result["r"].chunks_deleted == 4
    assert _names(store_url) == [layout.step_name(2)]
    assert ckptstore.Store(store_url).verify().ok
    _save(content, store_url, step=3)  # the gc is over: this one writes x again
    assert ckptstore.Store(store_url).verify().ok
    assert_same(content, ckptstore.load_full(store_url, step=3))


def test_commit_check_accepts_chunks_rewritten_after_the_gc_deleted_them(store_url, small_skew):
    content = _garbage_x(store_url)
    result: dict = {}
    backend, gate = _gated(store_url, layout.TRASH, release_after=2.0)  # chunks gone, gc not done
    runner = _gc_in_thread(backend, result)
    assert gate.wait_reached(60)
    info = _save(content, store_url, step=3)  # waits for the gc, finds x present
    runner.join(60)
    assert info.new_chunks == 4 and result["r"].chunks_deleted == 4
    assert ckptstore.Store(store_url).verify().ok
    assert_same(content, ckptstore.load_full(store_url, step=3))


def test_commit_check_gives_up_on_a_gc_that_does_not_finish(store_url, small_skew, monkeypatch):
    content = _garbage_x(store_url)
    monkeypatch.setenv("CKPTSTORE_GC_WAIT", "1")
    result: dict = {}
    backend, gate = _gated(store_url, layout.CHUNKS)
    runner = _gc_in_thread(backend, result)
    try:
        assert gate.wait_reached(60)
        with pytest.raises(errors.ConcurrentGcError, match="did not finish deleting"):
            _save(content, store_url, step=3)
    finally:
        gate.release()
    runner.join(60)
    assert _names(store_url) == [layout.step_name(2)]
    assert ckptstore.Store(store_url).verify().ok


def test_commit_waits_for_an_unpublished_plan_then_gives_up(local_url, small_skew, monkeypatch):
    _save(_state(1), local_url, step=1)
    gc_lock = leases.acquire_gc(Repository.open(local_url).backend)  # a gc, still planning
    try:
        monkeypatch.setenv("CKPTSTORE_GC_WAIT", "1")
        sleeps = _record_sleeps(monkeypatch)
        with pytest.raises(errors.ConcurrentGcError, match="did not publish"):
            _save(_state(2), local_url, step=2)
        assert sleeps  # it polled for the plan (up to CKPTSTORE_GC_WAIT), then gave up
    finally:
        gc_lock.release()
    assert _names(local_url) == [layout.step_name(1)]
    _save(_state(2), local_url, step=2)  # no gc now: commits at once


def test_expired_save_lease_does_not_commit(local_url, monkeypatch):
    """A save whose lease could not be renewed in time stops before the commit."""
    original = leases.Lease.acquire

    def stale(*args, **kwargs):
        lease = original(*args, **kwargs)
        lease._last_ok -= 10_000  # as if renewals had failed for hours
        return lease

    monkeypatch.setattr(leases.Lease, "acquire", stale)
    with pytest.raises(errors.LeaseExpiredError, match="could not be renewed"):
        _save(_state(1), local_url, step=1)
    monkeypatch.undo()
    repo = Repository.open(local_url)
    assert repo.names() == [] and repo.backend.list(layout.LEASES) == []


def test_save_lease_lives_during_the_save_only(local_url):
    faulty = FaultyBackend(open_backend(local_url))
    gate = faulty.pause("put", layout.CHECKPOINTS + "/*")  # hold the commit
    errors_seen: list[BaseException] = []

    def run() -> None:
        try:
            _save(_state(1), faulty, step=1)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors_seen.append(exc)

    saver = threading.Thread(target=run, daemon=True)
    saver.start()
    assert gate.wait_reached(60)
    held = Repository.open(local_url).backend.list(layout.LEASES)
    gate.release()
    saver.join(60)
    assert errors_seen == [] and _names(local_url) == [layout.step_name(1)]
    assert len(held) == 1 and held[0].startswith("leases/save-")
    assert Repository.open(local_url).backend.list(layout.LEASES) == []


def test_failed_save_releases_its_lease(faults):
    url = "faulty://lease"
    _save(_state(1), url, step=1)
    faults.set_plan(fail_put_after=0, put_match="*/chunks/*")
    with pytest.raises(errors.BackendError):
        _save(_state(2), url, step=2)
    faults.set_plan()
    assert Repository.open(url).backend.list(layout.LEASES) == []


# -- the gc lock and lease records -------------------------------------------------------------
def test_gc_lock_is_exclusive(local_url, monkeypatch):
    _save(_state(1), local_url, step=1)
    backend = Repository.open(local_url).backend
    first = leases.acquire_gc(backend)
    try:
        with pytest.raises(errors.GcBusyError, match="another gc"):
            leases.acquire_gc(backend)
        with pytest.raises(errors.GcBusyError):
            ckptstore.Store(local_url).gc(keep_last=1)
        with pytest.raises(errors.GcBusyError):
            ckptstore.Store(local_url).delete(step=1)
        sleeps = _record_sleeps(monkeypatch)
        with pytest.raises(errors.GcBusyError):
            leases.acquire_gc(backend, wait=1.0)
        assert sleeps  # it retried the lock before giving up, rather than failing at once
    finally:
        first.release()
    leases.acquire_gc(backend).release()
    assert backend.list(layout.LEASES) == []


def test_dead_gc_record_stops_blocking_once_expired(local_url):
    _save(_state(1), local_url, step=1)
    backend = Repository.open(local_url).backend
    dead = leases.Lease.acquire(backend, "gc", ttl=2, skew=0.1, renew=False)  # never renewed
    with pytest.raises(errors.GcBusyError):
        leases.acquire_gc(backend, skew=0.1)
    time.sleep(2.3)
    leases.acquire_gc(backend, skew=0.1).release()
    # the next gc tidies the dead record away
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPTSTORE_CLOCK_SKEW", "0")
        ckptstore.Store(local_url).gc(grace=0)
    assert not backend.exists(dead.key)


def test_gc_tidies_expired_save_leases(local_url):
    _save(_state(1), local_url, step=1)
    backend = Repository.open(local_url).backend
    stale = leases.Lease.acquire(backend, "save", checkpoint="x", ttl=2, skew=0.1, renew=False)
    live = leases.Lease.acquire(backend, "save", checkpoint="y")
    try:
        time.sleep(2.3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CKPTSTORE_CLOCK_SKEW", "0")
            report = ckptstore.Store(local_url).gc(grace=0)
        assert report.saves_in_flight == 1 and report.leases_cleaned >= 1
        assert not backend.exists(stale.key) and backend.exists(live.key)
    finally:
        live.release()


def test_lease_objects_are_plain_json(local_url):
    _save(_state(1), local_url, step=1)
    backend = Repository.open(local_url).backend
    lease = leases.Lease.acquire(backend, "save", checkpoint="step-000000000002")
    try:
        (info,) = leases.read_leases(backend)
        assert info.kind == "save" and info.checkpoint == "step-000000000002"
        assert info.expires - info.created == pytest.approx(backend.settings.lease_ttl, abs=1)
        lease.update()  # renewal rewrites it with a later expiry
        assert leases.read_leases(backend)[0].expires >= info.expires
        assert lease.valid()
    finally:
        lease.release()
    backend.put("leases/save-" + "0" * 32 + ".json", b"{not json")
    with pytest.raises(errors.LeaseError, match="cannot be read"):
        leases.read_leases(backend)


def test_plan_objects_roundtrip():
    keys = {bytes([i]) * 16 for i in range(5)}
    assert leases.decode_plan(leases.encode_plan(keys), "x") == keys
    data = bytearray(leases.encode_plan(keys))
    data[-1] ^= 1
    with pytest.raises(errors.LeaseError, match="corrupt"):
        leases.decode_plan(bytes(data), "x")


# -- gc that fails part-way --------------------------------------------------------------------
@pytest.mark.parametrize("after", [0, 3, 10])
def test_gc_failing_deletes_part_way_leaves_a_valid_store(store_url, after):
    frozen = _tensor(9, rows=128)
    states = {i: _state(i, frozen) for i in range(5)}
    for i, st in states.items():
        _save(st, store_url, step=i)
    faulty = FaultyBackend(open_backend(store_url))
    faulty.fail_deletes(layout.CHUNKS + "/*", after=after)
    with pytest.raises(errors.BackendError, match="injected delete failure"):
        ckptstore.Store(faulty).gc(keep_last=2, grace=0)
    assert _names(store_url) == [layout.step_name(3), layout.step_name(4)]
    assert ckptstore.Store(store_url).verify().ok
    for i in (3, 4):
        assert_same(states[i], ckptstore.load_full(store_url, step=i))
    # the failed run's record says "done": saves are not held up, the next gc finishes
    _save(_state(5, frozen), store_url, step=5)
    report = ckptstore.Store(store_url).gc(keep_last=2, grace=0)
    assert _chunks(store_url) == _referenced(store_url)
    assert report.chunks_deleted > 0 and ckptstore.Store(store_url).verify().ok
    assert Repository.open(store_url).backend.list(layout.LEASES) == []


def test_gc_failing_in_faulty_storage_deletes(faults):
    url = "faulty://gcfail"
    for i in range(4):
        _save(_state(i), url, step=i)
    faults.set_plan(fail_delete_after=2, delete_match="*/chunks/*")
    with pytest.raises(errors.BackendError, match="injected delete failure"):
        ckptstore.Store(url).gc(keep_last=1, grace=0)
    faults.set_plan()
    assert ckptstore.Store(url).verify().ok
    ckptstore.Store(url).gc(keep_last=1, grace=0)
    assert _chunks(url) == _referenced(url)


def test_gc_failing_while_dropping_keeps_the_checkpoint(store_url):
    for i in range(3):
        _save(_state(i), store_url, step=i)
    before = _chunks(store_url)
    faulty = FaultyBackend(open_backend(store_url))
    faulty.fail_puts(layout.TRASH + "/*")
    with pytest.raises(errors.BackendError, match="injected put failure"):
        ckptstore.Store(faulty).gc(keep_last=1, grace=0)
    assert len(_names(store_url)) == 3 and _chunks(store_url) == before
    assert ckptstore.Store(store_url).verify().ok


# -- keep_last in save -------------------------------------------------------------------------
def test_save_keep_last_applies_retention(local_url, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_GC_GRACE", "0")
    frozen = _tensor(3, rows=128)
    for i in range(5):
        info = _save(_state(i, frozen), local_url, step=i, keep_last=2)
        report = info.retention.result(timeout=60)
        assert report is not None
    assert _names(local_url) == [layout.step_name(3), layout.step_name(4)]
    assert _chunks(local_url) == _referenced(local_url)
    with pytest.raises(ValueError):
        _save(_state(9), local_url, step=9, keep_last=0)
    assert layout.step_name(9) not in _names(local_url)


def test_async_save_keep_last(local_url, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_GC_GRACE", "0")
    for i in range(4):
        info = ckptstore.async_save(_state(i), local_url, step=i, keep_last=1).result(60)
        info.retention.result(timeout=60)
    assert _names(local_url) == [layout.step_name(3)]
    assert ckptstore.Store(local_url).verify().ok


# -- the plan is what runs -----------------------------------------------------------------------
def _plan(url: str, **policy) -> gc_plan.GcPlan:
    return gc_plan.plan(Repository.open(url), Retention(**policy), grace=0)


def _keys(plan: gc_plan.GcPlan) -> set[str]:
    return {layout.chunk_key(k.hex()) for k in plan.chunk_keys}


def test_execute_runs_the_dry_run_plan(store_url):
    frozen = _tensor(7, rows=128)
    for i in range(6):
        _save(_state(i, frozen), store_url, step=i)
    shown = ckptstore.Store(store_url).gc(keep_last=2, grace=0, dry_run=True).plan
    assert len(shown.chunk_keys) == shown.chunks_freed == 4 * 4  # the dropped heads
    assert "chunk_keys" not in shown.to_dict()
    before = _chunks(store_url)
    report = gc_run.execute(Repository.open(store_url), shown)
    assert report.plan is shown and report.dropped == shown.dropped
    assert report.skipped == {} and report.new_checkpoints == []
    assert report.chunks_skipped == report.chunks_unplanned == 0
    assert before - _chunks(store_url) == _keys(shown)  # quiet store: exactly the plan
    assert report.chunks_deleted == shown.chunks_freed
    assert report.bytes_deleted == shown.bytes_freed
    assert _chunks(store_url) == _referenced(store_url)
    assert ckptstore.Store(store_url).verify().ok


def test_checkpoint_committed_after_the_plan_is_not_dropped(store_url):
    states = {i: _state(i) for i in range(4)}
    for i, st in states.items():
        _save(st, store_url, step=i)
    p = _plan(store_url, keep_last=2)
    assert p.dropped == [layout.step_name(0), layout.step_name(1)]
    # committed after the plan, and dedups against step 0, which the plan drops
    late = {"head": states[0]["head"], "bias": torch.full((8,), 4.0)}
    assert _save(late, store_url, step=4).new_chunks == 0
    report = gc_run.execute(Repository.open(store_url), p)
    assert report.dropped == p.dropped  # not step 2, which keep_last=2 would now drop
    assert report.new_checkpoints == [layout.step_name(4)] and report.skipped == {}
    assert report.chunks_skipped == 4 and report.chunks_deleted == 4  # step 0's head stays
    assert _names(store_url) == [layout.step_name(i) for i in (2, 3, 4)]
    assert ckptstore.Store(store_url).verify().ok
    assert_same(late, ckptstore.load_full(store_url, step=4))
    assert _chunks(store_url) == _referenced(store_url)
    # the next gc decides about the new state of the store
    again = ckptstore.Store(store_url).gc(keep_last=2, grace=0)
    assert again.dropped == [layout.step_name(2)]


def test_plan_executed_after_its_checkpoints_were_removed_or_replaced(store_url):
    for i in range(5):
        _save(_state(i), store_url, step=i)
    p = _plan(store_url, keep_last=2)
    assert p.dropped == [layout.step_name(i) for i in range(3)]
    store = ckptstore.Store(store_url)
    store.delete(step=0)
    store.delete(step=1)
    again = _state(11)
    _save(again, store_url, step=1)  # same name, another checkpoint
    report = gc_run.execute(Repository.open(store_url), p)
    assert report.dropped == [layout.step_name(2)]
    assert report.skipped == {
        layout.step_name(0): "gone: removed since the plan",
        layout.step_name(1): "replaced: removed and saved again since the plan",
    }
    assert report.new_checkpoints == [layout.step_name(1)]
    assert _names(store_url) == [layout.step_name(i) for i in (3, 4, 1)]  # commit order
    assert_same(again, ckptstore.load_full(store_url, step=1))
    assert ckptstore.Store(store_url).verify().ok
    # the old steps 0, 1, 2 had 4 chunks each, all planned; the new step 1's are referenced
    assert report.chunks_deleted == 12 and report.chunks_skipped == 0
    assert _chunks(store_url) == _referenced(store_url)


def test_plan_executed_after_a_kept_checkpoint_was_removed(store_url):
    for i in range(4):
        _save(_state(i), store_url, step=i)
    p = _plan(store_url, keep_last=2)
    assert p.dropped == [layout.step_name(0), layout.step_name(1)]
    three = _keys_of(store_url, 3)
    ckptstore.Store(store_url).delete(step=3)
    report = gc_run.execute(Repository.open(store_url), p)
    # keep_last=2 keeps step 1 now: the plan's drop of it no longer holds
    assert report.dropped == [layout.step_name(0)]
    assert report.skipped == {
        layout.step_name(1): "now kept (last 2): the checkpoints changed since the plan"
    }
    assert report.chunks_deleted == 4 and report.chunks_skipped == 4  # step 1's head stays
    assert report.chunks_unplanned == 4  # step 3's, garbage the plan did not name
    assert {layout.chunk_key(k.hex()) for k in three} <= _chunks(store_url)
    assert ckptstore.Store(store_url).verify().ok
    assert ckptstore.Store(store_url).gc(grace=0).chunks_deleted == 4  # the next gc


def test_plan_does_not_delete_chunks_a_save_begun_since_may_need(store_url, small_skew):
    _save({"x": _tensor(5)}, store_url, step=1)
    _save(_state(2), store_url, step=2)
    p = _plan(store_url, keep_last=1)
    assert p.dropped == [layout.step_name(1)] and len(p.chunk_keys) == 4
    time.sleep(1.2)  # the chunks are older than the save's lease by more than the skew
    state = {"x": _tensor(5), "zz_pause": _tensor(6)}  # dedups against step 1
    save = SaveThread(state, store_url, 3, PausingPlanner("zz_pause"))
    save.start()
    save.pause_point()
    report = gc_run.execute(Repository.open(store_url), p)
    assert report.dropped == [layout.step_name(1)] and report.chunks_deleted == 0
    assert report.chunks_skipped == 4 and report.held.by_saves >= 4 and report.trash_kept == 1
    save.finish()
    assert save.error is None
    assert ckptstore.Store(store_url).verify().ok
    assert_same(state, ckptstore.load_full(store_url, step=3))


def test_execute_checks_its_plan(local_url, tmp_path):
    _save(_state(1), local_url, step=1)
    _save(_state(2), local_url, step=2)
    repo = Repository.open(local_url)
    p = gc_plan.plan(repo, Retention(keep_last=1), grace=0)
    other = Repository.open(str(tmp_path / "other"), create=True)
    with pytest.raises(ValueError, match="plan is for"):
        gc_run.execute(other, p)
    with pytest.raises(TypeError, match="grace"):  # the grace is part of the plan
        gc_run.execute(repo, p, grace=0)  # type: ignore[call-arg]
    for not_a_plan in ("keep_last=1", Retention(keep_last=1), None):
        with pytest.raises(TypeError, match="GcPlan"):
            gc_run.execute(repo, not_a_plan)  # type: ignore[arg-type]
    assert _names(local_url) == [layout.step_name(1), layout.step_name(2)]
    assert repo.backend.list(layout.LEASES) == []


def test_collect_plans_under_the_lock(local_url):
    for i in range(3):
        _save(_state(i), local_url, step=i)
    report = gc_run.collect(Repository.open(local_url), Retention(keep_last=1), grace=0)
    assert report.dropped == report.plan.dropped == [layout.step_name(0), layout.step_name(1)]
    assert report.chunks_deleted == len(report.plan.chunk_keys) == 8
    assert _chunks(local_url) == _referenced(local_url)
    lock = leases.acquire_gc(Repository.open(local_url).backend)
    try:
        with pytest.raises(errors.GcBusyError):
            gc_run.collect(Repository.open(local_url), Retention(keep_last=1))
    finally:
        lock.release()


def test_retention_exit_hook_is_registered_by_the_first_retention_gc_not_by_imports(tmp_path):
    """Importing ckptstore (api, scheduler) registers no exit hook; the first retention gc
    registers it once, and the script's last save still applies its retention."""
    url = str(tmp_path / "s")
    code = f"""
import sys, threading, torch
import ckptstore, ckptstore.api, ckptstore.background

def ours():
    return [h for h in threading._threading_atexits
            if getattr(h, "func", h).__module__ == "ckptstore.background"]

if ours():
    sys.exit("registered at import")
for step in range(3):
    ckptstore.save({{"w": torch.full((8,), float(step))}}, {url!r}, step=step, keep_last=1)
if len(ours()) != 1:
    sys.exit(f"{{len(ours())}} hooks after three retention gcs")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [c.step for c in ckptstore.Store(url).list()] == [2]


def test_chunks_reused_from_storage_survive_a_gc_that_starts_after_the_commit_check(tmp_path):
    """A save reuses chunks a failed save left (no committed manifest names them, and they
    are older than any grace). A gc that starts after the save's commit check, before its
    manifest put, must not delete them: the save puts them again under its lease, so their
    modification time falls inside it (docs/format.md rule 7)."""
    url = str(tmp_path / "s")
    state = {"w": torch.randn(2048, 512)}
    faulty = FaultyBackend(open_backend(url))
    faulty.fail_puts("checkpoints/*", times=1)
    with pytest.raises(errors.CkptStoreError):
        ckptstore.save(state, faulty, step=1, chunk_bytes=1 << 20)
    faulty.clear()
    backend = Repository.open(url).backend
    old = time.time() - 3600
    orphans = backend.list(layout.CHUNKS)
    assert len(orphans) == 4
    for key in orphans:
        os.utime(backend.path(key), (old, old))
    reports = []
    faulty.on(
        "put",
        "checkpoints/*",
        lambda key: reports.append(ckptstore.Store(url).gc(grace=0)),
        times=1,
    )
    info = ckptstore.save(state, faulty, step=2, chunk_bytes=1 << 20)
    assert (info.chunks, info.new_chunks) == (4, 0)  # reused: they existed
    assert len(reports) == 1 and reports[0].chunks_deleted == 0
    assert ckptstore.Store(url).verify().ok
    assert torch.equal(ckptstore.load_full(url)["w"], state["w"])


def _record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds of every ``time.sleep`` from now on (still slept): a wait loop's polls,
    counted by the loop itself rather than by a clock that a busy box stretches."""
    sleeps: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        real(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return sleeps
