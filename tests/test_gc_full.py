"""gc and leftovers: stale temporary files, a full disk (simulated with FaultyBackend's
capacity, and a real tmpfs where this machine lets the tests mount one), what gc holds back
and until when, and the CLI's account of it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid

import pytest
import torch

import ckptstore
from ckptstore import errors
from ckptstore.backend import open_backend
from ckptstore.store import Repository, gc_plan, layout, leases
from ckptstore.testing.faulty import FaultyBackend
from tests.helpers import assert_same, run_cli

CHUNK = 64 * 1024


def _state(seed: int, rows: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"head": torch.randn(rows, 1024, generator=g), "bias": torch.full((8,), float(seed))}


def _save(state: dict, url, step: int, **kw):
    return ckptstore.save(state, url, step=step, chunk_bytes=CHUNK, **kw)


def _chunks(backend) -> set[str]:
    return set(backend.list(layout.CHUNKS))


def _referenced(url) -> set[str]:
    keys: set[bytes] = set()
    for m in Repository.open(url).manifests():
        keys |= m.chunk_keys()
    return {layout.chunk_key(k.hex()) for k in keys}


def _temp_file(root: str, folder: str, nbytes: int = 100, age: float = 3600) -> str:
    path = os.path.join(root, folder, f".tmp-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * nbytes)
    _age(path, age)
    return path


def _age(path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _age_temp_files(backend, seconds: float = 120) -> int:
    """Make every temporary file ``seconds`` old, as a put killed that long ago left it."""
    temps = backend.list_temp("")
    for t in temps:
        _age(backend.path(t.key), seconds)
    return len(temps)


# -- stale temporary files ---------------------------------------------------------------------
def test_gc_deletes_stale_temp_files_in_every_folder(local_url):
    _save(_state(0), local_url, step=0)
    root = local_url
    old = [
        _temp_file(root, "chunks/ab", 1000),
        _temp_file(root, "checkpoints", 10),
        _temp_file(root, "leases", 10),
        _temp_file(root, "", 5),
        _temp_file(root, "catalog/step-000000000000", 0),
    ]
    young = _temp_file(root, "chunks/cd", 7, age=0)  # a put in progress, for all gc knows
    report = ckptstore.Store(local_url).gc(grace=0)
    assert report.temp_deleted == 5 and report.temp_bytes_deleted == 1025
    assert not any(os.path.exists(p) for p in old) and os.path.exists(young)
    # younger than max(grace, clock skew) stays, and the report says until when
    assert report.temp_held == 1 and report.temp_bytes_held == 7
    assert report.temp_held_until is not None
    assert time.time() < report.temp_held_until <= time.time() + 31
    # the grace applies too: a 2 h grace keeps a temp file an hour old
    hour_old = _temp_file(root, "chunks/ef", 3, age=3600)
    report = ckptstore.Store(local_url).gc(grace="2h")
    assert report.temp_deleted == 0 and os.path.exists(hour_old)
    assert report.temp_held_until == pytest.approx(time.time() + 3600, abs=60)
    assert ckptstore.Store(local_url).verify().ok


def test_plan_counts_temp_files_and_dry_run_keeps_them(local_url):
    _save(_state(0), local_url, step=0)
    path = _temp_file(local_url, "chunks/ab", 300)
    plan = gc_plan.plan(Repository.open(local_url), grace=0)
    assert plan.temp_files == 1 and plan.temp_bytes == 300
    ckptstore.Store(local_url).gc(grace=0, dry_run=True)
    assert os.path.exists(path)


def test_temp_files_of_a_save_in_flight_are_kept_whatever_the_grace(local_url, monkeypatch):
    """A save holds its lease from before its first put: a temp file written since the
    oldest live save lease began (minus the skew margin) is never deleted."""
    monkeypatch.setenv("CKPTSTORE_CLOCK_SKEW", "1")
    _save(_state(0), local_url, step=0)
    backend = open_backend(local_url)
    lease = leases.Lease.acquire(backend, "save", checkpoint="x", renew=False)
    try:
        time.sleep(1.2)  # older than the skew floor, but written under the live lease
        path = _temp_file(local_url, "chunks/ab", 50, age=0)
        report = ckptstore.Store(local_url).gc(grace=0)
        assert report.temp_deleted == 0 and report.temp_held == 1 and os.path.exists(path)
    finally:
        lease.release()
    _age(path, 5)  # the lease ended: the file is a leftover now
    assert ckptstore.Store(local_url).gc(grace=0).temp_deleted == 1
    assert not os.path.exists(path)


def test_memory_backend_has_no_temp_files_to_collect():
    url = f"memory://tmpless-{uuid.uuid4().hex[:8]}"
    _save(_state(0), url, step=0)
    assert not open_backend(url).capabilities.temp_files
    report = ckptstore.Store(url).gc(grace=0)
    assert report.temp_deleted == 0 and report.temp_held == 0


# -- what is held, and until when ------------------------------------------------------------
def test_report_says_what_is_held_why_and_until_when(local_url):
    for i in range(3):
        _save(_state(i), local_url, step=i)
    t_saved = time.time()
    report = ckptstore.Store(local_url).gc(keep_last=1, grace="1h")
    assert len(report.dropped) == 2 and report.chunks_deleted == 0
    assert report.held.chunks == report.held.by_grace == 8 and report.held.by_saves == 0
    assert report.held.bytes == report.held.bytes_by_grace > 0
    # the oldest held chunk goes an hour after it was written; the youngest an hour after it
    assert report.held.until is not None and report.held.all_until is not None
    assert t_saved + 3600 - 120 < report.held.until <= report.held.all_until <= t_saved + 3600 + 1
    d = report.to_dict()
    for k in ("held_by_grace", "bytes_held_by_grace", "held_until", "held_all_until",
              "held_by_saves", "bytes_held_by_saves", "temp_held", "unreadable"):  # fmt: skip
        assert k in d and k in d["plan"]
    assert d["plan"]["held_until"] == pytest.approx(report.held.until, abs=5)


def test_chunks_held_for_a_save_in_flight_are_reported_apart(local_url, monkeypatch):
    monkeypatch.setenv("CKPTSTORE_CLOCK_SKEW", "1")
    _save(_state(0), local_url, step=0)
    ckptstore.Store(local_url).delete(step=0)
    backend = open_backend(local_url)
    lease = leases.Lease.acquire(backend, "save", checkpoint="x", renew=False)
    try:  # the save may have read step 0's manifest before it went: its chunks stay
        report = ckptstore.Store(local_url).gc(grace=0)
    finally:
        lease.release()
    assert report.chunks_deleted == 0 and report.held.by_saves == 4 and report.held.by_grace == 0
    assert report.held.bytes_by_saves == report.held.bytes and report.saves_in_flight == 1
    assert report.held.until is None


def test_cli_says_what_is_held_and_until_when(local_url):
    for i in range(3):
        _save(_state(i), local_url, step=i)
    out = run_cli("gc", local_url, "--keep-last", "1").stdout
    assert "deleted 0 chunk(s)" in out
    assert "kept 8 unreferenced chunk(s)" in out
    assert "8 (" in out and "younger than the grace period (1h)" in out
    assert "a gc frees them from" in out and "--grace 0s" in out
    js = json.loads(run_cli("gc", local_url, "--json").stdout)
    res = js["result"]
    assert res["held_by_grace"] == 8 and res["held_until"] > time.time() + 3000
    assert js["plan"]["held_by_grace"] == 8 and js["plan"]["held_all_until"] >= res["held_until"]


def test_cli_plan_says_what_goes_now_before_what_goes_later(local_url):
    """The dry run leads with the checkpoints dropped now and the bytes a run frees now, then
    the bytes the grace period holds back and when a gc frees them, then the store's size."""
    for i in range(3):
        _save(_state(i), local_url, step=i)
    out = run_cli("gc", local_url, "--keep-last", "1", "--dry-run").stdout
    lines = [line.strip() for line in out.splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith("drop now:"))
    summary = lines[first:]
    assert summary[0] == "drop now: 2 checkpoint(s) (keep 1)"
    assert summary[1].startswith("free now: ")
    assert "0 chunk(s) (0 B) and 2 manifest(s)" in summary[1]
    assert summary[2].startswith("free later: ")
    assert summary[2].endswith("8 unreferenced chunk(s) held back:")
    assert "younger than the grace period (1h): a gc frees them from" in summary[3]
    assert summary[4].startswith("stored now: ")
    assert summary[5:] == ["dry run: nothing was deleted"]
    # with no grace, all of it goes now and nothing is held back
    out = run_cli("gc", local_url, "--keep-last", "1", "--grace", "0s", "--dry-run").stdout
    assert "free now: " in out and "8 chunk(s)" in out and "free later" not in out


