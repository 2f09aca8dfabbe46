"""Concurrency stress: saver processes and gc processes work on one store at once, for a
fixed number of rounds; after every round every checkpoint in the store must verify.

Savers save small checkpoints that share a frozen tensor, and whose "head" is either fresh,
a copy of a checkpoint that exists now (so the save dedups against a checkpoint that a gc
may be dropping at that moment: the dedup race), or a copy of one saved long ago (whose
chunks may be garbage a gc is deleting: the commit check's case). gc processes run
``gc --keep-last K --grace 0s`` with random K, half of the time as the CLI does (a plan,
a pause, then that plan executed: the store changes in between) and half of the time
planned under the lock (:func:`~ckptstore.store.gc_run.collect`). A save refused with
ConcurrentGcError is fine (it committed nothing); a checkpoint that does not verify is not,
nor a gc that drops or deletes more than its plan.

The test counts work, not time: each round every saver attempts SAVES_PER_ROUND saves and
every gc process GCS_PER_ROUND gc runs, whatever the speed of the machine; how much of that
overlaps depends on the machine, and the asserts do not. Safety is asserted after every
round and by a last gc on the quiet store, which must leave exactly the chunks of the
checkpoint it keeps. A quiet 2-core box runs a storage in about 10-25 s. A soak:
CKPTSTORE_STRESS_ROUNDS=100. CKPTSTORE_STRESS_REPORT=path.json appends the figures.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import threading
import time
from typing import Any

import pytest

SAVERS = 3
GCS = 2
SAVES_PER_ROUND = 6
"""Save attempts per saver per round."""
GCS_PER_ROUND = 4
"""gc attempts per gc process per round (a run, or GcBusyError)."""
CHUNK = 32 * 1024
BARRIER_S = 300  # a hang guard only: the first round waits for the workers' imports


def _rounds() -> int:
    return int(os.environ.get("CKPTSTORE_STRESS_ROUNDS", "4"))


def _env(s3: bool) -> dict[str, str]:
    return {
        "CKPTSTORE_CLOCK_SKEW": "2" if s3 else "1",  # S3 LastModified has 1 s resolution
        "CKPTSTORE_LEASE_TTL": "30",
        "CKPTSTORE_GC_WAIT": "30",
        "CKPTSTORE_THREADS": "2",
        "CKPTSTORE_FSYNC": "0",
    }


# -- workers (run in spawned processes) --------------------------------------------------------
def _head(seed: int):
    import torch

    return torch.randn(16, 1024, generator=torch.Generator().manual_seed(seed))  # 2 chunks


def _guarded(fn: Any) -> Any:
    """Any error in a worker breaks the barrier (so the test stops at once) and is sent."""

    def run(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
        try:
            fn(wid, url, opts, sync, out)
        except BaseException:  # noqa: BLE001 - reported to the test process
            import traceback

            out.put(("error", wid, traceback.format_exc()))
            sync["barrier"].abort()

    run.__name__ = run.__qualname__ = fn.__name__.lstrip("_")
    return run


def _rounds_of(sync: Any):
    """Yields once per round, between the round's start and end barriers."""
    while True:
        sync["barrier"].wait()
        if sync["stop"].value:
            return
        yield
        sync["barrier"].wait()