# -- unreadable manifests in the CLI -------------------------------------------------------------
def test_cli_gc_with_an_unreadable_manifest(local_url):
    for i in range(4):
        _save(_state(i), local_url, step=i)
    backend = open_backend(local_url)
    with open(backend.path(layout.manifest_key(layout.step_name(1))), "r+b") as f:
        f.truncate(30)
    before = _chunks(backend)
    proc = run_cli("gc", local_url, "--keep-last", "1", "--grace", "0s", check=False)
    assert proc.returncode == 4
    assert f"checkpoint '{layout.step_name(1)}' unreadable" in proc.stderr
    assert "deleted no chunk" in proc.stdout and "ckptstore rm --name" in proc.stdout
    assert _chunks(backend) == before
    # the policy's drops happened: the readable ones but the latest are gone
    assert sorted(Repository.open(local_url).names()) == [layout.step_name(1), layout.step_name(3)]
    proc = run_cli("gc", local_url, "--grace", "0s", "--json", check=False)
    assert proc.returncode == 4
    res = json.loads(proc.stdout)["result"]
    assert list(res["unreadable"]) == [layout.step_name(1)] and res["chunks_deleted"] == 0
    assert res["chunks_blocked"] == 12
    proc = run_cli("gc", local_url, "--dry-run", check=False)
    assert proc.returncode == 4 and "unreadable" in proc.stderr


# -- a full disk, simulated ----------------------------------------------------------------------
def _fill_with_failed_saves(faulty, url, first_step: int = 1) -> int:
    failures = 0
    for i in range(first_step, first_step + 6):
        try:
            _save(_state(i), faulty, step=i)
        except errors.StorageFullError:
            failures += 1
    return failures


def test_gc_recovers_a_full_disk_without_manual_deletion(local_url):
    faulty = FaultyBackend(open_backend(local_url))
    kept = _state(0)
    _save(kept, faulty, step=0)
    faulty.capacity(faulty.used_bytes() + 500_000, leave_temp=True)  # room for ~1.5 saves
    assert _fill_with_failed_saves(faulty, local_url) >= 4
    assert faulty.full_puts > 0 and faulty.list_temp("")  # leftovers: temp files and chunks
    orphans = _chunks(faulty) - _referenced(local_url)
    assert orphans
    with pytest.raises(errors.StorageFullError):  # not even a tiny save goes through
        ckptstore.save({"t": torch.ones(3)}, faulty, step=100)
    # the temp files of puts killed a while ago; gc needs no hand
    _age_temp_files(faulty)
    report = ckptstore.Store(faulty).gc(grace=0)
    assert report.temp_deleted > 0 and faulty.list_temp("") == []
    assert report.chunks_deleted == len(orphans) and report.chunks_deferred == 0
    assert _chunks(faulty) == _referenced(local_url)
    # saves work again, on the same small disk
    ckptstore.save({"t": torch.ones(3)}, faulty, step=100)
    ckptstore.Store(faulty).gc(keep_last=1, grace=0)  # and with room made, big ones too
    _save(_state(50), faulty, step=50)
    assert ckptstore.Store(local_url).verify().ok
    assert_same(_state(50), ckptstore.load_full(local_url, step=50))
    del kept


def test_a_disk_too_full_for_the_gc_record_says_what_to_do(local_url):
    faulty = FaultyBackend(open_backend(local_url))
    _save(_state(0), faulty, step=0)
    faulty.capacity(faulty.used_bytes() + 300_000, leave_temp=True)
    _fill_with_failed_saves(faulty, local_url)
    _age_temp_files(faulty)
    temp_bytes = sum(t.size for t in faulty.list_temp(""))
    # the orphan chunks alone fill the disk: deleting the temp files frees no room
    faulty.capacity(faulty.used_bytes() - temp_bytes)
    chunks = _chunks(faulty)
    with pytest.raises(errors.StorageFullError) as info:
        ckptstore.Store(faulty).gc(grace=0)
    msg = str(info.value)
    assert "gc could not write its lock record" in msg
    assert "Free a few KiB" in msg and "ckptstore gc --grace 0s" in msg
    assert _chunks(faulty) == chunks and faulty.list_temp("") == []  # temp files went
    assert faulty.list(layout.LEASES) == []
    # a little room (the user freed a file elsewhere): gc does the rest
    faulty.capacity(faulty.used_bytes() + 4096)
    report = ckptstore.Store(faulty).gc(grace=0)
    assert report.chunks_deleted > 0 and _chunks(faulty) == _referenced(local_url)
    ckptstore.save({"t": torch.ones(3)}, faulty, step=100)
    assert ckptstore.Store(local_url).verify().ok