def _saver(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
    import torch

    import ckptstore
    from ckptstore.errors import CheckpointNotFoundError, ConcurrentGcError
    from ckptstore.store import Repository

    rng = random.Random(1000 + wid)
    delta = os.environ.get("STRESS_DELTA") == "1"
    frozen = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))  # 8 chunks
    stats = {"attempts": 0, "saved": 0, "refused": 0, "reused_existing": 0,
             "reused_then_dropped": 0, "resurrected": 0, "delta": 0}  # fmt: skip
    history: list[int] = []
    n = 0
    for _ in _rounds_of(sync):
        for _ in range(SAVES_PER_ROUND):
            n += 1
            stats["attempts"] += 1
            kind = rng.choice(["fresh", "reuse", "reuse", "old"])
            seed, source = rng.randrange(1 << 30), None
            if kind == "reuse":
                names = Repository.open(url, opts).names()
                if names:
                    source = rng.choice(names)
                    seed = int(source.rsplit("-s", 1)[1])
                    stats["reused_existing"] += 1
            elif kind == "old" and history:
                seed = rng.choice(history[: max(1, len(history) // 2)])
                stats["resurrected"] += 1
            name = f"w{wid}-n{n}-s{seed}"
            state = {"frozen": frozen, "head": _head(seed), "n": torch.tensor(n)}
            extra: dict[str, Any] = {}
            if delta:  # a few elements changed: the head is stored as a delta on its source
                state["head"][0, : 1 + n % 8] += n
                extra = {"delta": True, "parent": source}
            try:
                try:
                    ckptstore.save(
                        state, url, name=name, storage_options=opts, chunk_bytes=CHUNK, **extra
                    )
                except CheckpointNotFoundError:  # the named parent was dropped meanwhile
                    extra["parent"] = None
                    ckptstore.save(
                        state, url, name=name, storage_options=opts, chunk_bytes=CHUNK, **extra
                    )
            except ConcurrentGcError:
                stats["refused"] += 1
                continue
            stats["saved"] += 1
            history.append(seed)
            if delta and Repository.open(url, opts).manifest(name).max_chain:
                stats["delta"] += 1
            if source is not None and not Repository.open(url, opts).exists(source):
                stats["reused_then_dropped"] += 1
    out.put(("saver", wid, stats))


def _gcer(wid: int, url: str, opts: dict, sync: Any, out: Any) -> None:
    from ckptstore.errors import GcBusyError
    from ckptstore.store import Repository, gc_plan, gc_run
    from ckptstore.store.retention import Retention

    rng = random.Random(2000 + wid)
    stats = {"attempts": 0, "runs": 0, "busy": 0, "dropped": 0, "chunks_deleted": 0,
             "bytes_deleted": 0, "held_by_saves": 0, "trash_kept": 0, "plan_then_execute": 0,
             "drops_skipped": 0, "new_since_plan": 0, "chunks_skipped": 0}  # fmt: skip
    for _ in _rounds_of(sync):
        for _ in range(GCS_PER_ROUND):
            stats["attempts"] += 1
            retention = Retention(keep_last=rng.randint(1, 4))
            repo = Repository.open(url, opts)
            try:
                if rng.random() < 0.5:  # as the CLI: plan, show it, run that plan
                    plan = gc_plan.plan(repo, retention, grace=0)
                    time.sleep(rng.uniform(0.0, 0.2))
                    r = gc_run.execute(repo, plan)
                    stats["plan_then_execute"] += 1
                else:
                    r = gc_run.collect(repo, retention, grace=0)
            except GcBusyError:
                stats["busy"] += 1
            else:
                # never more than the plan: checkpoints, and chunks
                assert r.plan is not None
                assert set(r.dropped) <= set(r.plan.dropped), (r.dropped, r.plan.dropped)
                assert r.chunks_deleted <= len(r.plan.chunk_keys)
                assert not set(r.dropped) & set(r.new_checkpoints)
                stats["runs"] += 1
                stats["dropped"] += len(r.dropped)
                stats["chunks_deleted"] += r.chunks_deleted
                stats["bytes_deleted"] += r.bytes_deleted
                stats["held_by_saves"] += r.held.by_saves
                stats["trash_kept"] += r.trash_kept
                stats["drops_skipped"] += len(r.skipped)
                stats["new_since_plan"] += len(r.new_checkpoints)
                stats["chunks_skipped"] += r.chunks_skipped
            time.sleep(rng.uniform(0.0, 0.3))
    out.put(("gc", wid, stats))


saver = _guarded(_saver)
gcer = _guarded(_gcer)


# -- the test ------------------------------------------------------------------------------------
def _stress(url: str, opts: dict, s3: bool, monkeypatch) -> dict:
    import torch

    import ckptstore
    from ckptstore.store import Repository, gc_plan, gc_run, layout, reports
    from ckptstore.store.retention import Retention

    for k, v in _env(s3).items():
        monkeypatch.setenv(k, v)  # spawned workers inherit the environment
    rounds = _rounds()
    ctx = mp.get_context("spawn")
    sync = {"barrier": ctx.Barrier(SAVERS + GCS + 1), "stop": ctx.Value("b", 0)}
    out = ctx.Queue()
    ckptstore.save({"seed": torch.ones(4)}, url, name="seed-s1", storage_options=opts)
    procs = [ctx.Process(target=saver, args=(i, url, opts, sync, out)) for i in range(SAVERS)]
    procs += [ctx.Process(target=gcer, args=(i, url, opts, sync, out)) for i in range(GCS)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    done, verified, problems = 0, 0, []
    try:
        for _ in range(rounds):
            sync["barrier"].wait(timeout=BARRIER_S)  # round starts
            sync["barrier"].wait(timeout=BARRIER_S)  # round ends: nobody writes now
            done += 1
            repo = Repository.open(url, opts)
            report = reports.verify(repo)  # every committed checkpoint, every chunk it names
            verified += len(report.checkpoints)
            problems += report.problems
            assert report.ok, f"round {done}: {report.problems[:3]}"
            # every save gave its lease back (gc records may stay until a later gc)
            assert not [k for k in repo.backend.list(layout.LEASES) if "/save-" in k]
        sync["stop"].value = 1
        sync["barrier"].wait(timeout=BARRIER_S)
        results = [out.get(timeout=BARRIER_S) for _ in procs]
    except threading.BrokenBarrierError:
        errors = []
        while not out.empty():
            kind, wid, text = out.get()
            if kind == "error":
                errors.append(f"worker {wid}: {text}")
        raise AssertionError("a worker failed:\n" + "\n".join(errors)) from None
    finally:
        sync["stop"].value = 1
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert not [r for r in results if r[0] == "error"], results
    # with nothing running, one gc runs its plan exactly and frees everything the checkpoint
    # it keeps does not reference
    repo = Repository.open(url, opts)
    before_names = repo.names()
    before_chunks = set(repo.backend.list(layout.CHUNKS))
    plan = gc_plan.plan(repo, Retention(keep_last=1), grace=0)
    final = gc_run.execute(repo, plan)
    kept = repo.manifests()
    assert len(kept) == 1 and final.dropped == plan.dropped
    assert len(final.dropped) == len(before_names) - 1
    assert final.skipped == {} and final.new_checkpoints == [] and final.held.chunks == 0
    after_chunks = set(repo.backend.list(layout.CHUNKS))
    assert before_chunks - after_chunks == {layout.chunk_key(k.hex()) for k in plan.chunk_keys}
    assert {layout.chunk_digest(k) for k in after_chunks} == kept[0].chunk_keys()
    left = repo.backend.list(layout.TRASH) + repo.backend.list(layout.LEASES)
    # (SeaweedFS lists an emptied folder as a key of its own: "trash", "leases")
    assert [k for k in left if k not in (layout.TRASH, layout.LEASES)] == []
    assert reports.verify(repo).ok
    savers = [s for kind, _, s in results if kind == "saver"]
    gcs = [s for kind, _, s in results if kind == "gc"]

    def total(rows: list[dict], key: str) -> int:
        return sum(r[key] for r in rows)

    figures = {
        "storage": "s3" if s3 else "local",
        "seconds": round(time.monotonic() - t0, 1),
        "rounds_planned": rounds,
        "rounds": done,
        "processes": {"savers": SAVERS, "gc": GCS},
        "saves_attempted": total(savers, "attempts"),
        "saves_committed": total(savers, "saved"),
        "saves_refused": total(savers, "refused"),
        "saves_reusing_a_listed_checkpoint": total(savers, "reused_existing"),
        "of_which_source_dropped_before_commit": total(savers, "reused_then_dropped"),
        "saves_of_old_content": total(savers, "resurrected"),
        "saves_with_delta_chunks": total(savers, "delta"),
        "gc_attempts": total(gcs, "attempts"),
        "gc_runs": total(gcs, "runs"),
        "gc_busy": total(gcs, "busy"),
        "gc_plan_then_execute": total(gcs, "plan_then_execute"),
        "checkpoints_dropped": total(gcs, "dropped"),
        "planned_drops_skipped": total(gcs, "drops_skipped"),
        "checkpoints_new_since_plan": total(gcs, "new_since_plan"),
        "chunks_deleted": total(gcs, "chunks_deleted"),
        "planned_chunks_skipped": total(gcs, "chunks_skipped"),
        "bytes_deleted": total(gcs, "bytes_deleted"),
        "chunks_held_for_saves": total(gcs, "held_by_saves"),
        "checkpoints_verified": verified,
        "problems": len(problems),
        "final_gc_dropped": len(final.dropped),
        "final_gc_chunks_deleted": final.chunks_deleted,
    }
    print(json.dumps(figures))
    path = os.environ.get("CKPTSTORE_STRESS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return figures


def _check(f: dict) -> None:
    """Counts of work done, which do not depend on the machine's speed."""
    rounds = f["rounds_planned"]
    assert f["rounds"] == rounds
    assert f["saves_attempted"] == rounds * SAVERS * SAVES_PER_ROUND
    assert f["saves_committed"] + f["saves_refused"] == f["saves_attempted"]
    assert f["gc_attempts"] == rounds * GCS * GCS_PER_ROUND
    assert f["gc_runs"] + f["gc_busy"] == f["gc_attempts"]
    assert f["problems"] == 0
    assert f["checkpoints_verified"] >= rounds  # the latest is always kept


@pytest.mark.slow
def test_gc_beside_saves_local(tmp_path, monkeypatch):
    _check(_stress(str(tmp_path / "store"), {}, False, monkeypatch))


@pytest.mark.slow
def test_gc_beside_delta_saves_local(tmp_path, monkeypatch):
    """The same with delta saves: a save reusing a checkpoint stores its head as a delta
    on that checkpoint's chunks, which gc may be dropping meanwhile; every base a live
    checkpoint's chain names must stay (verify decodes every chain)."""
    monkeypatch.setenv("STRESS_DELTA", "1")
    figures = _stress(str(tmp_path / "store"), {}, False, monkeypatch)
    _check(figures)
    assert figures["saves_with_delta_chunks"] > 0


@pytest.mark.slow
def test_gc_beside_saves_s3(s3_url, s3_options, monkeypatch):
    _check(_stress(s3_url, s3_options, True, monkeypatch))