def test_no_room_for_the_whole_list_publishes_the_largest_chunks_then_the_rest(local_url):
    for i in range(3):
        _save(_state(i, rows=64 + 16 * i), local_url, step=i)
    faulty = FaultyBackend(open_backend(local_url))
    sizes = {i.key: i.size for i in faulty.list_info(layout.CHUNKS)}
    full = faulty.storage_full(layout.LEASES + "/gc-*.plan", times=1)  # the whole list
    plans: list[set[bytes]] = []
    faulty.on(
        "delete",
        layout.CHUNKS + "/*",
        lambda key: plans.append(leases.read_plan(faulty, _own_record(faulty))),
        times=1,
    )
    report = ckptstore.Store(faulty).gc(keep_last=1, grace=0)
    assert full.fired == 1 and report.passes == 2 and report.chunks_deferred == 0
    assert len(report.dropped) == 2 and report.chunks_deleted == 4 + 5  # steps 0 and 1
    assert _chunks(faulty) == _referenced(local_url)
    # the first, shorter list named only the largest chunks
    (first,) = plans
    freed = [k for k in sizes if k not in _chunks(faulty)]
    largest = sorted(freed, key=lambda k: -sizes[k])[: len(first)]
    assert {layout.chunk_digest(k) for k in largest} == first
    assert faulty.list(layout.LEASES) == []
    assert ckptstore.Store(local_url).verify().ok


def _own_record(backend) -> leases.LeaseInfo:
    (record,) = [x for x in leases.read_leases(backend) if x.kind == "gc" and x.plan]
    return record


def test_no_room_for_any_list_fails_clearly_and_deletes_nothing(local_url):
    for i in range(3):
        _save(_state(i), local_url, step=i)
    ckptstore.Store(local_url).delete(step=0)
    faulty = FaultyBackend(open_backend(local_url))
    faulty.storage_full(layout.LEASES + "/gc-*.plan")
    chunks = _chunks(faulty)
    with pytest.raises(errors.StorageFullError, match="publish the list of chunks it deletes"):
        ckptstore.Store(faulty).gc(grace=0)
    assert _chunks(faulty) == chunks and faulty.list(layout.LEASES) == []
    faulty.clear()
    assert ckptstore.Store(faulty).gc(grace=0).chunks_deleted == 4


def test_no_room_for_the_trash_drops_after_freeing_chunks(local_url):
    for i in range(4):
        _save(_state(i), local_url, step=i)
    ckptstore.Store(local_url).delete(step=0)  # garbage whose deletion makes room
    faulty = FaultyBackend(open_backend(local_url))
    faulty.storage_full(layout.TRASH + "/*", times=1)
    report = ckptstore.Store(faulty).gc(keep_last=1, grace=0)
    assert report.passes == 2 and report.skipped == {}
    assert report.dropped == [layout.step_name(1), layout.step_name(2)]
    assert report.chunks_deleted == 12 and _chunks(faulty) == _referenced(local_url)
    assert ckptstore.Store(local_url).verify().ok


def test_lease_update_that_fails_is_undone(local_url):
    _save(_state(0), local_url, step=0)
    faulty = FaultyBackend(open_backend(local_url))
    lock = leases.acquire_gc(faulty)
    try:
        faulty.storage_full(layout.LEASES + "/*")
        with pytest.raises(errors.StorageFullError):
            lock.update(state="planned", plan={"key": "x", "chunks": 1, "bytes": 1})
        assert lock.info.state == "running" and lock.info.plan is None
    finally:
        faulty.clear()
        lock.release()


# -- a full disk, for real (tmpfs) ---------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs, where this machine lets the tests mount one (root, no container
    restriction); else the test is skipped (the simulated tests above cover the logic)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: str) -> int:
    """Write ``path`` until the disk is full, as a put killed mid-write leaves its temp."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                written += os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    break
                raise
    finally:
        os.close(fd)
    return written


def test_gc_recovers_a_real_full_tmpfs(small_disk):
    url = os.path.join(small_disk, "store")
    kept = _state(0, rows=256)  # 1 MiB of random floats
    _save(kept, url, step=0)
    failed = 0
    for i in range(1, 14):
        try:
            _save(_state(i, rows=256), url, step=i)
        except errors.StorageFullError:
            failed += 1
    assert failed >= 1
    backend = open_backend(url)
    assert backend.list_temp("") == []  # a failed put removes its temp file
    # a save killed mid-put leaves one, here as big as the disk has room
    leftover = os.path.join(url, "chunks", "00", f".tmp-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(leftover), exist_ok=True)
    assert _fill(leftover) >= 0
    _age(leftover, 120)
    with pytest.raises(errors.StorageFullError):
        ckptstore.save({"t": torch.ones(3)}, url, step=100)
    proc = run_cli("gc", url, "--grace", "0s")
    assert "gc done" in proc.stdout and "stale temporary file(s)" in proc.stdout
    assert not os.path.exists(leftover)
    assert set(backend.list(layout.CHUNKS)) == _referenced(url)
    ckptstore.save({"t": torch.ones(3)}, url, step=100)  # saves work again
    run_cli("gc", url, "--keep-last", "2", "--grace", "0s")  # and with room made, big ones
    _save(_state(70, rows=256), url, step=70)
    assert ckptstore.Store(url).verify().ok
    assert_same(_state(70, rows=256), ckptstore.load_full(url, step=70))
    del kept
